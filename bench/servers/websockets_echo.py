"""websockets (the most used Python library) echo server, on uvloop, no compression."""

from __future__ import annotations

import uvloop
from _common import MAX_MESSAGE, parse_args, ready
from websockets.asyncio.server import serve


async def echo(ws) -> None:  # type: ignore[no-untyped-def]
    async for message in ws:
        await ws.send(message)


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    async with serve(echo, args.host, args.port, max_size=MAX_MESSAGE, compression=None) as server:
        ready("websockets", args.port)
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
