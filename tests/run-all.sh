#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs the real peers the
# tests drive (Chromium, Python websockets, Node ws, Autobahn's wstest),
# then runs every test of the workspace. `.ci/run` calls exactly this.
#
# The tests run `python3` from PATH. Where the system python3 cannot take
# `pip install` (Debian 12), install-deps.sh puts websockets into a venv at
# $PY_VENV instead, and whenever that venv exists its bin/ goes first on PATH
# here (see .ci/install-deps.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PY_VENV=${PY_VENV:-/opt/eval-py}
bash .ci/install-deps.sh
if [ -e "$PY_VENV" ]; then
    export PATH="$PY_VENV/bin:$PATH"
fi
cargo test --workspace --locked
