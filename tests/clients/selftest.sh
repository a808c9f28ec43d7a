#!/usr/bin/env bash
# Checks the real-client scripts, and optionally the Autobahn runner and
# comparator, against the plain echo server (tests/autobahn/echo_server.py),
# so a broken client is told apart from a broken proxy.
#
# Usage: selftest.sh [--autobahn]
#   --autobahn  also run the quick Autobahn set twice direct (about 35 s) and
#               compare the two runs with compare.py --non-strict-is-ok
#
# Prints a line per failed check and a closing "N passed, N failed" line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
autobahn_dir="$here/../autobahn"
work=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

passed=0
failed=0

# start_server SCRIPT ARGS...: starts a server script and sets $port from
# its readiness line.
start_server() {
    local fd line
    exec {fd}< <(exec python3 "$@")
    pids+=("$!")
    if ! read -r -t 20 -u "$fd" line || [[ $line != "listening "* ]]; then
        echo "selftest: $* did not get ready" >&2
        exit 1
    fi
    exec {fd}<&-
    port=${line#listening }
}

# check NAME WANT_EXIT COMMAND...: WANT_EXIT is 0, or "fail" for non-zero.
check() {
    local name=$1 want=$2 rc=0
    shift 2
    "$@" >"$work/out" 2>"$work/err" || rc=$?
    if { [ "$want" = 0 ] && [ "$rc" = 0 ]; } || { [ "$want" = fail ] && [ "$rc" = 1 ] && [ -s "$work/err" ]; }; then
        passed=$((passed + 1))
        cp "$work/out" "$work/last-out"
    else
        failed=$((failed + 1))
        echo "FAIL $name: exit $rc, wanted $want; stderr: $(head -c 500 "$work/err")" >&2
    fi
}

start_server "$autobahn_dir/echo_server.py"
echo_url="ws://127.0.0.1:$port/wsv2/selftest-token"
start_server "$autobahn_dir/echo_server.py" --close-code 1008 --close-reason "stage=token;reason=expired"
reject_url="ws://127.0.0.1:$port/wsv2/selftest-token"
start_server "$here/bad_server.py" corrupt
corrupt_url="ws://127.0.0.1:$port/"
start_server "$here/bad_server.py" drop
drop_url="ws://127.0.0.1:$port/"

check "py echo" 0 python3 "$here/py_client.py" "$echo_url"
check "py expect-close" 0 python3 "$here/py_client.py" --expect-close 1008 "$reject_url"
if [ "$(cat "$work/last-out")" != "stage=token;reason=expired" ]; then
    failed=$((failed + 1))
    echo "FAIL py expect-close printed $(cat "$work/last-out"), wanted the close reason" >&2
fi
check "py expect-close, wrong code" fail python3 "$here/py_client.py" --expect-close 1011 "$reject_url"
check "py expect-close, no close" fail python3 "$here/py_client.py" --timeout 2 --expect-close 1008 "$echo_url"
check "py echo, server rejects" fail python3 "$here/py_client.py" "$reject_url"
check "py echo, corrupted" fail python3 "$here/py_client.py" "$corrupt_url"
check "py echo, dropped" fail python3 "$here/py_client.py" "$drop_url"

check "node echo" 0 node "$here/node_client.js" "$echo_url"
check "node expect-close" 0 node "$here/node_client.js" --expect-close 1008 "$reject_url"
check "node expect-close, wrong code" fail node "$here/node_client.js" --expect-close 1011 "$reject_url"
check "node echo, server rejects" fail node "$here/node_client.js" "$reject_url"
check "node echo, corrupted" fail node "$here/node_client.js" "$corrupt_url"
check "node echo, dropped" fail node "$here/node_client.js" "$drop_url"

check "chromium echo" 0 python3 "$here/chromium_check.py" "$echo_url"
check "chromium, server rejects" fail python3 "$here/chromium_check.py" "$reject_url"
check "chromium, corrupted" fail python3 "$here/chromium_check.py" "$corrupt_url"
check "chromium, dropped" fail python3 "$here/chromium_check.py" "$drop_url"

if [ "${1:-}" = --autobahn ]; then
    check "autobahn run 1" 0 "$autobahn_dir/run.sh" "$echo_url" "$work/ab1" quick
    check "autobahn run 2" 0 "$autobahn_dir/run.sh" "$echo_url" "$work/ab2" quick
    check "autobahn compare direct vs direct" 0 python3 "$autobahn_dir/compare.py" --non-strict-is-ok \
        "$work/ab1/index.json" "$work/ab2/index.json"
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
