"""Raw TCP echo that writes back only whole messages: the limit of any server with a message API.

A message server cannot hand a message to the application before all of it has arrived, so it
cannot stream an echo the way raw_tcp_echo.py does (a read written back at once, still in the CPU
cache, while the rest is on its way).  This one knows the message size (``--message-size``; the
stream is S-byte messages back to back, as `fastws bench ... --raw` sends them), reads each message
into one buffer, and writes the messages back only once they are whole.  Nothing else: no HTTP, no
framing, no masking, no copy (a big message is read straight into its buffer, which is reused when
the kernel took the whole write).  compare.py restarts it for each workload with that size.
"""

from __future__ import annotations

import asyncio

import uvloop
from _common import parse_args, ready

READ_SIZE = 262144  # what a read may take when messages are small (uvloop reads 256 KiB too)


class MessageEcho(asyncio.BufferedProtocol):
    __slots__ = ("transport", "size", "buffer", "view", "have")

    def __init__(self, size: int) -> None:
        self.size = size
        self.have = 0
        # room for whole messages only: a read never takes part of the next one beyond the buffer
        self._new_buffer()

    def _new_buffer(self) -> None:
        self.buffer = bytearray(max(1, READ_SIZE // self.size) * self.size)
        self.view = memoryview(self.buffer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.have:]

    def buffer_updated(self, nbytes: int) -> None:
        self.have += nbytes
        whole = self.have - self.have % self.size
        if not whole:
            return
        if whole == len(self.buffer):
            self.transport.write(self.view)
            if self.transport.get_write_buffer_size():
                self._new_buffer()  # the transport still holds the rest of this one
        else:
            self.transport.write(self.buffer[:whole])  # small messages: a copy of the whole ones
            self.view[: self.have - whole] = self.view[whole : self.have]
        self.have -= whole


def main() -> None:
    import argparse
    import sys

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--message-size", type=int, required=True)
    known, rest = p.parse_known_args()
    sys.argv[1:] = rest
    args = parse_args(__doc__.splitlines()[0])

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: MessageEcho(known.message_size), args.host, args.port,
                                          backlog=4096)
        ready("raw-tcp-message", args.port)
        await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
