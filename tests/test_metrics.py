"""/metrics after known traffic, parsed with prometheus-client's own text parser: every counter
matches what was sent, in one process and summed over several workers."""

from __future__ import annotations

import asyncio
import socket
import sys

import aiohttp
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from fastws import App
from wsraw import http_exchange, upgrade_request, wait_for

pytestmark = pytest.mark.timeout(90)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def known_traffic(port: int, connections: int) -> None:
    """Each connection: two 3-byte text messages and one 5-byte binary message, echoed; clean close."""
    for _ in range(connections):
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo", compression=None) as ws:
            for message in ("abc", "def", b"12345"):
                await ws.send(message)
                assert await ws.recv() == message


async def test_metrics_match_known_traffic(start_server, demo_app: App) -> None:
    server, port = await start_server(demo_app, metrics=True)
    await known_traffic(port, 3)
    assert (await http_exchange(port, upgrade_request("/nowhere")[0])).status == 404
    bad_version = upgrade_request("/echo")[0].replace(b"Version: 13", b"Version: 8")
    assert (await http_exchange(port, bad_version)).status == 426
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo", compression=None) as open_one:
        await open_one.send("live!")
        await open_one.recv()
        live = await scrape(port)
        assert value(live, "fastws_connections") == 1
        assert value(live, "fastws_messages_received_total", opcode="text") == 7  # a live session counts too
    await wait_for(lambda: server.session_count == 0)
    samples = await scrape(port)
    assert value(samples, "fastws_workers") == 1
    assert value(samples, "fastws_connections") == 0
    assert value(samples, "fastws_connections_accepted_total") == 4
    assert value(samples, "fastws_connections_rejected_total", status="404") == 1
    assert value(samples, "fastws_connections_rejected_total", status="426") == 1
    assert value(samples, "fastws_handshake_duration_seconds_count") == 4
    assert 0 < value(samples, "fastws_handshake_duration_seconds_sum") < 4 * 10
    assert value(samples, "fastws_handshake_duration_seconds_bucket", le="+Inf") == 4
    for verb in ("received", "sent"):
        assert value(samples, f"fastws_messages_{verb}_total", opcode="text") == 7
        assert value(samples, f"fastws_{verb}_bytes_total", opcode="text") == 3 * 6 + 5
        assert value(samples, f"fastws_messages_{verb}_total", opcode="binary") == 3
        assert value(samples, f"fastws_{verb}_bytes_total", opcode="binary") == 15
    assert value(samples, "fastws_closes_total", code="1000", side="remote") == 4
    assert value(samples, "fastws_slow_consumer_cutoffs_total", limit="send_buffer") == 0
    assert value(samples, "fastws_keepalive_timeouts_total") == 0


async def test_metrics_are_off_by_default(start_server, demo_app: App) -> None:
    _, port = await start_server(demo_app)
    assert (await http_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).status == 404


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_metrics_summed_over_workers() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastws", "serve", "--port", str(port), "--workers", "2", "--metrics",
        "--no-access-log", stderr=asyncio.subprocess.PIPE)
    try:
        pids: set[int] = set()
        # a new connection each time (no keep-alive): SO_REUSEPORT spreads connections over the workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(300):  # until both workers answer
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        pids.add((await resp.json())["pid"])
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
                if len(pids) == 2:
                    break
        assert len(pids) == 2
        await known_traffic(port, 20)
        for _ in range(100):  # every worker has seen its connections end
            samples = await scrape(port)
            if value(samples, "fastws_closes_total", code="1000", side="remote") == 20:
                break
            await asyncio.sleep(0.05)
        assert value(samples, "fastws_workers") == 2
        assert value(samples, "fastws_connections_accepted_total") == 20
        assert value(samples, "fastws_messages_received_total", opcode="text") == 40
        assert value(samples, "fastws_received_bytes_total", opcode="text") == 120
        assert value(samples, "fastws_messages_sent_total", opcode="binary") == 20
        assert value(samples, "fastws_sent_bytes_total", opcode="binary") == 100
        assert value(samples, "fastws_handshake_duration_seconds_count") == 20
        assert value(samples, "fastws_closes_total", code="1000", side="remote") == 20
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()


async def test_keepalive_timeouts_and_protocol_errors_are_counted(start_server, demo_app: App) -> None:
    from wsraw import RawWS

    server, port = await start_server(demo_app, metrics=True, ping_interval=0.2, ping_timeout=0.2)
    async with await RawWS.connect(port, "/echo") as silent:  # never answers the pings
        assert (await silent.expect_close(timeout=5, skip_data=True))[0] == 1011
    for _ in range(2):
        async with await RawWS.connect(port, "/echo") as bad:
            await bad.send_bad(0x3)  # a reserved opcode
            assert (await bad.expect_close())[0] == 1002
    await wait_for(lambda: server.session_count == 0)
    samples = await scrape(port)
    assert value(samples, "fastws_keepalive_timeouts_total") == 1
    assert value(samples, "fastws_protocol_errors_total") == 2
    assert value(samples, "fastws_closes_total", code="1011", side="local") == 1
    assert value(samples, "fastws_closes_total", code="1002", side="local") == 2
    assert value(samples, "fastws_connections_accepted_total") == 3


async def test_ping_round_trips_and_fanout_are_measured(start_server, demo_app: App) -> None:
    server, port = await start_server(demo_app, metrics=True, ping_interval=0.2, ping_timeout=5)
    feed = f"ws://127.0.0.1:{port}/feed"
    async with websockets.connect(feed) as a, websockets.connect(feed) as b, websockets.connect(feed) as c:
        await wait_for(lambda: server.session_count == 3)
        for _ in range(200):  # websockets answers the server's pings by itself
            samples = await scrape(port)
            if value(samples, "fastws_ping_rtt_seconds_count") >= 3:
                break
            await asyncio.sleep(0.05)
        pongs = value(samples, "fastws_ping_rtt_seconds_count")
        assert pongs >= 3
        assert 0 < value(samples, "fastws_ping_rtt_seconds_sum") < pongs * 5  # each under the ping timeout
        await a.send("quote")  # /feed: one publication to its three subscribers
        assert [await ws.recv() for ws in (a, b, c)] == ["quote"] * 3
        samples = await scrape(port)
    assert value(samples, "fastws_fanout_recipients_count") == 1
    assert value(samples, "fastws_fanout_recipients_sum") == 3
    assert value(samples, "fastws_fanout_recipients_bucket", le="1.0") == 0
    assert value(samples, "fastws_fanout_recipients_bucket", le="10.0") == 1
    assert 0 < value(samples, "fastws_fanout_duration_seconds_sum") < 1
