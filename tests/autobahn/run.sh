#!/usr/bin/env bash
# Runs Autobahn's fuzzingclient (wstest) against one WebSocket server.
#
# Usage: run.sh TARGET_URL OUTDIR [CASES]
#   TARGET_URL  ws:// URL of the server under test (the echo server, or the
#               proxy in front of it)
#   OUTDIR      where spec.json, wstest.log and the reports go; the verdicts
#               are in OUTDIR/index.json (compare.py reads it)
#   CASES       a comma-separated list of case patterns such as "5.*,9.1.1",
#               where quick (the default) stands for 1-7 and 10, the cases
#               about framing, not volume, and full for every case
# Environment: WSTEST (default /opt/eval-autobahn/bin/wstest), AUTOBAHN_AGENT
#   (the name the reports file results under, default "target"),
#   AUTOBAHN_TIMEOUT (seconds for the whole run, default 1800).
#
# Prints nothing on success; on failure, the reason and wstest's output.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: run.sh TARGET_URL OUTDIR [quick|full|CASE,CASE...]" >&2
    exit 2
fi
url=$1
outdir=$2
cases=${3:-quick}
wstest=${WSTEST:-/opt/eval-autobahn/bin/wstest}
agent=${AUTOBAHN_AGENT:-target}
limit=${AUTOBAHN_TIMEOUT:-1800}

fail() {
    echo "autobahn run.sh: FAIL: $*" >&2
    exit 1
}

[ -x "$wstest" ] || fail "$wstest not found (run .ci/install-deps.sh)"

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
rm -f "$outdir/index.json"

python3 - "$outdir/spec.json" "$url" "$outdir" "$agent" "$cases" <<'EOF'
import json, sys
path, url, outdir, agent, cases = sys.argv[1:]
names = {"quick": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"], "full": ["*"]}
patterns = []
for p in cases.split(","):
    patterns += names.get(p.strip(), [p.strip()] if p.strip() else [])
spec = {
    "outdir": outdir,
    "servers": [{"agent": agent, "url": url}],
    "cases": patterns,
    "exclude-cases": [],
    "exclude-agent-cases": {},
}
with open(path, "w") as f:
    json.dump(spec, f, indent=2)
    f.write("\n")
EOF

# The spec names OUTDIR absolutely; running from OUTDIR as well keeps any other
# file wstest may write there instead of in the caller's directory.
if ! (cd "$outdir" && PYTHONWARNINGS=ignore timeout "$limit" "$wstest" -m fuzzingclient -s spec.json) \
    >"$outdir/wstest.log" 2>&1; then
    cat "$outdir/wstest.log" >&2
    fail "wstest exited non-zero (timeout after ${limit}s gives 124); log in $outdir/wstest.log"
fi

# wstest exits 0 even when it could not reach the target, so the report is
# the proof that the cases ran.
if ! python3 - "$outdir/index.json" "$agent" <<'EOF'; then
import json, sys
path, agent = sys.argv[1:]
try:
    with open(path) as f:
        results = json.load(f).get(agent, {})
except (OSError, ValueError) as e:
    sys.exit(f"no readable report: {e}")
if not results:
    sys.exit(f"report has no cases for agent {agent!r}")
EOF
    tail -n 20 "$outdir/wstest.log" >&2
    fail "wstest produced no results for $url; log in $outdir/wstest.log"
fi
