"""TLS in-process (wss://, https://) with certificates made at test time: the websockets and
aiohttp clients over wss, HTTP/1.1 by ALPN, plain routes over https, the CLI with --certfile and
workers, clear errors for bad certificates, and Chromium over wss with a cookie set by an HTTP
route (refused without it)."""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from fastws import Accept, App, Config, ConnectRequest, Endpoint, Reject, Response, Server, tls_context
from tlsutil import Certs, make_certs
from wsraw import wait_for

pytestmark = pytest.mark.timeout(90)


class Echo(Endpoint):
    def on_message(self, message: str | bytes) -> None:
        self.session.send(message)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def tls_server(certs: Certs, demo_app: App) -> AsyncIterator[tuple[Server, int]]:
    server = Server(demo_app, Config())
    (_, port), *_ = await server.listen("127.0.0.1", 0, ssl=tls_context(str(certs.certfile)))
    yield server, port
    await server.shutdown(timeout=1.0)


async def test_websockets_client_over_wss(tls_server: tuple[Server, int], certs: Certs) -> None:
    server, port = tls_server
    async with websockets.connect(f"wss://localhost:{port}/echo", ssl=certs.client_context()) as ws:
        assert ws.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        await ws.send("over TLS")
        assert await ws.recv() == "over TLS"
        big = bytes(range(256)) * 4096  # 1 MiB: many TLS records each way
        await ws.send(big)
        assert await ws.recv() == big
    await wait_for(lambda: server.session_count == 0)


async def test_aiohttp_over_wss_and_https(tls_server: tuple[Server, int], certs: Certs) -> None:
    _, port = tls_server
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=certs.client_context())) as http:
        async with http.ws_connect(f"wss://127.0.0.1:{port}/echo") as ws:
            await ws.send_bytes(b"\x00binary\xff")
            assert await ws.receive_bytes() == b"\x00binary\xff"
            await ws.close()
        for _ in range(2):  # keep-alive over TLS
            async with http.get(f"https://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"


async def test_server_close_over_tls_is_clean(tls_server: tuple[Server, int], certs: Certs) -> None:
    server, port = tls_server
    async with websockets.connect(f"wss://localhost:{port}/echo", ssl=certs.client_context()) as ws:
        await wait_for(lambda: server.session_count == 1)
        next(iter(server.hub.sessions.values())).close(4000, "bye")
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 4000 and ws.close_reason == "bye"
    await wait_for(lambda: server.session_count == 0)


async def test_a_cleartext_client_on_the_tls_port_is_dropped(tls_server: tuple[Server, int]) -> None:
    server, port = tls_server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await wait_for(lambda: server.pending_handshakes == 0)


def test_tls_context_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        tls_context(str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ssl.SSLError):
        tls_context(str(tmp_path / "junk.pem"))


async def test_cli_serves_wss_with_workers(certs: Certs, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastws", "serve", "--port", str(port), "--workers", "2",
        "--certfile", str(certs.certfile), stderr=asyncio.subprocess.PIPE)
    try:
        pids = set()
        for _ in range(200):
            try:
                async with websockets.connect(f"wss://localhost:{port}/echo", ssl=certs.client_context(),
                                              open_timeout=2) as ws:
                    await ws.send("x")
                    assert await ws.recv() == "x"
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(ssl=certs.client_context())) as http:
                    async with http.get(f"https://localhost:{port}/healthz") as resp:
                        pids.add((await resp.json())["pid"])
                if len(pids) == 2:
                    break
            except OSError:
                await asyncio.sleep(0.1)
        assert len(pids) == 2, "both workers serve TLS"
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert b"https://127.0.0.1" in err


async def test_cli_bad_certificate_is_one_clear_line(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastws", "serve", "--port", "0", "--certfile", str(tmp_path / "nope.pem"),
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot load the TLS certificate" in lines[0], err


# -- Chromium over wss, authenticated by a cookie that an HTTP route set -------------------------------------

PAGE = """<!doctype html><title>auth</title><script>
window.tryConnect = () => new Promise((resolve) => {
  const ws = new WebSocket("wss://" + location.host + "/private");
  ws.onopen = () => ws.send("hello");
  ws.onmessage = (e) => { resolve("message:" + e.data); ws.close(); };
  ws.onclose = (e) => resolve("closed:" + e.code);
});
</script>"""


def cookie_app() -> App:
    def needs_cookie(conn: ConnectRequest) -> Any:
        if conn.origin != f"https://{conn.headers.get('host')}":
            raise Reject(403, "cross-site WebSocket refused\n")
        if conn.cookies.get("session") != "s3cret":
            raise Reject(401, "log in first\n")
        return Accept(user="chromium")

    class Private(Endpoint):
        def on_message(self, message: str | bytes) -> None:
            self.session.send(f"welcome {message}")

    app = App()
    app.route("/private", on_connect=needs_cookie)(Private)

    @app.http("/")
    def page(request: Any) -> Response:
        return Response(PAGE, content_type="text/html; charset=utf-8")

    @app.http("/login")
    def login(request: Any) -> Response:
        return Response("ok", headers=[("Set-Cookie", "session=s3cret; Path=/; Secure; HttpOnly; SameSite=Strict")])

    return app


async def test_chromium_over_wss_with_a_cookie(certs: Certs) -> None:
    from test_browser import BROWSER, CDP, FLAGS, Page

    if BROWSER is None:
        pytest.skip("Chromium is not installed")
    import os
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    server = Server(cookie_app(), Config())
    (_, port), *_ = await server.listen("127.0.0.1", 0, ssl=tls_context(str(certs.certfile)))
    profile = tempfile.mkdtemp(prefix="fastws-chromium-tls-")
    proc = subprocess.Popen([BROWSER, *FLAGS, "--ignore-certificate-errors", f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", "about:blank"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        port_file = Path(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            await asyncio.sleep(0.05)
        devtools, path = port_file.read_text().split()[:2]
        cdp = await CDP.connect(f"ws://127.0.0.1:{devtools}{path}")
        target = (await cdp.send("Target.createTarget", url=f"https://localhost:{port}/"))["targetId"]
        page = Page(await CDP.connect(f"ws://127.0.0.1:{devtools}/devtools/page/{target}"), target)
        await page.cdp.send("Runtime.enable")
        for _ in range(200):
            if await page.js("typeof window.tryConnect") == "function":
                break
            await asyncio.sleep(0.05)
        assert await page.js("tryConnect()") == "closed:1006"  # refused: the browser sees no status
        assert await page.js("fetch('/login').then(r => r.text())") == "ok"
        assert await page.js("tryConnect()") == "message:welcome hello"
        await page.cdp.close()
        await cdp.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)
        await server.shutdown(timeout=1.0)
