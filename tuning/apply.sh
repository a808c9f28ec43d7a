#!/usr/bin/env bash
# Applies a sysctl profile, printing each key's old and new value and
# skipping (with a note) keys this kernel or container does not allow.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tuning/apply.sh [--dry-run] PROFILE.conf
       tuning/apply.sh --help

Applies the sysctl lines of PROFILE.conf (key = value; '#' starts a
comment), printing for each key its current and new value. Keys this
kernel or container does not allow are reported and skipped. Needs root
to write; --dry-run only shows what would change.

Profiles:
  tuning/eval-proxy.conf       production host running eval-proxy
  tuning/loopback-bench.conf   benchmarks on one machine over loopback

To keep the settings across reboots, install the profile instead:
  sudo cp tuning/eval-proxy.conf /etc/sysctl.d/60-eval-proxy.conf
  sudo sysctl --system

Exit codes: 0 done (some keys may be skipped), 2 bad arguments.
EOF
}

profile=""
dry=""
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        --dry-run) dry=1 ;;
        -*) echo "tuning/apply.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *)
            if [[ -n "$profile" ]]; then
                echo "tuning/apply.sh: one profile at a time" >&2
                exit 2
            fi
            profile=$arg
            ;;
    esac
done
if [[ -z "$profile" ]]; then
    usage >&2
    exit 2
fi
if [[ ! -r "$profile" ]]; then
    echo "tuning/apply.sh: cannot read profile $profile" >&2
    exit 2
fi

while IFS= read -r line; do
    line=${line%%#*}
    [[ -z "${line// /}" ]] && continue
    key=$(echo "${line%%=*}" | xargs)
    val=$(echo "${line#*=}" | xargs)
    old=$(sysctl -n "$key" 2>/dev/null | tr '\t' ' ' || echo "?")
    if [[ -n "$dry" ]]; then
        printf '%-40s %s -> %s\n' "$key" "$old" "$val"
    elif sysctl -q -w "$key=$val" >/dev/null 2>&1; then
        printf '%-40s %s -> %s\n' "$key" "$old" "$val"
    else
        printf '%-40s not applied (read-only here or unknown key)\n' "$key"
    fi
done <"$profile"
