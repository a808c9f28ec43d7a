#!/usr/bin/env bash
# Response times of the session registry with N live sessions (default
# 9,900: the proxy holds two descriptors per session and these machines cap
# a process at 20,000). Release builds of eval-proxy and eval-loadgen, the
# loadgen's echo server as Conman, 2 shards, client sources spread over
# 127.0.0.0/8 by the loadgen. Prints p50 and max of 20 requests per path,
# then one close and one evacuation of every session (spread over 10 s).
# Usage: N=9900 bench/registry.sh
set -euo pipefail
[[ "${1:-}" == "--help" || "${1:-}" == "-h" ]] && { sed -n '2,8p' "$0"; exit 0; }
N=${N:-9900}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
R=$root/target/release
D=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$D"' EXIT
(cd "$root" && cargo build -q --release --bin eval-proxy -p eval-proxy -p eval-loadgen)
wait_for() { # FILE WORD
  for _ in $(seq 600); do grep -q "$2" "$1" && return; sleep 0.1; done
  echo "registry: no '$2' in $1" >&2; exit 1
}
"$R/eval-loadgen" echo-server --listen 127.0.0.1:0 > "$D/echo.out" &
pids+=($!)
wait_for "$D/echo.out" listening
conman=$(awk '/listening/{print $2}' "$D/echo.out")
printf '[token]\nallow_dev_key = true\n[placement]\ndefault = "ws://%s/"\n[listen]\nshards = 2\n' \
  "$conman" > "$D/eval.toml"
RUST_LOG=warn "$R/eval-proxy" --config "$D/eval.toml" --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
  > "$D/proxy.out" &
pids+=($!)
wait_for "$D/proxy.out" ready
listen=$(sed -n 's/.*listen=\([^ ]*\).*/\1/p' "$D/proxy.out")
admin=$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' "$D/proxy.out")
"$R/eval-loadgen" idle --url "ws://$listen/wsv2/" --token-per-conn --dev-key --conns "$N" \
  --threads 4 > "$D/idle.out" &
pids+=($!)
for _ in $(seq 1200); do grep -q holding "$D/idle.out" && break; sleep 0.5; done
cat "$D/idle.out"
measure() {
  for _ in $(seq 20); do
    curl -s -o "$D/body" -w '%{time_total}\n' "http://$admin$1"
  done | sort -n > "$D/times"
  awk -v p="$1" -v sz="$(wc -c < "$D/body")" '{a[NR]=$1} END {
    printf "GET %-28s p50 %6.1f ms  max %6.1f ms  (%d bytes)\n", p, a[int((NR+1)/2)]*1000, a[NR]*1000, sz}' "$D/times"
}
measure "/sessions"
measure "/sessions?limit=10000"
measure "/sessions?repl=repl-17"
measure "/metrics"
id=$(curl -s "http://$admin/sessions?limit=1" | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
curl -s -o /dev/null -w "POST /sessions/ID/close            %{time_total} s (%{http_code})\n" \
  -X POST "http://$admin/sessions/$id/close"
curl -s -o "$D/body" -w "POST /vms/default/evacuate        %{time_total} s (%{http_code}) " \
  -X POST "http://$admin/vms/default/evacuate?spread_s=10"
cat "$D/body"
