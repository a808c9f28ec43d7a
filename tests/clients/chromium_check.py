#!/usr/bin/env python3
"""Headless Chromium as a real browser client of eval-proxy.

Usage: chromium_check.py [--timeout 30] [--chromium /usr/bin/chromium]
                         [--trust-spki SHA256_B64] [--expect-refused] URL

Serves a page from 127.0.0.1 (port 0) whose script opens `new WebSocket(URL)`,
sends "hello from chromium", expects that text echoed, then closes with 1000
and expects a clean close answered with 1000. The page shows the outcome in
document.title and POSTs it back to the page's server, which is what this
script waits for: no WebDriver, and no guessing how long the page needs (a
--dump-dom with a virtual time budget can dump before a slow echo arrives).

For wss:// the browser trusts only the certificate whose public key has
the --trust-spki hash (Chromium's --ignore-certificate-errors-spki-list, the
way to trust a test certificate without a system CA store); with
--expect-refused the page must fail to connect (close 1006, no echo), as a
browser does with a certificate it does not trust.

Exit 0 on success; 1 with one line on stderr otherwise; 2 on bad usage.
"""

import argparse
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

GREETING = "hello from chromium"

# Flags as on this machine's probe: root needs --no-sandbox, and without the
# background-networking ones Chromium keeps dialing Google's hosts, which the
# closed network refuses.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-default-browser-check",
    # The target is on loopback; a proxy from the environment must not matter.
    "--no-proxy-server",
    "--enable-logging=stderr",
    "--log-level=0",
]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>pending</title></head>
<body><pre id="result">pending</pre>
<script>
"use strict";
const target = __TARGET__;
const greeting = __GREETING__;
const result = { echo: null, closeCode: null, closeReason: null, wasClean: null, error: null };
let reported = false;
function report() {
  if (reported) return;
  reported = true;
  const text = JSON.stringify(result);
  document.title = "done " + text;
  document.getElementById("result").textContent = text;
  fetch("/result", { method: "POST", body: text });
}
let ws;
console.log("eval-check: connecting to " + target);
try {
  ws = new WebSocket(target);
} catch (e) {
  result.error = "new WebSocket threw: " + e;
  report();
}
if (ws) {
  // Console lines reach Chromium's stderr log, which a failure message quotes.
  ws.onopen = () => {
    console.log("eval-check: open, sending greeting");
    ws.send(greeting);
  };
  ws.onmessage = (e) => {
    console.log("eval-check: message received");
    if (result.echo !== null) {
      result.error = "more than one message received";
      return;
    }
    result.echo = typeof e.data === "string" ? e.data : "<binary message>";
    ws.close(1000, "bye");
  };
  ws.onerror = () => {
    // Browsers give no detail here; the close event that follows has the code.
    if (result.error === null) result.error = "WebSocket error event";
  };
  ws.onclose = (e) => {
    console.log("eval-check: closed " + e.code);
    result.closeCode = e.code;
    result.closeReason = e.reason;
    result.wasClean = e.wasClean;
    report();
  };
}
</script></body></html>
"""


class CheckFailed(Exception):
    pass


def render_page(url):
    # json.dumps gives a valid JS string literal; "</" is escaped so the URL
    # cannot end the script element.
    def lit(s):
        return json.dumps(s).replace("</", "<\\/")

    return PAGE.replace("__TARGET__", lit(url)).replace("__GREETING__", lit(GREETING)).encode()


def make_server(page):
    outcome = {}
    arrived = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/page.html":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(page)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(204)
            self.end_headers()
            if self.path == "/result" and not arrived.is_set():
                outcome["body"] = body
                arrived.set()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server, outcome, arrived


def verdict(raw, expect_refused=False):
    try:
        r = json.loads(raw)
    except ValueError:
        raise CheckFailed(f"page reported unparsable result {raw[:200]!r}") from None
    closed = f"closed {r.get('closeCode')} {r.get('closeReason')!r} clean={r.get('wasClean')}"
    if expect_refused:
        if r.get("echo") is not None or r.get("closeCode") != 1006:
            raise CheckFailed(f"expected a refused connection (1006, no echo); {closed}")
        return
    if r.get("echo") != GREETING:
        what = "no echo" if r.get("echo") is None else f"echo {r['echo'][:80]!r}"
        raise CheckFailed(f"{what}; {closed}" + (f"; {r['error']}" if r.get("error") else ""))
    if r.get("error"):
        raise CheckFailed(f"{r['error']}; {closed}")
    if r.get("closeCode") != 1000 or not r.get("wasClean"):
        raise CheckFailed(f"closing handshake: {closed}, expected a clean 1000")


def stop_browser(proc):
    # Chromium forks zygote and renderer children into the session this
    # script gave it, so the whole group is ended, and only that group.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
        # Children outlive the browser process by a moment; wait until none
        # runs so no renderer is left behind when the script exits. Zombies
        # waiting for init to reap them hold nothing and are not waited for.
        deadline = time.monotonic() + 5
        while live_members(proc.pid):
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def live_members(pgid):
    live = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                # comm may hold spaces and parentheses: fields follow the last ")".
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live += 1
    return live


def tail_of(log_file, count=5):
    # Chromium warns about D-Bus, GPUs and sandboxes at every start here; the
    # page's own console lines and real errors are what explain a failure.
    log_file.seek(0)
    wanted = ("CONSOLE", ":ERROR:", ":FATAL:")
    noise = ("dbus", "bus.cc", "Fontconfig", "gcm", "google_apis")
    lines_read = log_file.read().decode(errors="replace").splitlines()
    kept = [line.strip() for line in lines_read if any(w in line for w in wanted) and not any(n in line for n in noise)]
    return " | ".join(kept[-count:]) or "(nothing relevant)"


def run(args):
    if not os.access(args.chromium, os.X_OK):
        raise CheckFailed(f"{args.chromium} not found or not executable (run .ci/install-deps.sh)")
    server, outcome, arrived = make_server(render_page(args.url))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page_url = f"http://127.0.0.1:{server.server_address[1]}/page.html"
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="eval-chromium-") as profile, tempfile.TemporaryFile() as log:
        trust = [f"--ignore-certificate-errors-spki-list={args.trust_spki}"] if args.trust_spki else []
        proc = subprocess.Popen(
            [args.chromium, *CHROMIUM_FLAGS, *trust, f"--user-data-dir={profile}", page_url],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            while not arrived.wait(0.1):
                if proc.poll() is not None:
                    raise CheckFailed(
                        f"chromium exited with {proc.returncode} before the page reported: {tail_of(log)}"
                    )
                if time.monotonic() > deadline:
                    raise CheckFailed(
                        f"timed out after {args.timeout:g}s waiting for the page's result; "
                        f"chromium said: {tail_of(log)}"
                    )
        finally:
            stop_browser(proc)
            server.shutdown()
            server.server_close()
    verdict(outcome["body"].decode(errors="replace"), args.expect_refused)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="ws:// or wss:// URL to test")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole check (default 30)")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    p.add_argument("--trust-spki", help="wss://: base64 SHA-256 of the certificate's public key to trust")
    p.add_argument("--expect-refused", action="store_true", help="the connection must fail (untrusted certificate)")
    args = p.parse_args(argv)
    # A test harness that gives up on this script sends SIGTERM; turning it
    # into SystemExit runs the cleanup that ends the browser's process group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        run(args)
    except CheckFailed as e:
        print(f"chromium_check: FAIL: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
