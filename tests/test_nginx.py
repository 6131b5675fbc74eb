"""fastws behind a real nginx, configured by deploy/nginx.conf.

nginx (the Debian package, installed by scripts/test) runs on a free loopback
port with the deploy config, changed only where a test must: ports, file
paths, one worker, and a 2 s proxy_read_timeout so that "fastws's pings keep
idle connections alive through nginx" takes seconds to show.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from fastws import App, Config, Endpoint, Server, tls_context
from tlsutil import Certs, make_certs

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_CONF = ROOT / "deploy" / "nginx.conf"
READ_TIMEOUT = 2.0  # seconds: nginx's proxy_read_timeout in these tests


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


NGINX = nginx_binary()
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (scripts/test installs it: apt-get install nginx-light)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sub(pattern: str, replacement: str, text: str, count: int | None = 1) -> str:
    """Replace a directive of the deploy config; fail loudly if the config no longer has it."""
    new, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count is None:
        assert n >= 1, f"deploy/nginx.conf: no match for {pattern!r}"
    else:
        assert n == count, f"deploy/nginx.conf: expected {count} match(es) for {pattern!r}, found {n}"
    return new


def render_config(listen_port: int, upstream_port: int, read_timeout: float, workdir: Path,
                  tls: Certs | None = None, upstream_tls: Certs | None = None) -> str:
    """deploy/nginx.conf with test ports, paths under ``workdir`` and a short read timeout; ``tls``:
    nginx terminates TLS with these certificates; ``upstream_tls``: fastws does (nginx -> https)."""
    text = DEPLOY_CONF.read_text()
    user = "user root;" if os.geteuid() == 0 else ""  # workers must reach workdir (mode 0700)
    text = _sub(r"^user\s+\S+;", user, text)
    text = _sub(r"^worker_processes\s+\S+;", "worker_processes 1;", text)
    # raising the fd limit needs a hard limit that high (not so in every container)
    text = _sub(r"^worker_rlimit_nofile\s+\d+;", "", text)
    text = _sub(r"^\s*server\s+127\.0\.0\.1:8000;", f"        server 127.0.0.1:{upstream_port};", text)
    listen = f"        listen 127.0.0.1:{listen_port}"
    if tls is not None:
        listen += f" ssl;\n        ssl_certificate {tls.certfile};\n        ssl_certificate_key {tls.certfile};"
    else:
        listen += ";"
    text = _sub(r"^\s*listen\s+80;", listen, text)
    if upstream_tls is not None:
        text = _sub(r"proxy_pass http://fastws;", "proxy_pass https://fastws;\n"
                    f"            proxy_ssl_trusted_certificate {upstream_tls.ca_file};\n"
                    "            proxy_ssl_verify on;\n            proxy_ssl_name localhost;\n"
                    "            proxy_ssl_server_name on;", text)
    text = _sub(r"proxy_read_timeout\s+75s;", f"proxy_read_timeout {read_timeout:g}s;", text)
    text = _sub(r"/var/log/nginx/", f"{workdir}/", text, count=None)
    # The package's compiled-in temp paths are under /var/lib/nginx: keep everything in workdir.
    flags = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr  # type: ignore[list-item]
    temp = [f"client_body_temp_path {workdir}/client_body;", f"proxy_temp_path {workdir}/proxy;"]
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in flags:
            temp.append(f"{module}_temp_path {workdir}/{module};")
    return _sub(r"^http\s*\{", "http {\n    " + "\n    ".join(temp), text)


StartNginx = Callable[[int], Awaitable[int]]


@pytest.fixture
async def start_nginx(tmp_path: Path) -> AsyncIterator[StartNginx]:
    """``port = await start_nginx(upstream_port)``: nginx on 127.0.0.1 proxying to fastws."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    async def start(upstream_port: int, read_timeout: float = READ_TIMEOUT, tls: Certs | None = None,
                    upstream_tls: Certs | None = None) -> int:
        for attempt in range(5):  # free_port() can race with another process taking the port
            workdir = tmp_path / f"nginx{len(procs)}-{attempt}"
            workdir.mkdir()
            port = free_port()
            conf = workdir / "nginx.conf"
            conf.write_text(render_config(port, upstream_port, read_timeout, workdir, tls, upstream_tls))
            log = workdir / "stderr.log"
            logs.append(log)
            with open(log, "wb") as err:
                proc = subprocess.Popen(
                    [NGINX, "-c", str(conf), "-p", str(workdir),  # type: ignore[list-item]
                     "-g", f"daemon off; pid {workdir}/nginx.pid; error_log stderr notice;"],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err)
            procs.append(proc)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                return port
            output = log.read_text(errors="replace")
            if proc.poll() is not None and "Address already in use" in output:
                continue
            pytest.fail(f"nginx did not start on port {port}:\n{output}")
        pytest.fail("nginx could not find a free port")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful stop
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for log in logs:  # nginx's own errors are worth seeing when a test fails
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text.splitlines():
            if "[emerg]" in line or "[alert]" in line or "[crit]" in line:
                print(f"nginx: {line}")


