"""websockets (the most used Python library) echo server, on uvloop; --compression: its default deflate."""

from __future__ import annotations

import uvloop
from _common import MAX_MESSAGE, parse_args, ready
from websockets.asyncio.server import serve


async def echo(ws) -> None:  # type: ignore[no-untyped-def]
    async for message in ws:
        await ws.send(message)


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    compression = "deflate" if args.compression else None
    async with serve(echo, args.host, args.port, max_size=MAX_MESSAGE, compression=compression) as server:
        ready("websockets", args.port)
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
