#!/usr/bin/env python3
"""Compares two Autobahn fuzzingclient reports: the echo server direct, and the
same server through eval-proxy. The proxy relays frames unchanged, so no case
may do worse through it.

Usage: compare.py [--agent NAME] [--non-strict-is-ok] DIRECT PROXIED
  DIRECT, PROXIED: the index.json of each run (run.sh's OUTDIR/index.json)

A case is worse when its `behavior` ranks higher through the proxy, in the
order OK < NON-STRICT < INFORMATIONAL < UNIMPLEMENTED < FAILED; equal is fine.
A case that ran on one side only also fails the comparison. Changes of
`behaviorClose` are listed too, as notes: the verdict is on `behavior`.

--non-strict-is-ok ranks NON-STRICT with OK. Against the websockets echo
server a few cases (3.4, 4.1.5, 4.2.5 seen) flip between the two from one
direct run to the next: NON-STRICT there only means the server saw the bad
frame in the same read as the good one before it, and failed the connection
before echoing. Without the flag such a flip fails the comparison.

Prints one line per case that differs and a count line. Exit 0 when nothing
is worse, 1 when something is, 2 when a report cannot be read.
"""

import argparse
import json
import sys

RANK = {"OK": 0, "NON-STRICT": 1, "INFORMATIONAL": 2, "UNIMPLEMENTED": 3, "FAILED": 4}


class BadReport(Exception):
    pass


def load(path, agent):
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise BadReport(f"{path}: {e}") from None
    if not isinstance(report, dict) or not report:
        raise BadReport(f"{path}: not an Autobahn index.json (expected {{agent: {{case: result}}}})")
    if agent is None:
        if len(report) != 1:
            raise BadReport(f"{path}: several agents {sorted(report)}; pick one with --agent")
        agent = next(iter(report))
    if agent not in report:
        raise BadReport(f"{path}: no agent {agent!r}, only {sorted(report)}")
    cases = report[agent]
    for case, result in cases.items():
        behavior = result.get("behavior") if isinstance(result, dict) else None
        if behavior not in RANK:
            raise BadReport(f"{path}: case {case} has unknown behavior {behavior!r}")
    return cases


def case_key(case):
    return tuple(int(p) if p.isdigit() else p for p in case.split("."))


def compare(direct, proxied, non_strict_is_ok=False):
    """Returns (lines, worse, better, same) over the union of cases."""
    rank = dict(RANK)
    if non_strict_is_ok:
        rank["NON-STRICT"] = rank["OK"]
    lines = []
    worse = better = same = 0
    for case in sorted(set(direct) | set(proxied), key=case_key):
        d = direct.get(case)
        p = proxied.get(case)
        if d is None or p is None:
            worse += 1
            side = "proxied" if d is None else "direct"
            lines.append(f"WORSE   {case}: ran only {side}")
            continue
        db, pb = d["behavior"], p["behavior"]
        close_note = ""
        if d.get("behaviorClose") != p.get("behaviorClose"):
            close_note = f" (close {d.get('behaviorClose')} -> {p.get('behaviorClose')})"
        if rank[pb] > rank[db]:
            worse += 1
            proxied_close = f"proxied: {p.get('behaviorClose')}, remote close {p.get('remoteCloseCode')}"
            lines.append(f"WORSE   {case}: {db} -> {pb}{close_note}; {proxied_close}")
        elif rank[pb] < rank[db]:
            better += 1
            lines.append(f"better  {case}: {db} -> {pb}{close_note}")
        else:
            same += 1
            if db != pb:
                lines.append(f"note    {case}: {db} -> {pb}, counted as same{close_note}")
            elif close_note:
                lines.append(f"note    {case}: {db} both{close_note}")
    return lines, worse, better, same


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("direct", help="index.json of the run against the echo server")
    p.add_argument("proxied", help="index.json of the run through the proxy")
    p.add_argument("--agent", help="agent name in both reports (default: the only one)")
    p.add_argument("--non-strict-is-ok", action="store_true", help="rank NON-STRICT with OK (timing noise)")
    args = p.parse_args(argv)
    try:
        direct = load(args.direct, args.agent)
        proxied = load(args.proxied, args.agent)
    except BadReport as e:
        print(f"compare.py: {e}", file=sys.stderr)
        return 2
    lines, worse, better, same = compare(direct, proxied, args.non_strict_is_ok)
    out = sys.stderr if worse else sys.stdout
    for line in lines:
        print(line, file=out)
    print(f"autobahn compare: {worse + better + same} cases, {worse} worse, {better} better, {same} same", file=out)
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
