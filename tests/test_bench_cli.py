"""`fastws bench`: each mode runs briefly against `fastws serve` and writes valid JSON; plot makes a PNG."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastws.bench.common import Histogram, classify_error, parse_size, parse_target, source_addresses

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd} did not listen on {port}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def demo_server():
    port = _free_port()
    proc = _start(
        [sys.executable, "-m", "fastws", "serve", "--port", str(port), "--log-level", "warning"], port
    )
    yield proc, port
    _stop(proc)


@pytest.fixture(scope="module")
def raw_server():
    port = _free_port()
    proc = _start(
        [sys.executable, str(REPO / "bench" / "servers" / "raw_tcp_echo.py"), "--port", str(port)], port
    )
    yield proc, port
    _stop(proc)


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastws", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def run_json(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = bench(*args, "--json", str(out))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    data = json.loads(out.read_text())
    assert data["tool"] == "fastws bench" and data["schema"] == 1
    assert data["mode"] == args[0]
    for key in ("date", "cpu", "cores", "kernel", "python", "packages", "command"):
        assert key in data["meta"]
    return data


@pytest.fixture(scope="module")
def results(tmp_path_factory, demo_server, raw_server):
    """Run every mode once (module scope: the plot test reuses the files)."""
    tmp = tmp_path_factory.mktemp("bench")
    proc, port = demo_server
    url = f"ws://127.0.0.1:{port}"
    pid = str(proc.pid)
    runs = {
        "throughput": f"throughput {url}/echo -w 0.2 -c 4 -i 8 -s 1K -p 2 --server-pid {pid} --label fastws",
        "throughput_big": f"throughput {url}/echo --warmup 0.1 --size 100K --inflight 2 --text",
        "raw": f"throughput tcp://127.0.0.1:{raw_server[1]} --raw --warmup 0.1 --label raw-tcp",
        "latency": f"latency {url}/echo --warmup 0.1 --connections 2",
        "connections": f"connections {url}/echo --connections 300 --server-pid {pid} --processes 2",
        "broadcast": f"broadcast {url}/chat --connections 5 --rate 100 --grace 2",
        "handshake": f"handshake {url}/echo --connections 4",
    }
    if importlib.util.find_spec("aiofastnet"):
        runs["throughput_afn"] = f"throughput {url}/echo --warmup 0.1 --client-transport aiofastnet"
    out = {}
    for name, args in runs.items():
        duration = "0.3" if name == "connections" else "0.5"
        out[name] = run_json(tmp, name, *args.split(), "--quiet", "--duration", duration)
    return tmp, out


def test_throughput(results):
    r = results[1]["throughput"]
    res = r["results"]
    assert r["label"] == "fastws"
    assert r["params"]["size"] == 1024 and r["params"]["connections"] == 4 and r["params"]["inflight"] == 8
    assert res["connections_opened"] == 4 and res["failures"] == {}
    assert res["messages"] > 100 and res["msgs_per_s"] > 0 and res["seconds"] > 0.3
    assert res["mb_per_s"] == pytest.approx(res["msgs_per_s"] * 1024 / 1e6, rel=1e-3)
    assert len(res["per_process"]) == 2 and len(res["client_cpu_percent"]) == 2
    assert res["server_cpu_percent"] is not None
    big = results[1]["throughput_big"]["results"]
    assert big["messages"] > 0 and big["dropped"] == 0
    if "throughput_afn" in results[1]:
        afn = results[1]["throughput_afn"]
        assert afn["params"]["client_transport"] == "aiofastnet" and afn["results"]["messages"] > 100


def test_throughput_raw(results):
    res = results[1]["raw"]["results"]
    assert results[1]["raw"]["params"]["raw"] is True
    assert res["messages"] > 100 and res["msgs_per_s"] > 0


def test_latency(results):
    res = results[1]["latency"]["results"]
    lat = res["latency_us"]
    assert res["round_trips"] > 50
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    assert sum(c for _, _, c in res["histogram"]["buckets"]) == res["round_trips"]


def test_connections(results):
    res = results[1]["connections"]["results"]
    assert res["target"] == 300 and res["opened"] == 300 and res["failed"] == 0
    assert res["handshakes_per_s"] > 0 and res["ramp"][-1][1] == 300
    assert res["processes"] == 2 and res["source_addresses"] >= 1
    srv = res["server"]
    assert srv["rss_before"] > 0 and srv["rss_after_hold"] > 0
    assert 0 < srv["bytes_per_connection"] < 1_000_000
    assert res["dropped_during_hold"] == 0


def test_a_merged_ramp_is_thinned_to_evenly_spaced_steps():
    # 56 processes ramping to a million connections report tens of thousands of distinct sample times
    from fastws.bench.connections import _merge_timelines

    timelines = [[[0.0, 0.0]] + [[k * 0.001 + (i + 1) * 0.01, float(i + 1)] for i in range(3000)] for k in range(20)]
    ramp = _merge_timelines(timelines)
    assert 400 <= len(ramp) <= 510
    assert ramp[0] == [0.0, 0.0] and ramp[-1] == [round(19 * 0.001 + 3000 * 0.01, 3), 20 * 3000.0]
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(ramp, ramp[1:], strict=False))
    assert _merge_timelines([timelines[0][:100]]) == [[round(t, 3), c] for t, c in timelines[0][:100]]  # short: whole


def test_broadcast(results):
    res = results[1]["broadcast"]["results"]
    assert res["subscribers"] == 5
    assert res["messages_sent"] >= 10
    assert res["deliveries"] == res["expected_deliveries"] == 5 * res["messages_sent"]
    assert res["lost"] == 0 and res["complete_messages"] == res["messages_sent"]
    assert 0 < res["latency_us"]["p50"] <= res["latency_us"]["max"]
    assert res["fanout_us"]["p50"] >= res["latency_us"]["p50"] * 0.5
    assert res["deliveries_per_s"] > 0


def test_handshake(results):
    res = results[1]["handshake"]["results"]
    assert res["handshakes"] > 10 and res["handshakes_per_s"] > 0
    assert res["failures"] == {}
    assert res["open_latency_us"]["p50"] > 0


def test_plot_writes_a_png(results):
    tmp, _ = results
    out = tmp / "chart.png"
    files = sorted(str(p) for p in tmp.glob("*.json"))
    proc = bench("plot", *files, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_unreachable_server_is_a_clear_error():
    port = _free_port()
    proc = bench("throughput", f"ws://127.0.0.1:{port}/echo", "--quiet", "--duration", "0.2", "--warmup", "0")
    assert proc.returncode == 1
    assert "ECONNREFUSED" in proc.stderr


def test_not_an_echo_endpoint_is_refused(demo_server):
    _, port = demo_server
    proc = bench("throughput", f"ws://127.0.0.1:{port}/chat", "--quiet", "--duration", "0.2", "--warmup", "0")
    assert proc.returncode == 1
    assert "echo" in proc.stderr


def test_message_file_errors_are_clear(tmp_path, demo_server):
    _, port = demo_server
    url = f"ws://127.0.0.1:{port}/echo"
    missing = bench("throughput", url, "--message-file", str(tmp_path / "nope.json"), "--quiet")
    assert missing.returncode == 2 and "--message-file: cannot read" in missing.stderr
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    text = bench("latency", url, "--message-file", str(latin), "--text", "--quiet")
    assert text.returncode == 2 and "is not UTF-8 text (byte 3)" in text.stderr


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None, reason="aiohttp not installed")
def test_compressed_throughput_against_a_peer_with_context_takeover(tmp_path):
    # aiohttp answers the offer with context takeover on both sides: the engine's messages (each
    # compressed alone) are still valid, and the checked echo is its compressor's first message.
    port = _free_port()
    proc = _start([sys.executable, str(REPO / "bench" / "servers" / "aiohttp_echo.py"), "--port", str(port),
                   "--compression"], port)
    try:
        message = tmp_path / "m.json"
        message.write_text('{"symbol": "AAPL", "bid": 189.5, "ask": 189.52, "seq": 1}' * 6)
        data = run_json(tmp_path, "deflate", "throughput", f"ws://127.0.0.1:{port}/echo", "--compression",
                        "--message-file", str(message), "--text", "-c", "2", "-d", "0.3", "-w", "0.1", "--quiet")
    finally:
        _stop(proc)
    res = data["results"]
    assert res["client_path"] == "native" and res["failures"] == {} and res["dropped"] == 0
    assert res["messages"] > 0 and data["params"]["size"] == message.stat().st_size


def test_bench_is_a_fastws_subcommand():
    from fastws.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0


def test_plot_rejects_other_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    proc = bench("plot", str(bad), "-o", str(tmp_path / "x.png"))
    assert proc.returncode == 1 and "not a `fastws bench --json` file" in proc.stderr


# -- pieces ----------------------------------------------------------------------


def test_histogram_percentiles_match_exact_ones_within_one_percent():
    rng = random.Random(7)
    values = [int(rng.lognormvariate(10, 1.5)) for _ in range(20000)]
    h = Histogram()
    for v in values:
        h.record(v)
    values.sort()
    for q in (50, 90, 99, 99.9):
        exact = values[max(0, int(-(-q * len(values) // 100)) - 1)]
        assert h.percentile(q) == pytest.approx(exact, rel=0.01, abs=1)
    assert h.percentile(100) == h.max == values[-1] and h.min == values[0]
    again = Histogram.from_json(json.loads(json.dumps(h.to_json())))
    assert again.total == h.total and again.percentile(99) == h.percentile(99)
    merged = Histogram()
    merged.merge(h)
    merged.merge(again)
    assert merged.total == 2 * h.total and merged.percentile(50) == h.percentile(50)


def test_histogram_buckets_are_contiguous():
    prev_high = -1
    for idx in range(Histogram.SUB + 20 * Histogram.HALF):
        low, high = Histogram.bounds(idx)
        assert low == prev_high + 1 and Histogram.index(low) == idx == Histogram.index(high)
        prev_high = high


def test_parse_size_and_targets():
    assert [parse_size(s) for s in ("64", "1K", "1KiB", "64k", "1M", "2MiB")] == [
        64,
        1024,
        1024,
        65536,
        1 << 20,
        2 << 20,
    ]
    with pytest.raises(ValueError):
        parse_size("lots")
    t = parse_target("ws://127.0.0.1:9000/echo")
    assert (t.host, t.port, t.loopback, t.raw) == ("127.0.0.1", 9000, True, False)
    assert parse_target("localhost:9000", raw=True).loopback
    assert not parse_target("ws://example.com/").loopback
    assert source_addresses(3) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert source_addresses(300)[253] == "127.0.1.1"


def test_classify_error():
    import asyncio
    import errno

    from fastws import HandshakeError

    assert classify_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) == "ECONNREFUSED"
    assert classify_error(OSError(errno.EADDRNOTAVAIL, "x")) == "EADDRNOTAVAIL"
    assert classify_error(OSError("Multiple exceptions: [Errno 111] Connect call failed")) == "ECONNREFUSED"
    assert classify_error(asyncio.TimeoutError()) == "timeout"
    assert classify_error(HandshakeError(503, "full")) == "HTTP 503"
    assert classify_error(ConnectionResetError("closed during handshake")) == "closed during handshake"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_compare_script_parses(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compare.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and "--quick" in proc.stdout


@pytest.mark.parametrize("size", [300_000, 1000])  # one message per buffer; many per buffer
def test_the_whole_message_raw_echo_writes_back_whole_messages_only(size):
    """compare.py's raw-tcp-message bound: 2.5 messages in, the peer's end of input, and exactly the
    two whole ones come back before it closes (the half message never leaves)."""
    port = _free_port()
    script = REPO / "bench" / "servers" / "raw_tcp_message_echo.py"
    proc = _start([sys.executable, str(script), "--port", str(port), "--message-size", str(size)], port)
    try:
        data = random.Random(size).randbytes(size * 5 // 2)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for start in range(0, len(data), 70_000):  # in pieces that do not line up with messages
                sock.sendall(data[start:start + 70_000])
            sock.shutdown(socket.SHUT_WR)
            back = bytearray()
            while chunk := sock.recv(1 << 20):
                back += chunk
        assert bytes(back) == data[: 2 * size]
    finally:
        _stop(proc)


def test_the_connections_bench_warns_of_a_small_established_connection_table():
    from fastws.bench.connections import established_hash_buckets, established_hash_warning

    assert established_hash_warning(1_000_000, True, 262_144) == (
        "2,000,000 sockets for 262,144 buckets in the kernel's table of established TCP connections: the ramp "
        "will slow as its chains grow; boot with thash_entries=2097152, or run in a network namespace made "
        "after sysctl net.ipv4.tcp_child_ehash_entries=2097152")
    assert established_hash_warning(1_000_000, True, 2_097_152) is None
    assert established_hash_warning(400_000, False, 262_144) is None  # the server elsewhere: 1 socket each here
    assert established_hash_warning(1_000_000, True, None) is None  # a kernel that does not say
    buckets = established_hash_buckets()
    assert buckets is None or buckets > 0


def test_sections_other_tools_write_survive_a_compare_rewrite(tmp_path, monkeypatch):
    """bench/compression.py and bench/asgi_compare.py put their sections into RESULTS.md; a second
    write replaces the section, and compare.py's own rewrite carries both over unchanged."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from benchutil import write_section
    from compare import kept_sections

    report = tmp_path / "RESULTS.md"
    report.write_text("# fastws vs peers\n\n## Messages/s\n\n| a |\n")
    write_section("## Compression: deflate\n\nold\n", report)
    write_section("## ASGI: uvicorn\n\nasgi\n", report)
    write_section("## Compression: deflate\n\nnew\n", report)
    text = report.read_text()
    assert text.count("## Compression:") == 1 and "new" in text and "old" not in text
    assert text.index("## Messages/s") < text.index("## Compression:") < text.index("## ASGI:")
    kept = kept_sections(report)
    assert "## Compression: deflate\n\nnew" in kept and "## ASGI: uvicorn\n\nasgi" in kept
    assert "## Messages/s" not in kept
