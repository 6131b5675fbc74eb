"""aiohttp echo server (web.WebSocketResponse), on uvloop; --compression: permessage-deflate (aiohttp's default)."""

from __future__ import annotations

import asyncio

import uvloop
from _common import MAX_MESSAGE, parse_args, ready
from aiohttp import WSMsgType, web

COMPRESS = False


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, compress=COMPRESS)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def main() -> None:
    global COMPRESS
    args = parse_args(__doc__.splitlines()[0])
    COMPRESS = args.compression
    app = web.Application()
    app.router.add_get("/echo", echo)
    app.router.add_get("/", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=4096)
    await site.start()
    ready("aiohttp", args.port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
