#!/usr/bin/env python3
"""A misbehaving echo server, so selftest.sh can show that each client script
notices a broken peer instead of passing on a connection that merely opened.

Usage: bad_server.py MODE   (prints `listening PORT` when ready)
  corrupt  echoes every message with its last character or byte changed
  drop     echoes the first message, then drops TCP without a Close frame
"""

import asyncio
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


def corrupted(message):
    if isinstance(message, str):
        return message[:-1] + ("?" if message[-1:] != "?" else "!")
    return message[:-1] + bytes([message[-1] ^ 0xFF]) if message else b"\xff"


async def corrupt(ws):
    try:
        async for message in ws:
            await ws.send(corrupted(message))
    except ConnectionClosed:
        pass


async def drop(ws):
    try:
        await ws.send(await ws.recv())
    except ConnectionClosed:
        return
    ws.transport.abort()


async def main(mode):
    handler = {"corrupt": corrupt, "drop": drop}[mode]
    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None, ping_interval=None) as server:
        print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("corrupt", "drop"):
        sys.exit(__doc__)
    try:
        asyncio.run(main(sys.argv[1]))
    except KeyboardInterrupt:
        pass
