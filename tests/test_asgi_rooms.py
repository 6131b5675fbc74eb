"""The fastws.hub scope extension: rooms, send-to-user and frame-once broadcast for ASGI apps.

A FastAPI route (tests/test_asgi_apps.py ``/rooms``) drives ``fastws.asgi.rooms(websocket)``
from JSON commands; the clients check what reaches whom.  One uvicorn process first, then
two uvicorn workers joined by a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from test_asgi_apps import MiB, ServerProcess, free_port, uvicorn
from wsraw import OP_BINARY, OP_TEXT, RawWS

pytestmark = pytest.mark.timeout(120)


class Member:
    """A client of /rooms: sends commands, keeps whatever else arrives (publications) apart."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[str | bytes] = []

    async def do(self, op: str, **args: Any) -> Any:
        await self.ws.send(json.dumps({"op": op, **args}))
        while True:
            message = await asyncio.wait_for(self.ws.recv(), 10)
            if isinstance(message, str) and message.startswith('{"ok":'):
                return json.loads(message)["ok"]
            self.received.append(message)

    async def expect(self, message: str | bytes) -> None:
        """``message`` arrives (now or already did)."""
        while message not in self.received:
            self.received.append(await asyncio.wait_for(self.ws.recv(), 10))
        self.received.remove(message)

    async def expect_nothing_more(self) -> None:
        """Nothing but what a round trip brings: a command answered shows the queue is empty."""
        await self.do("members", room="-")
        assert not self.received, self.received


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = uvicorn()
    yield proc
    proc.stop()


@pytest.fixture
async def members(server: ServerProcess) -> AsyncIterator[Any]:
    opened: list[ClientConnection] = []

    async def open_member(url: str | None = None, **kw: Any) -> Member:
        ws = await connect(url or server.url("/rooms"), **kw)
        opened.append(ws)
        return Member(ws)

    yield open_member
    for ws in opened:
        await ws.close()


async def test_join_publish_leave(members: Any) -> None:
    alice, bob, carol = await members(), await members(), await members()
    assert await alice.do("join", room="lobby") is True
    assert await bob.do("join", room="lobby") is True
    assert await alice.do("members", room="lobby") == 2
    assert await alice.do("publish", room="lobby", message="hello lobby") == 2
    await alice.expect("hello lobby")
    await bob.expect("hello lobby")
    assert await bob.do("publish", room="lobby", message="not to myself", exclude_self=True) == 1
    await alice.expect("not to myself")
    assert await bob.do("publish_bytes", room="lobby", message="binary") == 2
    await alice.expect(b"binary")
    await bob.expect(b"binary")
    await bob.do("leave", room="lobby")
    assert await carol.do("publish", room="lobby", message="after bob left") == 1
    await alice.expect("after bob left")
    for member in (alice, bob, carol):
        await member.expect_nothing_more()
    assert (await alice.do("whoami"))["rooms"] == ["lobby"]


async def test_broadcast_and_send_to_user(members: Any) -> None:
    alice_phone, alice_laptop, bob = await members(), await members(), await members()
    assert await alice_phone.do("set_user", user="alice") is True
    assert await alice_laptop.do("set_user", user="alice") is True
    assert await bob.do("send_to_user", user="alice", message="for alice") == 2
    await alice_phone.expect("for alice")
    await alice_laptop.expect("for alice")
    await alice_laptop.do("set_user", user="alice2")  # moves: no longer alice's
    await bob.do("send_to_user", user="alice", message="alice again")
    await alice_phone.expect("alice again")
    await alice_laptop.expect_nothing_more()
    assert (await alice_laptop.do("whoami"))["user"] == "alice2"
    sent = await bob.do("broadcast", message="to everyone", exclude_self=True)
    assert sent >= 2  # every connection of the process (other tests' may be closing)
    await alice_phone.expect("to everyone")
    await alice_laptop.expect("to everyone")
    await bob.expect_nothing_more()


async def test_a_closed_connection_leaves_its_rooms(members: Any, server: ServerProcess) -> None:
    alice, bob = await members(), await members()
    await alice.do("join", room="leaving")
    await bob.do("join", room="leaving")
    await bob.ws.close()
    assert await alice.do("members", room="leaving") == 1
    assert await alice.do("publish", room="leaving", message="still here") == 1


async def test_one_frame_for_plain_and_compressed_members(members: Any, server: ServerProcess) -> None:
    """Members with and without permessage-deflate get the publication right: one plain frame,
    one compressed frame shared by every member without context takeover."""
    plain = await members(compression=None)
    deflate = await members(compression="deflate")
    async with await RawWS.connect(server.port, "/rooms",
                                   extra=[("Sec-WebSocket-Extensions", "permessage-deflate")]) as raw:
        await raw.send_frame(OP_TEXT, json.dumps({"op": "join", "room": "mixed"}))
        assert await raw.recv_message() == (OP_TEXT, b'{"ok":true}')
        await plain.do("join", room="mixed")
        await deflate.do("join", room="mixed")
        message = "compressible " * 500
        assert await plain.do("publish", room="mixed", message=message) == 3
        await plain.expect(message)
        await deflate.expect(message)
        frame = await raw.recv_frame()
        assert frame.rsv == 4 and len(frame.payload) < len(message) // 10  # compressed once, for all of them
        assert zlib.decompressobj(-15).decompress(frame.payload + b"\x00\x00\xff\xff") == message.encode()


