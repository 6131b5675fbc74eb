"""socketify (uWebSockets, C++) echo server: one libuv loop, no compression."""

from __future__ import annotations

from _common import MAX_MESSAGE, parse_args, ready
from socketify import App, CompressOptions, OpCode


def on_message(ws, message, opcode: OpCode) -> None:  # type: ignore[no-untyped-def]
    ws.send(message, opcode)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    app = App()
    app.ws(
        "/*",
        {
            "compression": CompressOptions.DISABLED,
            "max_payload_length": MAX_MESSAGE,
            "max_backpressure": 4 * MAX_MESSAGE,  # uWS drops messages past this: keep it above any echo burst
            "idle_timeout": 960,  # uWS's maximum; idle connections are part of the memory workload
            "message": on_message,
        },
    )
    app.listen({"host": args.host, "port": args.port}, lambda config: ready("socketify", args.port))
    app.run()


if __name__ == "__main__":
    main()
