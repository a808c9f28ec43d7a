#!/usr/bin/env python3
"""Reconnect storm: what a Conman rollout does to the proxy in front of it.

For each subject (eval-proxy, nginx, HAProxy; one proxy core each) this
starts two echo backends standing for two Conman VMs, puts the subject in
front of both, and runs `eval-loadgen storm`: it opens N sessions (about
half on each backend), holds them with a light periodic echo, kills one
backend, and reconnects every session that was lost, at once (after the
Close's `retry_after_ms` when there is one). The loadgen reports the time
from the kill until every session relays again, the reconnects' setup
latency, the sessions that never came back, and the proxy's CPU time over
the storm (read from /proc at the kill and when the last session relays).

Writes RESULTS/storm.{md,json,svg} and puts the table into bench/README.md
after a full run. Python 3.11 standard library only; the process handling,
build and peer installation come from compare.py. See bench/README.md,
"Reconnect storm".
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as C  # noqa: E402  (the sibling script, not a package)

SUBJECTS = ["eval-proxy", "nginx", "haproxy"]
PEERS = ["nginx", "haproxy"]
TEMPLATES = {
    "eval-proxy": "storm-eval-proxy.toml",
    "nginx": "storm-nginx.conf",
    "haproxy": "storm-haproxy.cfg",
}
COLORS = {"eval-proxy": "#d62728", "nginx": "#2ca02c", "haproxy": "#1f77b4"}
# eval-proxy metrics kept from each run, as their change from every session
# held to the end: what the proxy did inside during the storm.
EVAL_METRICS = ("eval_conman_attempt_failures_total", "eval_session_setup_failures_total",
                "eval_session_attempts_total", "eval_sessions_established_total",
                "eval_close_codes_total", "eval_setup_duration_seconds_sum",
                "eval_setup_duration_seconds_count", "eval_accept_errors_total")
# A run whose proxy waited for a CPU (other work on its core) for more
# than this share of the storm is marked ~.
MAX_WAIT_SHARE = 0.25


def log(msg: str) -> None:
    print(f"[storm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ runs


def eval_metrics(procs: C.Procs, proxy: C.Proxy) -> dict[str, float]:
    """eval-proxy's samples named in EVAL_METRICS, by name and labels."""
    m = re.search(r"admin=(\S+)", procs.out_text(proxy.leader))
    if not m:
        return {}
    try:
        with urllib.request.urlopen(f"http://{m.group(1)}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        log(f"  eval-proxy /metrics failed: {e}")
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(EVAL_METRICS):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metrics_change(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0), 6) for k, v in sorted(after.items())
            if v != before.get(k, 0)}


TCP_COUNTERS = ("TCPSynRetrans", "ListenOverflows", "ListenDrops")


def tcp_counters() -> dict[str, int]:
    """The kernel's TcpExt counters named in TCP_COUNTERS (machine-wide)."""
    out = {}
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            for k, v in zip(names.split()[1:], values.split()[1:]):
                if k in TCP_COUNTERS:
                    out[k] = int(v)
    return out


def nginx_upstream_failures(procs: C.Procs, proxy: C.Proxy) -> dict[str, int] | None:
    path = procs.workdir / proxy.leader.bench_name / "error.log"  # type: ignore[union-attr]
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    return {"connect_failed": len(re.findall(r"connect\(\) failed .* while connecting to upstream", text)),
            "marked_down": text.count("upstream server temporarily disabled")}


