#!/usr/bin/env bash
# eval-proxy under mixed load with faults injected; see bench/README.md "Soak".
# Usage: bench/soak.sh MINUTES [--out DIR] [--help for the rest]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
command -v python3 >/dev/null || { echo "soak: python3 (3.11+) is required" >&2; exit 2; }
command -v taskset >/dev/null || { echo "soak: taskset (util-linux) is required" >&2; exit 2; }
# exec: signals go straight to the runner, which stops everything it started.
exec python3 "$here/soak.py" "$@"
