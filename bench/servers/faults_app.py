"""The app bench/faults.py runs under `fastws serve`: /echo, and /flood, which pushes 16 KiB
messages without awaiting them (so only the slow-consumer policy and the send budget hold it)."""

from __future__ import annotations

import asyncio

from fastws import Endpoint
from fastws.demo import create_app

app = create_app()
CHUNK = b"f" * 16384  # under 64 KiB: the writer copies it into each frame, as with any real message


class Flood(Endpoint):
    def on_open(self) -> None:
        self.task = asyncio.ensure_future(self.flood())

    async def flood(self) -> None:
        while not self.session.closed:
            self.session.send(CHUNK)
            await asyncio.sleep(0)


app.route("/flood")(Flood)
