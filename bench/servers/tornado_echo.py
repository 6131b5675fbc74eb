"""tornado echo server (WebSocketHandler), on uvloop, no compression."""

from __future__ import annotations

import asyncio

import uvloop
from _common import MAX_MESSAGE, parse_args, ready
from tornado.web import Application
from tornado.websocket import WebSocketHandler


class Echo(WebSocketHandler):
    def check_origin(self, origin: str) -> bool:
        return True

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    app = Application([(r"/echo", Echo), (r"/", Echo)], websocket_max_message_size=MAX_MESSAGE)
    app.listen(args.port, args.host, backlog=4096, max_buffer_size=2 * MAX_MESSAGE)
    ready("tornado", args.port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
