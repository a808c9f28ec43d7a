#!/usr/bin/env bash
# Installs the real peers that eval-proxy's integration tests drive: Debian's
# Chromium, Debian's HAProxy (a PROXY protocol load balancer in front of the
# proxy, tests/hostile.rs), OpenSSL (`s_client` and the RSA test key of
# tests/tls.rs), Python `websockets`, Node `ws` (tests/clients)
# and the Autobahn testsuite's wstest (a CPython 2.7 virtualenv at
# $AUTOBAHN_VENV).
#
# Runs as root on Debian 12, a stock install as well as this project's machine
# image, and reaches only Debian's, PyPI's and npm's registries. Every step
# checks first and is skipped when already done, so a re-run costs about a
# second. Prints one line per step it performs, nothing when all is in place,
# and a step's full output only when that step fails. apt starts no daemon.
#
# Where each piece comes from:
# - Node: the `node` and `npm` on PATH; Debian's `nodejs` (18) and `npm` when
#   either is missing. `ws` is installed from tests/clients/package-lock.json.
# - Python 3 `websockets` (pinned): the tests run `python3` from PATH. When
#   there is no $PY_VENV and that python3 already has websockets at the pin
#   (an image whose python3 takes `pip install`), nothing is installed.
#   Otherwise, as on a stock Debian 12 whose python3 refuses `pip install`
#   (PEP 668, "externally managed"), websockets goes into a venv at $PY_VENV
#   (default /opt/eval-py; Debian's python3-venv), and tests/run-all.sh puts
#   $PY_VENV/bin first on PATH whenever that venv exists. To run a test or
#   tests/autobahn/full.sh by hand there: PATH=/opt/eval-py/bin:$PATH.
# - Python 2.7 for wstest: $PYTHON27, by default pyenv's CPython 2.7.18 when
#   the image has it, else Debian bullseye's python2.7 (Debian 12 has none):
#   a bullseye apt source is added (sources.list.d/eval-bullseye.sources),
#   pinned (preferences.d/eval-bullseye) so that only python2.7 and the
#   bullseye libraries it needs can come from it. virtualenv is fetched with
#   python3's pip and run by python2.7, which needs no pip of its own.
#   $BULLSEYE_MIRROR and $BULLSEYE_SECURITY_MIRROR override the mirrors (e.g.
#   http://archive.debian.org/debian once bullseye leaves deb.debian.org).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON3=${PYTHON3:-python3}
PY_VENV=${PY_VENV:-/opt/eval-py}
PYENV_PYTHON27=/root/.pyenv/versions/2.7.18/bin/python
DEBIAN_PYTHON27=/usr/bin/python2.7
if [ -z "${PYTHON27:-}" ]; then
    PYTHON27=$PYENV_PYTHON27
    [ -x "$PYTHON27" ] || PYTHON27=$DEBIAN_PYTHON27
