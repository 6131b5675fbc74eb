"""The PROXY protocol (v1 and v2): the parser against the spec's byte layouts, then over real
sockets -- HAProxy (send-proxy, send-proxy-v2) in front of fastws, so session.remote is the real
client; headers from untrusted addresses refused; a trusted peer without one refused."""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from fastws import App, Endpoint
from fastws.proxy_protocol import V2_SIGNATURE, ProxyHeaderError, parse
from wsraw import http_exchange, upgrade_request, wait_for

pytestmark = pytest.mark.timeout(60)
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


def v2(command: int, family: int, addresses: bytes, tlvs: bytes = b"") -> bytes:
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family, len(body)) + body


V2_TCP4 = v2(1, 0x11, socket.inet_aton("203.0.113.7") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 5555, 443))
V2_TCP6 = v2(1, 0x21, socket.inet_pton(socket.AF_INET6, "2001:db8::42") + socket.inet_pton(socket.AF_INET6, "::1")
             + struct.pack("!HH", 5555, 443), tlvs=b"\x01\x00\x02h2")


@pytest.mark.parametrize(("data", "expected"), [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\nGET", (42, "203.0.113.7")),
    (b"PROXY TCP6 2001:db8::42 ::1 5555 443\r\n", (38, "2001:db8::42")),
    (b"PROXY UNKNOWN\r\n", (15, None)),
    (b"PROXY TCP4 203.0.113.7", None),  # more to come
    (V2_TCP4 + b"GET", (len(V2_TCP4), "203.0.113.7")),
    (V2_TCP6, (len(V2_TCP6), "2001:db8::42")),
    (v2(0, 0x00, b""), (16, None)),  # LOCAL: the balancer's own health check
    (V2_TCP4[:10], None),
    (V2_TCP4[:-3], None),
])
def test_parse(data: bytes, expected: tuple[int, str | None] | None) -> None:
    assert parse(data) == expected


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", b"PROXY " + b"x" * 120, b"GET / HTTP/1.1\r\n",
    V2_SIGNATURE[:-1] + b"X" + b"\x21\x11\x00\x0c" + bytes(12), V2_SIGNATURE + b"\x31\x11\x00\x00",
    v2(1, 0x11, b"\x01\x02"),
])
def test_parse_refuses(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


class Remote(Endpoint):
    def on_open(self) -> None:
        self.session.send(self.session.remote)


def remote_app() -> App:
    app = App()
    app.route("/remote")(Remote)
    return app


async def first_message(port: int, prefix: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(prefix + upgrade_request("/remote")[0])
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    frame = await asyncio.wait_for(reader.readexactly(2), 5)
    payload = await reader.readexactly(frame[1] & 0x7F)
    writer.close()
    return payload


@pytest.mark.parametrize(("prefix", "remote"), [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n", b"203.0.113.7"),
    (V2_TCP4, b"203.0.113.7"),
    (V2_TCP6, b"2001:db8::42"),
    (v2(0, 0x00, b""), b"127.0.0.1"),  # LOCAL: the peer itself
])
async def test_trusted_proxy_header_gives_session_remote(start_server, prefix: bytes, remote: bytes) -> None:
    _, port = await start_server(remote_app(), trusted_proxies=["127.0.0.1"], proxy_protocol=True)
    assert await first_message(port, prefix) == remote
    # split in pieces across reads, too
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(len(prefix)):
        writer.write(prefix[i:i + 1])
        await writer.drain()
    writer.write(upgrade_request("/remote")[0])
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert (await reader.readexactly(2 + len(remote)))[2:] == remote
    writer.close()


@pytest.mark.parametrize("prefix", [b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n", V2_TCP4])
async def test_proxy_header_from_an_untrusted_address_is_refused(start_server, prefix: bytes) -> None:
    server, port = await start_server(remote_app(), trusted_proxies=["10.9.9.9"], proxy_protocol=True)
    resp = await http_exchange(port, prefix + upgrade_request("/remote")[0])
    assert resp.status == 400 and b"not a trusted proxy" in resp.body and resp.closed
    assert server.session_count == 0
    # a direct client that sends no PROXY header is served as itself
    assert await first_message(port, b"") == b"127.0.0.1"


async def test_trusted_peer_without_a_header_is_refused(start_server) -> None:
    _, port = await start_server(remote_app(), trusted_proxies=["127.0.0.1"], proxy_protocol=True)
    resp = await http_exchange(port, upgrade_request("/remote")[0])
    assert resp.status == 400 and b"PROXY" in resp.body


async def test_without_proxy_protocol_a_header_is_just_a_bad_request(start_server) -> None:
    _, port = await start_server(remote_app(), trusted_proxies=["127.0.0.1"])
    for prefix in (V2_TCP4, b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n"):
        resp = await http_exchange(port, prefix + upgrade_request("/remote")[0])
        assert resp.status == 400 and b"proxy_protocol" in resp.body


# -- HAProxy in front -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[object]:
    if HAPROXY is None:
        pytest.skip("HAProxy is not installed (scripts/test installs it: apt-get install haproxy)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(backend_port: int, send_proxy: str) -> int:
        port = free_port()
        config = tmp_path / f"haproxy-{port}.cfg"
        config.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend ws
    bind 127.0.0.1:{port}
    default_backend fastws
backend fastws
    server one 127.0.0.1:{backend_port} {send_proxy} source 127.0.0.1
""")
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                    pytest.fail(f"HAProxy did not start: {out[-2000:]}")
                time.sleep(0.05)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
async def test_haproxy_in_front(start_server, haproxy, send_proxy: str) -> None:
    server, port = await start_server(remote_app(), trusted_proxies=["127.0.0.1"], proxy_protocol=True)
    front = haproxy(port, send_proxy)  # type: ignore[operator]
    # the client comes from 127.0.0.5; HAProxy connects to fastws from 127.0.0.1
    async with websockets.connect(f"ws://127.0.0.1:{front}/remote",
                                  sock=_bound_socket("127.0.0.5", front)) as ws:
        assert await ws.recv() == "127.0.0.5"
    await wait_for(lambda: server.session_count == 0)


def _bound_socket(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock
