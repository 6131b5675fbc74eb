"""`fastws serve` and `fastws bench`."""

from __future__ import annotations

import argparse
import importlib
import sys

from fastws.app import App, Config
from fastws.logs import LOG_FORMATS, configure
from fastws.server import port_number, run, tls_context


def load_app(spec: str) -> App:
    """'package.module:app' -> the App object (a clear error for every way it can go wrong)."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name or module_name.startswith("."):
        raise SystemExit(f"fastws: app {spec!r} must be 'module:attribute' with an absolute module name")
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"fastws: cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # the module itself raised while importing
        raise SystemExit(f"fastws: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, attr):
        raise SystemExit(f"fastws: module {module_name!r} has no attribute {attr!r} (the app is 'module:attribute')")
    app = getattr(module, attr)
    if not isinstance(app, App):
        raise SystemExit(f"fastws: {spec!r} is not a fastws.App (found {type(app).__name__})")
    return app


def port_arg(text: str) -> int:
    try:
        return port_number(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def worker_count(text: str) -> int:
    workers = int(text)
    if workers < 1:
        raise argparse.ArgumentTypeError(f"at least one worker, not {workers}")
    return workers


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a fastws app (the demo app when none is given)")
    p.add_argument("app", nargs="?", default="fastws.demo:app", help="module:attribute (default: the demo)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_arg, default=8000)
    p.add_argument("--workers", type=worker_count, default=1, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    defaults = Config()
    p.add_argument("--max-message-size", type=int, default=defaults.max_message_size)
    p.add_argument("--ping-interval", type=float, default=defaults.ping_interval,
                   help="seconds; 0 disables keepalive pings")
    p.add_argument("--ping-timeout", type=float, default=defaults.ping_timeout,
                   help="seconds to wait for any byte after a ping before closing (1011); 0: no limit")
    p.add_argument("--handshake-timeout", type=float, default=defaults.handshake_timeout)
    p.add_argument("--idle-timeout", type=float, default=0, help="seconds without a message; 0 = off")
    p.add_argument("--close-timeout", type=float, default=defaults.close_timeout,
                   help="seconds: every way out of an open connection ends TCP within this")
    p.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout,
                   help="seconds: graceful shutdown waits this long for clients to answer the 1001")
    p.add_argument("--max-connections", type=int, default=0, help="0 = no limit")
    p.add_argument("--max-pending-handshakes", type=int, default=defaults.max_pending_handshakes,
                   help="connections still in the HTTP phase per process; more get 503")
    p.add_argument("--max-send-buffer", type=int, default=defaults.max_send_buffer)
    p.add_argument("--send-budget", type=int, default=defaults.send_budget,
                   help="bytes all slow peers of a process may leave unread; past it the biggest go (1013)")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help="messages queued for async code per connection before reading pauses")
    p.add_argument("--max-queue-bytes", type=int, default=defaults.max_queue_bytes)
    p.add_argument("--allowed-origin", action="append", dest="allowed_origins", metavar="ORIGIN")
    p.add_argument("--subprotocol", action="append", dest="subprotocols", default=[], metavar="NAME")
    p.add_argument("--compression", action="store_true", help="offer permessage-deflate")
    p.add_argument("--compression-context-takeover", action="store_true",
                   help="keep each connection's compression context (better ratio, ~64 KiB per connection)")
    p.add_argument("--compression-level", type=int, choices=range(1, 10), metavar="1-9",
                   help="zlib level of the server's compressor (default: 1 without context takeover, 6 with)")
    p.add_argument("--malloc-trim-threshold", type=int, default=defaults.malloc_trim_threshold, metavar="BYTES",
                   help="free heap glibc may keep for big messages instead of returning it at once; 0: glibc's own")
    p.add_argument("--transport", default=defaults.transport, choices=["uvloop", "aiofastnet"],
                   help="socket transports under the uvloop loop")
    p.add_argument("--redis", metavar="URL", help="fan rooms/broadcast out to other nodes via Redis pub/sub")
    p.add_argument("--trusted-proxy", action="append", dest="trusted_proxies", default=[], metavar="ADDR",
                   help="address or network whose X-Forwarded-For / Forwarded / PROXY header is believed")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="trusted proxies start every connection with a PROXY v1/v2 header (HAProxy send-proxy)")
    p.add_argument("--max-connections-per-ip", type=int, default=0,
                   help="WebSocket connections per client address (after trusted proxies); more get 429")
    p.add_argument("--keepalive-timeout", type=float, default=defaults.keepalive_timeout,
                   help="seconds an HTTP connection may idle between plain requests")
    p.add_argument("--certfile", help="serve TLS (https://, wss://) with this PEM certificate chain")
    p.add_argument("--keyfile", help="the certificate's private key (PEM; default: in --certfile)")
    p.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS, help="json: one JSON object per line")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="one line per WebSocket connection and per refused upgrade (logger fastws.access); "
                        "off by default: a line costs half as much again as a handshake")


def serve_command(args: argparse.Namespace) -> int:
    configure(args.log_level, args.log_format, access_log=args.access_log)
    app = load_app(args.app)
    try:
        config = make_config(args)
    except ValueError as exc:
        raise SystemExit(f"fastws: {exc}") from None
    context = None
    if args.keyfile and not args.certfile:
        raise SystemExit("fastws: --keyfile needs --certfile")
    if args.certfile:
        try:
            context = tls_context(args.certfile, args.keyfile)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise SystemExit(f"fastws: cannot load the TLS certificate {args.certfile}: {exc}") from None
    if args.redis:
        from fastws.backplane.redis import RedisBackplane

        RedisBackplane(app.hub, args.redis)
    try:
        return run(app, args.host, args.port, workers=args.workers, config=config, ssl=context)
    except OSError as exc:
        raise SystemExit(f"fastws: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None


def make_config(args: argparse.Namespace) -> Config:
    """The Config that ``fastws serve``'s options describe (ValueError names a bad one)."""
    return Config(
        max_message_size=args.max_message_size,
        ping_interval=args.ping_interval or None,
        ping_timeout=args.ping_timeout or None,
        close_timeout=args.close_timeout,
        drain_timeout=args.drain_timeout,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout or None,
        max_connections=args.max_connections,
        max_pending_handshakes=args.max_pending_handshakes,
        max_send_buffer=args.max_send_buffer,
        send_budget=args.send_budget,
        max_queue=args.max_queue,
        max_queue_bytes=args.max_queue_bytes,
        allowed_origins=args.allowed_origins,
        subprotocols=args.subprotocols,
        compression=args.compression,
        compression_no_context_takeover=not args.compression_context_takeover,
        compression_level=args.compression_level,
        trusted_proxies=args.trusted_proxies,
        proxy_protocol=args.proxy_protocol,
        max_connections_per_ip=args.max_connections_per_ip,
        keepalive_timeout=args.keepalive_timeout,
        transport=args.transport,
        malloc_trim_threshold=args.malloc_trim_threshold,
        access_log=args.access_log,
        metrics=args.metrics,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastws", description="fastws WebSocket server and load tools")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    from fastws.bench.cli import add_bench_parser  # its optional deps (rich, matplotlib) load lazily

    add_bench_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args)) if hasattr(args, "func") else serve_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
