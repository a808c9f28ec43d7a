#!/usr/bin/env bash
# Autobahn|Testsuite, every case (~1 minute each way here), through
# eval-proxy and direct against the same conformant echo server; fails if
# any case is worse through the proxy. CI runs the quick set instead
# (tests/real_clients.rs). Needs `bash .ci/install-deps.sh` once.
# Usage: tests/autobahn/full.sh [OUTDIR]   (reports stay in OUTDIR)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${1:-$(mktemp -d)}
mkdir -p "$out"
cd "$root"
cargo build --release -q -p eval-proxy
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

python3 tests/autobahn/echo_server.py >"$out/echo.out" &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^listening ' "$out/echo.out" 2>/dev/null && break; sleep 0.1; done
port=$(awk '/^listening /{print $2}' "$out/echo.out")
[ -n "$port" ] || { echo "full.sh: echo server did not start" >&2; exit 1; }

printf '[token]\nallow_dev_key = true\n[placement]\ndefault = "ws://127.0.0.1:%s/"\n' "$port" >"$out/eval.toml"
target/release/eval-proxy --config "$out/eval.toml" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 1 >"$out/proxy.out" 2>"$out/proxy.err" &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^eval-proxy ready ' "$out/proxy.out" 2>/dev/null && break; sleep 0.1; done
listen=$(grep -o 'listen=[^ ]*' "$out/proxy.out" | cut -d= -f2)
[ -n "$listen" ] || { echo "full.sh: proxy did not start: $(cat "$out/proxy.err")" >&2; exit 1; }
token=$(target/release/eval-proxy token mint --dev --repl autobahn --ttl 2h)

bash tests/autobahn/run.sh "ws://127.0.0.1:$port/" "$out/direct" full
bash tests/autobahn/run.sh "ws://$listen/wsv2/$token" "$out/proxied" full
python3 tests/autobahn/compare.py --non-strict-is-ok "$out/direct/index.json" "$out/proxied/index.json"
echo "reports: $out/direct, $out/proxied"
