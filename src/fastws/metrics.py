"""Counters read at scrape time, and ``/metrics`` in the Prometheus text format.

Nothing here runs per message: the wire core counts messages and bytes in plain C integers, per
process (``fastws._frame.traffic_counts``), the server counts events in plain Python integers,
and a scrape reads them.  With ``--workers N`` the worker that gets the scrape asks every other
worker for its snapshot over a Unix socket in a directory the master made (``metrics_dir``) and
sums them: exact at the moment of the scrape, and free between scrapes (prometheus-client's
multiprocess mode would instead write an mmap'd file on every increment, see the README).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

from fastws._frame import PING_RTT_BUCKETS, ping_rtt_counts, traffic_counts

if TYPE_CHECKING:
    from fastws.connection import Session
    from fastws.server import Server

log = logging.getLogger("fastws")

# seconds, from the connection's first byte (or the previous answer, on a keep-alive connection) to the 101
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FANOUT_SIZE_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)  # local recipients of one publication
# seconds to hand one publication to its local recipients (the frame built once, then written to each)
FANOUT_DURATION_BUCKETS = (0.00001, 0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
# seconds from a publication on another node to its arrival here through the backplane (wall clocks)
BACKPLANE_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TRAFFIC = ("text_in", "text_bytes_in", "binary_in", "binary_bytes_in",
           "text_out", "text_bytes_out", "binary_out", "binary_bytes_out")  # traffic_counts()'s order
SCRAPE_TIMEOUT = 2.0  # seconds to wait for the other workers' snapshots


class Histogram:
    """Counts per bucket (not cumulative) and a sum: one bisect per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


class ProcessMetrics:
    """What one process counts beyond Server.stats, while metrics are on."""

    def __init__(self) -> None:
        self.rejected: Counter[int] = Counter()  # refused upgrades by HTTP status
        self.handshake = Histogram(HANDSHAKE_BUCKETS)
        self.fanout_size = Histogram(FANOUT_SIZE_BUCKETS)
        self.fanout_duration = Histogram(FANOUT_DURATION_BUCKETS)
        self.closes: Counter[tuple[int, str]] = Counter()  # (close code, who closed first)
        # the wire core's totals are the process's: count from here (another server run earlier
        # in the same process, as in tests, is not this one's traffic)
        self.traffic_base = traffic_counts()
        self.ping_rtt_base = ping_rtt_counts()

    def fanout_done(self, recipients: int, seconds: float) -> None:
        """The hub handed a publication to ``recipients`` local sessions (Hub.on_fanout)."""
        self.fanout_size.observe(recipients)
        self.fanout_duration.observe(seconds)

    def session_ended(self, session: Session) -> None:
        self.closes[(session.close_code or 1006, session.closed_by or "none")] += 1

    def snapshot(self, server: Server) -> dict[str, Any]:
        """This process's figures as plain JSON-able data (what other workers are sent)."""
        traffic = [now - base for now, base in zip(traffic_counts(), self.traffic_base, strict=True)]
        rtt_counts, rtt_sum = ping_rtt_counts()
        base_counts, base_sum = self.ping_rtt_base
        ping_rtt = {"counts": [a - b for a, b in zip(rtt_counts, base_counts, strict=True)], "sum": rtt_sum - base_sum}
        backplane = server.hub.backplane
        lag = getattr(backplane, "receive_lag", None)
        return {
            "workers": 1,
            "connections": server.session_count,
            "pending_handshakes": server.pending_handshakes,
            "unsent_bytes": server.unsent_bytes,
            "stats": dict(server.stats),
            "rejected": {str(k): v for k, v in self.rejected.items()},
            "histograms": {
                "handshake": self.handshake.snapshot(),
                "ping_rtt": ping_rtt,
                "fanout_size": self.fanout_size.snapshot(),
                "fanout_duration": self.fanout_duration.snapshot(),
                "backplane_lag": lag.snapshot() if lag is not None else Histogram(BACKPLANE_LAG_BUCKETS).snapshot(),
            },
            "traffic": traffic,
            "closes": [[code, side, n] for (code, side), n in self.closes.items()],
            "backplane": dict(getattr(backplane, "stats", None) or {}),
            "backplane_queue_lag": getattr(backplane, "lag_ms", 0.0) / 1000,
        }


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' snapshots."""
    total = snapshots[0]
    for snap in snapshots[1:]:
        for key in ("workers", "connections", "pending_handshakes", "unsent_bytes"):
            total[key] += snap[key]
        for key in ("stats", "rejected", "backplane"):
            for name, n in snap[key].items():
                total[key][name] = total[key].get(name, 0) + n
        total["backplane_queue_lag"] = max(total["backplane_queue_lag"], snap["backplane_queue_lag"])
        for name, histogram in total["histograms"].items():
            other = snap["histograms"][name]
            histogram["counts"] = [a + b for a, b in zip(histogram["counts"], other["counts"], strict=True)]
            histogram["sum"] += other["sum"]
        total["traffic"] = [a + b for a, b in zip(total["traffic"], snap["traffic"], strict=True)]
        closes = Counter({(c, s): n for c, s, n in total["closes"]})
        closes.update({(c, s): n for c, s, n in snap["closes"]})
        total["closes"] = [[c, s, n] for (c, s), n in closes.items()]
    return total