def run_one(a: argparse.Namespace, bench: C.Bench, rep: int, subject: str) -> dict:
    procs = bench.procs
    rec: dict = {"rep": rep, "subject": subject, "ok": False}
    log(f"rep {rep} {C.NAMES[subject]}: {a.sessions} sessions")
    started = []
    try:
        vm_a, addr_a = bench.start_backend()
        started.append(vm_a)
        vm_b, addr_b = bench.start_backend()
        started.append(vm_b)
        proxy = bench.start_subject(subject, addr_a, templates=TEMPLATES, BACKEND_B=addr_b)
        started.insert(0, proxy.leader)
        pids = proxy.pids()
        rec["proxy_pids"] = pids
        argv = [bench.bins["loadgen"], "storm", "--sessions", str(a.sessions),
                "--url", f"ws://{proxy.addr}/wsv2/", "--json",
                "--token-per-conn", "--dev-key", "--repls", str(a.repls),
                "--kill-pid", str(vm_b.pid), "--settle", f"{a.settle}s",
                "--observe", f"{a.observe}s", "--echo-every", a.echo_every,
                "--storm-timeout", f"{a.storm_timeout}s"]
        for pid in pids:
            argv += ["--watch-pid", str(pid)]
        rec["argv"] = ["eval-loadgen"] + argv[1:]
        others0 = C.others_cpu_ticks()
        tcp0 = tcp_counters()
        be0 = C.proc_cpu(vm_a.pid)
        t0 = time.monotonic()
        lg = procs.spawn(bench.name(f"storm-{subject}"), argv, a.load_cpu)
        if subject == "eval-proxy":
            # Counters from here on are the storm's (and the settle's echoes).
            procs.wait_line(lg, r"holding \d+", 120 + a.sessions / 200)
            held = eval_metrics(procs, proxy)
        # Opening N sessions, the settle time, the storm and its tail.
        code, ru = procs.wait_exit(lg, 120 + a.sessions / 200 + a.settle + a.storm_timeout)
        rec["wall_s"] = time.monotonic() - t0
        rec["others_cpu_s"] = max(0, C.others_cpu_ticks() - others0) / C.HZ
        rec["tcp"] = {k: v - tcp0.get(k, 0) for k, v in tcp_counters().items()}
        be1 = C.proc_cpu(vm_a.pid)
        rec["backend_cpu_s"] = (sum(be1) - sum(be0)) / C.HZ
        rec["loadgen_cpu_s"] = ru.ru_utime + ru.ru_stime
        rec["exit_code"] = code
        if vm_b.poll() is None:
            rec["note"] = "the backend to kill was still running"
        if proxy.leader.poll() is not None:
            rec["note"] = f"the proxy exited (status {proxy.leader.returncode})"
        if subject == "eval-proxy":
            rec["eval_metrics"] = metrics_change(held, eval_metrics(procs, proxy))
        elif subject == "nginx":
            rec["nginx_upstream"] = nginx_upstream_failures(procs, proxy)
        report = C.json_report(procs.out_text(lg))
        rec["loadgen"] = report
        stderr = procs.out_text(lg, "err").strip()
        if report is None:
            rec["error"] = f"eval-loadgen exited {code} without a JSON report:\n{procs.tail(lg)}"
        elif code != 0 or report.get("errors") or rec.get("note"):
            rec["error"] = (f"eval-loadgen exited {code}, errors {report.get('errors')}"
                            + (f"; {rec['note']}" if rec.get("note") else "")
                            + (f": {stderr.splitlines()[-1]}" if stderr else ""))
        else:
            rec["ok"] = True
    except C.RunError as e:
        rec["error"] = str(e)
    finally:
        for p in started:
            procs.stop(p)
    if rec.get("error"):
        log(f"  FAILED: {rec['error']}")
    if rec.get("loadgen") and rec["loadgen"].get("storm"):
        log("  " + summary(rec))
    return rec


def summary(rec: dict) -> str:
    s = rec["loadgen"]["storm"]
    cpu = s.get("cpu") or {}
    return (f"lost {s['lost']}, all relaying after {fmt(s['all_relaying_ms'])} ms, "
            f"setup p50 {s['setup_us']['p50'] / 1000:.1f} ms p99 {s['setup_us']['p99'] / 1000:.1f} ms, "
            f"failed {s['failed_sessions']}, proxy CPU {fmt(cpu.get('storm_cpu_ms'))} ms")


