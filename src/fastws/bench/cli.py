"""`fastws bench MODE URL [options]` and `fastws bench plot FILE.json... -o chart.png`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from fastws.bench.common import (
    CLIENT_BOUND_WARNING,
    SCHEMA_VERSION,
    BenchError,
    environment,
    find_server_pids,
    format_size,
    parse_cpus,
    parse_size,
    parse_target,
    write_json,
)

MODE_HELP = {
    "throughput": "C connections x D messages of S bytes in flight against an echo endpoint: msgs/s, MB/s",
    "latency": "round trips with one message in flight: p50/p90/p99/p99.9/max",
    "connections": "ramp to N idle connections over several processes; memory per connection, failures",
    "broadcast": "N subscribers on a fan-out endpoint (the demo's /feed), one publisher: delivery latency",
    "handshake": "connect + upgrade + close rate",
}
DEFAULTS = {  # connections, duration
    "throughput": (1, 10.0),
    "latency": (1, 10.0),
    "connections": (1000, 10.0),
    "broadcast": (100, 10.0),
    "handshake": (16, 10.0),
}
# Parameters that describe a run (copied into the JSON file).
PARAM_KEYS = (
    "client_transport",
    "connections",
    "inflight",
    "size",
    "text",
    "duration",
    "warmup",
    "count",
    "processes",
    "pin",
    "raw",
    "compression",
    "source_addresses",
    "concurrency",
    "rate",
    "server_pid",
    "server_pid_detected",
    "ramp_timeout",
)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type) -> Any:
    def conv(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text}")
        return value

    return conv


def _add_common(p: argparse.ArgumentParser, mode: str) -> None:
    conns, duration = DEFAULTS[mode]
    p.add_argument("url", help="ws://host:port/path (with --raw: tcp://host:port)")
    what = {
        "connections": "connections to open and hold",
        "broadcast": "subscribers",
        "handshake": "concurrent connect/close loops",
    }.get(mode, "connections")
    p.add_argument(
        "-c",
        "--connections",
        type=_positive(int),
        default=conns,
        metavar="N",
        help=f"{what} (default {conns})",
    )
    p.add_argument(
        "-d",
        "--duration",
        type=_positive(float),
        default=duration,
        metavar="SECONDS",
        help=f"{'hold time' if mode == 'connections' else 'measured time'} (default {duration:g})",
    )
    p.add_argument(
        "-n",
        "--count",
        type=_positive(int),
        default=0,
        metavar="N",
        help="stop after this many messages / round trips / handshakes (0: duration only)",
    )
    if mode in ("throughput", "latency", "broadcast"):
        p.add_argument(
            "-s",
            "--size",
            type=_size,
            default=64 if mode != "broadcast" else 128,
            metavar="BYTES",
            help="message size: 64, 1K, 64KiB, 1M (default %(default)s)",
        )
    if mode in ("throughput", "latency"):
        p.add_argument("--text", action="store_true", help="send text messages (default: binary)")
        p.add_argument(
            "-w",
            "--warmup",
            type=_positive(float),
            default=1.0,
            metavar="SECONDS",
            help="unmeasured time before the measurement (default 1)",
        )
        p.add_argument(
            "--compression",
            action="store_true",
            help="offer permessage-deflate, require it and send the message compressed",
        )
        p.add_argument(
            "--message-file",
            metavar="FILE",
            help="send FILE's contents as the message (its size replaces --size; --text: UTF-8 text)",
        )
    if mode == "throughput":
        p.add_argument(
            "-i",
            "--inflight",
            type=_positive(int),
            default=16,
            metavar="D",
            help="messages in flight per connection (default 16)",
        )
    if mode in ("throughput", "latency", "connections"):
        p.add_argument(
            "--raw",
            action="store_true",
            help="plain TCP echo (no upgrade, no framing): the same byte streams, as the physical limit",
        )
    p.add_argument(
        "-p",
        "--procs",
        "--processes",
        dest="processes",
        type=_positive(int),
        default=0,
        metavar="P",
        help="client processes (default: "
        + (
            "enough to keep each under the open-file limit"
            if mode in ("connections", "broadcast")
            else "one per --pin CPU, else half of this machine's CPUs"
        )
        + ")",
    )
    p.add_argument(
        "--pin",
        metavar="CPUS",
        help="pin the client processes to these CPUs, one each in turn (taskset style: 1, 1-3, 0,2)",
    )
    p.add_argument(
        "--source-addresses",
        type=_positive(int),
        default=0 if mode != "throughput" else 0,
        metavar="K",
        help="spread connections over K loopback source addresses 127.0.0.2... (loopback servers only;"
        " default: auto for connections/broadcast, none otherwise)",
    )
    p.add_argument(
        "--open-timeout",
        type=_positive(float),
        default=10.0,
        metavar="SECONDS",
        help="TCP connect + upgrade timeout (default 10)",
    )
    p.add_argument(
        "--client-transport",
        choices=("native", "uvloop", "aiofastnet"),
        default="native",
        help="native (default): the Cython client engine on its own sockets; uvloop / aiofastnet: the "
        "previous client (fastws.client, a Python call per message) on those transports",
    )
    p.add_argument("--json", metavar="FILE", help="save parameters, results and machine facts as JSON")
    p.add_argument("--label", help="name of this run in the JSON file and in plots (default: the URL)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--server-pid",
        type=int,
        action="append",
        metavar="PID",
        help="server process to watch (repeatable; its children count too): CPU use"
        + (", memory per connection" if mode == "connections" else "")
        + " (default: the process listening on the URL's port, when that is on this machine)",
    )
    if mode in ("connections", "broadcast"):
        p.add_argument(
            "--concurrency",
            type=_positive(int),
            default=100,
            metavar="K",
            help="handshakes in progress at once, over all processes (default 100)",
        )
    if mode == "connections":
        p.add_argument(
            "--no-verify",
            dest="verify",
            action="store_false",
            help="skip the end check that every held connection still echoes (default: check; "
            "against an echo endpoint)",
        )
        p.add_argument(
            "--rate",
            type=_positive(float),
            default=0.0,
            metavar="PER_S",
            help="pace the ramp at this many connections/s (default: as fast as possible)",
        )
        p.add_argument(
            "--ramp-timeout",
            type=_positive(float),
            default=0.0,
            metavar="SECONDS",
            help="give up opening more after this long (default: 120, or 1 s per 1,000 connections)",
        )
    if mode in ("connections", "handshake"):
        p.add_argument(
            "--max-failures",
            type=_positive(int),
            default=1000,
            metavar="N",
            help="stop after this many failed attempts per process (default 1000)",
        )
    if mode == "broadcast":
        p.add_argument(
            "--rate",
            type=_positive(float),
            default=100.0,
            metavar="PER_S",
            help="messages published per second (default 100; 0: as fast as possible)",
        )
        p.add_argument(
            "--grace",
            type=_positive(float),
            default=5.0,
            metavar="SECONDS",
            help="wait this long after publishing for late deliveries (default 5)",
        )
        p.add_argument(
            "--settle",
            type=_positive(float),
            default=0.3,
            metavar="SECONDS",
            help="pause between the last subscriber joining and the first message (default 0.3)",
        )


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = subparsers.add_parser(
        "bench",
        help="load-test any ws:// server: throughput, latency, connections, broadcast, handshake",
        description="Load tools for any WebSocket server; results as a table and, with --json, a file "
        "that `fastws bench plot` draws.",
    )
    modes = bench.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, text in MODE_HELP.items():
        p = modes.add_parser(mode, help=text, description=text)
        _add_common(p, mode)
        p.set_defaults(func=bench_command)
    plot = modes.add_parser(
        "plot",
        help="draw saved --json results into a PNG",
        description="Draw results saved with --json (one panel per mode).",
    )
    plot.add_argument("files", nargs="+", metavar="FILE.json")
    plot.add_argument("-o", "--output", default="bench.png", help="image file (default bench.png)")
    plot.add_argument("--title")
    plot.set_defaults(func=plot_command)
    return bench


def load_message_file(args: argparse.Namespace) -> str:
    """--message-file: the message's bytes into args.message, its length into args.size; an error or ''."""
    path = getattr(args, "message_file", None)
    args.message = None
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            message = f.read()
    except OSError as exc:
        return f"--message-file: cannot read {path}: {exc.strerror}"
    if not message:
        return f"--message-file: {path} is empty"
    if args.text:
        try:
            message.decode()
        except UnicodeDecodeError as exc:
            return f"--message-file: {path} is not UTF-8 text (byte {exc.start}), which --text sends"
    args.message, args.size = message, len(message)
    return ""