def render(snap: dict[str, Any]) -> bytes:
    """A snapshot in the Prometheus text exposition format (prometheus-client writes it)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    stats = snap["stats"]

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=value)

    def labelled(name: str, doc: str, labels: list[str], rows: list[tuple[list[str], float]]) -> Any:
        family = CounterMetricFamily(name, doc, labels=labels)
        for values, n in rows:
            family.add_metric(values, n)
        return family

    def histogram(name: str, doc: str, key: str, bounds: tuple[float, ...]) -> HistogramMetricFamily:
        counts, cumulative, running = snap["histograms"][key]["counts"], [], 0
        for bound, n in zip((*(repr(float(b)) for b in bounds), "+Inf"), counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=snap["histograms"][key]["sum"])

    def families() -> Any:
        yield GaugeMetricFamily("fastws_workers", "Worker processes that answered this scrape",
                                value=snap["workers"])
        yield GaugeMetricFamily("fastws_connections", "Open WebSocket connections", value=snap["connections"])
        yield GaugeMetricFamily("fastws_pending_handshakes", "Connections in the HTTP phase",
                                value=snap["pending_handshakes"])
        yield GaugeMetricFamily("fastws_unsent_bytes", "Bytes held for paused (slow) peers",
                                value=snap["unsent_bytes"])
        yield counter("fastws_connections_accepted", "WebSocket upgrades accepted (101)",
                      stats["connections_total"])
        yield labelled("fastws_connections_rejected", "WebSocket upgrades refused, by HTTP status", ["status"],
                       sorted(([status], n) for status, n in snap["rejected"].items()))
        yield histogram("fastws_handshake_duration_seconds", "From the request's first byte to the 101 response",
                        "handshake", HANDSHAKE_BUCKETS)
        yield histogram("fastws_ping_rtt_seconds", "Round trip of keepalive pings answered by a pong",
                        "ping_rtt", PING_RTT_BUCKETS)
        yield histogram("fastws_fanout_recipients", "Local sessions one publication (publish, broadcast, "
                        "send_to_user) was written to", "fanout_size", FANOUT_SIZE_BUCKETS)
        yield histogram("fastws_fanout_duration_seconds", "Time to write one publication to its local recipients",
                        "fanout_duration", FANOUT_DURATION_BUCKETS)
        traffic = dict(zip(TRAFFIC, snap["traffic"], strict=True))
        for direction, verb in (("in", "received"), ("out", "sent")):
            yield labelled(f"fastws_messages_{verb}", f"WebSocket data messages {verb}, by opcode", ["opcode"],
                           [(["text"], traffic[f"text_{direction}"]), (["binary"], traffic[f"binary_{direction}"])])
            yield labelled(f"fastws_{verb}_bytes", f"WebSocket payload bytes {verb}, by opcode", ["opcode"],
                           [(["text"], traffic[f"text_bytes_{direction}"]),
                            (["binary"], traffic[f"binary_bytes_{direction}"])])
        yield labelled("fastws_closes", "Ended WebSocket connections by close code and by who closed first "
                       "(local, remote; none: TCP ended without a close frame)", ["code", "side"],
                       sorted(([str(code), side], n) for code, side, n in snap["closes"]))
        yield labelled("fastws_slow_consumer_cutoffs", "Peers cut off for not reading: over max_send_buffer "
                       "(1008) or over the process send_budget (1013)", ["limit"],
                       [(["send_buffer"], stats["slow_consumers"]), (["send_budget"], stats["send_budget_cutoffs"])])
        yield counter("fastws_keepalive_pings", "Keepalive pings sent", stats["keepalive_pings"])
        yield counter("fastws_keepalive_timeouts", "Connections closed for not answering a ping (1011)",
                      stats["keepalive_timeouts"])
        yield counter("fastws_protocol_errors", "Connections failed for a protocol violation",
                      stats["protocol_errors"])
        yield counter("fastws_handler_errors", "Exceptions raised by application code", stats["handler_errors"])
        yield counter("fastws_pending_handshakes_refused", "Connections refused at once: too many in the "
                      "HTTP phase (503)", stats["pending_handshakes_refused"])
        backplane = snap["backplane"]
        if backplane:
            for name, doc in (("published", "Publications sent to the backplane"),
                              ("received", "Publications received from the backplane"),
                              ("dropped", "Publications dropped (backplane unreachable)"),
                              ("reconnects", "Backplane reconnections"),
                              ("malformed", "Malformed publications received")):
                yield counter(f"fastws_backplane_{name}", doc, backplane.get(name, 0))
            yield histogram("fastws_backplane_lag_seconds", "From a publication on another node to its arrival here "
                            "(the nodes' wall clocks)", "backplane_lag", BACKPLANE_LAG_BUCKETS)
            yield GaugeMetricFamily("fastws_backplane_queue_lag_seconds", "How long the last batch of publications "
                                    "waited before Redis took it (the largest over the workers)",
                                    value=snap["backplane_queue_lag"])

    class Snapshot:
        def collect(self) -> Any:
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())  # type: ignore[arg-type]
    return generate_latest(registry)


# -- gathering the workers' snapshots ------------------------------------------------------------


class _Answer(asyncio.Protocol):
    """A peer worker connected: send it our snapshot and hang up."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(json.dumps(self.server.metrics_snapshot()).encode())  # type: ignore[attr-defined]
        transport.close()


