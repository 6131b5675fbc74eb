"""The echo endpoint in each style a fastws user may write, for bench/compare.py's style rows.

    python bench/servers/fastws_styles.py --port 9001 --style handler

--style endpoint   sync Endpoint.on_message -> session.send (the demo's /echo)
--style async      async def on_message -> await session.send
--style handler    async def handler(ws): async for message in ws: await ws.send(message)
--style handler-del  the same handler, with `del message` after the send: the previous message is
                   freed at once instead of living until the next one arrives (big messages then
                   reuse memory that is still in the CPU cache; README, Benchmarks)

Each serves its style at /echo through `fastws serve` (so the bench client's URL is the same
for every row); ``fastws serve fastws_styles:app`` serves all three at /echo, /echo-async and
/echo-handler.
"""

from __future__ import annotations

import os
import sys

from fastws import App, Endpoint, Session
from fastws.demo import Echo, create_app


class AsyncEcho(Endpoint):
    async def on_message(self, message: str | bytes) -> None:
        await self.session.send(message)


async def echo_handler(ws: Session) -> None:
    async for message in ws:
        await ws.send(message)


async def echo_handler_del(ws: Session) -> None:
    async for message in ws:
        await ws.send(message)
        del message


app = create_app()
app.route("/echo-async")(AsyncEcho)
app.route("/echo-handler")(echo_handler)


def style_app(style: str) -> App:
    one = App()
    one.route("/echo")({"endpoint": Echo, "async": AsyncEcho, "handler": echo_handler,
                        "handler-del": echo_handler_del}[style])
    return one


endpoint_app, async_app, handler_app, handler_del_app = (
    style_app(s) for s in ("endpoint", "async", "handler", "handler-del"))


if __name__ == "__main__":
    import argparse

    from _common import MAX_MESSAGE

    from fastws.cli import main

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--style", choices=("endpoint", "async", "handler", "handler-del"), default="handler")
    args, extra = p.parse_known_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(f"fastws {args.style} echo server on port {args.port} {' '.join(extra)}", flush=True)
    app_name = f"fastws_styles:{args.style.replace('-', '_')}_app"
    sys.exit(main(["serve", app_name, "--host", args.host, "--port", str(args.port),
                   "--log-level", "warning", "--max-message-size", str(MAX_MESSAGE), *extra]))
