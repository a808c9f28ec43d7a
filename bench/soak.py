#!/usr/bin/env python3
"""Soak: eval-proxy under mixed load for MINUTES, with faults injected.

Everything runs on loopback. The proxy (1 shard, Controlplane placement) is
pinned to one core; everything else to another. The fake Controlplane
(`eval-loadgen controlplane`) places repls by prefix (`--pin`):

- `repl-*` (the loadgen's survivors: echo at a fixed rate, bulk, terminal-
  like mixed, idle) only on Conman `keep`, which is never killed: every one
  of these sessions must last the whole soak;
- `vict-*` (victims, long-lived clients of this script) and `hs-*` (a loop
  of connect, upgrade, one echo, close) on Conmans `b1` and `b2`, which are
  killed in turn: victims are deliberately killed, must get Close 1014 and
  must reconnect; new sessions are retried by the proxy on the other VM;
- `torn-*` on `rec`, a Conman in this script that records exactly what
  reaches it, for clients that send half a frame and then reset.

Faults, in rotation, with a gap after each: one Conman killed (SIGKILL) and
restarted on its port; a few clients that reset mid-frame; the Controlplane
killed and restarted after a while. Every second: sessions active and the
setup counters (/metrics), the proxy's RSS and open fds (/proc).

Writes OUT/soak.{json,md,svg}. Exit status 0 when every criterion holds
(see bench/README.md "Soak"), 1 when one does not, 2 when the soak could
not run. Python 3.11 standard library only; shares its process handling
with compare.py.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import html
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from compare import (BENCH, HZ, BenchError, Procs, RunError, build, host_meta, ignore_signals,
                     json_report, log, others_cpu_ticks, proc_cpu, run_main, stop_on_signals,
                     svg_grid)

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
# A fault's effects are allowed to last this long after it ends: a
# restarted Conman is reachable at once, but the proxy's Controlplane
# breaker stays open up to breaker_open_ms (5 s by default) after the
# Controlplane is back.
RECOVERY_S = {"conman_kill": 2.0, "torn_clients": 1.0, "controlplane_down": 6.0}
# Fixed ports (a restarted fake must come back on its own port) are taken
# below the kernel's ephemeral range, so that no outgoing connection holds
# one when a fake rebinds it.
FIXED_PORTS = range(20000, 32000)
# Warm-up and end figures are medians of this many snapshots, 1 s apart.
MARK_SNAPSHOTS = 5
# A shard keeps up to this many splice pipes (two fds each) for reuse
# (src/shard/pipe.rs, POOL); the pool grows with concurrent long frames and
# is not drift.
PIPE_POOL = 32
# A victim's close counts as deliberate if it came this soon after its
# Conman was killed.
KILL_ATTRIBUTION_S = 5.0


# ------------------------------------------------------- WebSocket client


class WsClosed(Exception):
    """The peer sent Close."""

    def __init__(self, code: int, reason: str):
        super().__init__(f"Close {code} {reason!r}")
        self.code = code
        self.reason = reason


class WsError(Exception):
    """Anything else that ended a connection; `kind` is what it is counted as."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def mask_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame: masked, as RFC 6455 requires."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + key + xor_mask(payload, key)


def server_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | opcode, 127]) + struct.pack(">Q", n)
    return head + payload


