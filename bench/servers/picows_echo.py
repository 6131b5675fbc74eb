"""picows echo server, as picows ships (aiofastnet transports by default; --transport uvloop for uvloop's)."""

from __future__ import annotations

import uvloop
from _common import MAX_MESSAGE, parse_args, ready
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server


class Echo(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION):
            # send() copies the payload into picows's own write buffer: the memoryview is safe here.
            transport.send(frame.msg_type, frame.get_payload_as_memoryview(), frame.fin)


def listener_factory(request: WSUpgradeRequest) -> WSListener:
    return Echo()


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], transports=("aiofastnet", "uvloop"))
    server = await ws_create_server(
        listener_factory,
        args.host,
        args.port,
        max_frame_size=MAX_MESSAGE,
        use_aiofastnet=args.transport == "aiofastnet",
    )
    ready(f"picows ({args.transport})", args.port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
