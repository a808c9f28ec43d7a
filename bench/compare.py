#!/usr/bin/env python3
"""eval-proxy against nginx, HAProxy and Caddy, one proxy core each.

Runs the same loads (bundled eval-loadgen) against eval-proxy (1 shard), each
peer (one worker or thread) and the echo backend directly; the proxy is pinned
to one core, loadgen and backend to another. The headline figures are the
proxy's CPU per unit of work, read from /proc/PID/stat, because the load side
may saturate first and then msgs/s alone hides what a proxy costs.

Writes RESULTS/latest.{md,json,svg} (RESULTS/quick.* with --quick) and puts
the table into bench/README.md after a full run. With --tls, every proxy
terminates TLS instead (RESULTS/tls.*, or tls-quick.*). Python 3.11 standard
library only. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import html
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CONFIGS = BENCH / "configs"
HZ = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20

PEERS = ["nginx", "haproxy", "caddy"]
SUBJECTS = ["direct", "eval-proxy"] + PEERS
PROXIES = ["eval-proxy"] + PEERS
# --tls: the same eval-proxy built with the aws-lc-rs provider (cargo feature
# `aws-lc`) runs beside the default (ring) build, so both providers are
# measured in the same run; the peers are compared with the default build.
AWS_LC = "eval-proxy-aws-lc"
TLS_PROXIES = ["eval-proxy", AWS_LC] + PEERS
# --baseline without --tls: an older eval-proxy build (same config template)
# runs as one more subject beside eval-proxy, in the same turns, so drift
# reaches both builds alike. It is no peer: "eval ÷ best peer" stays eval-proxy
# against nginx, HAProxy and Caddy. (With --tls it takes the aws-lc-rs slot.)
BASELINE = "eval-proxy-baseline"
# Every eval-proxy build a run can start, and its key in build()'s binaries.
EVAL_BUILDS = {"eval-proxy": "proxy", AWS_LC: "proxy-aws-lc", BASELINE: "proxy-baseline"}
NAMES = {
    "direct": "direct",
    "eval-proxy": "eval-proxy",
    AWS_LC: "eval-proxy (aws-lc-rs)",
    BASELINE: "eval-proxy (baseline)",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "caddy": "Caddy",
}
# Each subject's config template in bench/configs.
TEMPLATES = {
    "eval-proxy": "eval-proxy.toml",
    "nginx": "nginx.conf",
    "haproxy": "haproxy.cfg",
    "caddy": "Caddyfile",
}
TLS_TEMPLATES = {
    "eval-proxy": "eval-proxy-tls.toml",
    "nginx": "nginx-tls.conf",
    "haproxy": "haproxy-tls.cfg",
    "caddy": "Caddyfile-tls",
}
# The certificate's name (eval-loadgen tls-cert makes it for localhost); the
# loadgen sends it as SNI and in the Host header, as a browser would.
TLS_NAME = "localhost"
# A resumed-handshake run counts only if at least this share of its
# handshakes resumed; below it the subject "did not resume".
MIN_RESUMED_SHARE = 0.9
PEER_BINARIES = {
    "nginx": ["/usr/sbin/nginx"],
    "haproxy": ["/usr/sbin/haproxy"],
    "caddy": ["/usr/bin/caddy"],
}
# The same URL shape and token for everyone, so every subject sees the same
# request bytes; only eval-proxy checks the token.
TOKEN_CACHED = ["--token-per-conn", "--dev-key", "--repls", "1"]
TOKEN_FRESH = ["--token-per-conn", "--dev-key"]


class BenchError(Exception):
    """A step that the benchmark cannot go on without."""


class RunError(Exception):
    """One run failed (a proxy did not start, a wait timed out); others go on."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- loads


@dataclasses.dataclass(frozen=True)
class Load:
    key: str
    title: str
    mode: str
    args: tuple[str, ...]
    subjects: tuple[str, ...]
    tokens: tuple[str, ...]
    # What the proxy's CPU is divided by: "messages", "handshakes", "mib",
    # or None (idle: RSS, not CPU).
    unit: str | None
    # Over TLS: "resume" (TLS 1.3 tickets kept across connections) or
    # "full" (no session cache: every handshake is full); None: plain.
    tls: str | None = None


def make_tls_loads(a: argparse.Namespace) -> list[Load]:
    """--tls: every proxy terminates TLS in front of the same plain backend."""
    d = f"{a.duration}s"
    every = tuple(TLS_PROXIES)
    return [
        Load("tls_handshake_full", "TLS full handshake storm, 16 workers", "handshake",
             ("--workers", "16", "--duration", d, "--no-resume"),
             every, tuple(TOKEN_CACHED), "handshakes", "full"),
        Load("tls_handshake_resumed", "TLS resumed handshake storm (tickets), 16 workers",
             "handshake", ("--workers", "16", "--duration", d),
             every, tuple(TOKEN_CACHED), "handshakes", "resume"),
        Load("tls_echo", "TLS echo 64 B, 50 conns, saturated", "echo",
             ("--conns", "50", "--size", "64", "--duration", d),
             every, tuple(TOKEN_CACHED), "messages", "resume"),
        Load("tls_bulk", "TLS bulk 1 MiB messages, 1 conn", "bulk",
             ("--size", "1MiB", "--duration", d),
             every, tuple(TOKEN_CACHED), "mib", "resume"),
        # The plain figure beside it, from the same run: what TLS costs per MiB.
        Load("bulk", "plain bulk 1 MiB messages, 1 conn", "bulk",
             ("--size", "1MiB", "--duration", d),
             tuple(PROXIES), tuple(TOKEN_CACHED), "mib"),
    ]


def make_loads(a: argparse.Namespace) -> list[Load]:
    if a.tls:
        return select_loads(a, make_tls_loads(a), TLS_PROXIES)
    d = f"{a.duration}s"
    # Fresh tokens are signed before the clock starts so signing does not
    # load the client core; enough for ~8,000 handshakes/s for the whole run.
    premint = max(20_000 if not a.quick else 2_000, int(8_000 * a.duration))
    loads = [
        Load("echo", "echo 64 B, 50 conns, saturated", "echo",
             ("--conns", "50", "--size", "64", "--duration", d),
             tuple(SUBJECTS), tuple(TOKEN_CACHED), "messages"),
        Load("rate30k", "rate 30,000 msg/s, 100 conns, 64 B", "rate",
             ("--conns", "100", "--rate", "30000", "--size", "64", "--duration", d),
             tuple(PROXIES), tuple(TOKEN_CACHED), "messages"),
        Load("handshake", "handshake storm, 16 workers, token seen before", "handshake",
             ("--workers", "16", "--duration", d),
             tuple(SUBJECTS), tuple(TOKEN_CACHED), "handshakes"),
        Load("handshake_fresh", "handshake storm, 16 workers, fresh token each", "handshake",
             ("--workers", "16", "--duration", d),
             ("eval-proxy",), tuple(TOKEN_FRESH + ["--premint", str(premint)]), "handshakes"),
        Load("idle", f"idle, {a.idle_conns} sessions held", "idle",
             ("--conns", str(a.idle_conns), "--hold", f"{a.idle_hold}s"),
             tuple(PROXIES), tuple(TOKEN_FRESH), None),
        Load("bulk", "bulk 1 MiB messages, 1 conn", "bulk",
             ("--size", "1MiB", "--duration", d),
             tuple(SUBJECTS), tuple(TOKEN_CACHED), "mib"),
        Load("rate5k", "rate 5,000 msg/s, 50 conns, 64 B (RTT)", "rate",
             ("--conns", "50", "--rate", "5000", "--size", "64", "--duration", d),
             tuple(SUBJECTS), tuple(TOKEN_CACHED), "messages"),
    ]
    if a.baseline:
        # Right after eval-proxy, so that in the alternating turns the two
        # builds are loaded next to each other.
        loads = [dataclasses.replace(l, subjects=tuple(
            x for s in l.subjects for x in ((s, BASELINE) if s == "eval-proxy" else (s,))))
            for l in loads]
        return select_loads(a, loads, SUBJECTS + [BASELINE])
    return select_loads(a, loads, SUBJECTS)


def select_loads(a: argparse.Namespace, loads: list[Load], subjects: list[str]) -> list[Load]:
    """The loads and subjects --loads and --subjects ask for."""
    if a.loads:
        wanted = set(a.loads.split(","))
        unknown = wanted - {l.key for l in loads}
        if unknown:
            raise BenchError(f"unknown load(s): {', '.join(sorted(unknown))}")
        loads = [l for l in loads if l.key in wanted]
    if a.subjects:
        wanted = set(a.subjects.split(","))
        unknown = wanted - set(subjects)
        if unknown:
            raise BenchError(f"unknown subject(s): {', '.join(sorted(unknown))}")
        loads = [dataclasses.replace(l, subjects=tuple(s for s in l.subjects if s in wanted))
                 for l in loads]
    return [l for l in loads if l.subjects]


# ------------------------------------------------------------ /proc readers


