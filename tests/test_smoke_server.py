"""End-to-end smoke test of the demo app with the websockets client."""

import websockets


async def test_demo_echo_text_and_binary(start_server, demo_app):
    _, port = await start_server(demo_app)
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\xff" * 50_000)
        assert await ws.recv() == b"\x00\xff" * 50_000