class WorkerMetrics:
    """This worker's Unix socket in ``directory``, and the scrape that asks the others."""

    def __init__(self, server: Server, directory: str) -> None:
        self.server = server
        self.directory = directory
        self.path = os.path.join(directory, f"{os.getpid()}.sock")
        self._unix: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._unix = await self.server.loop.create_unix_server(lambda: _Answer(self.server), self.path)

    async def stop(self) -> None:
        if self._unix is not None:
            self._unix.close()
            self._unix = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    async def gather(self) -> dict[str, Any]:
        others = [os.path.join(self.directory, name) for name in sorted(os.listdir(self.directory))
                  if name.endswith(".sock") and os.path.join(self.directory, name) != self.path]
        answers = await asyncio.gather(*(self._ask(path) for path in others))
        return merge([self.server.metrics_snapshot(), *(a for a in answers if a is not None)])

    async def _ask(self, path: str) -> dict[str, Any] | None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), SCRAPE_TIMEOUT)
            try:
                data = await asyncio.wait_for(reader.read(), SCRAPE_TIMEOUT)
            finally:
                writer.close()
            return json.loads(data)  # type: ignore[no-any-return]
        except (ConnectionRefusedError, FileNotFoundError):  # a worker that has died: forget its socket
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("metrics: worker socket %s did not answer: %s", path, exc)
        return None
