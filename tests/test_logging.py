"""Logs an operator can use: one access line per WebSocket connection (checked field by field) and
per refused upgrade, JSON lines from `fastws serve --log-format json`, --no-access-log, and
rate-limited protocol-error lines."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys

import pytest
import websockets

from fastws import Accept, App, ConnectRequest, Endpoint, Reject
from fastws.logs import JsonFormatter
from wsraw import RawWS, http_exchange, upgrade_request, wait_for

pytestmark = pytest.mark.timeout(60)


class Echo(Endpoint):
    def on_message(self, message: str | bytes) -> None:
        self.session.send(message)


def app() -> App:
    def hook(conn: ConnectRequest) -> Accept:
        if conn.query.get("deny"):
            raise Reject(403, "denied by policy\n")
        return Accept()

    app = App(on_connect=hook)
    app.route("/echo")(Echo)
    return app


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fastws.access"]


async def test_access_line_per_connection_field_by_field(start_server, caplog) -> None:
    server, port = await start_server(app(), subprotocols=["chat"], access_log=True)
    with caplog.at_level(logging.INFO, logger="fastws.access"):
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo?x=1", subprotocols=["chat"],
                                      compression=None) as ws:
            await ws.send("hello")  # 5 bytes
            await ws.recv()
            await ws.send(b"\x00" * 100)
            await ws.recv()
        await wait_for(lambda: len(access_records(caplog)) == 1)
    (record,) = access_records(caplog)
    assert record.levelno == logging.INFO
    fields = record.__dict__
    assert fields["remote"] == "127.0.0.1" and fields["method"] == "GET" and fields["path"] == "/echo"
    assert fields["status"] == 101 and fields["subprotocol"] == "chat"
    assert fields["close_code"] == 1000 and fields["closed_by"] == "remote"
    assert (fields["messages_in"], fields["bytes_in"], fields["messages_out"], fields["bytes_out"]) == (2, 105, 2, 105)
    assert 0 <= fields["duration"] < 30 and fields["session"] >= 1  # the loop's clock: 1 ms resolution
    line = record.getMessage()
    assert line.startswith('127.0.0.1 "GET /echo?x=1" 101 chat ') and "close=1000/remote in=2/105B out=2/105B" in line
    assert server.session_count == 0


async def test_access_line_per_refused_upgrade(start_server, caplog) -> None:
    _, port = await start_server(app(), access_log=True)
    with caplog.at_level(logging.INFO, logger="fastws.access"):
        assert (await http_exchange(port, upgrade_request("/echo?deny=1")[0])).status == 403
        assert (await http_exchange(port, upgrade_request("/missing")[0])).status == 404
    first, second = access_records(caplog)
    assert (first.status, first.path, first.reason) == (403, "/echo", "denied by policy")  # type: ignore[attr-defined]
    assert (second.status, second.path) == (404, "/missing")  # type: ignore[attr-defined]
    assert "refused: denied by policy" in first.getMessage()


async def test_no_access_log_by_default(start_server, caplog) -> None:
    _, port = await start_server(app())
    with caplog.at_level(logging.INFO, logger="fastws.access"):
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo"):
            pass
        assert (await http_exchange(port, upgrade_request("/echo?deny=1")[0])).status == 403
        await asyncio.sleep(0)
    assert access_records(caplog) == []


async def test_protocol_errors_are_logged_but_rate_limited(start_server, caplog) -> None:
    server, port = await start_server(app())
    with caplog.at_level(logging.INFO, logger="fastws"):
        for _ in range(20):
            async with await RawWS.connect(port, "/echo") as ws:
                await ws.send_bad(0x3)  # a reserved opcode: 1002
                await ws.expect_close()
        await wait_for(lambda: server.stats["protocol_errors"] == 20)
    lines = [r for r in caplog.records if r.name == "fastws" and "protocol error 1002" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.INFO


def test_json_formatter_fields() -> None:
    record = logging.LogRecord("fastws.access", logging.INFO, __file__, 1, "%s x", ("a",), None)
    record.remote = "10.0.0.1"
    record.close_code = 1001
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "a x" and entry["level"] == "info" and entry["logger"] == "fastws.access"
    assert entry["remote"] == "10.0.0.1" and entry["close_code"] == 1001 and entry["time"].endswith("Z")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_cli_and_connect(*options: str, expect_access_line: bool) -> list[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastws", "serve", "--port", str(port), *options, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        for _ in range(300):
            try:
                async with websockets.connect(f"ws://127.0.0.1:{port}/echo", compression=None) as ws:
                    await ws.send("ping!")
                    await ws.recv()
                break
            except OSError:
                await asyncio.sleep(0.05)
        while expect_access_line:  # the line is written when the server sees the connection end
            line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
            lines.append(line.rstrip("\n"))
            if "fastws.access" in line:
                break
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return lines + err.decode().splitlines()


async def test_cli_json_logs() -> None:
    lines = await run_cli_and_connect("--log-format", "json", "--access-log", expect_access_line=True)
    entries = [json.loads(line) for line in lines]  # every line is JSON
    access = [e for e in entries if e["logger"] == "fastws.access"]
    assert len(access) == 1, lines
    (entry,) = access
    assert entry["level"] == "info" and entry["status"] == 101 and entry["path"] == "/echo"
    assert entry["remote"] == "127.0.0.1" and entry["close_code"] == 1000 and entry["closed_by"] == "remote"
    assert (entry["messages_in"], entry["bytes_in"], entry["messages_out"], entry["bytes_out"]) == (1, 5, 1, 5)
    assert isinstance(entry["pid"], int) and isinstance(entry["duration"], float)
    assert any("listening on" in e["message"] for e in entries)


async def test_cli_no_access_log_by_default() -> None:
    lines = await run_cli_and_connect(expect_access_line=False)
    assert not any("fastws.access" in line for line in lines), lines
    assert any("listening on" in line for line in lines)


async def test_keepalive_timeouts_are_logged(start_server, caplog) -> None:
    server, port = await start_server(app(), ping_interval=0.2, ping_timeout=0.2)
    with caplog.at_level(logging.INFO, logger="fastws"):
        async with await RawWS.connect(port, "/echo") as ws:  # reads pings, never answers them
            code, _ = await ws.expect_close(timeout=5, skip_data=True)
        assert code == 1011
        await wait_for(lambda: server.session_count == 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "fastws" and "no answer to a ping" in r.getMessage()]
    assert len(lines) == 1 and "(1011)" in lines[0]
    assert server.stats["keepalive_timeouts"] == 1
