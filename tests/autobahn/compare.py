#!/usr/bin/env python3
"""Compares an Autobahn fuzzingclient report through eval-proxy with the
expected result: a committed summary of a direct run (tests/autobahn/expected/)
or another run's index.json. The proxy relays frames unchanged, so every case
must end as it does with the same echo server reached directly.

Usage: compare.py [--agent NAME] [--non-strict-is-ok] [--table FILE --label L]
                  EXPECTED ACTUAL
       compare.py --save EXPECTED INDEX --about TEXT

EXPECTED  an expected summary ({"about": ..., "cases": {case: [behavior,
          behaviorClose, remoteCloseCode]}}) or an index.json
ACTUAL    the index.json of the run through the proxy (run.sh's OUTDIR)

A case differs when its `behavior`, `behaviorClose` or `remoteCloseCode` is not
the expected one; each differing case is printed, marked WORSE when its
behavior ranks higher (OK < NON-STRICT < INFORMATIONAL < UNIMPLEMENTED <
FAILED), and any difference fails the comparison. Only the cases that the
spec.json beside ACTUAL asked for are expected (run.sh writes it), so a quick
run is compared with the quick part of a full expected file.

--non-strict-is-ok counts NON-STRICT as OK. In 3.4, 4.1.5 and 4.2.5 a valid
message is followed by a bad frame; the verdict is OK when the echo of the
message reaches the client before the Close, NON-STRICT (accepted by Autobahn)
when the connection is failed first, and which comes first is a race. Direct,
the echo server wins it nearly always; through the proxy, which fails the
connection itself on the bad frame's first byte while the echo is still on its
way back from the echo server, 4.1.5 (sent a byte at a time) is NON-STRICT in
most runs. Without the flag such a flip fails the comparison.

--table FILE appends one row of ACTUAL's verdict counts under LABEL (the header
first when FILE is empty), for full.sh's per-mode summary.

--save writes INDEX as an expected summary, one case per line so that a
regeneration diffs readably, with TEXT saying how it was made.

Exit 0 when nothing differs, 1 when something does, 2 when a report cannot be
read.
"""

import argparse
import json
import os
import re
import sys

RANK = {"OK": 0, "NON-STRICT": 1, "INFORMATIONAL": 2, "UNIMPLEMENTED": 3, "FAILED": 4}


class BadReport(Exception):
    pass


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BadReport(f"{path}: {e}") from None


def check(path, cases):
    for case, (behavior, _, _) in cases.items():
        if behavior not in RANK:
            raise BadReport(f"{path}: case {case} has unknown behavior {behavior!r}")
    return cases


def load(path, agent):
    """{case: (behavior, behaviorClose, remoteCloseCode)} from an index.json
    or an expected summary."""
    report = read_json(path)
    if isinstance(report, dict) and isinstance(report.get("cases"), dict):
        return check(path, {case: tuple(v) for case, v in report["cases"].items()})
    if not isinstance(report, dict) or not report:
        raise BadReport(f"{path}: neither an expected summary nor an Autobahn index.json")
    if agent is None:
        if len(report) != 1:
            raise BadReport(f"{path}: several agents {sorted(report)}; pick one with --agent")
        agent = next(iter(report))
    if agent not in report:
        raise BadReport(f"{path}: no agent {agent!r}, only {sorted(report)}")
    cases = {}
    for case, r in report[agent].items():
        if not isinstance(r, dict):
            raise BadReport(f"{path}: case {case} is not a result")
        cases[case] = (r.get("behavior"), r.get("behaviorClose"), r.get("remoteCloseCode"))
    return check(path, cases)


def spec_patterns(actual_path):
    """The case patterns of the run, from the spec.json run.sh wrote beside
    its index.json; None (every case) when there is none."""
    spec_path = os.path.join(os.path.dirname(actual_path), "spec.json")
    if not os.path.exists(spec_path):
        return None
    patterns = read_json(spec_path).get("cases")
    if not isinstance(patterns, list):
        raise BadReport(f"{spec_path}: no case list")
    return patterns


