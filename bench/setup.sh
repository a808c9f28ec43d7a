#!/usr/bin/env bash
# Session-setup figures of issue 3, from one command:
#   - added setup latency (p50/p99) of eval-proxy over a direct connection,
#     with a warm and a cold placement cache (Controlplane mode, fake
#     Controlplane process), over >= 1,000 sessions each;
#   - the session success rate while 1 of 3 fake Conmans refuses every
#     connection (goal: 100 %).
# Usage: bench/setup.sh [SECONDS_PER_RUN]   (default 6)
# Everything runs on loopback; processes started here are killed on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-6}
cargo build --release -q -p eval-proxy -p eval-loadgen
R=target/release
work=$(mktemp -d)
# start() runs inside $(...), a subshell: pids go to a file, not a variable.
cleanup() {
    [ -f "$work/pids" ] && while read -r p; do kill "$p" 2>/dev/null || true; done <"$work/pids"
    rm -rf "$work"
}
trap cleanup EXIT

# start NAME CMD...: runs CMD in the background, waits for its readiness
# line (`listening ADDR` or `eval-proxy ready listen=ADDR`), prints ADDR.
start() {
    local name=$1; shift
    "$@" >"$work/$name.out" 2>"$work/$name.err" &
    echo $! >>"$work/pids"
    for _ in $(seq 1 200); do
        if grep -q '^listening ' "$work/$name.out" 2>/dev/null; then
            awk '/^listening /{print $2; exit}' "$work/$name.out"; return
        fi
        if grep -q '^eval-proxy ready ' "$work/$name.out" 2>/dev/null; then
            grep -o 'listen=[^ ]*' "$work/$name.out" | cut -d= -f2; return
        fi
        sleep 0.05
    done
    echo "bench/setup.sh: $name did not start: $(cat "$work/$name.err")" >&2; exit 1
}
admin_of() { grep -o 'admin=[^ ]*' "$work/$1.out" | cut -d= -f2; }
metric() { # metric ADMIN NAME [LABEL-SUBSTRING]
    curl -s "http://$1/metrics" | awk -v n="$2" -v l="${3:-}" '$1 ~ "^"n"({|$)" && index($1,l) {s+=$2} END {print s+0}'
}
hs() { # hs NAME URL ARGS... → "handshakes p50 p99" of a handshake run
    # One worker: sessions one after another, so latency is the setup path's
    # own, not queueing behind a saturated core.
    taskset -c 1 $R/eval-loadgen handshake --url "$2" --workers "${WORKERS:-1}" --duration "${secs}s" --json "${@:3}" >"$work/$1.json" \
        || { echo "bench/setup.sh: loadgen $1 failed: $(cat "$work/$1.json")" >&2; exit 1; }
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); l=j["latency_us"]; print(j["handshakes"], l["p50"], l["p99"])' "$work/$1.json"
}

e1=$(start echo1 taskset -c 1 $R/eval-loadgen echo-server --listen 127.0.0.1:0)
e2=$(start echo2 taskset -c 1 $R/eval-loadgen echo-server --listen 127.0.0.1:0)
bad=$(start bad taskset -c 1 $R/eval-loadgen conman --listen 127.0.0.1:0 --refuse)

read -r n_d p50_d p99_d < <(hs direct "ws://$e1/")

cp=$(start cp taskset -c 1 $R/eval-loadgen controlplane --listen 127.0.0.1:0 --conman "vm-1=ws://$e1/" --ttl-ms 600000)
cat >"$work/p.toml" <<TOML
[token]
allow_dev_key = true
[placement]
mode = "controlplane"
[controlplane]
urls = ["http://$cp"]
[listen]
pin = false
TOML
px=$(start proxy taskset -c 0 $R/eval-proxy --config "$work/p.toml" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 1)
read -r n_w p50_w p99_w < <(hs warm "ws://$px/wsv2/" --token-per-conn --dev-key --repls 64)
read -r n_c p50_c p99_c < <(hs cold "ws://$px/wsv2/" --token-per-conn --dev-key --unique-repls --premint 40000)

# Success rate with one refusing Conman of three.
cp3=$(start cp3 taskset -c 1 $R/eval-loadgen controlplane --listen 127.0.0.1:0 --conman "vm-1=ws://$e1/" --conman "vm-2=ws://$e2/" --conman "vm-bad=ws://$bad/" --ttl-ms 600000)
sed "s|http://$cp|http://$cp3|" "$work/p.toml" >"$work/p3.toml"
px3=$(start proxy3 taskset -c 0 $R/eval-proxy --config "$work/p3.toml" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 1)
WORKERS=8 hs slo "ws://$px3/wsv2/" --token-per-conn --dev-key --unique-repls --premint 40000 >/dev/null
a3=$(admin_of proxy3)
attempts=$(metric "$a3" eval_session_attempts_total)
est=$(metric "$a3" eval_sessions_established_total)
fault=$(metric "$a3" eval_session_client_fault_rejections_total)
retried=$(metric "$a3" eval_conman_attempt_failures_total)

python3 - "$n_d" "$p50_d" "$p99_d" "$n_w" "$p50_w" "$p99_w" "$n_c" "$p50_c" "$p99_c" "$attempts" "$est" "$fault" "$retried" <<'PY'
import sys
a = [float(x) for x in sys.argv[1:]]
nd, p50d, p99d, nw, p50w, p99w, nc, p50c, p99c, att, est, fault, retried = a
print("| run | sessions | p50 µs | p99 µs | added p50 µs | added p99 µs |")
print("|---|---|---|---|---|---|")
print(f"| direct (no proxy) | {nd:.0f} | {p50d:.0f} | {p99d:.0f} | – | – |")
print(f"| eval-proxy, warm placement cache | {nw:.0f} | {p50w:.0f} | {p99w:.0f} | {p50w-p50d:.0f} | {p99w-p99d:.0f} |")
print(f"| eval-proxy, cold cache (a Controlplane request per session) | {nc:.0f} | {p50c:.0f} | {p99c:.0f} | {p50c-p50d:.0f} | {p99c-p99d:.0f} |")
rate = est / (att - fault) * 100 if att > fault else 0
print()
print(f"1 of 3 Conmans refusing: {est:.0f} established of {att:.0f} attempts "
      f"({fault:.0f} client-fault rejections), success rate {rate:.3f} %, "
      f"{retried:.0f} Conman attempts failed and were retried elsewhere")
PY