class WhoAmI(Endpoint):
    """Tells the client the address fastws believes it has."""

    def on_open(self) -> None:
        self.session.send(self.session.remote)


@pytest.fixture
async def proxied(start_server, start_nginx, demo_app: App) -> int:  # type: ignore[no-untyped-def]
    """The demo app (plus /whoami) in-process, behind nginx; returns nginx's port."""
    demo_app.route("/whoami")(WhoAmI)
    _, port = await start_server(demo_app, ping_interval=0.5, trusted_proxies=["127.0.0.1"])
    return await start_nginx(port)


async def connect_from(source: str, port: int, path: str, **kwargs):  # type: ignore[no-untyped-def]
    """A websockets client connection to 127.0.0.1:port whose source address is ``source``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await websockets.connect(f"ws://127.0.0.1:{port}{path}", sock=sock, **kwargs)


def test_deploy_config_has_the_websocket_essentials() -> None:
    text = DEPLOY_CONF.read_text()
    for directive in (
        r"map \$http_upgrade \$connection_upgrade \{",
        r"proxy_http_version 1\.1;",
        r"proxy_set_header Upgrade \$http_upgrade;",
        r"proxy_set_header Connection \$connection_upgrade;",
        r"proxy_set_header Host \$host;",
        r"proxy_set_header X-Real-IP \$remote_addr;",
        r"proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;",
        r"proxy_set_header X-Forwarded-Proto \$scheme;",
        r"proxy_buffering off;",
        r"server 127\.0\.0\.1:8000;",
    ):
        assert re.search(directive, text), f"deploy/nginx.conf lacks {directive!r}"
    # nginx must wait longer than fastws's default ping interval, or idle sockets die.
    from fastws import Config

    timeout = int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1))  # type: ignore[union-attr]
    assert timeout > (Config().ping_interval or 0) * 2


async def test_http_through_nginx(proxied: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxied)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b'"status": "ok"' in body


async def test_echo_text_and_binary_through_nginx(proxied: int) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{proxied}/echo") as ws:
        await ws.send("héllo through nginx")
        assert await asyncio.wait_for(ws.recv(), 5) == "héllo through nginx"
        payload = os.urandom(300_000)
        await ws.send(payload)
        assert await asyncio.wait_for(ws.recv(), 5) == payload
        await ws.send(b"")
        assert await asyncio.wait_for(ws.recv(), 5) == b""


async def test_chat_between_two_clients_through_nginx(proxied: int) -> None:
    url = f"ws://127.0.0.1:{proxied}/chat"
    async with websockets.connect(url) as alice:
        joined = await asyncio.wait_for(alice.recv(), 5)
        # the demo announces "<remote>#<id>": the client's address, not nginx's (it is trusted)
        m = re.fullmatch(r"\* 127\.0\.0\.1#(\d+) joined", joined)
        assert m, joined
        alice_id = m.group(1)
        async with websockets.connect(url) as bob:
            bob_joined = await asyncio.wait_for(bob.recv(), 5)
            assert bob_joined.endswith(" joined")
            assert await asyncio.wait_for(alice.recv(), 5) == bob_joined
            await alice.send("hi bob")
            expected = f"#{alice_id}: hi bob"
            assert await asyncio.wait_for(bob.recv(), 5) == expected
            assert await asyncio.wait_for(alice.recv(), 5) == expected
            bob_id = bob_joined.split("#")[1].split()[0]
        assert await asyncio.wait_for(alice.recv(), 5) == f"* #{bob_id} left"


async def test_push_through_nginx(proxied: int) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{proxied}/push") as ws:
        first = await asyncio.wait_for(ws.recv(), 5)
        second = await asyncio.wait_for(ws.recv(), 5)
    for stamp in (first, second):
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stamp), stamp
    assert first != second  # pushed a second apart


async def test_idle_connection_outlives_proxy_read_timeout(proxied: int) -> None:
    """The client sends nothing and never pings: only fastws's pings keep nginx from cutting it."""
    async with websockets.connect(f"ws://127.0.0.1:{proxied}/echo", ping_interval=None) as ws:
        await asyncio.sleep(3.2 * READ_TIMEOUT)
        await ws.send("still here")
        assert await asyncio.wait_for(ws.recv(), 5) == "still here"


