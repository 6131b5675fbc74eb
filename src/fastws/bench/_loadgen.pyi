"""Type stub for the bench client's Cython engine (fastws.bench._loadgen); see _loadgen.pyx."""

from collections.abc import Sequence
from typing import Any

HOLD: int  # count messages, answer pings
ECHO: int  # throughput: answer every message with a pre-built frame, one send() per read
PINGPONG: int  # latency: time the round trip, send the next message
SUBSCRIBE: int  # broadcast: time deliveries from the publisher's timestamp
CYCLE: int  # handshake: close as soon as open, open another
HISTOGRAMS: tuple[str, ...]

def accept_for(key: str | bytes) -> str: ...
def build_frame(opcode: int, payload: str | bytes, mask: bytes) -> bytes: ...

class Engine:
    raw: bool
    mode: int
    refill: bool
    published: int
    ramping: bool
    attempts: int
    in_progress: int
    live: int
    closing: int
    opened: int
    failed: int
    received: int
    sent: int
    bytes_received: int
    reads: int
    writes: int
    round_trips: int
    deliveries: int
    foreign: int
    first_delivery: int
    last_delivery: int
    pings: int
    pongs: int
    dropped: int
    closed_clean: int
    closed_unclean: int
    close_timeouts: int
    cycles: int
    checks_good: int
    checks_bad: int
    verify_sent: int
    verified: int
    protocol_errors: int
    write_errors: int
    def __init__(
        self,
        host_ip: str,
        port: int,
        *,
        request: bytes | None = None,
        sources: Sequence[str] = (),
        source_offset: int = 0,
        mask: bytes | None = None,
        frame: bytes = b"",
        payload: bytes = b"",
        inflight: int = 1,
        probe: bytes = b"",
        max_fds: int = 0,
        read_buffer: int = 1 << 20,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
    ) -> None: ...
    def fileno(self) -> int: ...
    @property
    def mask_key(self) -> bytes: ...
    @property
    def ramp_done(self) -> bool: ...
    @property
    def stopped_by(self) -> str: ...
    @property
    def pending_bytes(self) -> int: ...
    def set_mode(self, mode: int, refill: bool = False) -> None: ...
    def set_measure_from(self, t_ns: int, round_trip_limit: int = 0) -> None: ...
    def poll(self, timeout_ms: int = 0) -> int: ...
    def run_until(
        self, deadline: float, max_received: int = 0, max_round_trips: int = 0, max_cycles: int = 0
    ) -> None: ...
    def tick(self) -> None: ...
    def ramp(
        self, target: int, concurrency: int = 100, rate: float = 0.0, timeout: float = 0.0, max_failures: int = 1000
    ) -> None: ...
    def cycle(self, concurrency: int, deadline: float, limit: int = 0, max_failures: int = 1000) -> None: ...
    def stop_ramp(self) -> None: ...
    def send_all(self, count: int) -> None: ...
    def start_check(self) -> None: ...
    def verify(self, max_conns: int = -1) -> int: ...
    def close_all(self) -> None: ...
    def abort_all(self) -> None: ...
    def set_broadcast(self, run_id: str, size: int = 0, seq_cap: int = 0) -> None: ...
    def publish(self, n: int) -> int: ...
    def histogram(self, name: str) -> dict[str, Any]: ...
    def per_message(self) -> list[list[int]]: ...
    def failures(self) -> dict[str, int]: ...
    def first_failure(self) -> dict[str, Any] | None: ...
