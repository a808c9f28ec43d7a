#!/usr/bin/env bash
# Installs the real peers that eval-proxy's integration tests drive: Debian's
# Chromium, Debian's HAProxy (a PROXY protocol load balancer in front of the
# proxy, tests/hostile.rs), OpenSSL (`s_client` and the RSA test key of
# tests/tls.rs), Python `websockets`, Node `ws` (tests/clients)
# and the Autobahn testsuite's wstest (a CPython 2.7 virtualenv at
# $AUTOBAHN_VENV).
#
# Runs as root on Debian 12 and reaches only Debian's, PyPI's and npm's
# registries. Every step checks first and is skipped when already done, so a
# re-run costs about a second. Prints one line per step it performs, nothing
# when all is in place, and a step's full output only when that step fails.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON3=${PYTHON3:-python3}
PYTHON27=${PYTHON27:-/root/.pyenv/versions/2.7.18/bin/python}
AUTOBAHN_VENV=${AUTOBAHN_VENV:-/opt/eval-autobahn}

APT_PACKAGES=(chromium gcc haproxy openssl prometheus)
WEBSOCKETS_VERSION=17.4
# The last virtualenv that is one self-contained module on Python 2.7; its
# --no-download seed (pip 20.3.4, setuptools 44.1.1) fetches nothing.
VIRTUALENV_VERSION=16.7.12

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

say() { echo "install-deps: $*" >&2; }

quietly() {
    if ! "$@" >"$LOG" 2>&1; then
        say "FAILED: $*"
        cat "$LOG" >&2
        exit 1
    fi
}

apt_missing() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            echo "$pkg"
        fi
    done
}

install_apt() {
    local missing
    mapfile -t missing < <(apt_missing)
    [ "${#missing[@]}" -eq 0 ] && return
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The tests need these packages' binaries, not their services: Debian's
    # prometheus would start on :9090 (the proxy's default admin port) and
    # haproxy on its packaged config. policy-rc.d exit 101 is Debian's way
    # to say "start no daemon" during an install (invoke-rc.d honours it).
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    quietly apt-get update
    quietly apt-get install -y --no-install-recommends "${missing[@]}"
    [ "$own_policy" = 1 ] && rm -f "$policy"
    return 0
}

install_websockets() {
    if "$PYTHON3" -c "import sys, websockets; sys.exit(websockets.__version__ != '$WEBSOCKETS_VERSION')" 2>/dev/null; then
        return
    fi
    say "pip install websockets==$WEBSOCKETS_VERSION"
    quietly "$PYTHON3" -m pip install --disable-pip-version-check --root-user-action=ignore \
        "websockets==$WEBSOCKETS_VERSION"
}

install_node_clients() {
    local dir="$ROOT/tests/clients" want have
    want=$(node -p "require('$dir/package-lock.json').packages['node_modules/ws'].version")
    have=$(node -p "try { require('$dir/node_modules/ws/package.json').version } catch (e) { '' }")
    [ "$want" = "$have" ] && return
    say "npm ci in tests/clients (ws $want)"
    quietly npm ci --prefix "$dir" --no-audit --no-fund
}

install_autobahn() {
    local req="$ROOT/tests/autobahn/requirements-wstest.txt"
    # The stamp is the requirements file the venv was built from: a change of
    # pins rebuilds it, an unchanged one skips the step.
    local stamp="$AUTOBAHN_VENV/.eval-requirements.txt"
    if [ -x "$AUTOBAHN_VENV/bin/wstest" ] && cmp -s "$req" "$stamp"; then
        return
    fi
    if [ ! -x "$PYTHON27" ]; then
        say "FAILED: $PYTHON27 not found (pyenv's CPython 2.7.18 runs wstest)"
        exit 1
    fi
    say "autobahntestsuite into $AUTOBAHN_VENV"
    if ! "$PYTHON27" -m virtualenv --version >/dev/null 2>&1; then
        quietly "$PYTHON27" -m pip install --disable-pip-version-check --no-warn-script-location \
            "virtualenv==$VIRTUALENV_VERSION"
    fi
    rm -rf "$AUTOBAHN_VENV"
    quietly "$PYTHON27" -m virtualenv --no-download "$AUTOBAHN_VENV"
    quietly "$AUTOBAHN_VENV/bin/pip" install --disable-pip-version-check -r "$req"
    quietly env PYTHONWARNINGS=ignore "$AUTOBAHN_VENV/bin/wstest" --autobahnversion
    cp "$req" "$stamp"
}

install_apt
install_websockets
install_node_clients
install_autobahn