def bench_command(args: argparse.Namespace) -> int:
    from fastws.bench.ui import UI

    ui = UI(quiet=args.quiet)
    module = importlib.import_module(f"fastws.bench.{args.mode}")
    for name in ("size", "text", "warmup", "inflight", "raw", "compression"):
        if not hasattr(args, name):
            setattr(args, name, {"size": 0, "warmup": 0.0, "inflight": 1}.get(name, False))
    if args.raw and args.compression:
        print("fastws bench: --raw and --compression exclude each other", file=sys.stderr)
        return 2
    error = load_message_file(args)
    if error:
        print(f"fastws bench {args.mode}: {error}", file=sys.stderr)
        return 2
    try:
        from fastws.bench.clients import set_transport

        prepare(args)
        set_transport("uvloop" if args.client_transport == "native" else args.client_transport)
        results = module.run(args, ui)
    except (BenchError, ImportError) as exc:
        ui.stop()
        print(f"fastws bench {args.mode}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        ui.stop()
        print("interrupted", file=sys.stderr)
        return 130
    params = {k: getattr(args, k) for k in PARAM_KEYS if hasattr(args, k)}
    label = args.label or (f"raw {args.url}" if args.raw else args.url)
    title = f"{args.mode} — {label}"
    if args.mode in ("throughput", "latency", "broadcast"):
        title += f" — {format_size(args.size)}"
    if args.mode == "throughput":
        title += f", {args.connections} conn x {args.inflight} in flight"
    ui.table(title, module.summary(results, params))
    if results.get("client_bound"):
        ui.warn(CLIENT_BOUND_WARNING)
    if args.json:
        doc = {
            "tool": "fastws bench",
            "schema": SCHEMA_VERSION,
            "mode": args.mode,
            "label": label,
            "url": args.url,
            "params": params,
            "results": results,
            "meta": environment(("picows", "aiofastnet", "websockets")),
        }
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        write_json(args.json, doc)
        if not args.quiet:
            ui.note(f"saved {args.json}")
    return 0


def prepare(args: argparse.Namespace) -> None:
    """Client CPUs (--pin), the default number of client processes, and the server's PIDs when the user gave
    none and the server is on this machine (so its CPU is shown beside the client's)."""
    args.pin_cpus = parse_cpus(args.pin) if args.pin else None
    if args.pin_cpus:
        try:
            os.sched_setaffinity(0, set(args.pin_cpus))  # the coordinating parent stays off the server's CPUs too
        except OSError as exc:
            raise BenchError(f"cannot pin to CPUs {args.pin}: {exc}") from None
    if not args.processes and args.mode in ("throughput", "latency", "handshake"):
        cpus = len(args.pin_cpus) if args.pin_cpus else max(1, len(os.sched_getaffinity(0)) // 2)
        args.processes = max(1, min(cpus, args.connections or 1))
    args.server_pid_detected = False
    if not args.server_pid:
        target = parse_target(args.url, args.raw)
        if target.loopback:
            pids = find_server_pids(target.port)
            if pids:
                args.server_pid = pids
                args.server_pid_detected = True


def plot_command(args: argparse.Namespace) -> int:
    try:
        from fastws.bench.plot import plot
    except ImportError as exc:  # pragma: no cover
        print(f"fastws bench plot needs matplotlib (pip install 'fastws[bench]'): {exc}", file=sys.stderr)
        return 2
    try:
        out = plot(args.files, args.output, args.title)
    except ImportError as exc:
        print(f"fastws bench plot needs matplotlib (pip install 'fastws[bench]'): {exc}", file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"fastws bench plot: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