# --------------------------------------------------------------- figures


def fmt(v) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    return "–" if v is None else C.fmt(v)


def storm_of(rec: dict | None) -> dict | None:
    if not rec or not rec.get("loadgen"):
        return None
    return rec["loadgen"].get("storm")


def cpu_field(key: str):
    return lambda s: (s.get("cpu") or {}).get(key)


def kernel_share(s: dict):
    c = s.get("cpu") or {}
    total = c.get("storm_user_ms", 0) + c.get("storm_sys_ms", 0)
    return 100 * c["storm_sys_ms"] / total if total > 0 else None


# (title, value from a run's storm section, whether a ratio means anything)
ROWS = [
    ("sessions lost by the kill", lambda s: s["lost"], False),
    ("**time until all relay again (ms)**", lambda s: s["all_relaying_ms"], True),
    ("reconnect: 101 received, p50 (ms)", lambda s: s["upgrade_us"]["p50"] / 1000, True),
    ("**reconnect setup p50 (ms)**: connect → 101 → first echo", lambda s: s["setup_us"]["p50"] / 1000, True),
    ("**reconnect setup p99 (ms)**", lambda s: s["setup_us"]["p99"] / 1000, True),
    ("reconnect setup max (ms)", lambda s: s["setup_us"]["max"] / 1000, True),
    ("loss to relaying again, p99 (ms)", lambda s: s["recovery_us"]["p99"] / 1000, True),
    ("**failed sessions** (goal 0)", lambda s: s["failed_sessions"], False),
    ("reconnect attempts that failed (retried by the client)",
     lambda s: sum(s["attempt_failures"].values()), False),
    ("loss seen by the client after the kill, p50 (ms)", lambda s: s["detect_us"]["p50"] / 1000, True),
    ("loss seen by the client after the kill, max (ms)", lambda s: s["detect_us"]["max"] / 1000, True),
    ("**proxy CPU over the storm (ms)**", cpu_field("storm_cpu_ms"), True),
    ("proxy CPU above its background rate, per reconnect (µs)", cpu_field("per_reconnect_us"), True),
    ("proxy kernel share over the storm (%)", kernel_share, False),
    ("proxy waited for a CPU over the storm (ms): other work on its core",
     cpu_field("storm_wait_ms"), False),
    ("proxy CPU while holding, before the kill (ms/s)",
     lambda s: (s.get("cpu") or {}).get("baseline_cpu_ms", 0) / max((s.get("cpu") or {}).get("baseline_s", 0), 1e-9)
     if s.get("cpu") else None, False),
]


def table(runs: list[dict], reps: int) -> tuple[list[str], list[dict]]:
    by = {(r["rep"], r["subject"]): r for r in runs}
    lines = ["| figure | eval-proxy | nginx | HAProxy | eval ÷ best peer |",
             "|---|---|---|---|---|"]
    figs = []
    for title, get, ratio in ROWS:
        vals: dict[str, list] = {}
        for subject in SUBJECTS:
            vs = []
            for rep in range(1, reps + 1):
                s = storm_of(by.get((rep, subject)))
                try:
                    vs.append(get(s) if s else None)
                except (KeyError, TypeError, ZeroDivisionError):
                    vs.append(None)
            vals[subject] = vs
        ratios = []
        for i in range(reps):
            peers = [vals[p][i] for p in PEERS if vals[p][i] is not None]
            ev = vals["eval-proxy"][i]
            best = min(peers) if peers else None
            ratios.append(ev / best if ratio and ev is not None and best and best > 0 else None)
        flags = {s: [mark(by.get((rep, s))) for rep in range(1, reps + 1)] for s in SUBJECTS}
        cells = [" / ".join(fmt(v) + f for v, f in zip(vals[s], flags[s])) for s in SUBJECTS]
        rcell = " / ".join(f"{x:.2f}" if x is not None else "–" for x in ratios) if ratio else "–"
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {rcell} |")
        figs.append({"title": title, "values": vals, "ratio": ratios})
    return lines, figs