async def test_without_pings_nginx_cuts_idle_connections(start_server, start_nginx, demo_app) -> None:
    """The control for the test above: with pings off, nginx's read timeout ends the connection."""
    _, port = await start_server(demo_app, ping_interval=None)
    nginx_port = await start_nginx(port)
    async with websockets.connect(f"ws://127.0.0.1:{nginx_port}/echo", ping_interval=None) as ws:
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 4 * READ_TIMEOUT)
        assert time.monotonic() - started >= READ_TIMEOUT * 0.9


async def test_real_client_address_through_nginx(proxied: int) -> None:
    ws = await connect_from("127.0.0.5", proxied, "/whoami")
    async with ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "127.0.0.5"


async def test_forged_forwarded_for_is_not_believed(proxied: int) -> None:
    """nginx appends the real address; fastws takes the first untrusted hop from the right."""
    ws = await connect_from("127.0.0.5", proxied, "/whoami",
                            additional_headers={"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"})
    async with ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "127.0.0.5"


async def test_forwarded_for_from_untrusted_peer_is_ignored(start_server, demo_app) -> None:
    """Straight to fastws (no nginx): the peer 127.0.0.5 is not a trusted proxy, its header is ignored."""
    demo_app.route("/whoami")(WhoAmI)
    _, port = await start_server(demo_app, trusted_proxies=["127.0.0.1"])
    ws = await connect_from("127.0.0.5", port, "/whoami",
                            additional_headers={"X-Forwarded-For": "203.0.113.9"})
    async with ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "127.0.0.5"


# -- TLS at nginx, or TLS at fastws ------------------------------------------------------------------------


async def test_tls_at_nginx(start_server, start_nginx, demo_app, tmp_path: Path) -> None:
    """wss:// to nginx, which proxies ws:// to fastws."""
    certs = make_certs(tmp_path)
    _, port = await start_server(demo_app, trusted_proxies=["127.0.0.1"])
    nginx_port = await start_nginx(port, tls=certs)
    async with websockets.connect(f"wss://localhost:{nginx_port}/echo", ssl=certs.client_context()) as ws:
        await ws.send("TLS ends at nginx")
        assert await asyncio.wait_for(ws.recv(), 5) == "TLS ends at nginx"
        payload = os.urandom(200_000)
        await ws.send(payload)
        assert await asyncio.wait_for(ws.recv(), 5) == payload


async def test_tls_at_fastws_behind_nginx(start_nginx, demo_app, tmp_path: Path) -> None:
    """ws:// to nginx, which proxies to fastws over TLS (fastws's certificate verified by nginx)."""
    certs = make_certs(tmp_path)
    demo_app.route("/whoami")(WhoAmI)
    server = Server(demo_app, Config(trusted_proxies=["127.0.0.1"]))
    (_, port), *_ = await server.listen("127.0.0.1", 0, ssl=tls_context(str(certs.certfile)))
    try:
        nginx_port = await start_nginx(port, upstream_tls=certs)
        async with websockets.connect(f"ws://127.0.0.1:{nginx_port}/echo") as ws:
            await ws.send("TLS ends at fastws")
            assert await asyncio.wait_for(ws.recv(), 5) == "TLS ends at fastws"
        ws = await connect_from("127.0.0.5", nginx_port, "/whoami")
        async with ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "127.0.0.5"
    finally:
        await server.shutdown(timeout=1.0)