async def test_a_member_that_reads_nothing_is_cut_off(members: Any, server: ServerProcess) -> None:
    """Publications never wait: a member that lets megabytes pile up is closed with 1008, the
    others go on receiving."""
    reader = await members(compression=None, max_size=None)
    async with await RawWS.connect(server.port, "/rooms") as idle:  # reads nothing from here on
        await idle.send_frame(OP_TEXT, json.dumps({"op": "join", "room": "firehose"}))
        assert await idle.recv_message() == (OP_TEXT, b'{"ok":true}')
        await reader.do("join", room="firehose")
        big = "x" * MiB
        delivered = []
        while len(delivered) < 64 and delivered[-1:] != [1]:
            delivered.append(await reader.do("publish", room="firehose", message=big))
            await reader.expect(big)
        # cut off (no longer written to) once 4 MiB waited in its transport, past what the kernel holds
        assert delivered[-1] == 1, delivered
        code, reason = await idle.expect_close(30, skip_data=True)
        assert (code, reason) == (1008, b"slow consumer: send buffer limit exceeded")


# -- two uvicorn workers, one redis-server ---------------------------------------------------------------

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def redis_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in proc.stdout:  # its log says when it accepts connections
        if b"Ready to accept connections" in line:
            break
    else:
        raise RuntimeError("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.kill()
    proc.wait()


@needs_redis
async def test_rooms_across_two_workers(redis_url: str) -> None:
    """uvicorn --workers 2 with FASTWS_REDIS_URL: rooms, send_to_user and broadcast reach the
    members on the other worker (once: the publishing worker does not get its own copy back)."""
    proc = uvicorn("test_asgi_apps:fastapi_app", workers=2, env={"FASTWS_REDIS_URL": redis_url})
    opened: list[ClientConnection] = []
    try:
        by_worker: dict[int, list[Member]] = {}
        for _ in range(200):  # the kernel picks the worker: open until both have two members
            ws = await connect(proc.url("/rooms"))
            opened.append(ws)
            member = Member(ws)
            by_worker.setdefault((await member.do("whoami"))["pid"], []).append(member)
            if len(by_worker) == 2 and all(len(m) >= 2 for m in by_worker.values()):
                break
        assert len(by_worker) == 2, "every connection went to the same worker"
        (a1, a2, *_), (b1, b2, *_) = by_worker.values()
        for member in (a1, b1):
            assert await member.do("join", room="across") is True
            await member.do("synced")  # its worker has told Redis: the other one may publish now
        assert await a1.do("publish", room="across", message="from worker A") == 1  # local deliveries
        await a1.expect("from worker A")
        await b1.expect("from worker A")
        await b1.do("publish", room="across", message="from worker B")
        await a1.expect("from worker B")
        await b1.expect("from worker B")
        await a2.do("set_user", user="dana")
        await b2.do("set_user", user="dana")
        for member in (a2, b2):
            await member.do("synced")
        await a1.do("send_to_user", user="dana", message="for dana")
        await a2.expect("for dana")
        await b2.expect("for dana")
        await b2.do("broadcast", message="everyone, every worker")
        for member in (a1, a2, b1, b2):
            await member.expect("everyone, every worker")
        for member in (a1, a2, b1, b2):
            await member.expect_nothing_more()  # exactly once each
    finally:
        for ws in opened:
            await ws.close()
        proc.stop()


@needs_redis
async def test_binary_publications_cross_workers_as_binary(redis_url: str) -> None:
    proc = uvicorn("test_asgi_apps:fastapi_app", workers=2, env={"FASTWS_REDIS_URL": redis_url})
    try:
        seen: dict[int, Member] = {}
        opened = []
        for _ in range(200):
            ws = await connect(proc.url("/rooms"))
            opened.append(ws)
            member = Member(ws)
            seen.setdefault((await member.do("whoami"))["pid"], member)
            if len(seen) == 2:
                break
        assert len(seen) == 2, "every connection went to the same worker"
        a, b = seen.values()
        await b.do("join", room="bin")
        await b.do("synced")
        await a.do("publish_bytes", room="bin", message="bytes, not text")
        await b.expect(b"bytes, not text")
        for ws in opened:
            await ws.close()
    finally:
        proc.stop()


async def test_raw_member_sees_binary_opcode(server: ServerProcess) -> None:
    async with await RawWS.connect(server.port, "/rooms") as raw:
        await raw.send_frame(OP_TEXT, json.dumps({"op": "join", "room": "raw-bin"}))
        assert await raw.recv_message() == (OP_TEXT, b'{"ok":true}')
        await raw.send_frame(OP_TEXT, json.dumps({"op": "publish_bytes", "room": "raw-bin", "message": "b"}))
        assert await raw.recv_message() == (OP_BINARY, b"b")
        assert await raw.recv_message() == (OP_TEXT, b'{"ok":1}')


def test_rooms_helper_says_what_is_missing() -> None:
    """On another --ws (or another server) there is no extension: a clear error, not a KeyError."""
    from fastws.asgi import rooms

    with pytest.raises(LookupError, match="--ws fastws.asgi:FastWSProtocol"):
        rooms({"type": "websocket", "extensions": {"websocket.http.response": {}}})
    with pytest.raises(LookupError):
        rooms({"type": "websocket"})
    marker = object()
    assert rooms({"extensions": {"fastws.hub": marker}}) is marker