def contended(rec: dict | None) -> bool:
    s = storm_of(rec)
    c = (s or {}).get("cpu")
    return bool(c) and c["storm_wait_ms"] > MAX_WAIT_SHARE * c["storm_s"] * 1000


def mark(rec: dict | None) -> str:
    if not rec:
        return ""
    return ("" if rec.get("ok") else "⚠") + ("~" if contended(rec) else "")


def eval_inside(m: dict[str, float]) -> str:
    """What eval-proxy's own counters say happened during the storm."""
    parts = []
    fails = {k: v for k, v in m.items() if k.startswith("eval_conman_attempt_failures_total")}
    for k, v in fails.items():
        labels = dict(re.findall(r'(\w+)="([^"]*)"', k))
        parts.append(f"{v:,.0f} Conman attempts failed ({labels.get('stage')}, {labels.get('reason')})")
    if not fails:
        parts.append("no Conman attempt failed")
    means = []
    for stage in ("controlplane", "conman_dial", "conman_upgrade", "total"):
        n = m.get(f'eval_setup_duration_seconds_count{{stage="{stage}"}}')
        t = m.get(f'eval_setup_duration_seconds_sum{{stage="{stage}"}}')
        if n and t is not None:
            means.append(f"{stage} {t / n * 1000:.1f}")
    if means:
        parts.append("mean setup stage ms: " + ", ".join(means))
    return "; ".join(parts)


def details(runs: list[dict]) -> list[str]:
    out = ["| run | lost by | failed attempts (client) | reconnects | inside the proxy | "
           "SYN retransmits, listen overflows | others' CPU |",
           "|---|---|---|---|---|---|---|"]
    for r in runs:
        s = storm_of(r)
        if not s:
            out.append(f"| {r['rep']} {C.NAMES[r['subject']]} | – | – | – | – | – | – |")
            continue
        kinds = lambda m: ", ".join(f"{k} {n}" for k, n in m.items()) or "none"
        inside = "–"
        if r.get("eval_metrics"):
            inside = eval_inside(r["eval_metrics"])
        elif r.get("nginx_upstream"):
            n = r["nginx_upstream"]
            inside = (f"{n['connect_failed']:,} upstream connects failed, backend marked down "
                      f"{n['marked_down']} time(s) (error.log)")
        share = r.get("others_cpu_s", 0) / r["wall_s"] if r.get("wall_s") else 0
        tcp = r.get("tcp", {})
        syn = f"{tcp.get('TCPSynRetrans', 0):,}, {tcp.get('ListenOverflows', 0):,}" if tcp else "–"
        out.append(f"| {r['rep']} {C.NAMES[r['subject']]} | {kinds(s['lost_by'])} | "
                   f"{kinds(s['attempt_failures'])} | {s['reconnects']:,} | {inside} | {syn} | "
                   f"{share:.0%} |")
    return out


def markdown(meta: dict, runs: list[dict]) -> tuple[str, list[dict]]:
    reps = meta["reps"]
    rows, figs = table(runs, reps)
    L = [f"# Reconnect storm: {meta['sessions']:,} sessions on 2 backends, one killed\n",
         f"{meta['date']} · eval-proxy {meta['commit']} · {meta['cpu_model']}, {meta['cpus']} CPUs, "
         f"Linux {meta['kernel']} · {meta['versions']}  ",
         f"`{meta['command']}` · {meta['repls']} repls (one cached token each), echo every "
         f"{meta['echo_every']} per session, kill after {meta['settle']} s of holding; proxy on "
         f"CPU {meta['proxy_cpu']}, loadgen + both backends on CPU {meta['load_cpu']}.\n",
         f"Each cell: " + " / ".join(f"run {i}" for i in range(1, reps + 1))
         + ". Lower is better except for sessions lost (which is how many reconnected). "
           "⚠ = the run failed or a session never relayed again (see notes); ~ = the proxy "
           f"waited for a CPU for more than {MAX_WAIT_SHARE:.0%} of the storm (other work on "
           "its core), so its times say more about the machine than about the proxy.\n"]
    L += rows
    L += ["", "What happened in each run:\n"] + details(runs)
    notes = [f"**{r['rep']} {C.NAMES[r['subject']]} FAILED**: {r['error'].splitlines()[0]}"
             for r in runs if r.get("error")]
    if notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    L += ["", "![Sessions relaying over time after the kill](storm.svg)", ""]
    return "\n".join(L), figs