def selected(case, patterns):
    """wstest's own matching (caseset.py resolveCasePatternList): a pattern
    with `*` is a regex match from the start, anything else an exact id."""
    if patterns is None:
        return True
    for p in patterns:
        if "*" in p:
            if re.match(p.replace(".", r"\.").replace("*", ".*"), case):
                return True
        elif p == case:
            return True
    return False


def case_key(case):
    return tuple(int(p) if p.isdigit() else p for p in case.split("."))


def show(result):
    behavior, close, code = result
    return f"{behavior}/{close}/{code}"


def compare(expected, actual, non_strict_is_ok=False):
    """Returns (lines, differ, worse) over the union of cases."""
    rank = dict(RANK)
    if non_strict_is_ok:
        rank["NON-STRICT"] = rank["OK"]
    lines = []
    differ = worse = 0
    for case in sorted(set(expected) | set(actual), key=case_key):
        e = expected.get(case)
        a = actual.get(case)
        if e is None or a is None:
            differ += 1
            if e is None:
                lines.append(f"DIFFERS {case}: not in the expected result")
            else:
                worse += 1
                lines.append(f"WORSE   {case}: did not run")
            continue
        same_behavior = rank[a[0]] == rank[e[0]]
        if same_behavior and a[1:] == e[1:]:
            if a[0] != e[0]:
                lines.append(f"note    {case}: {e[0]} -> {a[0]}, counted as same")
            continue
        differ += 1
        if rank[a[0]] > rank[e[0]]:
            worse += 1
            lines.append(f"WORSE   {case}: expected {show(e)}, got {show(a)}")
        else:
            lines.append(f"DIFFERS {case}: expected {show(e)}, got {show(a)}")
    return lines, differ, worse


def append_row(path, label, actual, differ):
    columns = list(RANK) + ["differ"]
    counts = {b: 0 for b in RANK}
    for behavior, _, _ in actual.values():
        counts[behavior] += 1
    counts["differ"] = differ
    width = max(len(label), 36)
    with open(path, "a") as f:
        if f.tell() == 0:
            f.write(f"{'mode':<{width}} {'cases':>5}" + "".join(f" {c:>13}" for c in columns) + "\n")
        f.write(f"{label:<{width}} {len(actual):>5}" + "".join(f" {counts[c]:>13}" for c in columns) + "\n")


def save(path, index_path, about):
    cases = load(index_path, None)
    rows = [f"    {json.dumps(c)}: {json.dumps(list(cases[c]))}" for c in sorted(cases, key=case_key)]
    with open(path, "w") as f:
        f.write("{\n")
        f.write(f'  "about": {json.dumps(about)},\n')
        f.write('  "cases": {\n' + ",\n".join(rows) + "\n  }\n}\n")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("expected", help="expected summary or index.json (with --save: the file to write)")
    p.add_argument("actual", help="index.json of the run through the proxy (with --save: of the direct run)")
    p.add_argument("--agent", help="agent name in index.json reports (default: the only one)")
    p.add_argument("--non-strict-is-ok", action="store_true", help="count NON-STRICT as OK (timing noise)")
    p.add_argument("--table", help="append a row of verdict counts to this file")
    p.add_argument("--label", default="", help="the row's name in --table")
    p.add_argument("--save", action="store_true", help="write ACTUAL as the expected summary EXPECTED")
    p.add_argument("--about", default="", help="with --save: how the expected result was made")
    args = p.parse_args(argv)
    try:
        if args.save:
            save(args.expected, args.actual, args.about)
            return 0
        patterns = spec_patterns(args.actual)
        expected = {c: r for c, r in load(args.expected, args.agent).items() if selected(c, patterns)}
        actual = load(args.actual, args.agent)
    except BadReport as e:
        print(f"compare.py: {e}", file=sys.stderr)
        return 2
    lines, differ, worse = compare(expected, actual, args.non_strict_is_ok)
    out = sys.stderr if differ else sys.stdout
    for line in lines:
        print(line, file=out)
    print(f"autobahn compare: {len(expected | actual)} cases, {differ} differ ({worse} worse)", file=out)
    if args.table:
        append_row(args.table, args.label, actual, differ)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
