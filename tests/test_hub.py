"""Hub: registry, users, rooms and fan-out, observed by real clients."""

from __future__ import annotations

import asyncio

import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from fastws import App, Endpoint
from wsraw import wait_for


def room_app() -> App:
    app = App()

    @app.route("/room/{name}")
    class Room(Endpoint):
        def on_open(self) -> None:
            user = self.session.request.query_params().get("user", [None])[0]
            self.hub.set_user(self.session, user)
            self.hub.join(self.session, self.params["name"])
            self.session.send("joined")

        def on_message(self, message: str | bytes) -> None:
            if isinstance(message, str) and message.startswith("@"):
                user, _, text = message[1:].partition(" ")
                self.session.send(f"sent to {self.hub.send_to_user(user, text)}")
            elif message == "everyone":
                self.hub.broadcast("to all")
            else:
                self.hub.publish(self.params["name"], message)

    return app


async def connect(port: int, room: str, user: str = "", compress: bool = False):
    extensions = [ClientPerMessageDeflateFactory()] if compress else None
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/room/{room}?user={user}",
                                  compression=None, extensions=extensions)
    assert await ws.recv() == "joined"
    return ws


async def test_rooms_isolate_and_every_member_gets_every_message_in_order(start_server):
    server, port = await start_server(room_app())
    red = [await connect(port, "red") for _ in range(3)]
    blue = await connect(port, "blue")
    for i in range(50):
        await red[0].send(f"m{i}")
    for ws in red:
        assert [await ws.recv() for _ in range(50)] == [f"m{i}" for i in range(50)]
    await blue.send("blue only")
    assert await blue.recv() == "blue only"
    for ws in red:  # nothing from blue leaked into red
        try:
            leaked = await asyncio.wait_for(ws.recv(), 0.05)
        except asyncio.TimeoutError:
            leaked = None
        assert leaked is None
    assert server.hub.rooms() == {"red": 3, "blue": 1}
    for ws in [*red, blue]:
        await ws.close()
    await wait_for(lambda: server.hub.rooms() == {} and not server.hub.sessions)


async def test_send_to_user_reaches_all_of_that_users_sessions(start_server):
    server, port = await start_server(room_app())
    alice1 = await connect(port, "a", "alice")
    alice2 = await connect(port, "b", "alice")
    bob = await connect(port, "a", "bob")
    await bob.send("@alice hi alice")
    assert await alice1.recv() == "hi alice"
    assert await alice2.recv() == "hi alice"
    assert await bob.recv() == "sent to 2"
    assert {s.id for s in server.hub.user_sessions("alice")} == {s.id for s in server.hub.sessions.values()
                                                                   if s.user == "alice"}
    await alice2.close()
    await wait_for(lambda: len(server.hub.user_sessions("alice")) == 1)
    for ws in (alice1, bob):
        await ws.close()


async def test_broadcast_to_plain_and_compressed_sessions(start_server):
    # Plain and permessage-deflate clients share one encoded frame per kind;
    # each client must still decode every message correctly.
    for no_context_takeover in (True, False):
        _, port = await start_server(room_app(), compression=True, compress_threshold=16,
                                     compression_no_context_takeover=no_context_takeover)
        clients = [await connect(port, "r", compress=c) for c in (False, True, True, False)]
        for ws, compressed in zip(clients, (False, True, True, False), strict=True):
            assert ("permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")) \
                == compressed
        long_text = "compress me " * 100
        await clients[0].send(long_text)
        await clients[0].send("everyone")
        await clients[0].send(b"\x01" * 1000)
        for ws in clients:
            assert await ws.recv() == long_text
            assert await ws.recv() == "to all"
            assert await ws.recv() == b"\x01" * 1000
        for ws in clients:
            await ws.close()


async def test_fanout_keeps_each_sessions_order(start_server):
    """The wire core writes a broadcast straight to sockets with nothing queued, and through the
    transport otherwise: a session's own replies of the same read, and a backlog a slow reader has
    left, stay in order, and nothing is lost."""
    import socket

    app = App()

    @app.route("/room")
    class Room(Endpoint):
        def on_open(self) -> None:
            self.hub.join(self.session, "r")

        def on_message(self, message: str | bytes) -> None:
            self.session.send(f"reply to {message}")  # queued in this read's cork ...
            self.hub.publish("r", f"all: {message}")  # ... so the fan-out must queue behind it

    server, port = await start_server(app, max_send_buffer=64 << 20)
    fast = await connect_raw_room(port)
    slow_sock = socket.socket()
    slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow_sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(slow_sock, ("127.0.0.1", port))
    slow = await connect_raw_room(port, sock=slow_sock)
    await wait_for(lambda: len(server.hub.members("r")) == 2)
    from fastws._frame import fanout_counts

    direct, queued = fanout_counts()
    big = "x" * 60000
    for i in range(40):  # the slow one does not read: its transport queues, later ones must follow
        server.hub.publish("r", f"{i}:{big}")
    await fast.send_frame(0x1, b"hello")
    expected_fast = [f"{i}:{big}" for i in range(40)] + ["reply to hello", "all: hello"]
    assert [m for _, m in [await fast.recv_message() for _ in expected_fast]] == [e.encode() for e in expected_fast]
    got = [(await slow.recv_message(10))[1] for _ in range(41)]
    assert got == [f"{i}:{big}".encode() for i in range(40)] + [b"all: hello"]
    direct_now, queued_now = fanout_counts()
    assert direct_now > direct and queued_now > queued  # both paths were taken
    for ws in (fast, slow):
        ws.abort()
    await wait_for(lambda: not server.hub.sessions)


async def connect_raw_room(port: int, sock=None):  # type: ignore[no-untyped-def]
    from wsraw import RawWS

    return await RawWS.connect(port, "/room", sock=sock)


async def test_a_message_that_is_not_str_or_bytes_is_refused_by_name_and_nothing_is_sent(start_server):
    """hub.publish / broadcast / send_to_user and session.send refuse a dict, an int... with a
    TypeError that says what a message is (before a backplane would carry it to other nodes);
    the members get nothing, and the connection goes on."""
    app = App()
    errors: list[str] = []

    @app.route("/bad")
    class Bad(Endpoint):
        def on_open(self) -> None:
            self.hub.join(self.session, "r")

        def on_message(self, message: str | bytes) -> None:
            attempts = (lambda: self.hub.publish("r", {"price": 1}), lambda: self.hub.broadcast(42),
                        lambda: self.hub.send_to_user("u", ["a", "b"]), lambda: self.session.send(None))
            for attempt in attempts:
                try:
                    attempt()
                except TypeError as exc:
                    errors.append(str(exc))
            self.hub.publish("r", bytearray(b"fine"))  # any bytes-like object is a binary message

    server, port = await start_server(app)
    async with websockets.connect(f"ws://127.0.0.1:{port}/bad", compression=None) as ws:
        await ws.send("go")
        assert await asyncio.wait_for(ws.recv(), 10) == b"fine"  # the first thing to arrive
    assert errors == [
        "a message is a str (text) or a bytes-like object (binary), not dict: encode it first (json.dumps, for one)",
        "a message is a str (text) or a bytes-like object (binary), not int: encode it first (json.dumps, for one)",
        "a message is a str (text) or a bytes-like object (binary), not list: a message is sent whole "
        "(join the parts), or encode it (json.dumps, for one)",
        "a message is a str (text) or a bytes-like object (binary), not NoneType",
    ]
