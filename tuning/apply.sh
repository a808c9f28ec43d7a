#!/usr/bin/env bash
# Applies a sysctl profile, printing each key's old and new value and
# skipping (with a note) keys this kernel or container does not allow.
set -euo pipefail
profile=${1:?usage: tuning/apply.sh PROFILE.conf [--dry-run]}
dry=${2:-}
while IFS= read -r line; do
    line=${line%%#*}
    [[ -z "${line// /}" ]] && continue
    key=$(echo "${line%%=*}" | xargs)
    val=$(echo "${line#*=}" | xargs)
    old=$(sysctl -n "$key" 2>/dev/null | tr '\t' ' ' || echo "?")
    if [[ "$dry" == "--dry-run" ]]; then
        printf '%-40s %s -> %s\n' "$key" "$old" "$val"
    elif sysctl -q -w "$key=$val" >/dev/null 2>&1; then
        printf '%-40s %s -> %s\n' "$key" "$old" "$val"
    else
        printf '%-40s not applied (read-only here or unknown key)\n' "$key"
    fi
done <"$profile"
