#!/usr/bin/env bash
# tests/fuzz/run.sh MINUTES [TARGET...]
#
# Runs each fuzz target (all of them by default) for MINUTES of its own CPU
# time, at nice 19, then merges the inputs that add coverage into the
# committed corpus (tests/fuzz/corpus/<target>/) and prints a table.
#
# CPU time, not wall time: the machine is shared, and a fuzzer may be
# SIGSTOPped and SIGCONTed from outside while others measure something.
# libFuzzer's -max_total_time counts wall time, so this script reads the
# process's utime + stime from /proc/PID/stat once a second and stops it
# with SIGINT when the budget is spent. A crash restarts the target (its
# CPU time so far still counts) until the budget is spent or FUZZ_MAX_CRASHES
# crashes were found; each crash input stays in tests/fuzz/artifacts/<target>/.
# One that does not crash again when run alone (a unit "timed out" because
# the process was stopped, say) moves to artifacts/<target>/unreproduced/.
#
# Environment:
#   FUZZ_JOBS=1          targets fuzzed at once
#   FUZZ_SANITIZER=none  cargo fuzz --sanitizer (address finds nothing more in
#                        these safe-Rust parsers and halves the exec rate)
#   FUZZ_TIMEOUT=600     libFuzzer -timeout, seconds of wall time per input
#   FUZZ_MAX_CRASHES=5   restarts after crashes before giving up on a target
#   FUZZ_CMIN=0          1: minimise the whole corpus (cmin) instead of only
#                        adding to it; files not named by their SHA-1 (named
#                        seeds, regression-*) are always kept
set -euo pipefail

