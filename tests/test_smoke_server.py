"""End-to-end smoke test of the demo app with the websockets client."""

import websockets


async def test_demo_echo_text_and_binary(start_server, demo_app):
    _, port = await start_server(demo_app)
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\xff" * 50_000)
        assert await ws.recv() == b"\x00\xff" * 50_000


async def test_demo_feed_fans_out_to_every_subscriber_without_notices(start_server, demo_app):
    _, port = await start_server(demo_app)
    subscribers = [await websockets.connect(f"ws://127.0.0.1:{port}/feed") for _ in range(5)]
    await subscribers[0].send("quote 1")
    await subscribers[3].send(b"\x01\x02")
    for ws in subscribers:
        assert await ws.recv() == "quote 1"  # nothing before it: no join notices
        assert await ws.recv() == b"\x01\x02"
        await ws.close()
