"""The default app of `fastws serve`: /echo, /chat, /feed, /push and a page that uses them."""

from __future__ import annotations

import asyncio
import time
from importlib.resources import files

from fastws.app import App, Endpoint, Response

PAGE = files(__package__).joinpath("index.html").read_text(encoding="utf-8")


def index(request: object) -> Response:
    return Response(PAGE, content_type="text/html; charset=utf-8")


class Echo(Endpoint):
    """Sends every message back as it came (text stays text, binary stays binary)."""

    def on_message(self, message: str | bytes) -> None:
        self.session.send(message)


class Chat(Endpoint):
    """One room: every message goes to everyone in it, the sender included."""

    room = "lobby"

    def on_open(self) -> None:
        self.hub.join(self.session, self.room)
        self.hub.publish(self.room, f"* {self.session.remote}#{self.session.id} joined")

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.session.close(1003, "the chat takes text messages only")
            return
        self.hub.publish(self.room, f"#{self.session.id}: {message}")

    def on_close(self, code: int, reason: str) -> None:
        self.hub.publish(self.room, f"* #{self.session.id} left")


class Feed(Endpoint):
    """A quiet fan-out channel (live quotes, dashboards): every message sent here reaches
    every /feed subscriber, framed once; no join or leave notices."""

    def on_open(self) -> None:
        self.hub.join(self.session, "feed")

    def on_message(self, message: str | bytes) -> None:
        self.hub.publish("feed", message)


async def push(ws) -> None:  # type: ignore[no-untyped-def]
    """The server pushes the time every second until the client goes away."""
    while not ws.closed:
        await ws.send(time.strftime("%Y-%m-%d %H:%M:%S"))
        await asyncio.sleep(1.0)


def create_app() -> App:
    """A fresh demo app (tests start several)."""
    demo = App()
    demo.http("/")(index)
    demo.route("/echo")(Echo)
    demo.route("/chat")(Chat)
    demo.route("/feed")(Feed)
    demo.route("/push")(push)
    return demo


app = create_app()