usage() {
    echo "usage: $0 MINUTES [TARGET...]" >&2
    exit 2
}
[[ $# -ge 1 && $1 =~ ^[0-9]+([.][0-9]+)?$ ]] || usage
minutes=$1
shift

fuzz_dir=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$fuzz_dir/../.." && pwd)
jobs=${FUZZ_JOBS:-1}
sanitizer=${FUZZ_SANITIZER:-none}
timeout_s=${FUZZ_TIMEOUT:-600}
max_crashes=${FUZZ_MAX_CRASHES:-5}
cmin=${FUZZ_CMIN:-0}
hz=$(getconf CLK_TCK)
budget=$(awk -v m="$minutes" -v hz="$hz" 'BEGIN { printf "%d", m * 60 * hz }')

cd "$repo"
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir tests/fuzz)
fi
[[ ${#targets[@]} -gt 0 ]] || usage

build=(cargo +nightly fuzz build --fuzz-dir tests/fuzz -O --debug-assertions --sanitizer "$sanitizer")
if [[ $# -gt 0 ]]; then
    for t in "${targets[@]}"; do nice -n 19 "${build[@]}" "$t"; done
else
    nice -n 19 "${build[@]}"
fi
bin_dir=$fuzz_dir/target/x86_64-unknown-linux-gnu/release
work=$fuzz_dir/target/run
results=$work/results.$$
mkdir -p "$work"
: >"$results"

# Sets `ticks` to the CPU time (utime + stime, in clock ticks) of process $1
# and `state` to its state letter; fails once the process is gone. Fields
# after "(comm)" start at field 3 (state), so utime (14) and stime (15) are
# the 12th and 13th, and cutime (16) and cstime (17) the 14th and 15th.
# Builtins only: this runs every second.
sample() {
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    local -a f
    read -r -a f <<<"${stat##*) }"
    ticks=$((f[11] + f[12]))
    state=${f[0]}
    reaped=$((f[13] + f[14]))
}

count() { find "$1" -maxdepth 1 -type f | wc -l; }

is_hash_name() { [[ $(basename "$1") =~ ^[0-9a-f]{40}$ ]]; }

# One target: fuzz until the budget is spent, check the crashes, merge.
fuzz_target() {
    local t=$1 bin=$bin_dir/$1
    local corpus=$fuzz_dir/corpus/$t crashes=$fuzz_dir/artifacts/$t
    local dir=$work/$t
    local dict=$fuzz_dir/dict/$t.dict
    rm -rf "$dir"
    mkdir -p "$dir/new" "$corpus" "$crashes"
    local before used=0 execs=0 found=0 run=0 stamp=$dir/started
    before=$(count "$corpus")
    touch "$stamp"
    local -a opts=(-artifact_prefix="$crashes/" -print_final_stats=1 -timeout="$timeout_s")
    [[ -f $dict ]] && opts+=(-dict="$dict")

    while ((used < budget && found < max_crashes)); do
        run=$((run + 1))
        local log=$dir/fuzz-$run.log ticks=0 state=R reaped=0 stopped=0
        # What this shell's waited-for children used so far: the difference
        # after `wait` is the fuzzer's CPU time to the last tick.
        sample "$BASHPID"
        local reaped_before=$reaped
        nice -n 19 "$bin" "${opts[@]}" "$dir/new" "$corpus" >"$log" 2>&1 &
        local pid=$!
        while sample "$pid" && [[ $state != Z ]]; do
            if ((!stopped && used + ticks >= budget)); then
                kill -INT "$pid" 2>/dev/null || true
                stopped=1
            fi
            sleep 1
        done
        local rc=0
        wait "$pid" || rc=$?
        sample "$BASHPID"
        used=$((used + reaped - reaped_before))
        local n
        n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        [[ -n $n ]] || n=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -n 1)
        execs=$((execs + ${n:-0}))
        # 72: libFuzzer's exit code after SIGINT, that is, the budget.
        if ((rc != 0 && rc != 72)); then
            found=$((found + 1))
            echo "$t: run $run ended with status $rc, see $log" >&2
        fi
    done

    local crash kept=0
    while IFS= read -r crash; do
        [[ -n $crash ]] || continue
        # A crash input again, alone, with a short per-input timeout.
        if timeout 600 nice -n 19 "$bin" -timeout=60 "$crash" >"$crash.log" 2>&1; then
            mkdir -p "$crashes/unreproduced"
            mv "$crash" "$crash.log" "$crashes/unreproduced/"
        else
            kept=$((kept + 1))
        fi
    done < <(find "$crashes" -maxdepth 1 -type f -newer "$stamp" ! -name '*.log')

    if [[ $cmin == 1 ]]; then
        local keep=$dir/cmin
        mkdir -p "$keep"
        nice -n 19 "$bin" -merge=1 -timeout="$timeout_s" "$keep" "$corpus" "$dir/new" >"$dir/merge.log" 2>&1
        local f
        for f in "$corpus"/*; do
            is_hash_name "$f" || cp "$f" "$keep/"
        done
        find "$corpus" -maxdepth 1 -type f -delete
        cp "$keep"/* "$corpus/"
    else
        nice -n 19 "$bin" -merge=1 -timeout="$timeout_s" "$corpus" "$dir/new" >"$dir/merge.log" 2>&1
    fi
    local after
    after=$(count "$corpus")
    awk -v t="$t" -v u="$used" -v hz="$hz" -v e="$execs" -v b="$before" -v a="$after" -v c="$kept" \
        'BEGIN { printf "%s %.1f %d %d %d %d\n", t, u / hz / 60, e, b, a, c }' >>"$results"
}

for t in "${targets[@]}"; do
    [[ -x $bin_dir/$t ]] || { echo "no fuzz target $t" >&2; exit 2; }
    while (($(jobs -rp | wc -l) >= jobs)); do wait -n || true; done
    fuzz_target "$t" &
done
wait

echo
printf '%-24s %9s %14s %14s %8s\n' target CPU-min execs corpus crashes
sort "$results" | while read -r t cpu execs before after crashes; do
    printf '%-24s %9s %14s %14s %8s\n' "$t" "$cpu" "$execs" "$before -> $after" "$crashes"
done
rm -f "$results"
if [[ -n $(find "$fuzz_dir/artifacts" -maxdepth 2 -type f ! -name '*.log' 2>/dev/null) ]]; then
    echo "crash inputs: $fuzz_dir/artifacts/<target>/"
fi
