#!/usr/bin/env bash
# Reconnect storm against eval-proxy, nginx and HAProxy; see bench/README.md.
# Usage: bench/storm.sh [--sessions N] [--help for the rest]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
command -v python3 >/dev/null || { echo "storm: python3 (3.11+) is required" >&2; exit 2; }
# exec: signals go straight to the runner, which stops everything it started.
exec python3 "$here/storm.py" "$@"
