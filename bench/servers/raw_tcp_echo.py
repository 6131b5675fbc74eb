"""Raw TCP echo on uvloop, no WebSocket framing: the physical limit of one Python server core.

Whatever arrives is written back (one write per read).  Pair it with
`fastws bench ... --raw`, which sends the same byte streams as the WebSocket
workloads and counts every S bytes back as one message.
"""

from __future__ import annotations

import asyncio

import uvloop
from _common import parse_args, ready


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, args.host, args.port, backlog=4096)
    ready("raw-tcp", args.port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
