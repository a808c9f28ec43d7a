#!/usr/bin/env bash
# Autobahn|Testsuite, every case (517), through eval-proxy in each WebSocket
# mode, compared case by case (behaviour, close behaviour, close code) with the
# committed result of a direct run against the same echo server with the same
# settings, tests/autobahn/expected/MODE.json. CI runs the quick set instead
# (tests/real_clients.rs). Needs `bash .ci/install-deps.sh` once.
#
# Usage: tests/autobahn/full.sh [--mode client_first|upstream_first|both]
#                               [--regenerate] [OUTDIR]
#   --mode        which websocket.mode to run (default both, one after the other)
#   --regenerate  run every case directly against the mode's echo server
#                 instead and write expected/MODE.json from it; review its diff
#                 before committing
#   OUTDIR        where the reports stay (default: a new temporary directory)
#
# The echo server of each mode:
#   client_first    echo_server.py: the proxy answers the 101 itself with no
#                   extension, so permessage-deflate (12.x, 13.x) is
#                   UNIMPLEMENTED, as with a server that has none
#   upstream_first  echo_server.py --deflate: the server's 101, and with it
#                   permessage-deflate, reaches the client, so 12.x and 13.x run
#
# Prints each differing case and a table of verdict counts per mode with the
# wall time; exits 1 if any case differs from the expected result.
# Environment: AUTOBAHN_TIMEOUT, seconds per run (default 3600: upstream-first
# takes about 15 minutes here, most of it compressing 12.x/13.x in Python).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
modes=(client_first upstream_first)
regenerate=false
out=
while [ $# -gt 0 ]; do
    case $1 in
        --mode)
            case ${2:-} in
                client_first | upstream_first) modes=("$2") ;;
                both) ;;
                *) echo "full.sh: --mode client_first|upstream_first|both" >&2; exit 2 ;;
            esac
            shift 2
            ;;
        --regenerate) regenerate=true; shift ;;
        -*) echo "usage: full.sh [--mode client_first|upstream_first|both] [--regenerate] [OUTDIR]" >&2; exit 2 ;;
        *) out=$1; shift ;;
    esac
done
out=${out:-$(mktemp -d)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
export AUTOBAHN_TIMEOUT=${AUTOBAHN_TIMEOUT:-3600}
table=$out/summary.txt
rm -f "$table"
$regenerate || cargo build --release -q -p eval-proxy

pids=()
stop_all() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
}
trap stop_all EXIT

# Waits for the line a process prints once it is ready, or says why not.
wait_line() {
    local file=$1 pattern=$2 what=$3 pid=$4
    for _ in $(seq 1 100); do
        grep -q "$pattern" "$file" 2>/dev/null && return
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "full.sh: $what did not start: $(cat "$file" "$file.err" 2>/dev/null)" >&2
    exit 1
}

# Sets `port`: the echo server for MODE, with its flags in `flags`.
start_echo() {
    local dir=$1 mode=$2
    flags=
    if [ "$mode" = upstream_first ]; then flags=--deflate; fi
    # shellcheck disable=SC2086 # no flag or one word
    python3 tests/autobahn/echo_server.py $flags >"$dir/echo.out" 2>"$dir/echo.out.err" &
    pids+=($!)
    wait_line "$dir/echo.out" '^listening ' "echo server" $!
    port=$(awk '/^listening /{print $2}' "$dir/echo.out")
}

# Sets `url`: a proxy in MODE in front of the echo server at PORT.
start_proxy() {
    local dir=$1 mode=$2 port=$3
    printf '[token]\nallow_dev_key = true\n[websocket]\nmode = "%s"\n[placement]\ndefault = "ws://127.0.0.1:%s/"\n' \
        "$mode" "$port" >"$dir/eval.toml"
    target/release/eval-proxy --config "$dir/eval.toml" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 1 \
        >"$dir/proxy.out" 2>"$dir/proxy.out.err" &
    pids+=($!)
    wait_line "$dir/proxy.out" '^eval-proxy ready ' "eval-proxy" $!
    local listen token
    listen=$(grep -o 'listen=[^ ]*' "$dir/proxy.out" | cut -d= -f2)
    token=$(target/release/eval-proxy token mint --dev --repl autobahn --ttl 2h)
    url="ws://$listen/wsv2/$token"
}

status=0
for mode in "${modes[@]}"; do
    dir=$out/$mode
    mkdir -p "$dir"
    start_echo "$dir" "$mode"
    expected=tests/autobahn/expected/$mode.json
    if $regenerate; then
        url="ws://127.0.0.1:$port/"
        label="direct, for $mode"
    else
        start_proxy "$dir" "$mode" "$port"
        label=$mode
    fi
    echo "full.sh: $label: every case against ${url%%/wsv2/*}" >&2
    start=$(date +%s)
    bash tests/autobahn/run.sh "$url" "$dir/report" full
    wall=$(($(date +%s) - start))
    if $regenerate; then
        about="$(PYTHONWARNINGS=ignore "${WSTEST:-/opt/eval-autobahn/bin/wstest}" --autobahnversion 2>&1 | tail -n 1),"
        about+=" every case, run directly against tests/autobahn/echo_server.py${flags:+ $flags}"
        about+=" (Python websockets $(python3 -c 'import websockets; print(websockets.__version__)'));"
        about+=" the expected result of websocket.mode = \"$mode\"."
        about+=" Regenerate: tests/autobahn/full.sh --regenerate --mode $mode"
        python3 tests/autobahn/compare.py --save "$expected" "$dir/report/index.json" --about "$about"
        python3 tests/autobahn/compare.py --table "$table" --label "$label (${wall} s)" \
            "$expected" "$dir/report/index.json" >/dev/null
        echo "full.sh: wrote $expected" >&2
    elif ! python3 tests/autobahn/compare.py --non-strict-is-ok --table "$table" --label "$label (${wall} s)" \
        "$expected" "$dir/report/index.json"; then
        status=1
    fi
    stop_all
done
echo
cat "$table"
echo "reports: $out"
exit $status