def ticks(lo: float, hi: float) -> list[float]:
    """Round values (1, 2 or 5 × 10^k apart) from lo to hi, at most 7."""
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-9)))
    for m in (0.1, 0.2, 0.5, 1, 2, 5, 10):
        if (hi - lo) / (step * m) <= 6:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def svg(meta: dict, runs: list[dict]) -> str:
    """Sessions relaying against time since the kill, one line per run."""
    W, H, left, right, top, bottom = 760, 360, 70, 150, 40, 50
    series = []
    for r in runs:
        s = storm_of(r)
        if s and s["relaying"] and s["timeline_step_ms"] > 0:
            series.append((r, s))
    if not series:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>\n'
    ends = [s["all_relaying_ms"] or len(s["relaying"]) * s["timeline_step_ms"] for _, s in series]
    span = max(max(ends) * 1.15, 10.0)
    n = meta["sessions"]
    low = min(min(s["relaying"]) for _, s in series)
    y0 = max(0, low - (n - low) * 0.1)
    x = lambda ms: left + (W - left - right) * min(ms, span) / span
    y = lambda v: top + (H - top - bottom) * (n - v) / max(n - y0, 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">Sessions relaying after one of two backends '
           f'is killed ({n:,} sessions)</text>']
    for v in ticks(y0, n):
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
    for t in ticks(0, span):
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{H - bottom}" y2="{H - bottom + 5}" stroke="#999"/>')
        out.append(f'<text x="{x(t):.1f}" y="{H - bottom + 18}" text-anchor="middle">{t:,.0f}</text>')
    out.append(f'<text x="{(left + W - right) / 2}" y="{H - 12}" text-anchor="middle">ms since the kill</text>')
    for k, (r, s) in enumerate(series):
        step = s["timeline_step_ms"]
        pts = " ".join(f"{x(i * step):.1f},{y(v):.1f}" for i, v in enumerate(s["relaying"])
                       if i * step <= span)
        dash = ' stroke-dasharray="5,3"' if r["rep"] > 1 else ""
        color = COLORS[r["subject"]]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{pts}"/>')
        ly = top + 16 * k + 10
        out.append(f'<line x1="{W - right + 10}" x2="{W - right + 30}" y1="{ly}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>')
        label = html.escape(f"{C.NAMES[r['subject']]} run {r['rep']}")
        out.append(f'<text x="{W - right + 35}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_outputs(a: argparse.Namespace, meta: dict, runs: list[dict]) -> None:
    md, figs = markdown(meta, runs)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "storm.md").write_text(md)
    (a.out / "storm.svg").write_text(svg(meta, runs))
    (a.out / "storm.json").write_text(json.dumps(
        {"meta": meta, "figures": figs, "runs": runs}, indent=1, ensure_ascii=False) + "\n")
    if meta["sessions"] == 8000 and not meta.get("partial") and \
            a.out.resolve() == (C.BENCH / "results").resolve():
        C.update_readme(md, "storm", "storm", "Sessions relaying over time after the kill")
    print(md)
    log(f"wrote {a.out}/storm.{{md,json,svg}}")


