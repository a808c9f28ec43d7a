#!/usr/bin/env python3
"""Python `websockets` client run against eval-proxy as a real client would be.

Usage:
  py_client.py URL                     echo check: "hello" and 1 MiB of binary
                                       come back exactly, then Close 1000 "bye"
                                       is answered with 1000
  py_client.py --expect-close CODE URL the server must close with CODE right
                                       after the handshake; prints its reason
  --cafile FILE                        wss://: trust only this CA (PEM)
  --server-name NAME                   wss://: the name to ask for (SNI) and to
                                       check the certificate against
  --binary-size BYTES                  of the binary echo (default 1 MiB)
  --expect-tls-error                   the TLS handshake must fail certificate
                                       verification; prints the reason

Exit 0 on success; 1 with one line on stderr otherwise; 2 on bad usage.
"""

import argparse
import asyncio
import os
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

BINARY_SIZE = 1024 * 1024


class CheckFailed(Exception):
    pass


class Step:
    """What the check is doing now, so a timeout or a drop can say where."""

    now = "connecting"

    @classmethod
    def to(cls, what):
        cls.now = what


class Tls:
    """wss:// settings from the command line."""

    context = None
    server_name = None


def open_ws(url, timeout, max_size=4 * BINARY_SIZE):
    extra = {}
    if Tls.context is not None:
        extra["ssl"] = Tls.context
    if Tls.server_name is not None:
        extra["server_hostname"] = Tls.server_name
    return connect(
        url,
        **extra,
        # The proxy's tests run on loopback: an HTTP(S)_PROXY from the
        # environment must never reroute them.
        proxy=None,
        open_timeout=timeout,
        close_timeout=timeout,
        max_size=max_size,
        # Keepalive pings would be extra frames the proxy has to relay; the
        # check is about the messages it sends.
        ping_interval=None,
    )


async def recv_exact(ws, want, what):
    Step.to(f"waiting for the {what} echo")
    got = await ws.recv()
    if type(got) is not type(want):
        kind = "text" if isinstance(got, str) else "binary"
        raise CheckFailed(f"{what} echo came back as a {kind} message")
    if got != want:
        unit = "characters" if isinstance(want, str) else "bytes"
        raise CheckFailed(
            f"{what} echo differs: sent {len(want)} {unit}, got {len(got)}, first difference at {first_diff(want, got)}"
        )


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def describe_close(e):
    rcvd = e.rcvd
    if rcvd is None:
        return "no Close frame received"
    return f"server sent Close {rcvd.code} {rcvd.reason!r}"


async def echo_check(url, timeout, size):
    async with open_ws(url, timeout, 4 * max(size, BINARY_SIZE)) as ws:
        Step.to("sending text")
        await ws.send("hello")
        await recv_exact(ws, "hello", "text")
        payload = os.urandom(size)
        Step.to(f"sending {size} bytes binary")
        await ws.send(payload)
        await recv_exact(ws, payload, "binary")
        Step.to("closing with 1000")
        await ws.close(1000, "bye")
        rcvd = ws.protocol.close_rcvd
        if rcvd is None:
            raise CheckFailed("closing handshake incomplete: no Close frame came back after Close 1000")
        if rcvd.code != 1000:
            raise CheckFailed(f"closing handshake answered with {rcvd.code} {rcvd.reason!r}, expected 1000")


async def expect_close(url, code, timeout):
    async with open_ws(url, timeout) as ws:
        Step.to(f"waiting for Close {code}")
        try:
            message = await ws.recv()
        except ConnectionClosed as e:
            rcvd = e.rcvd
            if rcvd is None:
                raise CheckFailed(f"connection dropped without a Close frame, expected Close {code}") from None
            if rcvd.code != code:
                raise CheckFailed(f"server closed with {rcvd.code} {rcvd.reason!r}, expected {code}") from None
            print(rcvd.reason)
            return
        kind = "text" if isinstance(message, str) else "binary"
        raise CheckFailed(f"expected Close {code}, got a {kind} message first")


async def expect_tls_error(url, timeout):
    try:
        async with open_ws(url, timeout):
            pass
    except ssl.SSLCertVerificationError as e:
        print(e.verify_message)
        return
    raise CheckFailed("the TLS handshake succeeded")


async def run(args):
    if args.expect_tls_error:
        await expect_tls_error(args.url, args.timeout)
    elif args.expect_close is None:
        await echo_check(args.url, args.timeout, args.binary_size)
    else:
        await expect_close(args.url, args.expect_close, args.timeout)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="ws:// URL to test")
    p.add_argument("--expect-close", type=int, metavar="CODE", help="expect the server to close with CODE")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole check (default 30)")
    p.add_argument("--cafile", help="wss://: trust only this CA")
    p.add_argument("--server-name", help="wss://: SNI and the name to verify")
    p.add_argument("--binary-size", type=int, default=BINARY_SIZE, help="bytes of the binary echo")
    p.add_argument("--expect-tls-error", action="store_true", help="certificate verification must fail")
    p.add_argument("--certfile", help="wss://: present this client certificate (PEM)")
    p.add_argument("--keyfile", help="wss://: the client certificate's key (PEM)")
    args = p.parse_args(argv)
    if args.cafile is not None:
        Tls.context = ssl.create_default_context(cafile=args.cafile)
        if args.certfile is not None:
            Tls.context.load_cert_chain(args.certfile, args.keyfile)
    Tls.server_name = args.server_name
    try:
        asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except CheckFailed as e:
        fail(str(e))
    except ConnectionClosed as e:
        fail(f"connection closed while {Step.now}: {describe_close(e)}")
    except InvalidStatus as e:
        fail(f"handshake rejected: HTTP {e.response.status_code}")
    except TimeoutError:
        fail(f"timed out after {args.timeout:g}s while {Step.now}")
    except (WebSocketException, OSError) as e:
        fail(f"{type(e).__name__}: {e}")
    return 0


def fail(reason):
    print(f"py_client: FAIL: {reason}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
