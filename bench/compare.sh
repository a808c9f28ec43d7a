#!/usr/bin/env bash
# eval-proxy vs nginx, HAProxy and Caddy on one proxy core; see bench/README.md.
# Usage: bench/compare.sh [--quick] [--help for the rest]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
command -v python3 >/dev/null || { echo "bench: python3 (3.11+) is required" >&2; exit 2; }
# exec: signals go straight to the runner, which stops everything it started.
exec python3 "$here/compare.py" "$@"
