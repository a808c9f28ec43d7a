#!/usr/bin/env python3
"""Conformant WebSocket echo server: the peer behind eval-proxy in Autobahn runs
and the stand-in target when the real-client scripts are tested on their own.

Usage: echo_server.py [--host 127.0.0.1] [--port 0] [--close-code CODE
                      [--close-reason TEXT]] [--exit-on-stdin-eof]
                      [--tls CERT KEY]

Prints `listening PORT` on stdout once it accepts connections (bind port 0 and
read that line instead of sleeping). Runs until SIGTERM/SIGINT, or until stdin
closes with --exit-on-stdin-eof, so a test that dies cannot leak it.

--tls serves wss:// with that certificate chain and key (PEM files).

--close-code makes every connection close right after the handshake with that
code and reason, which is how a rejected token looks to a client.
"""

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys

# websockets reads its cap on fragments per message once, at import. Autobahn's
# 9.3.1 and 9.4.1 send 4 MiB in 64-byte fragments: 65536 of them, where the
# default of 4096 closes with 1009 "too many fragments".
os.environ["WEBSOCKETS_MAX_FRAGMENTS"] = str(1 << 20)

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

# Autobahn's 9.x cases send messages up to 16 MiB, some in 64-byte fragments;
# limits below that turn those cases into 1009 closes instead of echoes.
MAX_MESSAGE = 64 * 1024 * 1024
# Flow control in frames: at the default of 16, 64-byte fragments would pause
# and resume reading every kilobyte and make 9.x crawl.
MAX_QUEUE = (4096, 1024)
WRITE_LIMIT = 1024 * 1024


async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        # Autobahn closes abnormally on purpose; the library already answered.
        pass


def closer(code, reason):
    async def handler(ws):
        await ws.close(code, reason)

    return handler


async def wait_stdin_eof():
    # A pipe reader on the loop, not a thread: a thread blocked in read() would
    # hold up asyncio.run's shutdown after SIGTERM.
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(65536):
        pass


async def main(args):
    handler = echo if args.close_code is None else closer(args.close_code, args.close_reason)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tls = None
    if args.tls:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(*args.tls)
    async with serve(
        handler,
        args.host,
        args.port,
        # eval-proxy's default mode negotiates no extensions; its
        # upstream-first mode passes permessage-deflate through (--deflate).
        compression="deflate" if args.deflate else None,
        subprotocols=args.subprotocol or None,
        max_size=MAX_MESSAGE,
        max_queue=MAX_QUEUE,
        write_limit=WRITE_LIMIT,
        # Unsolicited pings would show up as unexpected frames in Autobahn.
        ping_interval=None,
        ssl=tls,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"listening {port}", flush=True)
        waiters = [asyncio.ensure_future(stop.wait())]
        if args.exit_on_stdin_eof:
            waiters.append(asyncio.ensure_future(wait_stdin_eof()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        server.close()
        await server.wait_closed()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--close-code", type=int, help="close every connection with this code")
    p.add_argument("--close-reason", default="", help="reason sent with --close-code")
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    p.add_argument("--deflate", action="store_true", help="negotiate permessage-deflate")
    p.add_argument("--subprotocol", action="append", help="subprotocol to accept (repeatable)")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve wss:// with this certificate")
    p.add_argument("-v", "--verbose", action="store_true", help="log websockets' errors")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    # Autobahn sends broken frames on purpose; the library's complaints about
    # them are expected noise, the Autobahn report is the verdict.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.CRITICAL)
    try:
        asyncio.run(main(args))
    except OSError as e:
        print(f"echo_server: {e}", file=sys.stderr)
        sys.exit(1)