def xor_mask(data: bytes, key: bytes) -> bytes:
    k = (key * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(len(data), "big")


def parse_frame(buf: bytes) -> tuple[int, bool, bytes, int] | None:
    """(opcode, fin, unmasked payload, bytes used), or None until complete."""
    if len(buf) < 2:
        return None
    n = buf[1] & 0x7F
    off = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack(">H", buf[2:4])[0]
        off = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack(">Q", buf[2:10])[0]
        off = 10
    key = None
    if buf[1] & 0x80:
        if len(buf) < off + 4:
            return None
        key = buf[off:off + 4]
        off += 4
    if len(buf) < off + n:
        return None
    payload = buf[off:off + n]
    if key:
        payload = xor_mask(payload, key)
    return buf[0] & 0x0F, bool(buf[0] & 0x80), payload, off + n


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def close_payload(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack(">H", payload[:2])[0], payload[2:].decode(errors="replace")


class Client:
    """One blocking WebSocket client connection through the proxy."""

    def __init__(self, addr: tuple[str, int], path: str, timeout: float):
        self.timeout = timeout
        try:
            self.sock = socket.create_connection(addr, timeout=timeout)
        except OSError as e:
            raise WsError("connect", str(e)) from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {path} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\n\r\n")
        self.buf = b""
        try:
            self.sock.sendall(req.encode())
            while b"\r\n\r\n" not in self.buf:
                self._fill()
        except WsError:
            self.sock.close()
            raise
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode(errors="replace").split("\r\n")
        status = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else "?"
        if status != "101":
            self.sock.close()
            raise WsError(f"http_{status}")
        if f"sec-websocket-accept: {accept_key(key)}".lower() not in head.decode().lower():
            self.sock.close()
            raise WsError("bad_accept")

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except socket.timeout as e:
            raise WsError("timeout") from e
        except ConnectionResetError as e:
            raise WsError("reset") from e
        except OSError as e:
            raise WsError("socket", str(e)) from e
        if not data:
            raise WsError("eof_without_close")
        self.buf += data

    def send(self, opcode: int, payload: bytes) -> None:
        try:
            self.sock.sendall(mask_frame(opcode, payload))
        except OSError as e:
            raise WsError("send", str(e)) from e

    def _frame(self) -> tuple[int, bool, bytes]:
        while (f := parse_frame(self.buf)) is None:
            self._fill()
        op, fin, payload, used = f
        self.buf = self.buf[used:]
        return op, fin, payload

    def recv(self, timeout: float | None = None) -> tuple[int, bytes]:
        """The next data message (unfragmented); answers Pings; a Close is
        answered and raised as WsClosed."""
        self.sock.settimeout(timeout if timeout is not None else self.timeout)
        while True:
            op, fin, payload = self._frame()
            if op == OP_PING:
                self.send(OP_PONG, payload)
            elif op == OP_PONG:
                continue
            elif op == OP_CLOSE:
                code, reason = close_payload(payload)
                try:
                    self.sock.sendall(mask_frame(OP_CLOSE, payload[:2]))
                except OSError:
                    pass
                self.sock.close()
                raise WsClosed(code, reason)
            elif not fin or op == OP_CONT:
                raise WsError("fragmented", "the soak's messages are never fragmented")
            else:
                return op, payload

    def echo(self, opcode: int, payload: bytes) -> bytes:
        self.send(opcode, payload)
        op, got = self.recv()
        if op != opcode or got != payload:
            raise WsError("mismatch", f"sent {len(payload)} B op {opcode}, got {len(got)} B op {op}")
        return got

    def close(self, code: int = 1000) -> None:
        """Our Close, then the peer's, then the end of TCP."""
        try:
            self.send(OP_CLOSE, struct.pack(">H", code))
            self.sock.settimeout(self.timeout)
            while self._frame()[0] != OP_CLOSE:
                pass
        finally:
            self.sock.close()

    def reset(self) -> None:
        """Closes with RST (SO_LINGER 0) instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# -------------------------------------------------- the recording Conman


class RecordingConman:
    """A Conman that answers the upgrade, echoes, answers Close, and records
    how each connection ended: the Close code it got, whether data followed
    that Close, and how many bytes of an unfinished frame it held when TCP
    ended (a torn frame). Connections are named by their first Text message.
    """

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cond = threading.Condition()
        self.results: dict[str, dict] = {}
        # Bytes of an unfinished frame held right now, per connection name.
        self.pending: dict[str, int] = {}
        threading.Thread(target=self._accept, name="rec-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        rec = {"close": None, "after_close": 0, "partial": 0, "end": None, "messages": 0}
        name = None
        buf = b""
        conn.settimeout(60)
        try:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            m = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", head)
            if not m:
                return
            conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Accept: "
                          f"{accept_key(m.group(1).decode())}\r\n\r\n").encode())
            while True:
                f = parse_frame(buf)
                if f is None:
                    if name is not None:
                        with self.cond:
                            self.pending[name] = len(buf)
                            self.cond.notify_all()
                    data = conn.recv(65536)
                    if not data:
                        rec["end"] = "eof"
                        break
                    buf += data
                    continue
                op, _, payload, used = f
                buf = buf[used:]
                if rec["close"] is not None:
                    rec["after_close"] += 1
                    continue
                if op == OP_CLOSE:
                    rec["close"] = close_payload(payload)[0]
                    conn.sendall(server_frame(OP_CLOSE, payload[:2]))
                elif op in (OP_TEXT, OP_BINARY):
                    rec["messages"] += 1
                    if name is None and op == OP_TEXT:
                        name = payload.decode(errors="replace")
                    conn.sendall(server_frame(op, payload))
        except ConnectionResetError:
            rec["end"] = "reset"
        except socket.timeout:
            rec["end"] = "timeout"
        except OSError as e:
            rec["end"] = f"error: {e}"
        finally:
            conn.close()
            rec["partial"] = len(buf)
            if name is not None:
                with self.cond:
                    self.results[name] = rec
                    self.cond.notify_all()

    def wait_pending(self, name: str, timeout: float) -> int:
        """Bytes of `name`'s unfinished frame that reached this Conman, once
        some have or `timeout` passed (a proxy that holds a partial frame
        forwards none)."""
        with self.cond:
            self.cond.wait_for(lambda: self.pending.get(name, 0) > 0, timeout)
            return self.pending.get(name, 0)

    def wait_result(self, name: str, timeout: float) -> dict | None:
        with self.cond:
            self.cond.wait_for(lambda: name in self.results, timeout)
            return self.results.get(name)


# ------------------------------------------------------------ helpers


def fixed_port() -> int:
    """A free port below the ephemeral range (see FIXED_PORTS)."""
    for _ in range(200):
        port = FIXED_PORTS.start + int.from_bytes(os.urandom(2), "big") % len(FIXED_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise BenchError("no free port below the ephemeral range")


def http_get(port: int, path: str, timeout: float = 2.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            out += data
    return out.decode(errors="replace").split("\r\n\r\n", 1)[-1]


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            try:
                out[key] = float(val)
            except ValueError:
                pass
    return out


def metric_sum(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def proc_mem_kib(pid: int) -> tuple[int, int]:
    """VmRSS and RssAnon. Leaks are anonymous memory; the file-backed rest
    (the binary's pages) shrinks whenever the machine reclaims page cache."""
    rss = anon = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon = int(line.split()[1])
    return rss, anon


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_sockets() -> dict[str, tuple[int, int]]:
    """Socket inode → (local port, remote port), for every TCP socket."""
    out = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    p = line.split()
                    out[p[9]] = (int(p[1].rsplit(":", 1)[1], 16), int(p[2].rsplit(":", 1)[1], 16))
        except FileNotFoundError:
            pass
    return out


def fd_kinds(pid: int, roles: dict[str, set[int]]) -> dict[str, int]:
    """The proxy's open fds by what they are: sockets by the peer's role
    (`roles`: role → ports, matched against either end), pipes, the rest."""
    socks = tcp_sockets()
    out: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = "other"
        if target.startswith("socket:["):
            ports = socks.get(target[8:-1])
            kind = "socket_other"
            if ports:
                kind = next((r for r, ps in roles.items() if ports[0] in ps or ports[1] in ps),
                            "socket_other")
        elif target.startswith("pipe:"):
            kind = "pipe"
        out[kind] = out.get(kind, 0) + 1
    return out


# Kernel counters (TcpExt in /proc/net/netstat) that show the machine, not
# the proxy, running short of TCP memory: other work on the machine can
# exhaust tcp_mem, and then loopback transfers stall and closing sockets
# are reset.
TCP_STRESS = ("TCPMemoryPressures", "TCPMemoryPressuresChrono", "TCPAbortOnMemory",
              "TCPRcvQDrop")


def tcp_stress() -> dict[str, int]:
    """The TCP_STRESS counters and the pages TCP holds now (`mem_pages`)."""
    out = {}
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            out = {k: int(v) for k, v in zip(names.split()[1:], values.split()[1:])
                   if k in TCP_STRESS}
    with open("/proc/net/sockstat") as f:
        m = re.search(r"^TCP:.* mem (\d+)", f.read(), re.M)
    out["mem_pages"] = int(m.group(1)) if m else 0
    return out


def tcp_mem_limits() -> list[int]:
    """tcp_mem: low, pressure, high, in pages."""
    with open("/proc/sys/net/ipv4/tcp_mem") as f:
        return [int(x) for x in f.read().split()]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


# ------------------------------------------------------------- the soak


@dataclasses.dataclass
class Fault:
    kind: str
    target: str
    start: float
    end: float = 0.0
    detail: dict = dataclasses.field(default_factory=dict)

    @property
    def recovered(self) -> float:
        return self.end + RECOVERY_S[self.kind]


class Soak:
    def __init__(self, a: argparse.Namespace, procs: Procs, bins: dict[str, str]):
        self.a = a
        self.procs = procs
        self.bins = bins
        # Ends the script's clients and the faults; `sampled` ends the
        # sampler, after the wind-down, so the chart shows it too.
        self.stop = threading.Event()
        self.sampled = threading.Event()
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.samples: list[dict] = []
        self.faults: list[Fault] = []
        self.victim_events: list[dict] = []
        self.victims_open: dict[int, str] = {}
        self.hs_by_second: dict[int, list[int]] = {}
        self.hs_failures: list[dict] = []
        self.torn: list[dict] = []
        self.marks: dict[str, dict] = {}
        self.seq = 0
        self.conmans: dict[str, dict] = {}
        self.cp: subprocess.Popen | None = None
        self.metrics_errors = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def name(self, what: str) -> str:
        self.seq += 1
        return f"{self.seq:03d}-{what}"

    # ---- processes

    def start_fake(self, what: str, argv: list[str], port: int) -> subprocess.Popen:
        """Starts a fake Conman or Controlplane on its fixed port and waits
        until it listens."""
        last = None
        # The port may still be held for a moment by the killed process's
        # last sockets; a few tries cover that.
        for _ in range(20):
            p = self.procs.spawn(self.name(what), argv, self.a.load_cpu)
            try:
                self.procs.wait_line(p, r"listening (\S+)", 10)
                return p
            except RunError as e:
                last = e
                self.procs.stop(p)
                if self.stop.wait(0.25):
                    break
        raise BenchError(f"{what} did not come back on port {port}: {last}")

    def start_conman(self, vm: str) -> None:
        c = self.conmans[vm]
        c["proc"] = self.start_fake(f"conman-{vm}", [self.bins["loadgen"], "conman", "--listen",
                                                     f"127.0.0.1:{c['port']}", "--vm", vm],
                                    c["port"])

    def start_controlplane(self) -> None:
        argv = [self.bins["loadgen"], "controlplane", "--listen", f"127.0.0.1:{self.cp_port}",
                "--ttl-ms", str(self.a.placement_ttl_ms)]
        for vm, c in self.conmans.items():
            argv += ["--conman", f"{vm}=ws://127.0.0.1:{c['port']}/conman"]
        argv += ["--pin", "repl-=keep", "--pin", "vict-=b1,b2", "--pin", "hs-=b1,b2",
                 "--pin", "torn-=rec"]
        self.cp = self.start_fake("controlplane", argv, self.cp_port)

    def kill(self, p: subprocess.Popen) -> None:
        """SIGKILL, as a VM that dies: no Close, no FIN until the kernel's."""
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        if p in self.procs.live:
            self.procs.live.remove(p)

    def start_proxy(self) -> None:
        conf = self.procs.workdir / "eval-proxy.toml"
        conf.write_text(
            "# eval-proxy for bench/soak.py: Controlplane placement, dev token key.\n"
            "[token]\nallow_dev_key = true\n\n[placement]\nmode = \"controlplane\"\n\n"
            f"[controlplane]\nurls = [\"http://127.0.0.1:{self.cp_port}\"]\n\n"
            "[listen]\npin = false\n\n"
            # No load balancer in front: no readiness delay on a stop.
            "[drain]\nreadiness_delay_s = 0\n")
        p = self.procs.spawn("eval-proxy", [self.bins["proxy"], "--config", str(conf),
                                            "--listen", "127.0.0.1:0", "--admin",
                                            "127.0.0.1:0", "--shards", "1"],
                             self.a.proxy_cpu, env={"RUST_LOG": "warn"})
        m = self.procs.wait_line(p, r"eval-proxy ready listen=(\S+) admin=(\S+)", 20)
        self.proxy = p
        host, port = m.group(1).rsplit(":", 1)
        self.listen = (host, int(port))
        self.admin_port = int(m.group(2).rsplit(":", 1)[1])

    def mint(self, repl: str) -> str:
        ttl = int(self.a.seconds + 3600)
        out = subprocess.run([self.bins["proxy"], "token", "mint", "--dev", "--repl", repl,
                              "--jti", f"soak-{repl}", "--ttl", f"{ttl}s"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise BenchError(f"token mint failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def start_survivors(self, hold: float) -> list[dict]:
        url = f"ws://{self.listen[0]}:{self.listen[1]}/wsv2/"
        common = ["--url", url, "--json", "--token-per-conn", "--dev-key", "--repls", "16"]
        a = self.a
        d = f"{hold:.0f}s"
        loads = []
        if a.echo_conns:
            loads.append(("echo", ["rate", "--conns", str(a.echo_conns), "--rate",
                                   str(a.echo_rate), "--size", "64", "--duration", d]))
        if a.bulk_conns:
            loads.append(("bulk", ["rate", "--conns", str(a.bulk_conns), "--rate",
                                   str(a.bulk_rate), "--size", a.bulk_size, "--duration", d]))
        if a.mixed_conns:
            loads.append(("mixed", ["mixed", "--conns", str(a.mixed_conns), "--key-rate", "2",
                                    "--duration", d]))
        if a.idle:
            loads.append(("idle", ["idle", "--conns", str(a.idle), "--hold", d]))
        out = []
        for key, args in loads:
            conns = int(args[args.index("--conns") + 1])
            p = self.procs.spawn(self.name(f"loadgen-{key}"),
                                 [self.bins["loadgen"]] + args + common, self.a.load_cpu)
            out.append({"key": key, "conns": conns, "argv": ["eval-loadgen"] + args + common,
                        "proc": p})
        for s in out:
            if s["key"] == "idle":
                self.procs.wait_line(s["proc"], r"holding (\d+)", 120)
        return out

    # ---- sampling

    def metrics(self) -> dict[str, float] | None:
        try:
            return parse_metrics(http_get(self.admin_port, "/metrics"))
        except OSError as e:
            self.metrics_errors += 1
            if self.metrics_errors == 1:
                log(f"  GET /metrics failed: {e!r} (counted from now on, not logged)")
            return None

    def sample(self) -> dict:
        t = self.now()
        m = self.metrics()
        pid = self.proxy.pid
        rss, anon = proc_mem_kib(pid)
        s = {"t": round(t, 3), "rss_kib": rss, "anon_kib": anon, "fds": fd_count(pid),
             "cpu_ticks": sum(proc_cpu(pid)), "tcp": tcp_stress()}
        if m is None:
            s["metrics_error"] = True
        else:
            s["active"] = metric_sum(m, "eval_sessions_active")
            s["attempts"] = metric_sum(m, "eval_session_attempts_total")
            s["established"] = metric_sum(m, "eval_sessions_established_total")
            s["failures"] = metric_sum(m, "eval_session_setup_failures_total")
            s["client_fault"] = metric_sum(m, "eval_session_client_fault_rejections_total")
        with self.lock:
            s["victims_open"] = len(self.victims_open)
        return s

    def sampler(self) -> None:
        next_t = time.monotonic()
        while not self.sampled.is_set():
            try:
                s = self.sample()
            except (OSError, ValueError):
                # The proxy is gone; the main thread finds out and reports it.
                return
            with self.lock:
                self.samples.append(s)
            # After a stall (the machine, not the proxy, can stall this
            # script), go on from now rather than catch up.
            next_t = max(next_t + 1.0, time.monotonic())
            self.sampled.wait(max(0.0, next_t - time.monotonic()))

    def snapshot(self) -> dict:
        if self.proxy.poll() is not None:
            raise RunError(f"eval-proxy exited with status {self.proxy.returncode}:\n"
                           f"{self.procs.tail(self.proxy)}")
        pid = self.proxy.pid
        roles = {"client": {self.listen[1]},
                 "conman": {c["port"] for c in self.conmans.values()},
                 "controlplane": {self.cp_port}, "admin": {self.admin_port}}
        m = self.metrics() or {}
        kinds = fd_kinds(pid, roles)
        fds = fd_count(pid)
        # The keep-alive connections to the Controlplane come and go with it
        # (a restart cuts them, the pool refills on demand), and pooled
        # splice pipes stay for reuse: neither is per session.
        pooled = kinds.get("controlplane", 0) + min(kinds.get("pipe", 0), 2 * PIPE_POOL)
        rss, anon = proc_mem_kib(pid)
        return {"t": round(self.now(), 1), "rss_kib": rss, "anon_kib": anon, "fds": fds,
                "fds_net": fds - pooled, "fd_kinds": kinds,
                "active": metric_sum(m, "eval_sessions_active")}

    def mark(self, name: str, snapshots: int = 1) -> None:
        """Records the proxy's state; with several snapshots a second
        apart, also their medians (one snapshot can catch a handshake in
        flight)."""
        snaps = [self.snapshot()]
        for _ in range(snapshots - 1):
            self.stop.wait(1.0)
            snaps.append(self.snapshot())
        mark = snaps[-1]
        for key in ("rss_kib", "anon_kib", "fds", "fds_net", "active"):
            mark[f"{key}_median"] = statistics.median(s[key] for s in snaps)
        self.marks[name] = mark
        log(f"  {name}: {mark['active']:.0f} sessions, RSS {mark['rss_kib'] / 1024:.1f} MiB, "
            f"{mark['fds']} fds")

    # ---- clients

    def victim_loop(self, i: int, path: str) -> None:
        """A long-lived session on b1 or b2: one echo every interval; when
        its Conman is killed it must get Close 1014 and then reconnect."""
        lost_at: float | None = None
        tries = 0
        seq = 0
        while not self.stop.is_set():
            tries += 1
            c = None
            try:
                c = Client(self.listen, path, self.a.client_timeout)
                c.send(OP_TEXT, b"__vm__")
                vm = c.recv()[1].decode(errors="replace")
            except WsClosed as e:
                self.victim_event(i, "attempt_failed", None, code=e.code, reason=e.reason)
                self.stop.wait(retry_after(e.reason, 0.25))
                continue
            except WsError as e:
                self.victim_event(i, "attempt_failed", None, kind=e.kind)
                if c is not None:
                    c.sock.close()
                self.stop.wait(0.25)
                continue
            with self.lock:
                self.victims_open[i] = vm
            self.victim_event(i, "open", vm, tries=tries,
                              reconnect_s=None if lost_at is None else round(self.now() - lost_at, 3))
            tries = 0
            try:
                while not self.stop.wait(self.a.victim_interval):
                    seq += 1
                    c.echo(OP_BINARY, f"vict-{i}-{seq}-".encode().ljust(64, b"."))
                c.close()
                self.victim_event(i, "stopped", vm)
                with self.lock:
                    self.victims_open.pop(i, None)
                return
            except WsClosed as e:
                self.victim_event(i, "lost", vm, code=e.code, reason=e.reason)
            except WsError as e:
                self.victim_event(i, "lost", vm, kind=e.kind, detail=str(e))
                c.sock.close()
            with self.lock:
                self.victims_open.pop(i, None)
            lost_at = self.now()

    def victim_event(self, i: int, what: str, vm: str | None, **kw) -> None:
        with self.lock:
            self.victim_events.append({"t": round(self.now(), 3), "victim": i, "event": what,
                                       "vm": vm, **kw})

    def handshake_loop(self, k: int, paths: list[str]) -> None:
        """Connect, upgrade, one echo, close, at a steady rate per worker."""
        period = self.a.handshake_workers / self.a.handshake_rate
        next_t = time.monotonic() + period * k / self.a.handshake_workers
        n = 0
        while not self.stop.wait(max(0.0, next_t - time.monotonic())):
            next_t = max(next_t + period, time.monotonic())
            t = self.now()
            path = paths[(k + n * self.a.handshake_workers) % len(paths)]
            n += 1
            ok, failure, c = True, None, None
            try:
                c = Client(self.listen, path, self.a.client_timeout)
                c.echo(OP_BINARY, os.urandom(64))
                c.close()
            except WsClosed as e:
                ok, failure = False, {"kind": f"close_{e.code}", "reason": e.reason}
            except WsError as e:
                ok, failure = False, {"kind": e.kind, "detail": str(e)}
            finally:
                if c is not None:
                    c.sock.close()
            with self.lock:
                bucket = self.hs_by_second.setdefault(int(t), [0, 0])
                bucket[0 if ok else 1] += 1
                if failure:
                    self.hs_failures.append({"t": round(t, 3), **failure})

    # ---- faults

    def fault_conman(self, vm: str) -> Fault:
        f = Fault("conman_kill", vm, self.now())
        with self.lock:
            f.detail["victims_on_it"] = sum(1 for v in self.victims_open.values() if v == vm)
        self.kill(self.conmans[vm]["proc"])
        self.stop.wait(self.a.conman_down)
        self.start_conman(vm)
        f.end = self.now()
        return f

    def fault_controlplane(self) -> Fault:
        f = Fault("controlplane_down", "controlplane", self.now())
        self.kill(self.cp)
        self.stop.wait(self.a.controlplane_down)
        self.start_controlplane()
        f.end = self.now()
        return f

    def fault_torn(self, paths: list[str]) -> Fault:
        f = Fault("torn_clients", "rec", self.now())
        names = []
        for k in range(self.a.torn_clients):
            name = f"torn-{len(self.torn) + len(names)}"
            try:
                c = Client(self.listen, paths[k % len(paths)], self.a.client_timeout)
                c.echo(OP_TEXT, name.encode())
                frame = mask_frame(OP_BINARY, os.urandom(1000))
                c.sock.sendall(frame[:len(frame) // 2])
                forwarded = self.rec.wait_pending(name, 0.3)
                c.reset()
                names.append((name, forwarded))
            except (WsClosed, WsError, OSError) as e:
                self.torn.append({"t": round(self.now(), 3), "name": name, "setup_error": str(e)})
        for name, forwarded in names:
            r = self.rec.wait_result(name, 15.0)
            self.torn.append({"t": round(self.now(), 3), "name": name,
                              "partial_bytes_seen_before_reset": forwarded,
                              "conman_got": r or {"end": "no end within 15 s"}})
        f.end = self.now()
        f.detail["clients"] = len(names)
        return f

    def run_faults(self, until: float, torn_paths: list[str]) -> None:
        kinds = ["conman_kill", "torn_clients", "controlplane_down"]
        longest = {"conman_kill": self.a.conman_down + 2, "torn_clients": 16,
                   "controlplane_down": self.a.controlplane_down + 2}
        i = 0
        kill_next = "b1"
        while not self.stop.is_set():
            kind = kinds[i % len(kinds)]
            if self.now() + longest[kind] + RECOVERY_S[kind] > until:
                break
            i += 1
            log(f"  t={self.now():5.0f} s fault: {kind}"
                + (f" {kill_next}" if kind == "conman_kill" else ""))
            if kind == "conman_kill":
                f = self.fault_conman(kill_next)
                kill_next = "b2" if kill_next == "b1" else "b1"
            elif kind == "torn_clients":
                f = self.fault_torn(torn_paths)
            else:
                f = self.fault_controlplane()
            self.faults.append(f)
            self.stop.wait(self.a.gap)
        self.stop.wait(max(0.0, until - self.now()))

    # ---- the whole run

    def run(self) -> dict:
        a = self.a
        for vm in ("keep", "b1", "b2"):
            self.conmans[vm] = {"port": fixed_port()}
            self.start_conman(vm)
        self.rec = RecordingConman()
        self.conmans["rec"] = {"port": self.rec.port}
        self.cp_port = fixed_port()
        self.start_controlplane()
        self.start_proxy()
        log(f"proxy on {self.listen[0]}:{self.listen[1]} (CPU {a.proxy_cpu}), admin "
            f"{self.admin_port}; Conmans keep/b1/b2/rec, Controlplane on {self.cp_port}")
        victim_paths = [f"/wsv2/{self.mint(f'vict-{i}')}" for i in range(a.victims)]
        hs_paths = [f"/wsv2/{self.mint(f'hs-{i}')}" for i in range(8)]
        torn_paths = [f"/wsv2/{self.mint(f'torn-{i}')}" for i in range(2)]
        self.mark("start")
        threading.Thread(target=self.sampler, name="sampler", daemon=True).start()

        planned = a.seconds
        # Survivors run past the planned end, so that all of them are still
        # up through the cool-down window; the wait below ends them.
        survivors = self.start_survivors(planned + 10)
        threads = [threading.Thread(target=self.victim_loop, args=(i, p), daemon=True)
                   for i, p in enumerate(victim_paths)]
        threads += [threading.Thread(target=self.handshake_loop, args=(k, hs_paths), daemon=True)
                    for k in range(a.handshake_workers)]
        for t in threads:
            t.start()
        expect = sum(s["conns"] for s in survivors) + a.victims
        deadline = time.monotonic() + 120
        while metric_sum(self.metrics() or {}, "eval_sessions_active") < expect:
            if time.monotonic() > deadline:
                raise BenchError(f"{expect} sessions not open within 120 s")
            for s in survivors:
                if s["proc"].poll() is not None:
                    raise BenchError(f"loadgen {s['key']} exited early:\n{self.procs.tail(s['proc'])}")
            time.sleep(0.1)
        load_t0 = self.now()
        others0 = others_cpu_ticks()
        log(f"{expect} sessions open; warm-up {a.warmup:.0f} s, faults until "
            f"{planned - a.cooldown:.0f} s, cool-down {a.cooldown:.0f} s")
        self.stop.wait(max(0.0, load_t0 + a.warmup - MARK_SNAPSHOTS - self.now()))
        self.mark("warm", MARK_SNAPSHOTS)
        self.run_faults(load_t0 + planned - a.cooldown, torn_paths)
        self.stop.wait(max(0.0, load_t0 + planned - MARK_SNAPSHOTS - self.now()))
        self.mark("end", MARK_SNAPSHOTS)
        load_t1 = self.now()
        others = (others_cpu_ticks() - others0) / HZ / (load_t1 - load_t0)
        early = [s["key"] for s in survivors if s["proc"].poll() is not None]
        # Stop this script's clients; the survivors end on their own.
        log("stopping the clients")
        self.stop.set()
        for t in threads:
            t.join(timeout=a.client_timeout + 5)
        for s in survivors:
            p = s["proc"]
            # poll() above reaped any that ended early; wait4 would not find them.
            if p.returncode is None:
                self.procs.wait_exit(p, 120)
            elif p in self.procs.live:
                self.procs.live.remove(p)
            s["exit"] = p.returncode
            s["report"] = json_report(self.procs.out_text(s["proc"]))
            s["stderr"] = self.procs.out_text(s["proc"], "err").strip().splitlines()[-5:]
            del s["proc"]
        deadline = time.monotonic() + 30
        while metric_sum(self.metrics() or {"eval_sessions_active": 1}, "eval_sessions_active") > 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # Not a readiness wait: the proxy gives idle buffer pages back after
        # 1 s of quiet, and the after-load RSS is meant to be measured then.
        time.sleep(3)
        self.mark("after")
        self.sampled.set()
        final = self.metrics() or {}
        err = self.procs.out_text(self.proxy, "err")
        return {
            "load_t0": load_t0, "load_t1": load_t1, "survivors": survivors,
            "others_cpu_share": others,
            "survivors_ended_early": early, "final_metrics":
                {k: v for k, v in final.items() if v and "_bucket{" not in k},
            "proxy_alive": self.proxy.poll() is None, "metrics_errors": self.metrics_errors,
            "proxy_log": {"lines": len(err.splitlines()), "bytes": len(err.encode()),
                          "tail": err.splitlines()[-5:]},
        }


def retry_after(reason: str, default: float) -> float:
    m = re.search(r"retry_after_ms=(\d+)", reason)
    return int(m.group(1)) / 1000 if m else default


# ------------------------------------------------------------- figures


def analyse(rec: dict) -> dict:
    """The criteria and figures, from what a run recorded (as in its JSON)."""
    res, cfg, samples = rec["run"], rec["settings"], rec["samples"]
    faults, marks = res["faults"], rec["marks"]
    victim_events, torn = rec["victim_events"], rec["torn"]
    hs_by_second = {int(k): v for k, v in rec["handshakes_by_second"].items()}
    t0, t1 = res["load_t0"], res["load_t1"]
    windows = [(f["start"], f["end"] + RECOVERY_S[f["kind"]]) for f in faults]

    def in_fault(lo: float, hi: float) -> bool:
        return any(ws < hi and lo < we for ws, we in windows)

    # Proxy side, per sample interval: sessions established against setups
    # that failed through no fault of the client's.
    rate = []
    ok = {"all": [0, 0], "outside": [0, 0]}
    for prev, cur in zip(samples, samples[1:]):
        if "established" not in prev or "established" not in cur:
            continue
        est = cur["established"] - prev["established"]
        failed = (cur["failures"] - prev["failures"]) - (cur["client_fault"] - prev["client_fault"])
        fault = in_fault(prev["t"], cur["t"])
        rate.append({"t": cur["t"], "established": est, "failed": failed, "in_fault": fault})
        if t0 <= prev["t"] and cur["t"] <= t1 + 1:
            for key in ("all",) + (() if fault else ("outside",)):
                ok[key][0] += est
                ok[key][1] += failed
    hs = {"all": [0, 0], "outside": [0, 0]}
    for sec, (n_ok, n_fail) in hs_by_second.items():
        if not t0 <= sec <= t1:
            continue
        for key in ("all",) + (() if in_fault(sec, sec + 1) else ("outside",)):
            hs[key][0] += n_ok
            hs[key][1] += n_fail
    hs_fail_outside = [f for f in rec["handshake_failures"] if not in_fault(f["t"] - 1, f["t"] + 1)]

    def share(pair: list[int]) -> float | None:
        return pair[0] / (pair[0] + pair[1]) if pair[0] + pair[1] else None

    kills = [(f["target"], f["start"]) for f in faults if f["kind"] == "conman_kill"]
    deliberate, unexpected = [], []
    for e in victim_events:
        if e["event"] != "lost":
            continue
        killed = any(vm == e["vm"] and start - 0.5 <= e["t"] <= start + KILL_ATTRIBUTION_S
                     for vm, start in kills)
        if killed and e.get("code") == 1014:
            deliberate.append(e)
        else:
            unexpected.append(e)
    reconnects = [e["reconnect_s"] for e in victim_events
                  if e["event"] == "open" and e.get("reconnect_s") is not None]
    stopped = {e["victim"] for e in victim_events if e["event"] == "stopped"}
    killed_not_back = sorted({e["victim"] for e in deliberate} - stopped)

    survivors = []
    for s in res["survivors"]:
        r = s.get("report")
        errors = sum(r["errors"].values()) if r else None
        # A connection that fails is counted once among the errors, whether
        # or not it was ever established.
        lost = s["conns"] if r is None else max(errors, s["conns"] - r["established"])
        survivors.append({"key": s["key"], "conns": s["conns"], "exit": s.get("exit"),
                          "established": r["established"] if r else None,
                          "messages": r["messages"] if r else None,
                          "errors": r["errors"] if r else None,
                          "latency_p99_us": r["latency_us"]["p99"] if r else None,
                          "latency_max_us": r["latency_us"]["max"] if r else None,
                          "lost": lost, "stderr": s.get("stderr")})
    survivors_lost = sum(s["lost"] for s in survivors)

    m = marks

    mid = (t0 + t1) / 2

    def median_of(key: str, lo: float, hi: float) -> float | None:
        vals = [s[key] for s in samples if lo <= s["t"] <= hi and key in s]
        return statistics.median(vals) if vals else None

    # "Flat": the second half of the load adds (almost) nothing. The first
    # half is allowed to grow, as buffers and caches reach their working size.
    anon_mid = median_of("anon_kib", mid - 5, mid + 5)
    anon_end = median_of("anon_kib", t1 - 10, t1)
    growth = anon_end - anon_mid if anon_mid is not None and anon_end is not None else None
    slope = None
    late = [s for s in samples if mid <= s["t"] <= t1]
    if len(late) >= 10:
        xs = [s["t"] / 60 for s in late]
        ys = [s["anon_kib"] for s in late]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None
    grow_allowed = max(cfg["rss_tolerance_mib"] * 1024, 0.10 * (anon_mid or 0))
    back_allowed = cfg["rss_tolerance_mib"] * 1024
    anon_back = m["after"]["anon_kib"] - m["start"]["anon_kib"]
    # Each session holds two sockets; should a victim be between Conmans
    # at one mark, that is not drift.
    fd_drift_loaded = (m["end"]["fds_net_median"] - m["warm"]["fds_net_median"]
                       - 2 * (m["end"]["active_median"] - m["warm"]["active_median"]))
    fd_drift_after = m["after"]["fds_net"] - m["start"]["fds_net"]

    torn_clean = [t for t in torn if (g := t.get("conman_got")) and g.get("close") == 1001
                  and g.get("partial") == 0 and g.get("after_close") == 0]
    torn_summary: dict[str, int] = {}
    for t in torn:
        g = t.get("conman_got")
        if g is None:
            what = "client setup failed"
        elif g.get("close") is not None:
            what = f"Close {g['close']}" + (f" after {g['partial']} B of a torn frame"
                                            if g.get("partial") else "")
            if t.get("partial_bytes_seen_before_reset"):
                what += " (torn frame bytes reached Conman first)"
            if g.get("after_close"):
                what += f", {g['after_close']} frame(s) after it"
        else:
            what = (f"no Close, {g.get('end')}"
                    + (f", {g['partial']} B of a torn frame" if g.get("partial") else ""))
        torn_summary[what] = torn_summary.get(what, 0) + 1

    # The machine's TCP memory, over the whole run.
    with_tcp = [s for s in samples if "tcp" in s]
    stressed = [(p["t"], c["t"]) for p, c in zip(with_tcp, with_tcp[1:])
                if any(c["tcp"].get(k, 0) > p["tcp"].get(k, 0) for k in TCP_STRESS[1:])]
    machine = {"tcp_mem_pressure_pages": tcp_mem_limits()[1],
               "tcp_mem_peak_pages": max((s["tcp"]["mem_pages"] for s in with_tcp), default=0),
               "counters": {k: with_tcp[-1]["tcp"].get(k, 0) - with_tcp[0]["tcp"].get(k, 0)
                            for k in TCP_STRESS} if with_tcp else {},
               "stressed_intervals": stressed}

    criteria = [
        ("sessions lost that were not deliberately killed", survivors_lost + len(unexpected), "0",
         survivors_lost + len(unexpected) == 0 and not res["survivors_ended_early"]),
        ("victims killed with their Conman that did not reconnect", len(killed_not_back), "0",
         not killed_not_back),
        ("setup failures outside fault windows (proxy metrics)", ok["outside"][1], "0",
         ok["outside"][1] == 0),
        ("handshake-loop failures outside fault windows", len(hs_fail_outside), "0",
         not hs_fail_outside),
        ("fds after the load minus fds before it (Controlplane connections and pooled splice "
         "pipes aside)",
         fd_drift_after, f"|x| ≤ {cfg['fd_tolerance']}", abs(fd_drift_after) <= cfg["fd_tolerance"]),
        ("fds at the end minus after warm-up, under the same load (medians, as above, 2 per "
         "session of difference allowed)", fd_drift_loaded,
         f"|x| ≤ {cfg['fd_tolerance']}", abs(fd_drift_loaded) <= cfg["fd_tolerance"]),
        ("anonymous RSS growth over the second half of the load (10 s medians, KiB)",
         None if growth is None else round(growth), f"≤ {grow_allowed:.0f}",
         growth is not None and growth <= grow_allowed),
        ("anonymous RSS after the load minus before it (KiB)", anon_back,
         f"≤ {back_allowed:.0f}", anon_back <= back_allowed),
        ("proxy still running", res["proxy_alive"], "True", res["proxy_alive"]),
    ]
    return {
        "criteria": [{"what": w, "value": v, "goal": g, "ok": bool(o)} for w, v, g, o in criteria],
        "passed": all(o for *_, o in criteria),
        "success_rate": {"proxy_overall": share(ok["all"]), "proxy_outside_faults": share(ok["outside"]),
                         "proxy_counts": ok, "handshakes_overall": share(hs["all"]),
                         "handshakes_outside_faults": share(hs["outside"]), "handshake_counts": hs},
        "survivors": survivors,
        "survivors_lost": survivors_lost,
        "victims": {"count": cfg["victims"], "deliberately_killed": len(deliberate),
                    "unexpected": unexpected, "killed_not_back": killed_not_back,
                    "reconnect_s": {"p50": percentile(reconnects, 0.5),
                                    "p99": percentile(reconnects, 0.99),
                                    "max": max(reconnects) if reconnects else None,
                                    "n": len(reconnects)},
                    "failed_attempts": sum(1 for e in victim_events
                                           if e["event"] == "attempt_failed")},
        "handshake_failures_outside_faults": hs_fail_outside[:20],
        "memory": {"rss_kib": {k: m[k]["rss_kib"] for k in m},
                   "anon_kib": {k: m[k]["anon_kib"] for k in m},
                   "anon_kib_mid": anon_mid, "anon_kib_end": anon_end,
                   "anon_growth_second_half_kib": growth,
                   "anon_slope_second_half_kib_per_min": slope,
                   "anon_after_minus_start_kib": anon_back,
                   "fds": {k: m[k]["fds"] for k in m},
                   "fds_net_median": {k: m[k].get("fds_net_median") for k in ("warm", "end")},
                   "fd_kinds": {k: m[k]["fd_kinds"] for k in m},
                   "sessions": {k: m[k]["active"] for k in m},
                   "fd_drift_after": fd_drift_after, "fd_drift_loaded": fd_drift_loaded},
        "faults": {kind: sum(1 for f in faults if f["kind"] == kind) for kind in RECOVERY_S},
        "machine": machine,
        "load_window": [t0, t1],
        "torn": {"clients": len(torn), "clean": len(torn_clean), "outcomes": torn_summary},
        "rate_series": rate,
    }


def fmt_rate(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.3f} %"


def markdown(meta: dict, fig: dict, res: dict) -> str:
    L = [f"# eval-proxy soak: {meta['minutes']:g} min, faults every few seconds\n",
         f"{meta['date']} · eval-proxy {meta['commit']} · {meta['cpu_model']}, {meta['cpus']} CPUs, "
         f"Linux {meta['kernel']}  ",
         f"`{meta['command']}` · proxy (1 shard) on CPU {meta['proxy_cpu']}, everything else on "
         f"CPU {meta['load_cpu']} · load: {meta['load']}\n",
         f"**{'PASSED' if fig['passed'] else 'FAILED'}**\n",
         "| criterion | value | goal | |", "|---|---|---|---|"]
    for c in fig["criteria"]:
        L.append(f"| {c['what']} | {c['value']} | {c['goal']} | {'✅' if c['ok'] else '❌'} |")
    sr = fig["success_rate"]
    mem = fig["memory"]
    v = fig["victims"]
    rc = v["reconnect_s"]
    mach = fig["machine"]
    L += ["", "## Figures\n",
          "| figure | value |", "|---|---|",
          f"| session success rate, proxy metrics (established ÷ established + setup failures "
          f"not the client's fault), whole soak | {fmt_rate(sr['proxy_overall'])} "
          f"({sr['proxy_counts']['all'][0]} / {sum(sr['proxy_counts']['all'])}) |",
          f"| the same outside fault windows | {fmt_rate(sr['proxy_outside_faults'])} "
          f"({sr['proxy_counts']['outside'][0]} / {sum(sr['proxy_counts']['outside'])}) |",
          f"| handshake loop (connect, upgrade, echo, close), whole soak | "
          f"{fmt_rate(sr['handshakes_overall'])} ({sr['handshake_counts']['all'][0]} / "
          f"{sum(sr['handshake_counts']['all'])}) |",
          f"| the same outside fault windows | {fmt_rate(sr['handshakes_outside_faults'])} "
          f"({sr['handshake_counts']['outside'][0]} / {sum(sr['handshake_counts']['outside'])}) |",
          f"| survivor sessions (never meant to end) lost | {fig['survivors_lost']} of "
          f"{sum(s['conns'] for s in fig['survivors'])} |",
          f"| victim sessions killed with their Conman (Close 1014) | {v['deliberately_killed']} "
          f"({v['count']} victims) |",
          f"| victim endings not explained by a kill | {len(v['unexpected'])} |",
          f"| victim reconnect, loss to relaying again (s) p50 / p99 / max | "
          f"{fmt_s(rc['p50'])} / {fmt_s(rc['p99'])} / {fmt_s(rc['max'])} (n = {rc['n']}) |",
          f"| victim connect attempts that failed (while reconnecting) | {v['failed_attempts']} |",
          f"| RSS MiB, total (anonymous): start / after warm-up / end / after the load | "
          + " / ".join(f"{mem['rss_kib'][k] / 1024:.1f} ({mem['anon_kib'][k] / 1024:.1f})"
                       for k in ("start", "warm", "end", "after")) + " |",
          f"| anonymous RSS, middle → end of the load (10 s medians) | "
          + ("–" if mem["anon_growth_second_half_kib"] is None else
             f"{mem['anon_kib_mid'] / 1024:.1f} → {mem['anon_kib_end'] / 1024:.1f} MiB "
             f"({mem['anon_growth_second_half_kib'] / 1024:+.2f})") + " |",
          f"| anonymous RSS trend over the second half (least squares) | "
          + ("–" if mem["anon_slope_second_half_kib_per_min"] is None
             else f"{mem['anon_slope_second_half_kib_per_min']:+.0f} KiB/min") + " |",
          f"| open fds: start / after warm-up / end / after the load | "
          + " / ".join(str(mem["fds"][k]) for k in ("start", "warm", "end", "after")) + " |",
          f"| sessions active at those points | "
          + " / ".join(f"{mem['sessions'][k]:.0f}" for k in ("start", "warm", "end", "after"))
          + " |",
          f"| fds by kind, start → after the load | "
          + ", ".join(f"{k} {mem['fd_kinds']['start'].get(k, 0)} → "
                      f"{mem['fd_kinds']['after'].get(k, 0)}"
                      for k in sorted(mem["fd_kinds"]["start"] | mem["fd_kinds"]["after"]))
          + " |",
          f"| fd drift: end − warm-up (medians) / after − start (Controlplane sockets, pooled "
          f"pipes aside) | "
          f"{mem['fd_drift_loaded']:+.0f} / {mem['fd_drift_after']:+d} |",
          f"| faults injected | " + ", ".join(f"{n} {k}" for k, n in fig["faults"].items()) + " |",
          f"| proxy stderr (RUST_LOG=warn) | {res['proxy_log']['lines']} lines, "
          f"{res['proxy_log']['bytes']} bytes |",
          f"| machine: other processes' CPU during the load | "
          f"{100 * res['others_cpu_share']:.0f} % of a core |",
          f"| machine: kernel TCP memory, peak / pressure threshold | "
          f"{mach['tcp_mem_peak_pages'] * 4 / 1024:.0f} / "
          f"{mach['tcp_mem_pressure_pages'] * 4 / 1024:.0f} MiB |",
          f"| machine: TCP memory pressure entered / s under it / sockets reset for lack of "
          f"memory / receive-queue drops | "
          + " / ".join(str(mach["counters"].get(k, 0) // (1000 if k.endswith("Chrono") else 1))
                       for k in TCP_STRESS) + " |",
          ""]
    if res["others_cpu_share"] > 0.25:
        L += [f"Other processes on this machine used {100 * res['others_cpu_share']:.0f} % of a "
              "core on average during the load: latencies (and timeouts, if any) reflect a shared "
              "machine.\n"]
    if mach["stressed_intervals"]:
        L += [f"**The kernel ran short of TCP memory during {len(mach['stressed_intervals'])} "
              "second(s) of this soak** (work of other processes on the machine; grey in the "
              "chart). Loopback transfers then stall on dropped segments and closing sockets are "
              "reset, so failures in those seconds may be the machine's rather than the "
              "proxy's.\n"]
    L += ["## What Conman got from clients that reset mid-frame\n",
          "Each sends one 1,000-byte binary frame's first 500 bytes, then RST. The goal (issue 11, "
          "item 1) is a Close 1001 and no partial bytes; recorded, not yet a criterion.\n",
          "| Conman received | clients |", "|---|---|"]
    for what, n in sorted(fig["torn"]["outcomes"].items()):
        L.append(f"| {what} | {n} |")
    L += ["", "## Survivors (eval-loadgen, repls on Conman `keep`)\n",
          "| load | conns | established | messages | errors | p99 / max µs | exit |",
          "|---|---|---|---|---|---|---|"]
    for s in fig["survivors"]:
        errs = "–" if s["errors"] is None else (", ".join(f"{k} {n}" for k, n in s["errors"].items())
                                                or "0")
        L.append(f"| {s['key']} | {s['conns']} | {s['established']} | {s['messages']} | {errs} | "
                 f"{s['latency_p99_us']} / {s['latency_max_us']} | {s['exit']} |")
    L += ["", "## Faults\n", "| t (s) | fault | target | lasted (s) | notes |", "|---|---|---|---|---|"]
    for f in res["faults"]:
        notes = ", ".join(f"{k} {v}" for k, v in f["detail"].items())
        L.append(f"| {f['start']:.1f} | {f['kind']} | {f['target']} | {f['end'] - f['start']:.1f} "
                 f"| {notes} |")
    if fig["victims"]["unexpected"] or fig["handshake_failures_outside_faults"]:
        L += ["", "## Unexplained endings\n"]
        for e in fig["victims"]["unexpected"]:
            L.append(f"- victim {e['victim']} at {e['t']:.1f} s on {e['vm']}: "
                     f"{e.get('code', e.get('kind'))} {e.get('reason', e.get('detail', ''))}")
        for e in fig["handshake_failures_outside_faults"]:
            L.append(f"- handshake at {e['t']:.1f} s: {e['kind']} {e.get('reason', e.get('detail', ''))}")
    L += ["", "A fault window runs from the fault's start to its end plus "
          + ", ".join(f"{v:g} s ({k})" for k, v in RECOVERY_S.items())
          + ". Chart: `soak.svg`. Raw samples: `soak.json`."]
    return "\n".join(L) + "\n"


def nice_step(span: float, ticks: int = 4) -> float:
    """A round step (1, 2, 2.5 or 5 × 10^k) that cuts `span` into about
    `ticks` parts."""
    raw = max(span, 1e-9) / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if raw <= m * mag)


def fmt_s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


FAULT_COLORS = {"conman_kill": "#d62728", "controlplane_down": "#ff7f0e",
                "torn_clients": "#9467bd"}


def svg_chart(meta: dict, fig: dict, samples: list[dict], faults: list[dict],
              hs_by_second: dict[int, list[int]]) -> str:
    W, left, right, top = 960, 70, 20, 76
    ph, gap = 120, 34
    panels = ["Sessions active", "RSS (MiB)", "Open fds", "Setup success per second (%)"]
    keys = [[], [("#1f77b4", "total"), ("#9467bd", "anonymous")], [],
            [("#1f77b4", "proxy (metrics)"), ("#2ca02c", "handshake loop (client)")]]
    H = top + len(panels) * (ph + gap) + 30
    pw = W - left - right
    tmax = max([s["t"] for s in samples] + [1.0])
    x = lambda t: left + pw * t / tmax  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="16" font-weight="bold">'
           f'eval-proxy soak, {meta["minutes"]:g} min, faults injected '
           f'({"passed" if fig["passed"] else "FAILED"})</text>',
           f'<text x="{W / 2}" y="42" text-anchor="middle" fill="#555">'
           f'{html.escape(meta["date"])} · eval-proxy {html.escape(meta["commit"])} · '
           f'sessions lost (not killed on purpose) {fig["survivors_lost"] + len(fig["victims"]["unexpected"])}'
           f' · anonymous RSS, 2nd half of the load '
           f'{(fig["memory"]["anon_growth_second_half_kib"] or 0) / 1024:+.1f} MiB · fd drift '
           f'{fig["memory"]["fd_drift_after"]:+d}</text>']
    rate_proxy = [(r["t"], 100 * r["established"] / (r["established"] + r["failed"]))
                  for r in fig["rate_series"] if r["established"] + r["failed"] > 0]
    rate_hs = [(sec + 0.5, 100 * ok / (ok + fail)) for sec, (ok, fail) in sorted(hs_by_second.items())
               if ok + fail > 0]
    series = [
        [("#1f77b4", [(s["t"], s["active"]) for s in samples if "active" in s])],
        [("#1f77b4", [(s["t"], s["rss_kib"] / 1024) for s in samples]),
         ("#9467bd", [(s["t"], s["anon_kib"] / 1024) for s in samples if "anon_kib" in s])],
        [("#1f77b4", [(s["t"], s["fds"]) for s in samples])],
        [("#1f77b4", rate_proxy), ("#2ca02c", rate_hs)],
    ]
    for pi, (title, lines) in enumerate(zip(panels, series)):
        y0 = top + pi * (ph + gap)
        vals = [v for _, pts in lines for _, v in pts]
        if pi == 3:
            lo = min(vals + [100.0])
            lo = 0.0 if lo < 50 else math.floor(lo / 10) * 10
            step = nice_step(100.0 - lo)
            hi = 100.0
        else:
            lo = 0.0
            step = nice_step(max(vals + [1.0]))
            hi = step * math.ceil(max(vals + [1.0]) * 1.05 / step)
        y = lambda v: y0 + ph - ph * (v - lo) / ((hi - lo) or 1)  # noqa: E731
        for t in fig["load_window"]:
            out.append(f'<line x1="{x(t):.1f}" y1="{y0}" x2="{x(t):.1f}" y2="{y0 + ph}" '
                       f'stroke="#555" stroke-dasharray="3,3"/>')
        for lo_t, hi_t in fig["machine"]["stressed_intervals"]:
            out.append(f'<rect x="{x(lo_t):.1f}" y="{y0}" width="{max(1.0, x(hi_t) - x(lo_t)):.1f}" '
                       f'height="{ph}" fill="#7f7f7f" opacity="0.3"/>')
        for f in faults:
            # The fault itself, then (lighter) the recovery it is allowed.
            x0 = x(f["start"])
            x1 = max(x(f["end"]), x0 + 2)
            x2 = x(f["end"] + RECOVERY_S[f["kind"]])
            color = FAULT_COLORS[f["kind"]]
            out.append(f'<rect x="{x0:.1f}" y="{y0}" width="{x1 - x0:.1f}" height="{ph}" '
                       f'fill="{color}" opacity="0.25"><title>{f["kind"]} '
                       f'{html.escape(f["target"])} at {f["start"]:.0f} s</title></rect>')
            out.append(f'<rect x="{x1:.1f}" y="{y0}" width="{max(0.0, x2 - x1):.1f}" '
                       f'height="{ph}" fill="{color}" opacity="0.08"/>')
        out.append(f'<text x="{left}" y="{y0 - 6}" font-weight="bold">{title}</text>')
        kx = left + 8 * len(title) + 20
        for color, label in keys[pi]:
            out.append(f'<line x1="{kx}" y1="{y0 - 10}" x2="{kx + 14}" y2="{y0 - 10}" '
                       f'stroke="{color}" stroke-width="2"/><text x="{kx + 18}" y="{y0 - 6}">'
                       f'{html.escape(label)}</text>')
            kx += 40 + 6.6 * len(label)
        out += svg_grid(y, lo, hi, step, left, W - right, lambda v: f"{v:g}", label_gap=6,
                        color="#e5e5e5")
        for color, pts in lines:
            if not pts:
                continue
            d = " ".join(f"{'M' if i == 0 else 'L'}{x(t):.1f},{y(v):.1f}"
                         for i, (t, v) in enumerate(pts))
            out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.3"/>')
    ya = top + len(panels) * (ph + gap) - gap + 16
    step = nice_step(tmax / 60, 10) * 60
    t = 0.0
    while t <= tmax:
        out.append(f'<text x="{x(t):.1f}" y="{ya}" text-anchor="middle">{t / 60:g}</text>')
        t += step
    out.append(f'<text x="{left + pw / 2}" y="{ya + 16}" text-anchor="middle" fill="#555">'
               f'minutes since the proxy started (dashed: the load starts, ends)</text>')
    lx, ly = left, H - 10
    legend = [(c, k.replace("_", " ")) for k, c in FAULT_COLORS.items()]
    legend.append(("#7f7f7f", "kernel short of TCP memory"))
    out.append(f'<text x="{lx}" y="{ly}" fill="#555">bands (lighter: recovery allowed):</text>')
    lx += 210
    for color, label in legend:
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{color}" '
                   f'opacity="0.35"/><text x="{lx + 16}" y="{ly}">{html.escape(label)}</text>')
        lx += 30 + 6.6 * len(label)
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def machine_meta(a: argparse.Namespace) -> dict:
    return {
        **host_meta(),
        "command": " ".join(["bench/soak.sh"] + a.argv),
        "minutes": a.minutes, "proxy_cpu": a.proxy_cpu, "load_cpu": a.load_cpu,
        "load": (f"echo {a.echo_conns} conns at {a.echo_rate:g} msg/s (64 B), bulk {a.bulk_conns} "
                 f"conns at {a.bulk_rate:g} msg/s ({a.bulk_size}), mixed {a.mixed_conns} conns, "
                 f"idle {a.idle}, {a.victims} victims, handshakes {a.handshake_rate:g}/s"),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/soak.sh",
        description="eval-proxy under mixed load with faults injected (see bench/README.md, Soak).")
    p.add_argument("minutes", type=float, nargs="?",
                   help="how long the load runs (warm-up and cool-down included)")
    p.add_argument("--out", type=Path,
                   help="folder for soak.{json,md,svg} (bench/results; with --render, the "
                   "JSON's folder)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only judge a saved soak.json again and rewrite its md, svg and json")
    p.add_argument("--proxy-cpu", type=int, help="CPU for the proxy (the first one allowed)")
    p.add_argument("--load-cpu", type=int,
                   help="CPU for everything else (the second one allowed, or the first)")
    p.add_argument("--no-build", action="store_true", help="use the release binaries already built")
    p.add_argument("--proxy-bin", help="eval-proxy binary to use (no build)")
    p.add_argument("--loadgen-bin", help="eval-loadgen binary to use (no build)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (configs, logs)")
    g = p.add_argument_group("load")
    g.add_argument("--echo-conns", type=int, default=50)
    g.add_argument("--echo-rate", type=float, default=1000, help="msg/s over all echo conns")
    g.add_argument("--bulk-conns", type=int, default=2)
    g.add_argument("--bulk-rate", type=float, default=8, help="msg/s over all bulk conns")
    g.add_argument("--bulk-size", default="256KiB")
    g.add_argument("--mixed-conns", type=int, default=50, help="terminal-like sessions")
    g.add_argument("--idle", type=int, default=1000, help="idle sessions")
    g.add_argument("--victims", type=int, default=10,
                   help="long-lived sessions on the Conmans that get killed")
    g.add_argument("--victim-interval", type=float, default=0.5, help="s between victim echoes")
    g.add_argument("--handshake-rate", type=float, default=10, help="handshakes/s")
    g.add_argument("--handshake-workers", type=int, default=2)
    g.add_argument("--client-timeout", type=float, default=15.0)
    g = p.add_argument_group("faults")
    g.add_argument("--warmup", type=float, help="s before the first fault (10 %% of the run, 8-30)")
    g.add_argument("--cooldown", type=float, help="s after the last fault (as --warmup)")
    g.add_argument("--gap", type=float, default=6.0, help="s between one fault's end and the next")
    g.add_argument("--conman-down", type=float, default=3.0, help="s a killed Conman stays down")
    g.add_argument("--controlplane-down", type=float, default=10.0,
                   help="s the Controlplane stays down")
    g.add_argument("--torn-clients", type=int, default=3, help="clients per mid-frame reset fault")
    g.add_argument("--placement-ttl-ms", type=int, default=15000,
                   help="ttl_ms the Controlplane hands out (so the cache expires during outages)")
    g = p.add_argument_group("criteria")
    g.add_argument("--fd-tolerance", type=int, default=4, help="fd drift allowed (4)")
    g.add_argument("--rss-tolerance-mib", type=float, default=4.0,
                   help="RSS drift allowed, MiB, or 10 %% of the warm RSS if more (4)")
    a = p.parse_args(argv)
    a.argv = argv
    if a.render:
        return a
    if a.minutes is None:
        p.error("MINUTES is required")
    a.out = a.out or BENCH / "results"
    a.seconds = a.minutes * 60
    edge = min(30.0, max(8.0, a.seconds / 10))
    a.warmup = edge if a.warmup is None else a.warmup
    a.cooldown = edge if a.cooldown is None else a.cooldown
    if a.seconds < a.warmup + a.cooldown + 10:
        p.error(f"{a.minutes:g} min leaves no time for faults after warm-up and cool-down")
    allowed = os.sched_getaffinity(0)
    cpus = sorted(allowed)
    a.proxy_cpu = cpus[0] if a.proxy_cpu is None else a.proxy_cpu
    if a.load_cpu is None:
        a.load_cpu = next((c for c in cpus if c != a.proxy_cpu), a.proxy_cpu)
    for c in (a.proxy_cpu, a.load_cpu):
        if c not in allowed:
            p.error(f"CPU {c} is not available here (have {sorted(allowed)})")
    if bool(a.proxy_bin) != bool(a.loadgen_bin):
        p.error("--proxy-bin and --loadgen-bin go together")
    return a


def write_outputs(out: Path, rec: dict) -> bool:
    """Judges a recorded run and writes soak.{md,svg,json}; whether it passed."""
    fig = analyse(rec)
    hs = {int(k): v for k, v in rec["handshakes_by_second"].items()}
    md = markdown(rec["meta"], fig, rec["run"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.md").write_text(md)
    (out / "soak.svg").write_text(svg_chart(rec["meta"], fig, rec["samples"],
                                            rec["run"]["faults"], hs))
    (out / "soak.json").write_text(json.dumps({**rec, "figures": fig}, indent=1,
                                              ensure_ascii=False) + "\n")
    print(md)
    log(f"wrote {out}/soak.{{md,json,svg}}")
    return fig["passed"]


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if a.render:
        try:
            rec = json.loads(a.render.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BenchError(f"cannot read {a.render}: {e}") from e
        rec.pop("figures", None)
        return 0 if write_outputs(a.out or a.render.parent, rec) else 1
    if a.proxy_bin:
        bins = {"proxy": a.proxy_bin, "loadgen": a.loadgen_bin}
    else:
        bins = build(a)
    meta = machine_meta(a)
    # This script's own clients run beside the load, not on the proxy's core.
    os.sched_setaffinity(0, {a.load_cpu})
    workdir = Path(tempfile.mkdtemp(prefix="eval-soak-"))
    procs = Procs(workdir)

    stop_on_signals("the soak")
    soak = Soak(a, procs, bins)
    ok = False
    try:
        res = soak.run()
        res["faults"] = [dataclasses.asdict(f) for f in soak.faults]
        rec = {
            "meta": meta,
            "settings": {"victims": a.victims, "fd_tolerance": a.fd_tolerance,
                         "rss_tolerance_mib": a.rss_tolerance_mib},
            "run": res, "marks": soak.marks, "samples": soak.samples,
            "victim_events": soak.victim_events, "handshakes_by_second": soak.hs_by_second,
            "handshake_failures": soak.hs_failures, "torn": soak.torn,
        }
        # Through JSON first, so that --render of the saved file judges
        # exactly what this run judged.
        ok = write_outputs(a.out, json.loads(json.dumps(rec, default=str)))
    except RunError as e:
        raise BenchError(str(e)) from e
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        ignore_signals()
        soak.stop.set()
        soak.sampled.set()
        procs.stop_all()
        if a.keep or not ok:
            log(f"work folder with configs and logs kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