fi
AUTOBAHN_VENV=${AUTOBAHN_VENV:-/opt/eval-autobahn}
BULLSEYE_MIRROR=${BULLSEYE_MIRROR:-http://deb.debian.org/debian}
BULLSEYE_SECURITY_MIRROR=${BULLSEYE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# libc6-dev: gcc (the linker cargo calls, the compiler of wstest's C
# extensions) only recommends it, and --no-install-recommends skips it.
# ca-certificates: the trust store for HTTPS to PyPI and npm (a minimal
# Debian 12 has none).
APT_PACKAGES=(ca-certificates chromium gcc libc6-dev haproxy openssl prometheus)
WEBSOCKETS_VERSION=17.4
# The last virtualenv that is one self-contained module on Python 2.7; its
# --no-download seed (pip 20.3.4, setuptools 44.1.1) fetches nothing.
VIRTUALENV_VERSION=16.7.12
# What python2.7-dev (Python.h for Twisted's, wsaccel's and ujson's C
# extensions) pulls from bullseye on a Debian 12; everything else comes from
# bookworm. apt-get refuses, naming the package, if bullseye ever needs more.
BULLSEYE_PACKAGES=(python2.7 python2.7-minimal python2.7-dev libpython2.7 libpython2.7-minimal
    libpython2.7-stdlib libpython2.7-dev libffi7 libssl1.1 mime-support)

WORK=$(mktemp -d)
OWN_POLICY=
cleanup() {
    rm -rf "$WORK"
    if [ -n "$OWN_POLICY" ]; then rm -f "$OWN_POLICY"; fi
}
trap cleanup EXIT
LOG=$WORK/log

say() { echo "install-deps: $*" >&2; }

quietly() {
    if ! "$@" >"$LOG" 2>&1; then
        say "FAILED: $*"
        cat "$LOG" >&2
        exit 1
    fi
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

has_websockets() {
    "$1" -c "import sys, websockets; sys.exit(websockets.__version__ != '$WEBSOCKETS_VERSION')" 2>/dev/null
}

# The python3 the tests get (see the header), and the one whose pip fetches
# virtualenv for Python 2.7.
test_python3() {
    if [ -e "$PY_VENV" ]; then echo "$PY_VENV/bin/python3"; else echo "$PYTHON3"; fi
}

autobahn_ready() {
    # The stamp is the requirements file the venv was built from: a change of
    # pins rebuilds it, an unchanged one skips the step.
    [ -x "$AUTOBAHN_VENV/bin/wstest" ] &&
        cmp -s "$ROOT/tests/autobahn/requirements-wstest.txt" "$AUTOBAHN_VENV/.eval-requirements.txt"
}

# Python 2.7 from bullseye needs the source and its pin before `apt-get update`.
add_bullseye_source() {
    local sources=/etc/apt/sources.list.d/eval-bullseye.sources
    local prefs=/etc/apt/preferences.d/eval-bullseye
    [ -e "$sources" ] && [ -e "$prefs" ] && return
    say "apt source: bullseye, pinned to python2.7"
    {
        echo "# .ci/install-deps.sh: CPython 2.7 for the Autobahn testsuite's wstest"
        echo "# (Debian 12 has none). $prefs lets only python2.7 come from here."
        echo "Types: deb"
        echo "URIs: $BULLSEYE_MIRROR"
        echo "Suites: bullseye"
        echo "Components: main"
        echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
        echo
        echo "Types: deb"
        echo "URIs: $BULLSEYE_SECURITY_MIRROR"
        echo "Suites: bullseye-security"
        echo "Components: main"
        echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    } >"$sources"
    # Packages named here may come from bullseye (500: as from any suite);
    # every other bullseye package never does (-1), even when bookworm lacks it.
    {
        echo "Package: ${BULLSEYE_PACKAGES[*]}"
        echo "Pin: release n=bullseye"
        echo "Pin-Priority: 500"
        echo
        echo "Package: ${BULLSEYE_PACKAGES[*]}"
        echo "Pin: release n=bullseye-security"
        echo "Pin-Priority: 500"
        echo
        echo "Package: *"
        echo "Pin: release n=bullseye"
        echo "Pin-Priority: -1"
        echo
        echo "Package: *"
        echo "Pin: release n=bullseye-security"
        echo "Pin-Priority: -1"
    } >"$prefs"
}

install_apt() {
    local wanted=("${APT_PACKAGES[@]}") missing=() pkg
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        wanted+=(nodejs npm)
    fi
    if ! has_websockets "$(test_python3)"; then
        wanted+=(python3 python3-venv)
    fi
    if ! autobahn_ready && [ ! -x "$PYTHON27" ] && [ "$PYTHON27" = "$DEBIAN_PYTHON27" ]; then
        wanted+=(python2.7 python2.7-dev)
    fi
    for pkg in "${wanted[@]}"; do
        installed "$pkg" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return
    case " ${missing[*]} " in *" python2.7 "*) add_bullseye_source ;; esac
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The tests need these packages' binaries, not their services: Debian's
    # prometheus would start on :9090 (the proxy's default admin port) and
    # haproxy on its packaged config. policy-rc.d exit 101 is Debian's way
    # to say "start no daemon" during an install (invoke-rc.d honours it).
    local policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        OWN_POLICY=$policy
    fi
    quietly apt-get update
    quietly apt-get install -y --no-install-recommends "${missing[@]}"
    if [ -n "$OWN_POLICY" ]; then
        rm -f "$OWN_POLICY"
        OWN_POLICY=
    fi
}

install_websockets() {
    has_websockets "$(test_python3)" && return
    say "websockets==$WEBSOCKETS_VERSION into a venv at $PY_VENV"
    rm -rf "$PY_VENV"
    quietly "$PYTHON3" -m venv "$PY_VENV"
    quietly "$PY_VENV/bin/python3" -m pip install --disable-pip-version-check \
        "websockets==$WEBSOCKETS_VERSION"
    if ! has_websockets "$PY_VENV/bin/python3"; then
        say "FAILED: $PY_VENV/bin/python3 does not import websockets $WEBSOCKETS_VERSION"
        exit 1
    fi
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
    autobahn_ready && return
    if [ ! -x "$PYTHON27" ]; then
        say "FAILED: $PYTHON27 not found (CPython 2.7 runs wstest)"
        exit 1
    fi
    say "autobahntestsuite into $AUTOBAHN_VENV ($PYTHON27)"
    local seed="$WORK/virtualenv"
    quietly "$(test_python3)" -m pip download --disable-pip-version-check --no-deps \
        --only-binary=:all: --dest "$WORK" "virtualenv==$VIRTUALENV_VERSION"
    quietly "$(test_python3)" -m zipfile -e "$WORK/virtualenv-$VIRTUALENV_VERSION-py2.py3-none-any.whl" "$seed"
    rm -rf "$AUTOBAHN_VENV"
    quietly "$PYTHON27" "$seed/virtualenv.py" --no-download "$AUTOBAHN_VENV"
    quietly "$AUTOBAHN_VENV/bin/pip" install --disable-pip-version-check \
        -r "$ROOT/tests/autobahn/requirements-wstest.txt"
    quietly env PYTHONWARNINGS=ignore "$AUTOBAHN_VENV/bin/wstest" --autobahnversion
    cp "$ROOT/tests/autobahn/requirements-wstest.txt" "$AUTOBAHN_VENV/.eval-requirements.txt"
}

install_apt
install_websockets
install_node_clients
install_autobahn