def proc_cpu(pid: int) -> tuple[int, int]:
    """utime, stime in clock ticks, all threads of the process."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[11]), int(rest[12])


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except FileNotFoundError:
        pass
    return out


PF_KTHREAD = 0x00200000

# A run during which the hypervisor took more than this share of the
# proxy's or the load's CPU (steal time) is marked ~ and repeated, as for
# other processes: on a shared host a TLS bulk pair ran with 11 % steal on
# the proxy's core while no other process was busy.
MAX_STEAL = 0.05


def steal_ticks(cpus: tuple[int, ...]) -> list[int]:
    """Steal time of each of `cpus` so far (/proc/stat, in ticks): time the
    hypervisor ran something else while this VM's vCPU wanted to run. No
    process's own times show it, and it is not the benchmark's doing."""
    want = {f"cpu{c}": i for i, c in enumerate(cpus)}
    out = [0] * len(cpus)
    try:
        with open("/proc/stat") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in want and len(parts) > 8:
                    out[want[parts[0]]] = int(parts[8])
    except OSError:
        pass
    return out


def others_cpu_ticks() -> int:
    """CPU ticks (own + reaped children's) of every user process that is not
    this benchmark or one of its children.

    The difference over a run is what other work on the machine took while
    it ran. Reaped children move into their parent's cutime/cstime, so the
    sum stays right when processes come and go. Per-CPU /proc/stat is no use
    for this: its tick samples disagree with the processes' own times by a
    third at light load here.
    """
    procs: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2:].split()
        if int(rest[6]) & PF_KTHREAD:
            continue
        procs[int(name)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    ours, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo.extend(kids.get(pid, []))
    return sum(t for pid, (_, t) in procs.items() if pid not in ours)


# ------------------------------------------------------------- processes


class Procs:
    """Everything the benchmark started, so that all of it ends with it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.live: list[subprocess.Popen] = []

    def spawn(self, name: str, argv: list[str], cpu: int, env: dict | None = None,
              ) -> subprocess.Popen:
        out = open(self.workdir / f"{name}.out", "wb")
        err = open(self.workdir / f"{name}.err", "wb")
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        try:
            p = subprocess.Popen(["taskset", "-c", str(cpu)] + argv, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=err, env=full_env, start_new_session=True)
        except OSError as e:
            raise RunError(f"cannot start {name} ({argv[0]}): {e}") from e
        finally:
            out.close()
            err.close()
        p.bench_name = name  # type: ignore[attr-defined]
        self.live.append(p)
        return p

    def out_text(self, p: subprocess.Popen, which: str = "out") -> str:
        path = self.workdir / f"{p.bench_name}.{which}"  # type: ignore[attr-defined]
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, p: subprocess.Popen, n: int = 12) -> str:
        lines = (self.out_text(p, "out") + self.out_text(p, "err")).strip().splitlines()
        return "\n".join("    " + l for l in lines[-n:]) or "    (no output)"

    def wait_line(self, p: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.out_text(p))
            if m:
                return m
            if p.poll() is not None:
                raise RunError(f"{p.bench_name} exited with status {p.returncode} before "  # type: ignore[attr-defined]
                               f"printing /{pattern}/:\n{self.tail(p)}")
            if time.monotonic() > deadline:
                raise RunError(f"{p.bench_name} did not print /{pattern}/ within {timeout:.0f} s:\n"  # type: ignore[attr-defined]
                               f"{self.tail(p)}")
            time.sleep(0.02)

    def wait_port(self, p: subprocess.Popen, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if p.poll() is not None:
                raise RunError(f"{p.bench_name} exited with status {p.returncode} "  # type: ignore[attr-defined]
                               f"before listening on 127.0.0.1:{port}:\n{self.tail(p)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RunError(f"{p.bench_name} is not listening on 127.0.0.1:{port} after "  # type: ignore[attr-defined]
                               f"{timeout:.0f} s:\n{self.tail(p)}")
            time.sleep(0.05)

    def wait_exit(self, p: subprocess.Popen, timeout: float):
        """Exit code and rusage (for the load side's own CPU)."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                self.live.remove(p)
                return p.returncode, ru
            if time.monotonic() > deadline:
                self.stop(p)
                raise RunError(f"{p.bench_name} still running after {timeout:.0f} s; killed:\n"  # type: ignore[attr-defined]
                               f"{self.tail(p)}")
            time.sleep(0.02)

    def stop(self, p: subprocess.Popen, grace: float = 3.0) -> None:
        # Each child leads its own process group (nginx's worker is in its
        # master's), so the group is exactly what this benchmark started.
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            except ChildProcessError:
                pass
            # The leader is gone; make sure nothing else of its group is left.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            break
        if p in self.live:
            self.live.remove(p)

    def stop_all(self) -> None:
        for p in list(reversed(self.live)):
            self.stop(p, grace=1.0)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_on_signals(who: str) -> None:
    """Ctrl-C, SIGTERM and SIGHUP become SystemExit, so that `finally`
    stops every process `who` started."""
    def on_signal(signum, _frame):
        log(f"{signal.Signals(signum).name}: stopping everything {who} started")
        raise SystemExit(128 + signum)

    for s in STOP_SIGNALS:
        signal.signal(s, on_signal)


def ignore_signals() -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(template: str, dest: Path, **values: str) -> Path:
    text = (CONFIGS / template).read_text()
    for k, v in values.items():
        text = text.replace(f"@{k}@", v)
    dest.write_text(text)
    return dest


@dataclasses.dataclass
class Proxy:
    """A started subject: where to send load, which PIDs to account."""
    addr: str
    leader: subprocess.Popen | None

    def pids(self) -> list[int]:
        if self.leader is None:
            return []
        return [self.leader.pid] + proc_children(self.leader.pid)

    def serving_pids(self) -> list[int]:
        # nginx's master only manages its worker; the worker holds sessions.
        if self.leader is None:
            return []
        kids = proc_children(self.leader.pid)
        return kids or [self.leader.pid]


class Bench:
    def __init__(self, a: argparse.Namespace, procs: Procs, bins: dict[str, str]):
        self.a = a
        self.procs = procs
        self.bins = bins
        self.seq = 0
        # --tls: the run's certificate files (ca, cert, key, pem).
        self.tls: dict[str, str] = {}

    def make_certificate(self) -> None:
        """One ECDSA P-256 certificate for every subject of the run, signed
        by a throwaway CA that only the loadgen trusts."""
        d = self.procs.workdir / "tls"
        try:
            out = subprocess.run([self.bins["loadgen"], "tls-cert", "--dir", str(d)],
                                 check=True, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise BenchError(f"eval-loadgen tls-cert failed: {e}") from e
        files = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        if set(files) != {"ca", "cert", "key"}:
            raise BenchError(f"eval-loadgen tls-cert printed {out!r}")
        # HAProxy takes the certificate and its key from one file.
        pem = d / "haproxy.pem"
        pem.write_text(Path(files["cert"]).read_text() + Path(files["key"]).read_text())
        pem.chmod(0o600)
        self.tls = {**files, "pem": str(pem)}

    def start_backend(self) -> tuple[subprocess.Popen, str]:
        p = self.procs.spawn(self.name("backend"),
                             [self.bins["loadgen"], "echo-server", "--listen", "127.0.0.1:0"],
                             self.a.load_cpu)
        m = self.procs.wait_line(p, r"listening (\S+)", 10)
        return p, m.group(1)

    def name(self, what: str) -> str:
        self.seq += 1
        return f"{self.seq:03d}-{what}"

    def start_subject(self, subject: str, backend: str, templates: dict[str, str] | None = None,
                      **values: str) -> Proxy:
        """Starts `subject` in front of `backend` from its config template
        (`templates` names other ones; `values` fills their other @KEY@s)."""
        if subject == "direct":
            return Proxy(backend, None)
        t = dict(TEMPLATES, **(templates or {}))
        if subject in EVAL_BUILDS:
            name = self.name(subject)
            conf = render(t["eval-proxy"], self.procs.workdir / f"{name}.toml", BACKEND=backend,
                          **values)
            binary = self.bins[EVAL_BUILDS[subject]]
            p = self.procs.spawn(name, [binary, "--config", str(conf),
                                        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                                        "--shards", "1"], self.a.proxy_cpu)
            m = self.procs.wait_line(p, r"eval-proxy ready listen=(\S+)", 15)
            return Proxy(m.group(1), p)
        last: Exception | None = None
        for _ in range(3):
            # A port picked by binding to port 0 can be taken again before the
            # peer binds it; then pick another.
            port = free_port()
            listen = f"127.0.0.1:{port}"
            name = self.name(subject)
            rundir = self.procs.workdir / name
            rundir.mkdir()
            env = None
            values = dict(values, PORT=str(port), HOST="127.0.0.1")
            if subject == "nginx":
                conf = render(t[subject], rundir / "nginx.conf", LISTEN=listen,
                              BACKEND=backend, DIR=str(rundir), **values)
                argv = ["nginx", "-p", str(rundir), "-c", str(conf), "-e", str(rundir / "error.log")]
            elif subject == "haproxy":
                conf = render(t[subject], rundir / "haproxy.cfg", LISTEN=listen, BACKEND=backend,
                              **values)
                argv = ["haproxy", "-db", "-f", str(conf)]
            else:
                conf = render(t[subject], rundir / "Caddyfile", LISTEN=listen, BACKEND=backend,
                              **values)
                argv = ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]
                env = {"GOMAXPROCS": "1", "HOME": str(rundir), "XDG_CONFIG_HOME": str(rundir),
                       "XDG_DATA_HOME": str(rundir)}
            p = self.procs.spawn(name, argv, self.a.proxy_cpu, env)
            try:
                self.procs.wait_port(p, port, 15)
                if subject == "nginx":
                    self.wait_nginx_worker(p)
                return Proxy(listen, p)
            except RunError as e:
                last = e
                self.procs.stop(p)
                if "in use" not in self.procs.tail(p, 50):
                    break
        raise RunError(f"{NAMES[subject]} did not start: {last}")

    def wait_nginx_worker(self, p: subprocess.Popen) -> None:
        deadline = time.monotonic() + 10
        while not proc_children(p.pid):
            if time.monotonic() > deadline or p.poll() is not None:
                raise RunError(f"nginx started no worker:\n{self.procs.tail(p)}")
            time.sleep(0.05)

    def open(self, load: Load, subject: str) -> Stage:
        """Starts `subject` and its own echo backend for `load`, and lets them settle."""
        stage = Stage(subject)
        try:
            stage.backend, backend_addr = self.start_backend()
            if load.tls:
                stage.proxy = self.start_subject(subject, backend_addr, TLS_TEMPLATES, SNI=TLS_NAME,
                                                 CERT=self.tls["cert"], KEY=self.tls["key"],
                                                 PEM=self.tls["pem"])
                stage.url = [f"wss://{stage.proxy.addr}/wsv2/", "--ca", self.tls["ca"],
                             "--sni", TLS_NAME]
            else:
                stage.proxy = self.start_subject(subject, backend_addr)
                stage.url = [f"ws://{stage.proxy.addr}/wsv2/"]
            time.sleep(self.a.settle)
            stage.pids = stage.proxy.pids()
            stage.rss0 = sum(proc_rss_kib(p) for p in stage.proxy.serving_pids())
        except RunError:
            self.close(stage)
            raise
        return stage

    def close(self, stage: Stage) -> None:
        if stage.proxy is not None and stage.proxy.leader is not None:
            self.procs.stop(stage.proxy.leader)
        if stage.backend is not None:
            self.procs.stop(stage.backend)

    def load_once(self, stage: Stage, load: Load, seconds: float) -> dict:
        """One eval-loadgen run of `load` for `seconds` against a started
        subject: what the proxy, the backend, the loadgen, other processes
        and the hypervisor took meanwhile, and the loadgen's report."""
        rec: dict = {"ok": False}
        proxy, backend, pids = stage.proxy, stage.backend, stage.pids
        rec["proxy_pids"] = pids
        cpu0 = [proc_cpu(p) for p in pids]
        be0 = proc_cpu(backend.pid)
        others0 = others_cpu_ticks()
        cpus = (self.a.proxy_cpu, self.a.load_cpu)
        steal0 = steal_ticks(cpus)
        t0 = time.monotonic()
        args = list(load.args)
        if "--duration" in args:
            args[args.index("--duration") + 1] = f"{round(seconds * 1000)}ms"
        argv = ([self.bins["loadgen"], load.mode] + args
                + ["--url"] + stage.url + ["--json"] + list(load.tokens))
        rec["argv"] = ["eval-loadgen"] + argv[1:]
        lg = self.procs.spawn(self.name(f"loadgen-{load.key}-{stage.subject}"), argv,
                              self.a.load_cpu)
        if load.mode == "idle":
            m = self.procs.wait_line(lg, r"holding (\d+)", 120)
            rec["held"] = int(m.group(1))
            # Let the proxy finish any per-session work before sampling
            # (eval-proxy returns its idle buffer pages after 1 s of
            # quiet); the same wait for every subject.
            time.sleep(min(2.5, self.a.idle_hold / 2))
            rec["rss_kib_held"] = sum(proc_rss_kib(p) for p in proxy.serving_pids())
        code, ru = self.procs.wait_exit(lg, seconds + self.a.idle_hold + 90)
        wall = time.monotonic() - t0
        others1 = others_cpu_ticks()
        steal1 = steal_ticks(cpus)
        be1 = proc_cpu(backend.pid)
        now_pids = proxy.pids()
        if proxy.leader is not None and (proxy.leader.poll() is not None or set(now_pids) != set(pids)):
            rec["proxy_note"] = (f"proxy processes changed during the load "
                                 f"({pids} -> {now_pids}, exit {proxy.leader.returncode})")
        elif backend.poll() is not None:
            rec["proxy_note"] = (f"the echo backend exited during the load (status "
                                 f"{backend.returncode})")
        cpu1 = [proc_cpu(p) if p in now_pids else c for p, c in zip(pids, cpu0)]
        rec["proxy_user_s"] = sum(b[0] - a[0] for a, b in zip(cpu0, cpu1)) / HZ
        rec["proxy_sys_s"] = sum(b[1] - a[1] for a, b in zip(cpu0, cpu1)) / HZ
        rec["backend_cpu_s"] = (be1[0] + be1[1] - be0[0] - be0[1]) / HZ
        rec["loadgen_cpu_s"] = ru.ru_utime + ru.ru_stime
        rec["wall_s"] = wall
        rec["others_cpu_s"] = max(0, others1 - others0) / HZ
        # [proxy CPU, load CPU]
        rec["steal_s"] = [max(0, b - a) / HZ for a, b in zip(steal0, steal1)]
        rec["exit_code"] = code
        report = json_report(self.procs.out_text(lg))
        rec["loadgen"] = report
        stderr = self.procs.out_text(lg, "err").strip()
        if report is None:
            rec["error"] = f"eval-loadgen exited {code} without a JSON report:\n{self.procs.tail(lg)}"
        elif code != 0 or report.get("errors"):
            rec["error"] = (f"eval-loadgen exited {code}, errors {report.get('errors')}"
                            + (f": {stderr.splitlines()[-1]}" if stderr else ""))
        elif load.mode == "idle" and rec.get("held") != int(load.args[1]):
            rec["error"] = f"held {rec.get('held')} of {load.args[1]} sessions"
        elif load.tls == "full" and report.get("tls", {}).get("resumed"):
            rec["error"] = f"{report['tls']['resumed']} handshakes resumed without a session cache"
        else:
            rec["ok"] = True
        if rec.get("proxy_note"):
            rec["ok"] = False
            rec["error"] = (rec.get("error", "") + " " + rec["proxy_note"]).strip()
        return rec

    def run(self, rep: int, load: Load, subject: str) -> dict:
        """One run: `subject` started fresh, loaded for the whole duration, stopped."""
        log(f"rep {rep} {load.key:<15} {NAMES[subject]}")
        rec: dict = {"ok": False}
        stage = None
        try:
            stage = self.open(load, subject)
            rec = self.load_once(stage, load, self.a.duration)
            rec["rss_kib_before"] = stage.rss0
            rec["rss_kib_after"] = sum(proc_rss_kib(p) for p in stage.proxy.serving_pids()) \
                if stage.pids else 0
        except RunError as e:
            rec["error"] = str(e)
        finally:
            if stage is not None:
                self.close(stage)
        rec = {"rep": rep, "load": load.key, "subject": subject, **rec}
        self.log_result(load, rec)
        return rec

    def run_sliced(self, rep: int, load: Load, order: list[str], slices: int,
                   again) -> list[dict]:
        """One repetition of `load` for every subject in `order`, interleaved:
        all of them started side by side (each idle while another is loaded),
        then `slices` turns, each loading every subject for duration / slices
        seconds, the order reversed from turn to turn. The host's speed drifts
        by a fifth within minutes here; in turns of seconds every subject sees
        the same drift, where back-to-back runs let one subject have the slow
        minute. `again(part)` says whether a disturbed turn is loaded once more
        (the quieter attempt is kept). Returns one record per subject, its
        turns summed."""
        seconds = self.a.duration / slices
        log(f"rep {rep} {load.key:<15} {', '.join(NAMES[s] for s in order)}: "
            f"{slices} turns of {seconds:g} s each")
        stages: dict[str, Stage] = {}
        parts: dict[str, list[dict]] = {s: [] for s in order}
        failed: dict[str, str] = {}
        try:
            for s in order:
                try:
                    stages[s] = self.open(load, s)
                except RunError as e:
                    failed[s] = str(e)
            live = [s for s in order if s in stages]
            for turn in range(slices):
                for s in (live if turn % 2 == 0 else list(reversed(live))):
                    if s in failed:
                        continue
                    try:
                        tries = [self.load_once(stages[s], load, seconds)]
                        while len(tries) < 2 and tries[-1].get("ok") and again(tries[-1]):
                            tries.append(self.load_once(stages[s], load, seconds))
                    except RunError as e:
                        failed[s] = str(e)
                        continue
                    kept = keep_one(tries, self.a)
                    parts[s].append(kept)
                    if kept.get("error"):
                        # A failure is never retried away; the subject's
                        # other turns would only repeat it.
                        failed[s] = kept["error"]
            for s in live:
                st = stages[s]
                if parts[s]:
                    parts[s][-1]["rss_kib_before"] = st.rss0
                    parts[s][-1]["rss_kib_after"] = sum(
                        proc_rss_kib(p) for p in st.proxy.serving_pids()) if st.pids else 0
        finally:
            for st in stages.values():
                self.close(st)
        out = []
        for s in order:
            rec = {"rep": rep, "load": load.key, "subject": s, **merge_turns(parts[s])}
            if s in failed:
                rec["ok"] = False
                rec["error"] = failed[s]
            self.log_result(load, rec)
            out.append(rec)
        return out

    def log_result(self, load: Load, rec: dict) -> None:
        if rec.get("error"):
            log(f"  {NAMES[rec['subject']]} FAILED: {rec['error']}")
        else:
            log(f"  {NAMES[rec['subject']]}: {summary_line(load, rec, rec['loadgen'])}")


@dataclasses.dataclass
class Stage:
    """A subject started for a load, with its own echo backend."""
    subject: str
    proxy: Proxy | None = None
    backend: subprocess.Popen | None = None
    url: list[str] = dataclasses.field(default_factory=list)
    pids: list[int] = dataclasses.field(default_factory=list)
    rss0: int = 0


# What a sliced run's turns add up to; the rest of a record is per turn.
SUMMED = ("proxy_user_s", "proxy_sys_s", "backend_cpu_s", "loadgen_cpu_s", "wall_s",
          "others_cpu_s")
REPORT_SUMMED = ("established", "messages", "bytes", "duration_s", "handshakes")


def merge_turns(parts: list[dict]) -> dict:
    """One record from the turns of a sliced run: CPU, time and counts
    summed, rates recomputed; latency percentiles are the worst turn's
    (no figure of a sliced load uses them). Each turn's own record stays
    under "turns"."""
    if not parts:
        return {"ok": False}
    rec: dict = {k: sum(p.get(k, 0) for p in parts) for k in SUMMED}
    rec["steal_s"] = [sum(x) for x in zip(*(p.get("steal_s", [0, 0]) for p in parts))]
    rec["ok"] = all(p.get("ok") for p in parts)
    rec["attempts"] = 1 + sum(p.get("attempts", 1) - 1 for p in parts)
    for k in ("proxy_pids", "argv", "rss_kib_before", "rss_kib_after"):
        if k in parts[-1] or k in parts[0]:
            rec[k] = parts[-1].get(k, parts[0].get(k))
    rec["exit_code"] = next((p["exit_code"] for p in parts if p.get("exit_code")), 0)
    reports = [p["loadgen"] for p in parts if p.get("loadgen")]
    if reports:
        r = dict(reports[0])
        for k in REPORT_SUMMED:
            r[k] = sum(x.get(k, 0) for x in reports)
        errors: dict = {}
        for x in reports:
            for kind, n in (x.get("errors") or {}).items():
                errors[kind] = errors.get(kind, 0) + n
        r["errors"] = errors
        if all(x.get("tls") for x in reports):
            r["tls"] = {k: sum(x["tls"][k] for x in reports) for k in ("full", "resumed")}
        secs = r["duration_s"]
        r["msgs_per_s"] = r["messages"] / secs if secs else 0.0
        r["mib_per_s"] = r["bytes"] / MIB / secs if secs else 0.0
        r["handshakes_per_s"] = r["handshakes"] / secs if secs else 0.0
        for key in ("latency_us", "upgrade_us"):
            if all(isinstance(x.get(key), dict) for x in reports):
                r[key] = {q: max(x[key][q] for x in reports) for q in reports[0][key]}
        rec["loadgen"] = r
    rec["turns"] = parts
    errs = [p["error"] for p in parts if p.get("error")]
    if errs:
        rec["ok"] = False
        rec["error"] = errs[0]
    return rec


def json_report(stdout: str) -> dict | None:
    """The loadgen's JSON report: the last line of its stdout that parses."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    return None


def summary_line(load: Load, rec: dict, r: dict) -> str:
    parts = []
    if load.unit == "messages":
        parts.append(f"{r['msgs_per_s']:.0f} msg/s")
    elif load.unit == "handshakes":
        parts.append(f"{r['handshakes_per_s']:.0f} hs/s")
    elif load.unit == "mib":
        parts.append(f"{r['mib_per_s']:.0f} MiB/s")
    else:
        parts.append(f"held {rec.get('held')}")
    v = unit_cpu_us(load, rec)
    if v is not None:
        parts.append(f"proxy {v:.1f} µs/{load.unit.rstrip('s') if load.unit != 'mib' else 'MiB'}")
    if load.mode == "idle" and rec.get("rss_kib_held") is not None:
        parts.append(f"RSS {rec['rss_kib_before']}→{rec['rss_kib_held']} KiB")
    if load.mode == "rate":
        parts.append(f"p50 {r['latency_us']['p50']} µs")
    if r.get("tls"):
        parts.append(f"TLS {r['tls']['full']} full, {r['tls']['resumed']} resumed")
    return ", ".join(parts)


def resumed_share(rec: dict) -> float | None:
    """Share of a TLS run's handshakes that resumed a session (client-side count)."""
    t = (rec.get("loadgen") or {}).get("tls")
    if not t or t["full"] + t["resumed"] == 0:
        return None
    return t["resumed"] / (t["full"] + t["resumed"])


def did_not_resume(fig: "Figure", rec: dict) -> bool:
    share = resumed_share(rec)
    return fig.resumed and share is not None and share < MIN_RESUMED_SHARE


# ---------------------------------------------------------------- figures


def units_of(load: Load, r: dict) -> float:
    if load.unit == "messages":
        return r["messages"]
    if load.unit == "handshakes":
        return r["handshakes"]
    if load.unit == "mib":
        return r["bytes"] / MIB
    return 0


def unit_cpu_us(load: Load, rec: dict) -> float | None:
    r = rec.get("loadgen")
    if not r or load.unit is None or rec["subject"] == "direct" or "proxy_user_s" not in rec:
        return None
    n = units_of(load, r)
    if n <= 0:
        return None
    return (rec["proxy_user_s"] + rec["proxy_sys_s"]) * 1e6 / n


@dataclasses.dataclass(frozen=True)
class Figure:
    key: str
    title: str
    load: str
    kind: str  # cpu, rss, rtt
    target: tuple[str, float] | None  # ("ratio", x) or ("abs", x)
    eval_load: str | None = None
    pct: str = "p50"
    chart: str | None = None
    # A CPU per resumed handshake: a run whose handshakes mostly did not
    # resume is marked ✗ and kept out of the best peer.
    resumed: bool = False


FIGURES = [
    Figure("echo_cpu", "CPU µs per 64-B echo round trip, saturated (50 conns)", "echo", "cpu",
           ("ratio", 0.95), chart="echo, saturated"),
    Figure("rate30k_cpu", "CPU µs per message at 30,000 msg/s open loop (100 conns)", "rate30k",
           "cpu", ("ratio", 0.7), chart="30k msg/s"),
    # Issue 4 asked for parity; issue 11 (a reconnect storm is handshakes)
    # for 0.95.
    Figure("hs_cached_cpu", "CPU µs per handshake, token seen before", "handshake", "cpu",
           ("ratio", 0.95), chart="handshake, cached"),
    Figure("hs_fresh_cpu", "CPU µs per handshake, fresh token each (peers: no auth)", "handshake",
           "cpu", ("ratio", 1.35), eval_load="handshake_fresh", chart="handshake, fresh"),
    Figure("idle_rss", "KiB RSS growth per idle session", "idle", "rss", ("abs", 1.0)),
    Figure("bulk_cpu", "CPU µs per MiB, 1 MiB messages", "bulk", "cpu", ("ratio", 0.5),
           chart="bulk, per MiB"),
    Figure("rtt_p50", "p50 RTT added over direct at 5,000 msg/s (µs)", "rate5k", "rtt",
           ("ratio", 0.5), pct="p50"),
    Figure("rtt_p99", "p99 RTT added over direct at 5,000 msg/s (µs)", "rate5k", "rtt", None,
           pct="p99"),
    Figure("rtt_p999", "p99.9 RTT added over direct at 5,000 msg/s (µs)", "rate5k", "rtt", None,
           pct="p999"),
]


TLS_FIGURES = [
    Figure("tls_hs_full_cpu", "CPU µs per full TLS handshake (TCP + TLS 1.3 + upgrade + one echo "
           "+ close)", "tls_handshake_full", "cpu", ("ratio", 1.0), chart="full handshake"),
    Figure("tls_hs_resumed_cpu", "CPU µs per resumed TLS handshake (1.3 ticket; same cycle)",
           "tls_handshake_resumed", "cpu", ("ratio", 1.0), chart="resumed handshake",
           resumed=True),
    Figure("tls_echo_cpu", "CPU µs per 64-B echo over TLS, saturated (50 conns)", "tls_echo",
           "cpu", ("ratio", 1.0), chart="echo over TLS"),
    Figure("tls_bulk_cpu", "CPU µs per MiB over TLS, 1 MiB messages", "tls_bulk", "cpu",
           ("ratio", 0.9), chart="TLS, per MiB"),
    Figure("plain_bulk_cpu", "CPU µs per MiB in plain text, 1 MiB messages (same run)", "bulk",
           "cpu", None),
]


@dataclasses.dataclass(frozen=True)
class Suite:
    """What a run compares: --tls or not."""
    key: str
    title: str
    proxies: list[str]
    figures: list[Figure]
    # results/STEM.* and the README's <!-- MARKER:begin --> block.
    stem: str
    marker: str


SUITES = {
    "plain": Suite("plain", "eval-proxy vs nginx, HAProxy, Caddy — one proxy core", PROXIES,
                   FIGURES, "latest", "results"),
    "tls": Suite("tls", "eval-proxy vs nginx, HAProxy, Caddy terminating TLS — one proxy core",
                 TLS_PROXIES, TLS_FIGURES, "tls", "tls"),
}


def suite_of(meta: dict) -> Suite:
    return SUITES[meta.get("suite", "plain")]


def figure_value(fig: Figure, load: Load, rec: dict, direct: dict | None) -> float | None:
    r = rec.get("loadgen")
    if not r:
        return None
    if fig.kind == "cpu":
        return unit_cpu_us(load, rec)
    if fig.kind == "rss":
        held = rec.get("held") or 0
        if held <= 0 or rec.get("rss_kib_held") is None:
            return None
        return (rec["rss_kib_held"] - rec["rss_kib_before"]) / held
    if fig.kind == "rtt":
        if not direct or not direct.get("loadgen"):
            return None
        return r["latency_us"][fig.pct] - direct["loadgen"]["latency_us"][fig.pct]
    return None


def compute_figures(runs: list[dict], loads: dict[str, Load], reps: int,
                    max_others: float, suite: Suite = SUITES["plain"],
                    max_steal: float = MAX_STEAL) -> list[dict]:
    by = {(r["rep"], r["load"], r["subject"]): r for r in runs}
    out = []
    for fig in suite.figures:
        if fig.load not in loads:
            continue
        eval_load = fig.eval_load or fig.load
        if eval_load not in loads:
            continue
        values: dict[str, list] = {}
        flags: dict[str, list] = {}
        # The baseline build, if it ran, gets figures too (for the A/B
        # table); a subject without runs gets none, so the rest stays as it was.
        for subject in suite.proxies + [s for s in (BASELINE,) if s not in suite.proxies]:
            vals, fl = [], []
            for rep in range(1, reps + 1):
                lkey = eval_load if subject in EVAL_BUILDS else fig.load
                rec = by.get((rep, lkey, subject))
                if rec is None:
                    vals.append(None)
                    fl.append(None)
                    continue
                direct = by.get((rep, fig.load, "direct"))
                v = figure_value(fig, loads[lkey], rec, direct)
                vals.append(v)
                uses = [rec] + ([direct] if fig.kind == "rtt" and direct else [])
                mark = "" if rec.get("ok") and (fig.kind != "rtt" or (direct and direct.get("ok"))) \
                    else "⚠"
                if any(contended(r, max_others, max_steal) for r in uses):
                    mark += "~"
                if did_not_resume(fig, rec):
                    mark += "✗"
                fl.append(mark or None)
            if any(v is not None or f for v, f in zip(vals, fl)):
                values[subject] = vals
                flags[subject] = fl
        best, best_who, ratios = [], [], []
        for i in range(reps):
            cands = [(values[s][i], s) for s in PEERS if s in values and values[s][i] is not None
                     and "✗" not in (flags[s][i] or "")]
            if not cands:
                best.append(None)
                best_who.append(None)
                ratios.append(None)
                continue
            b, who = min(cands)
            best.append(b)
            best_who.append(who)
            ev = values.get("eval-proxy", [None] * reps)[i]
            # An added latency at or under zero is noise, not a scale.
            meaningful = ev is not None and b > 0 and (fig.kind != "rtt" or ev > 0)
            ratios.append(ev / b if meaningful else None)
        verdict = None
        if fig.target:
            kind, x = fig.target
            ev = values.get("eval-proxy", [None] * reps)
            evflags = flags.get("eval-proxy", ["missing"] * reps)
            if "eval-proxy" not in values:
                verdict = "not run"
            elif any(f and "⚠" in f for f in evflags):
                verdict = "missed (eval-proxy run failed)"
            elif any(f and "✗" in f for f in evflags):
                verdict = "missed (eval-proxy did not resume)"
            elif kind == "abs":
                verdict = "met" if all(v is not None and v <= x for v in ev) else "missed"
            elif any(r is None for r in ratios):
                verdict = "n/a (no peer figure)" if any(b is None or b <= 0 for b in best) else "missed"
            else:
                verdict = "met" if all(r <= x for r in ratios) else "missed"
        out.append({
            "key": fig.key, "title": fig.title, "load": fig.load, "eval_load": eval_load,
            "kind": fig.kind, "target": list(fig.target) if fig.target else None,
            "values": values, "flags": flags, "best_peer": best, "best_peer_who": best_who,
            "ratio": ratios, "verdict": verdict, "chart": fig.chart,
        })
    return out


# ---------------------------------------------------------------- output


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(vals: list, flags: list | None = None) -> str:
    parts = []
    for i, v in enumerate(vals):
        s = fmt(v)
        if flags and flags[i]:
            s += flags[i]
        parts.append(s)
    return " / ".join(parts)


def target_text(t: list | None) -> str:
    if not t:
        return "–"
    return f"≤ {t[1]:g}×" if t[0] == "ratio" else f"≤ {t[1]:g} KiB"


def markdown(meta: dict, figs: list[dict], runs: list[dict], loads: list[Load],
             notes: list[str]) -> str:
    reps = meta["reps"]
    if meta.get("baseline"):
        NAMES[AWS_LC] = "eval-proxy (baseline)"
    reps_label = " / ".join(f"run {i}" for i in range(1, reps + 1))
    suite = suite_of(meta)
    L = []
    title = suite.title
    if meta["quick"]:
        title += " (quick smoke run: not a measurement)"
    L.append(f"# {title}\n")
    L.append(f"{meta['date']} · eval-proxy {meta['commit']} · {meta['cpu_model']}, {meta['cpus']} CPUs, "
             f"Linux {meta['kernel']}, TCP congestion control {meta.get('congestion', '?')} · "
             f"{meta['versions']}  ")
    L.append(f"`{meta['command']}` · {meta['duration']} s per load, {reps} repetition(s), "
             f"proxy on CPU {meta['proxy_cpu']}, loadgen + backend on CPU {meta['load_cpu']}, "
             + (f"every proxy started fresh for every repetition; echo, handshake and bulk loads "
                f"interleaved: all subjects started side by side and loaded in "
                f"{meta['slices']} alternating turns of {meta['duration'] / meta['slices']:g} s "
                f"each, so drift in the host's speed reaches all alike.\n"
                if meta.get("slices", 1) > 1 else "every proxy started fresh for every run.\n"))
    L.append(f"Each cell: {reps_label}. Lower is better everywhere. Ratio = eval-proxy ÷ best peer "
             f"of the same repetition; a target is met only if every repetition meets it. "
             f"⚠ = the run reported errors; ~ = other processes on the machine were busy, "
             f"or the hypervisor took the proxy's or the load's CPU (steal time), during the "
             f"run (see notes)"
             + ("; ✗ = fewer than {:.0%} of its handshakes resumed, so it is no resumed-handshake "
                "figure and not the best peer".format(MIN_RESUMED_SHARE) if suite.key == "tls" else "")
             + ".\n")
    if suite.key == "tls":
        L.append(f"Every subject terminates TLS with the same certificate (ECDSA P-256, made for "
                 f"the run, leaf only), TLS 1.3 with TLS_AES_128_GCM_SHA256 and X25519 (the "
                 f"client offers nothing else), ALPN http/1.1, in front of the same plain "
                 f"backend. eval-proxy is the default build ({meta.get('provider_ring', 'ring')}); "
                 f"the aws-lc-rs build is compared with it below.\n")
    L.append("| figure | eval-proxy | nginx | HAProxy | Caddy | eval ÷ best peer | target | |")
    L.append("|---|---|---|---|---|---|---|---|")
    for f in figs:
        row = [f["title"]]
        for s in PROXIES:
            row.append(cell(f["values"].get(s, [None] * reps), f["flags"].get(s)))
        row.append(cell(f["ratio"]))
        row.append(target_text(f["target"]))
        v = f["verdict"]
        row.append("–" if v is None else ("✅ met" if v == "met" else f"❌ {v}"))
        L.append("| " + " | ".join(row) + " |")
    if AWS_LC in suite.proxies:
        L += provider_table(figs, reps, reps_label, meta.get("baseline"))
    elif any(BASELINE in f["values"] for f in figs):
        L += provider_table(figs, reps, reps_label, meta.get("baseline"), BASELINE)
    # The tables below give the baseline build a column of its own when it
    # ran; without it they stay as they were.
    extra = [BASELINE] if any(r["subject"] == BASELINE for r in runs) else []
    # Absolute latency and baseline RSS give the ratios their scale.
    lk = {l.key: l for l in loads}
    by = {(r["rep"], r["load"], r["subject"]): r for r in runs}
    if "rate5k" in lk:
        L.append("")
        L.append("RTT at 5,000 msg/s (µs, p50 · p99 · p99.9), " + reps_label + ":\n")
        L.append("| | " + " | ".join(NAMES[s] for s in SUBJECTS + extra) + " |")
        L.append("|---|" + "---|" * len(SUBJECTS + extra))
        for pct, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
            row = [label]
            for s in SUBJECTS + extra:
                vals = []
                for rep in range(1, reps + 1):
                    r = by.get((rep, "rate5k", s))
                    vals.append(r["loadgen"]["latency_us"][pct] if r and r.get("loadgen") else None)
                row.append(cell(vals))
            L.append("| " + " | ".join(row) + " |")
    if "idle" in lk:
        L.append("")
        L.append(f"RSS of the serving process (MiB), before load → holding {lk['idle'].args[1]} "
                 f"idle sessions, {reps_label}:\n")
        L.append("| | " + " | ".join(NAMES[s] for s in PROXIES + extra) + " |")
        L.append("|---|" + "---|" * len(PROXIES + extra))
        row = ["RSS"]
        for s in PROXIES + extra:
            parts = []
            for rep in range(1, reps + 1):
                r = by.get((rep, "idle", s))
                if r and r.get("rss_kib_held") is not None:
                    parts.append(f"{r['rss_kib_before'] / 1024:.1f} → {r['rss_kib_held'] / 1024:.1f}")
                else:
                    parts.append("–")
            row.append(" / ".join(parts))
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("Kernel share of the proxy's CPU (stime ÷ (utime + stime), from /proc/PID/stat), "
             + reps_label + ":\n")
    L.append("| load | " + " | ".join(NAMES[s] for s in suite.proxies + extra) + " |")
    L.append("|---|" + "---|" * len(suite.proxies + extra))
    for l in loads:
        if l.unit is None:
            continue
        row = [l.title]
        for s in suite.proxies + extra:
            vals = []
            for rep in range(1, reps + 1):
                r = by.get((rep, l.key, s))
                if r and r.get("proxy_user_s") is not None and r["proxy_user_s"] + r["proxy_sys_s"] > 0:
                    vals.append(f"{100 * r['proxy_sys_s'] / (r['proxy_user_s'] + r['proxy_sys_s']):.0f} %")
                else:
                    vals.append("–")
            row.append(" / ".join(vals) if any(v != "–" for v in vals) else "")
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("Load side: throughput reached · proxy CPU as % of its core · loadgen + backend CPU as % "
             "of the load core (near 100 % there means the load side, not the proxy, set the pace) · "
             "CPU of other processes on the machine, as % of one core, and steal time on the "
             "proxy's · load's CPU (the hypervisor running something else), as % of the run · "
             "errors, "
             + reps_label + ":\n")
    tls = suite.key == "tls"
    L.append("| load | subject | throughput | proxy core | load core | others | errors |"
             + (" TLS handshakes: full · resumed |" if tls else ""))
    L.append("|---|---|---|---|---|---|---|" + ("---|" if tls else ""))
    for l in loads:
        for s in l.subjects:
            tp, pc, lc, oc, errs, hs = [], [], [], [], [], []
            for rep in range(1, reps + 1):
                r = by.get((rep, l.key, s))
                g = r.get("loadgen") if r else None
                if not g:
                    tp.append("failed" if r else "–")
                    pc.append("–")
                    lc.append("–")
                    oc.append("–")
                    errs.append("start/wait" if r else "–")
                    hs.append("–")
                    continue
                if l.unit == "messages":
                    tp.append(f"{g['msgs_per_s'] / 1000:.1f}k msg/s")
                elif l.unit == "handshakes":
                    tp.append(f"{g['handshakes_per_s']:.0f} hs/s")
                elif l.unit == "mib":
                    tp.append(f"{g['mib_per_s']:.0f} MiB/s")
                else:
                    tp.append(f"{r.get('held')} held")
                w = r["wall_s"]
                pc.append(f"{100 * (r['proxy_user_s'] + r['proxy_sys_s']) / w:.0f} %" if s != "direct" else "–")
                lc.append(f"{100 * (r['loadgen_cpu_s'] + r['backend_cpu_s']) / w:.0f} %")
                st = r.get("steal_s")
                oc.append(f"{100 * r.get('others_cpu_s', 0) / w:.0f} %"
                          + (f", steal {100 * st[0] / w:.0f} · {100 * st[1] / w:.0f} %" if st else "")
                          + (f" ({r['attempts']} tries)" if r.get("attempts", 1) > 1 else ""))
                e = sum(g.get("errors", {}).values())
                errs.append(str(e) if e or r.get("exit_code") else "0")
                t = g.get("tls")
                hs.append(f"{t['full']} · {t['resumed']}" if t else "–")
            L.append(f"| {l.title} | {NAMES[s]} | {' / '.join(tp)} | {' / '.join(pc)} | "
                     f"{' / '.join(lc)} | {' / '.join(oc)} | {' / '.join(errs)} |"
                     + (f" {' / '.join(hs)} |" if tls else ""))
    L.append("")
    L.append("Notes:\n")
    for n in notes or ["none"]:
        L.append(f"- {n}")
    L.append("")
    stem = output_stem(meta)
    L.append(f"Chart: `{stem}.svg` (CPU per unit of work, each proxy ÷ the best peer). "
             f"Raw numbers: `{stem}.json`.")
    return "\n".join(L) + "\n"


# Short names for the A/B table's line of medians, where a figure has no chart label.
SHORT = {"idle_rss": "idle KiB/session", "rtt_p50": "p50 RTT", "rtt_p99": "p99 RTT",
         "rtt_p999": "p99.9 RTT"}


def provider_table(figs: list[dict], reps: int, reps_label: str,
                   baseline: str | None = None, other: str = AWS_LC) -> list[str]:
    """eval-proxy's two crypto providers side by side, from the same run (or,
    with --baseline, this build and the baseline build: in the aws-lc-rs slot
    with --tls, else as subject `other` = BASELINE)."""
    if other == BASELINE:
        L = ["", f"A/B: this build and the baseline `{baseline}` (same config), loaded in the "
             f"same run, in the same turns where a load is interleaved, {reps_label}:\n",
             "| figure | this build | baseline | baseline ÷ this build |", "|---|---|---|---|"]
    elif baseline:
        L = ["", f"A/B: this build and the baseline `{baseline}`, interleaved in the same run, "
             f"{reps_label}:\n",
             "| figure | this build | baseline | baseline ÷ this build |", "|---|---|---|---|"]
    else:
        L = ["", f"Crypto provider: eval-proxy built with ring (the default) and with aws-lc-rs "
             f"(`--features aws-lc`), same run, {reps_label}:\n",
             "| figure | ring | aws-lc-rs | aws-lc-rs ÷ ring |", "|---|---|---|---|"]
    medians = []
    for f in figs:
        ring = f["values"].get("eval-proxy")
        aws = f["values"].get(other)
        if not ring or not aws:
            continue
        # An added latency at or under zero is noise, not a scale (as for
        # eval ÷ best peer); the TLS figures have none.
        ratio = [a / r if a is not None and r and (f["kind"] != "rtt" or (a > 0 and r > 0))
                 else None for a, r in zip(aws, ring)]
        L.append(f"| {f['title']} | {cell(ring, f['flags'].get('eval-proxy'))} | "
                 f"{cell(aws, f['flags'].get(other))} | {cell(ratio)} |")
        known = [x for x in ratio if x is not None]
        medians.append(f"{f.get('chart') or SHORT.get(f['key'], f['key'])} "
                       f"{fmt(statistics.median(known) if known else None)}")
    if other == BASELINE and medians:
        # One number per figure to read the A/B by; a single repetition's
        # ratio can be the host's drift as much as the build's.
        L += ["", f"Median of baseline ÷ this build over the {reps} repetition(s): "
              + " · ".join(medians) + "."]
    return L


def svg_grid(y, lo: float, hi: float, step: float, x0: float, x1: float, label,
             label_gap: float, color: str) -> list[str]:
    """Horizontal grid lines from `lo` to `hi` (the first one dark), each
    labelled `label(value)` left of `x0`; `y` maps a value to a y coordinate."""
    out = []
    v = lo
    while v <= hi + 1e-9:
        yy = y(v)
        out.append(f'<line x1="{x0}" y1="{yy:.1f}" x2="{x1}" y2="{yy:.1f}" '
                   f'stroke="{"#333" if v == lo else color}"/>')
        out.append(f'<text x="{x0 - label_gap}" y="{yy + 4:.1f}" text-anchor="end">'
                   f'{label(v)}</text>')
        v += step
    return out


def svg_chart(meta: dict, figs: list[dict], busy_runs: int) -> str:
    groups = [f for f in figs if f["chart"]]
    colors = {"eval-proxy": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#ff7f0e", "caddy": "#9467bd"}
    W, H = 960, 460
    left, right, top, bottom = 70, 20, 70, 80
    pw, ph = W - left - right, H - top - bottom
    data = []
    for f in groups:
        bars = []
        for s in PROXIES:
            norm = [v / b for v, b in zip(f["values"].get(s, []), f["best_peer"])
                    if v is not None and b]
            bars.append((s, sum(norm) / len(norm) if norm else None))
        data.append((f, bars))
    vmax = max([v for _, bars in data for _, v in bars if v is not None] + [1.2])
    ymax = math.ceil(vmax * 1.1 / 0.5) * 0.5
    y = lambda v: top + ph - ph * v / ymax  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">'
           f'{"TLS: " if suite_of(meta).key == "tls" else ""}'
           f'Proxy CPU per unit of work ÷ best peer (lower is better)</text>',
           f'<text x="{W / 2}" y="44" text-anchor="middle" fill="#555">'
           f'{html.escape(meta["date"])} · eval-proxy {html.escape(meta["commit"])} · mean of '
           f'{meta["reps"]} repetition(s), 1 proxy core{" · QUICK SMOKE RUN" if meta["quick"] else ""}'
           f'{f" · {busy_runs} run(s) disturbed by other work" if busy_runs else ""}'
           f'</text>']
    out += svg_grid(y, 0.0, ymax, 0.5 if ymax <= 4 else 1.0, left, W - right,
                    lambda t: f"{t:.1f}×", label_gap=8, color="#ddd")
    out.append(f'<line x1="{left}" y1="{y(1):.1f}" x2="{W - right}" y2="{y(1):.1f}" '
               f'stroke="#333" stroke-dasharray="6,4"/>')
    labels: list[str] = []
    gw = pw / max(len(data), 1)
    bw = gw * 0.8 / len(PROXIES)
    for gi, (f, bars) in enumerate(data):
        gx = left + gi * gw + gw * 0.1
        for bi, (s, v) in enumerate(bars):
            x = gx + bi * bw
            if v is None:
                out.append(f'<text x="{x + bw / 2:.1f}" y="{y(0) - 4:.1f}" text-anchor="middle" '
                           f'fill="#999">n/a</text>')
                continue
            out.append(f'<rect x="{x + 1:.1f}" y="{y(v):.1f}" width="{bw - 2:.1f}" '
                       f'height="{y(0) - y(v):.1f}" fill="{colors[s]}"><title>{NAMES[s]}: '
                       f'{v:.2f}×</title></rect>')
            labels.append(f'<text x="{x + bw / 2:.1f}" y="{y(v) - 4:.1f}" text-anchor="middle" '
                          f'font-size="10" stroke="white" stroke-width="3" paint-order="stroke">'
                          f'{v:.2f}</text>')
            if s == "eval-proxy" and f["target"] and f["target"][0] == "ratio":
                ty = y(f["target"][1])
                out.append(f'<line x1="{x - 3:.1f}" y1="{ty:.1f}" x2="{x + bw + 3:.1f}" y2="{ty:.1f}" '
                           f'stroke="#d62728" stroke-width="3"><title>target ≤ {f["target"][1]:g}×'
                           f'</title></line>')
        out.append(f'<text x="{gx + gw * 0.4:.1f}" y="{top + ph + 18}" text-anchor="middle">'
                   f'{html.escape(f["chart"])}</text>')
        v = f["verdict"] or ""
        out.append(f'<text x="{gx + gw * 0.4:.1f}" y="{top + ph + 34}" text-anchor="middle" '
                   f'fill="{"#2ca02c" if v == "met" else "#d62728"}">{html.escape(v)}</text>')
    out.extend(labels)
    lx = left
    for s in PROXIES:
        out.append(f'<rect x="{lx}" y="{H - 24}" width="12" height="12" fill="{colors[s]}"/>')
        out.append(f'<text x="{lx + 16}" y="{H - 14}">{NAMES[s]}</text>')
        lx += 110
    out.append(f'<line x1="{lx}" y1="{H - 18}" x2="{lx + 18}" y2="{H - 18}" stroke="#d62728" '
               f'stroke-width="3"/><text x="{lx + 24}" y="{H - 14}">target for eval-proxy</text>')
    lx += 170
    out.append(f'<line x1="{lx}" y1="{H - 18}" x2="{lx + 18}" y2="{H - 18}" stroke="#333" '
               f'stroke-dasharray="6,4"/><text x="{lx + 24}" y="{H - 14}">best peer = 1.0×</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def others_share(rec: dict) -> float:
    """Other processes' CPU during the run, as a share of one core."""
    w = rec.get("wall_s")
    return rec.get("others_cpu_s", 0) / w if w else 0.0


def steal_share(rec: dict) -> float:
    """The larger steal time of the proxy's and the load's CPU, as a share of the run."""
    w = rec.get("wall_s")
    return max(rec.get("steal_s", [0])) / w if w else 0.0


def contended(rec: dict, max_others: float, max_steal: float = MAX_STEAL) -> bool:
    """Other processes, or the hypervisor (steal time on the proxy's or the
    load's CPU), took more than their share while the run went on."""
    return others_share(rec) > max_others or steal_share(rec) > max_steal


def make_notes(runs: list[dict], loads: dict[str, Load], meta: dict) -> list[str]:
    notes = []
    label = lambda r: f"{r['load']} {NAMES[r['subject']]} (run {r['rep']})"  # noqa: E731
    for r in runs:
        if r.get("error"):
            lines = [l.strip() for l in r["error"].strip().splitlines() if l.strip()]
            what = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
            notes.append(f"**{label(r)} FAILED**: {what}")
    for r in runs:
        l = loads[r["load"]]
        share = resumed_share(r)
        if l.tls == "resume" and l.mode == "handshake" and share is not None \
                and share < MIN_RESUMED_SHARE:
            t = r["loadgen"]["tls"]
            notes.append(f"**{label(r)} did not resume**: {t['resumed']} of "
                         f"{t['full'] + t['resumed']} handshakes resumed a session (client-side "
                         f"count), so its figure is no resumed-handshake figure (✗).")
    saturated, slow = [], []
    for r in runs:
        if not r.get("loadgen") or "wall_s" not in r:
            continue
        w = r["wall_s"]
        l = loads[r["load"]]
        lc = (r["loadgen_cpu_s"] + r["backend_cpu_s"]) / w
        pc = (r["proxy_user_s"] + r["proxy_sys_s"]) / w
        if l.mode in ("echo", "bulk", "handshake") and r["subject"] != "direct" and lc > 0.9 > pc:
            saturated.append(f"{label(r)} {lc:.0%} vs {pc:.0%}")
        if l.mode == "rate":
            target = float(l.args[l.args.index("--rate") + 1])
            got = r["loadgen"]["msgs_per_s"]
            if got < 0.97 * target:
                slow.append(f"{label(r)}: {got:.0f} msg/s")
    if saturated:
        notes.append("The load core saturated before the proxy core (load vs proxy core use) in: "
                     + "; ".join(saturated) + ". CPU per unit of work still compares the proxies; "
                     "their throughput does not.")
    if slow:
        notes.append("Open-loop runs that fell short of their rate: " + "; ".join(slow) + ".")
    mo = meta.get("max_others", 0.25)
    ms = meta.get("max_steal", MAX_STEAL)
    busy = [r for r in runs if contended(r, mo, ms)]
    reruns = sum(r.get("attempts", 1) - 1 for r in runs)
    if busy or reruns:
        worst = max(runs, key=others_share)
        worst_st = max(runs, key=steal_share)
        notes.append(
            f"Other work disturbed {len(busy)} of {len(runs)} kept runs, marked ~: other processes "
            f"on this machine (not started by the benchmark) using more than {mo:.0%} of a core "
            f"(worst: {label(worst)}, {others_share(worst):.0%}), or the hypervisor stealing more than "
            f"{ms:.0%} of the proxy's or the load's CPU (worst: {label(worst_st)}, "
            f"{steal_share(worst_st):.0%}). {reruns} run(s) or turn(s) were repeated for that reason and the "
            f"quieter attempt kept. Such runs share the cores with foreign work, which changes "
            f"batching and cache behaviour, so their figures are less certain.")
    return notes


def update_readme(md: str, marker: str = "results", stem: str = "latest",
                  chart: str = "CPU per unit of work, relative to the best peer") -> None:
    """Puts md's headline table between bench/README.md's `<!-- MARKER:begin -->`
    and `:end -->` markers, with results/STEM.svg (alt text `chart`) below it."""
    readme = BENCH / "README.md"
    if not readme.exists():
        return
    text = readme.read_text()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if begin not in text or end not in text:
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    # The README carries the headline table; latest.md has the rest.
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| figure"))
    stop = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    body = "\n".join(lines[2:4] + [""] + lines[start:stop])
    readme.write_text(f"{head}{begin}\n{body}\n\n![{chart}](results/{stem}.svg)\n\n"
                      f"All tables and notes: [results/{stem}.md](results/{stem}.md).\n{end}{tail}")


# ---------------------------------------------------------------- setup


def ensure_peers(a: argparse.Namespace) -> None:
    missing = [p for p in PEERS
               if not shutil.which(p) and not any(os.path.exists(x) for x in PEER_BINARIES[p])]
    if not missing:
        return
    if a.no_install:
        raise BenchError(f"missing {', '.join(missing)} and --no-install given")
    if os.geteuid() != 0:
        raise BenchError(f"missing {', '.join(missing)}; as root: apt-get install -y "
                         "--no-install-recommends nginx-light haproxy caddy")
    log(f"installing {', '.join(missing)} from Debian's packages")
    # The packages would start their system services (nginx and Caddy on
    # port 80); the benchmark runs its own instances only.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                        "nginx-light", "haproxy", "caddy"], check=True, env=env, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"installing the peers failed: {e}") from e
    finally:
        if made_policy:
            policy.unlink()
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def build(a: argparse.Namespace) -> dict[str, str]:
    try:
        meta = json.loads(subprocess.run(
            ["cargo", "metadata", "--no-deps", "--format-version", "1"], cwd=ROOT, check=True,
            capture_output=True, text=True, timeout=120).stdout)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"cargo metadata failed (is cargo installed?): {e}") from e
    release = Path(meta["target_directory"]) / "release"
    if not a.no_build:
        log("building eval-proxy and eval-loadgen (release)")
        try:
            subprocess.run(["cargo", "build", "--release", "-p", "eval-proxy", "-p", "eval-loadgen"],
                           cwd=ROOT, check=True, timeout=3600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise BenchError(f"cargo build failed: {e}") from e
    bins = {"proxy": str(release / "eval-proxy"), "loadgen": str(release / "eval-loadgen")}
    # storm.py and soak.py build through here too, without a --tls flag.
    if getattr(a, "baseline", None) and getattr(a, "tls", False):
        # An A/B of two builds: the second runs in the aws-lc-rs slot.
        bins["proxy-aws-lc"] = str(Path(a.baseline).resolve())
    elif getattr(a, "baseline", None):
        # The plain loads have no such slot; it runs as a subject of its own.
        bins[EVAL_BUILDS[BASELINE]] = str(Path(a.baseline).resolve())
    elif getattr(a, "tls", False) and want_aws_lc(a):
        # A target folder of its own: the feature changes rustls' build, and
        # the default binary must stay as it is.
        aws_target = Path(meta["target_directory"]) / "aws-lc"
        if not a.no_build:
            log("building eval-proxy with --features aws-lc (release)")
            try:
                subprocess.run(["cargo", "build", "--release", "-p", "eval-proxy", "--bin",
                                "eval-proxy", "--features", "aws-lc"], cwd=ROOT, check=True,
                               timeout=3600, env=dict(os.environ, CARGO_TARGET_DIR=str(aws_target)))
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                raise BenchError(f"cargo build --features aws-lc failed: {e} (leave it out with "
                                 f"--subjects eval-proxy,nginx,haproxy,caddy)") from e
        bins["proxy-aws-lc"] = str(aws_target / "release" / "eval-proxy")
    for b in bins.values():
        if not os.access(b, os.X_OK):
            raise BenchError(f"{b} not found; build it or drop --no-build")
    if "proxy-aws-lc" in bins and not getattr(a, "baseline", None):
        # Both binaries look alike; --version names the provider each was built with.
        for key, want in (("proxy", "ring"), ("proxy-aws-lc", "aws-lc-rs")):
            version = capture([bins[key], "--version"])
            if f"TLS: {want}" not in version:
                raise BenchError(f"{bins[key]} --version says {version!r}, expected TLS: {want}")
    return bins


def want_aws_lc(a: argparse.Namespace) -> bool:
    return not a.subjects or AWS_LC in a.subjects.split(",")


def capture(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def host_meta() -> dict:
    """When, which commit, on what machine."""
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = capture(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = capture(["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain",
                     "--untracked-files=no"])
    if dirty and dirty != "?":
        commit += "+dirty"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "congestion": read_congestion(),
    }


CC_SYSCTL = Path("/proc/sys/net/ipv4/tcp_congestion_control")


def read_congestion() -> str:
    try:
        return CC_SYSCTL.read_text().strip()
    except OSError:
        return "?"


@contextlib.contextmanager
def congestion(name: str | None):
    """--cc: the machine's default TCP congestion control for the run,
    restored after. Every subject's sockets (and the load's) then use it;
    BBR, for one, paces every socket with a timer per packet on loopback."""
    if not name:
        yield
        return
    before = read_congestion()
    try:
        CC_SYSCTL.write_text(name)
    except OSError as e:
        raise BenchError(f"--cc {name}: cannot set {CC_SYSCTL} ({e}); needs root and "
                         f"one of {Path('/proc/sys/net/ipv4/tcp_available_congestion_control').read_text().strip()}")
    log(f"TCP congestion control {before} -> {name} for the run")
    try:
        yield
    finally:
        CC_SYSCTL.write_text(before)
        log(f"TCP congestion control back to {before}")


def machine_meta(a: argparse.Namespace, bins: dict[str, str]) -> dict:
    nginx = re.search(r"nginx/(\S+)", capture(["nginx", "-v"]))
    haproxy = re.search(r"version (\S+)", capture(["haproxy", "-v"]))
    caddy = capture(["caddy", "version"]).split()
    return {
        **host_meta(),
        "versions": (f"nginx {nginx.group(1) if nginx else '?'}, HAProxy "
                     f"{haproxy.group(1) if haproxy else '?'}, Caddy {caddy[0] if caddy else '?'}"),
        "eval_proxy_version": capture([bins["proxy"], "--version"]),
        "command": " ".join(["bench/compare.sh"] + a.argv),
        "duration": a.duration,
        "reps": a.reps,
        "quick": a.quick,
        "proxy_cpu": a.proxy_cpu,
        "load_cpu": a.load_cpu,
        "idle_conns": a.idle_conns,
        "partial": bool(a.loads or a.subjects or getattr(a, "baseline", None)),
        **({"baseline": a.baseline} if getattr(a, "baseline", None) else {}),
        "max_others": a.max_others,
        "max_steal": a.max_steal,
        "slices": getattr(a, "slices", 1),
        "suite": "tls" if getattr(a, "tls", False) else "plain",
        **({"eval_proxy_aws_lc_version": capture([bins["proxy-aws-lc"], "--version"])}
           if "proxy-aws-lc" in bins else {}),
        **({"eval_proxy_baseline_version": capture([bins[EVAL_BUILDS[BASELINE]], "--version"])}
           if EVAL_BUILDS[BASELINE] in bins else {}),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/compare.sh",
        description="eval-proxy vs nginx, HAProxy and Caddy on one proxy core (see bench/README.md).")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 s per load, 1 repetition, 500 idle sessions; writes quick.*")
    p.add_argument("--tls", action="store_true",
                   help="every proxy terminates TLS (one certificate, TLS 1.3, X25519): full and "
                   "resumed handshakes, echo, per MiB, and eval-proxy built with ring and with "
                   "aws-lc-rs; writes tls.* (tls-quick.* with --quick)")
    p.add_argument("--reps", type=int, help="repetitions (default 2; 1 with --quick)")
    p.add_argument("--duration", type=float, help="seconds per load (default 10; 2 with --quick)")
    p.add_argument("--idle-conns", type=int, help="idle sessions (default 4000; 500 with --quick)")
    p.add_argument("--loads", help="comma-separated subset: echo,rate30k,handshake,"
                   "handshake_fresh,idle,bulk,rate5k (with --tls: tls_handshake_full,"
                   "tls_handshake_resumed,tls_echo,tls_bulk,bulk)")
    p.add_argument("--subjects", help="comma-separated subset: direct,eval-proxy,nginx,haproxy,caddy "
                   f"(with --baseline also {BASELINE}; with --tls also {AWS_LC}, and no direct)")
    p.add_argument("--baseline", metavar="BINARY",
                   help="run this (older) eval-proxy build beside the current one, with the same "
                   "config and in the same interleaved turns, for a before/after A/B in one run: "
                   f"as subject {BASELINE} of every load eval-proxy runs (not a peer; an A/B "
                   "table follows the main one: this build, baseline, baseline ÷ this build, "
                   "and its median), or with --tls in the aws-lc-rs slot (the provider table "
                   "becomes that A/B). The README is left alone")
    p.add_argument("--proxy-cpu", type=int, default=0, help="CPU for the proxy under test (0)")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU for loadgen and backend (1)")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results folder")
    p.add_argument("--no-build", action="store_true", help="use the binaries already built")
    p.add_argument("--no-install", action="store_true", help="never apt-get install the peers")
    p.add_argument("--max-others", type=float, default=0.25, metavar="SHARE",
                   help="a run during which other processes used more than this share of a core "
                   "is marked ~ and repeated once, within the rerun budget (0.25)")
    p.add_argument("--max-steal", type=float, default=MAX_STEAL, metavar="SHARE",
                   help="the same for steal time (the hypervisor running something else) on the "
                   f"proxy's or the load's CPU, as a share of the run ({MAX_STEAL})")
    p.add_argument("--rerun-share", type=float, default=0.25, metavar="SHARE",
                   help="at most this share of the runs may be repeated (0.25; 0 = never)")
    p.add_argument("--slices", type=int, metavar="N",
                   help="load the subjects of a closed-loop load (echo, handshake, bulk) in N "
                   "alternating turns of duration/N seconds each, all started side by side, so "
                   "drift in the host's speed reaches every subject alike (default 5; 1 with "
                   "--quick; 1 = one whole run per subject)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs)")
    p.add_argument("--cc", metavar="NAME",
                   help="the machine's TCP congestion control during the run (e.g. cubic), "
                   "restored after; the results name the one in force")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only rebuild the table, chart (and README) from a saved results JSON")
    a = p.parse_args(argv)
    a.argv = argv
    a.reps = a.reps or (1 if a.quick else 2)
    a.duration = a.duration or (2.0 if a.quick else 10.0)
    a.idle_conns = a.idle_conns or (500 if a.quick else 4000)
    a.slices = a.slices or (1 if a.quick else 5)
    if a.slices < 1:
        p.error("--slices takes a positive number")
    a.idle_hold = 2.0 if a.quick else 4.0
    a.settle = 0.3 if a.quick else 0.5
    if a.duration != int(a.duration):
        p.error("--duration takes whole seconds")
    a.duration = int(a.duration)
    if a.proxy_cpu == a.load_cpu:
        p.error("--proxy-cpu and --load-cpu must differ")
    wanted = set(a.subjects.split(",")) if a.subjects else set()
    if BASELINE in wanted and not (a.baseline and not a.tls):
        p.error(f"subject {BASELINE} needs --baseline BINARY (and no --tls, where the baseline "
                f"takes the {AWS_LC} slot)")
    if a.baseline and not a.tls and a.subjects and BASELINE not in wanted:
        p.error(f"--baseline runs as subject {BASELINE}, which --subjects leaves out")
    allowed = os.sched_getaffinity(0)
    for c in (a.proxy_cpu, a.load_cpu):
        if c not in allowed:
            p.error(f"CPU {c} is not available here (have {sorted(allowed)})")
    return a


def output_stem(meta: dict) -> str:
    """results/STEM.*: latest or quick, tls or tls-quick."""
    suite = suite_of(meta)
    if suite.key == "plain":
        return "quick" if meta["quick"] else "latest"
    return f"{suite.stem}-quick" if meta["quick"] else suite.stem


def write_outputs(a: argparse.Namespace, meta: dict, loads: list[Load], runs: list[dict]) -> None:
    lmap = {l.key: l for l in loads}
    suite = suite_of(meta)
    ms = meta.get("max_steal", MAX_STEAL)
    figs = compute_figures(runs, lmap, meta["reps"], meta.get("max_others", 0.25), suite, ms)
    notes = make_notes(runs, lmap, meta)
    md = markdown(meta, figs, runs, loads, notes)
    stem = output_stem(meta)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.md").write_text(md)
    busy = sum(contended(r, meta.get("max_others", 0.25), ms) for r in runs)
    (a.out / f"{stem}.svg").write_text(svg_chart(meta, figs, busy))
    (a.out / f"{stem}.json").write_text(json.dumps({
        "meta": meta,
        "loads": [dataclasses.asdict(l) for l in loads],
        "figures": figs,
        "notes": notes,
        "runs": runs,
    }, indent=1, ensure_ascii=False) + "\n")
    if not meta["quick"] and not meta.get("partial") and \
            a.out.resolve() == (BENCH / "results").resolve():
        update_readme(md, marker=suite.marker, stem=stem)
    print(md)
    log(f"wrote {a.out / stem}.{{md,json,svg}}")


def render_only(a: argparse.Namespace) -> int:
    """Rebuild the table, chart and README from a saved JSON, without running."""
    try:
        saved = json.loads(a.render.read_text())
        loads = [Load(**{k: tuple(v) if isinstance(v, list) else v for k, v in l.items()})
                 for l in saved["loads"]]
        write_outputs(a, saved["meta"], loads, saved["runs"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise BenchError(f"cannot render {a.render}: {e}") from e
    return 0


def run_all(a: argparse.Namespace, prefix: str, body) -> tuple[list[dict], float]:
    """Calls body(procs, runs) with a fresh work folder, Ctrl-C and SIGTERM
    turned into a clean stop; then stops everything it started and removes
    the folder unless --keep or a run failed. Returns the runs appended by
    body and the elapsed seconds."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    procs = Procs(workdir)

    stop_on_signals("the benchmark")
    runs: list[dict] = []
    started = time.monotonic()
    try:
        body(procs, runs)
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        ignore_signals()
        procs.stop_all()
        if a.keep or any(r.get("error") for r in runs):
            log(f"work folder with configs and logs kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return runs, round(time.monotonic() - started, 1)


def exit_status(runs: list[dict]) -> int:
    if any(r.get("error") for r in runs):
        log("some runs failed (see Notes); exit status 1")
        return 1
    return 0


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.render:
        return render_only(a)
    if a.baseline:
        NAMES[AWS_LC] = "eval-proxy (baseline)"
    loads = make_loads(a)
    ensure_peers(a)
    if not shutil.which("taskset"):
        raise BenchError("taskset not found (package util-linux)")
    bins = build(a)
    with congestion(a.cc):
        return measure(a, loads, bins)


def keep_one(tries: list[dict], a: argparse.Namespace) -> dict:
    """The attempt of a run (or turn) that counts: the first failed one, since
    a failure is never retried away, else the least disturbed."""
    kept = next((t for t in tries if not t.get("ok")), None) or \
        min(tries, key=lambda t: (contended(t, a.max_others, a.max_steal),
                                  others_share(t) + steal_share(t)))
    kept["attempts"] = len(tries)
    kept["others_cpu_s_each"] = [t.get("others_cpu_s") for t in tries]
    return kept


def sliced(a: argparse.Namespace, load: Load) -> bool:
    """Closed-loop CPU loads run interleaved (Bench.run_sliced). Idle holds
    sessions and rate measures latency over one unbroken run; both stay whole."""
    return a.slices > 1 and load.mode in ("echo", "handshake", "bulk") and len(load.subjects) > 1


def measure(a: argparse.Namespace, loads: list, bins: dict[str, str]) -> int:
    meta = machine_meta(a, bins)
    total = a.reps * sum(len(l.subjects) for l in loads)
    # Repeat runs that other work on the machine disturbed, within a budget
    # that keeps the whole benchmark near its planned length.
    budget = math.ceil(total * a.rerun_share)

    def body(procs: Procs, runs: list[dict]) -> None:
        bench = Bench(a, procs, bins)
        if a.tls:
            bench.make_certificate()

        def again(part: dict, cost: float = 1.0) -> bool:
            """Whether a disturbed run is loaded once more: a whole run
            costs 1 of the rerun budget, a turn of a sliced run 1/slices."""
            nonlocal budget
            if budget < cost or not contended(part, a.max_others, a.max_steal):
                return False
            budget -= cost
            log(f"  other processes used {others_share(part):.0%} of a core and the hypervisor "
                f"stole {steal_share(part):.0%} of a CPU meanwhile; running it again")
            return True

        for rep in range(1, a.reps + 1):
            for load in loads:
                # Alternate the order between repetitions so drift in the
                # machine's background load does not favour one subject.
                order = list(load.subjects) if rep % 2 else list(reversed(load.subjects))
                if sliced(a, load):
                    runs.extend(bench.run_sliced(rep, load, order, a.slices,
                                                 lambda part: again(part, 1 / a.slices)))
                    continue
                for subject in order:
                    tries = [bench.run(rep, load, subject)]
                    while len(tries) < 2 and tries[-1].get("ok") and again(tries[-1]):
                        tries.append(bench.run(rep, load, subject))
                    runs.append(keep_one(tries, a))

    runs, meta["elapsed_s"] = run_all(a, "eval-bench-", body)
    write_outputs(a, meta, loads, runs)
    return exit_status(runs)


def entry(main_fn) -> None:
    """The scripts' entry point: exit 2 when the setup failed."""
    try:
        sys.exit(main_fn(sys.argv[1:]))
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(2)


# The name bench/soak.py calls it by.
run_main = entry


if __name__ == "__main__":
    entry(main)