# ------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/storm.sh",
        description="Reconnect storm against eval-proxy, nginx and HAProxy (see bench/README.md).")
    p.add_argument("--sessions", type=int, default=8000, help="sessions held (8000)")
    p.add_argument("--repls", type=int, default=2000,
                   help="repls, one cached token each, shared by sessions in turn (2000)")
    p.add_argument("--reps", type=int, default=2, help="repetitions, order reversed in each (2)")
    p.add_argument("--subjects", help="comma-separated subset: eval-proxy,nginx,haproxy")
    p.add_argument("--echo-every", default="2s", help="each held session echoes this often (2s)")
    p.add_argument("--settle", type=float, default=3.0,
                   help="seconds held before the kill; the CPU baseline (3)")
    p.add_argument("--observe", type=float, default=2.0,
                   help="seconds after the kill before the storm may end (2)")
    p.add_argument("--storm-timeout", type=float, default=60.0,
                   help="seconds after the kill when sessions still down count as failed (60)")
    p.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy under test (0)")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU for loadgen and backends (1)")
    p.add_argument("--out", type=Path, default=C.BENCH / "results", help="results folder")
    p.add_argument("--no-build", action="store_true", help="use the binaries already built")
    p.add_argument("--no-install", action="store_true", help="never apt-get install the peers")
    p.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only rebuild the table and chart from a saved storm.json")
    a = p.parse_args(argv)
    a.argv = argv
    a.subjects = a.subjects.split(",") if a.subjects else list(SUBJECTS)
    unknown = set(a.subjects) - set(SUBJECTS)
    if unknown:
        p.error(f"unknown subject(s): {', '.join(sorted(unknown))}")
    if a.proxy_cpu == a.load_cpu:
        p.error("--proxy-cpu and --load-cpu must differ")
    if a.sessions < 2 or a.repls < 1:
        p.error("--sessions needs at least 2 and --repls at least 1")
    allowed = os.sched_getaffinity(0)
    for c in (a.proxy_cpu, a.load_cpu):
        if c not in allowed:
            p.error(f"CPU {c} is not available here (have {sorted(allowed)})")
    # What compare.py's helpers read.
    a.quick = False
    a.duration = 0
    a.idle_conns = 0
    a.reps = max(1, a.reps)
    a.loads = None
    a.max_others = 0.25
    a.max_steal = C.MAX_STEAL
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.render:
        saved = json.loads(a.render.read_text())
        write_outputs(a, saved["meta"], saved["runs"])
        return 0
    if any(s != "eval-proxy" for s in a.subjects):
        C.ensure_peers(a)
    if not shutil.which("taskset"):
        raise C.BenchError("taskset not found (package util-linux)")
    bins = C.build(a)
    meta = C.machine_meta(a, bins)
    meta.update({
        "command": " ".join(["bench/storm.sh"] + a.argv),
        "sessions": a.sessions, "repls": a.repls, "echo_every": a.echo_every,
        "settle": a.settle, "observe": a.observe, "subjects": a.subjects,
        "partial": a.subjects != SUBJECTS,
    })
    for k in ("duration", "quick", "idle_conns", "max_others"):
        meta.pop(k, None)
    meta["versions"] = re.sub(r", Caddy \S+", "", meta["versions"])

    def body(procs: C.Procs, runs: list[dict]) -> None:
        bench = C.Bench(a, procs, bins)
        for rep in range(1, a.reps + 1):
            # Reverse the order every other repetition, so drift in the
            # machine's background load does not favour one subject.
            order = a.subjects if rep % 2 else list(reversed(a.subjects))
            for subject in order:
                runs.append(run_one(a, bench, rep, subject))

    runs, meta["elapsed_s"] = C.run_all(a, "eval-storm-", body)
    runs.sort(key=lambda r: (r["rep"], SUBJECTS.index(r["subject"])))
    write_outputs(a, meta, runs)
    return C.exit_status(runs)


if __name__ == "__main__":
    C.entry(main)
