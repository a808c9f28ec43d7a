#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs the real peers the
# tests drive (Chromium, Python websockets, Node ws, Autobahn's wstest),
# then runs every test of the workspace. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash .ci/install-deps.sh
cargo test --workspace --locked
