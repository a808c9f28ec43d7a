#!/usr/bin/env python3
"""Checks permessage-deflate and a subprotocol negotiated end to end.

Usage: py_deflate_check.py URL PROTOCOL

Connects with Python `websockets` offering permessage-deflate and PROTOCOL,
requires both in the server's 101, then round-trips a large compressible
text message and a binary one. Exit 0 on success, 1 with a reason on stderr.
"""

import asyncio
import sys

from websockets.asyncio.client import connect


async def main(url, protocol):
    async with connect(
        url, compression="deflate", subprotocols=[protocol, "other.v1"], max_size=None, open_timeout=20
    ) as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        if "permessage-deflate" not in ext:
            raise SystemExit(f"py_deflate_check: FAIL: no permessage-deflate in 101 (got {ext!r})")
        if ws.subprotocol != protocol:
            raise SystemExit(f"py_deflate_check: FAIL: subprotocol {ws.subprotocol!r}, wanted {protocol!r}")
        text = "compress me " * 20000
        await ws.send(text)
        if await asyncio.wait_for(ws.recv(), 20) != text:
            raise SystemExit("py_deflate_check: FAIL: text echo differs")
        blob = bytes(range(256)) * 4096
        await ws.send(blob)
        if await asyncio.wait_for(ws.recv(), 20) != blob:
            raise SystemExit("py_deflate_check: FAIL: binary echo differs")
    print(f"ok extensions={ext} subprotocol={protocol}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
