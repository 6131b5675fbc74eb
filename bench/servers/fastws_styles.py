"""The echo endpoint in each style a fastws user may write, for bench/compare.py's style rows.

    python -m fastws serve fastws_styles:app    (with bench/servers on PYTHONPATH)

/echo           sync Endpoint.on_message -> session.send (the demo's)
/echo-async     async def on_message -> await session.send
/echo-handler   async def handler(ws): async for message in ws: await ws.send(message)
"""

from __future__ import annotations

from fastws import Endpoint, Session
from fastws.demo import create_app

app = create_app()


class AsyncEcho(Endpoint):
    async def on_message(self, message: str | bytes) -> None:
        await self.session.send(message)


@app.route("/echo-handler")
async def echo_handler(ws: Session) -> None:
    async for message in ws:
        await ws.send(message)


app.route("/echo-async")(AsyncEcho)
