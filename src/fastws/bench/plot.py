"""`fastws bench plot FILE.json... -o chart.png`: charts of saved results for a person to look at.

One panel per mode found in the files: throughput (grouped bars, one group
per workload, one bar per label), latency percentiles, connection ramp
(open connections over time, memory per connection in the legend),
broadcast latency, handshake rate.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from fastws.bench.common import BenchError, format_size

_COLORS: dict[str, str] = {}  # one colour per label, the same in every panel


def _color(label: str) -> str:
    base = label.split(" (")[0]
    if base not in _COLORS:
        _COLORS[base] = f"C{len(_COLORS) % 10}"
    return _COLORS[base]


PERCENTILES = (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99.9", "p99_9"), ("max", "max"))


def load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or "mode" not in data or "results" not in data:
        raise BenchError(f"{path} is not a `fastws bench --json` file")
    data.setdefault("label", os.path.splitext(os.path.basename(path))[0])
    return data


def _workload(d: dict[str, Any]) -> str:
    p = d.get("params", {})
    parts = [format_size(p.get("size", 0)), f"{p.get('connections', 1)} conn"]
    if p.get("inflight", 1) != 1:
        parts.append(f"x{p['inflight']}")
    return " ".join(parts)


def _grouped_bars(
    ax: Any, groups: list[str], labels: list[str], value: dict[tuple[str, str], float], log: bool = False
) -> None:
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        xs, ys = [], []
        for i, g in enumerate(groups):
            if (g, label) in value:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(value[(g, label)])
        bars = ax.bar(xs, ys, width, label=label, color=_color(label))
        if len(labels) * len(groups) <= 24:
            ax.bar_label(bars, labels=[_short(y) for y in ys], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.25)
    ax.grid(axis="y", alpha=0.3)
    if len(labels) > 1:
        ax.legend(fontsize=7)


def _short(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.3g}"


def _throughput(ax: Any, runs: list[dict[str, Any]]) -> None:
    groups = list(dict.fromkeys(_workload(d) for d in runs))
    labels = list(dict.fromkeys(d["label"] for d in runs))
    values = {(_workload(d), d["label"]): d["results"]["msgs_per_s"] for d in runs}
    _grouped_bars(ax, groups, labels, values, log=len(groups) > 1)
    ax.set_title("Echo throughput")
    ax.set_ylabel("messages / s")


def _latency(ax: Any, runs: list[dict[str, Any]]) -> None:
    labels = [
        f"{d['label']} ({_workload(d)})" if len({_workload(r) for r in runs}) > 1 else d["label"]
        for d in runs
    ]
    groups = [name for name, _ in PERCENTILES]
    values = {}
    for label, d in zip(labels, runs, strict=True):
        for name, key in PERCENTILES:
            values[(name, label)] = d["results"]["latency_us"][key]
    _grouped_bars(ax, groups, list(dict.fromkeys(labels)), values, log=True)
    ax.set_title("Round-trip latency (one message in flight)")
    ax.set_ylabel("µs")


def _connections(ax: Any, runs: list[dict[str, Any]]) -> None:
    for d in runs:
        res = d["results"]
        ramp = res.get("ramp") or [[0, 0], [res.get("ramp_seconds", 0), res.get("opened", 0)]]
        label = d["label"]
        per = res.get("server", {}).get("bytes_per_connection")
        if per is not None:
            label += f" ({per:,.0f} B/conn)"
        label += f", {res.get('handshakes_per_s', 0):,.0f} conn/s"
        ax.plot([t for t, _ in ramp], [n for _, n in ramp], marker=".", label=label, color=_color(d["label"]))
    ax.set_title("Connection ramp")
    ax.set_xlabel("seconds")
    ax.set_ylabel("open connections")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _broadcast(ax: Any, runs: list[dict[str, Any]]) -> None:
    groups = ["delivery p50", "delivery p99", "delivery max", "all p50", "all p99", "all max"]
    values = {}
    labels = []
    for d in runs:
        r = d["results"]
        label = f"{d['label']} ({r['subscribers']} subs)"
        labels.append(label)
        for g, src, key in (
            ("delivery p50", "latency_us", "p50"),
            ("delivery p99", "latency_us", "p99"),
            ("delivery max", "latency_us", "max"),
            ("all p50", "fanout_us", "p50"),
            ("all p99", "fanout_us", "p99"),
            ("all max", "fanout_us", "max"),
        ):
            values[(g, label)] = max(r[src][key], 0.001)
    _grouped_bars(ax, groups, list(dict.fromkeys(labels)), values, log=True)
    ax.set_title("Broadcast: publish -> subscriber" + (f" — {labels[0]}" if len(set(labels)) == 1 else ""))
    ax.set_ylabel("µs")


def _handshake(ax: Any, runs: list[dict[str, Any]]) -> None:
    labels = list(dict.fromkeys(d["label"] for d in runs))
    values = {("handshakes/s", d["label"]): d["results"]["handshakes_per_s"] for d in runs}
    _grouped_bars(ax, ["handshakes/s"], labels, values)
    ax.set_title("Connect + upgrade + close")
    ax.set_ylabel("per second")


PANELS = {
    "throughput": _throughput,
    "latency": _latency,
    "connections": _connections,
    "broadcast": _broadcast,
    "handshake": _handshake,
}


def plot(files: Sequence[str], output: str, title: str | None = None) -> str:
    """Draw every result in ``files`` into one PNG (or any format matplotlib knows from the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load(f) for f in files]
    _COLORS.clear()
    for d in runs:
        _color(d["label"])
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for d in runs:
        by_mode.setdefault(d["mode"], []).append(d)
    modes = [m for m in PANELS if m in by_mode]
    if not modes:
        raise BenchError("no plottable results in the given files")
    cols = 1 if len(modes) == 1 else 2
    rows = math.ceil(len(modes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.8 * rows), squeeze=False)
    for ax, mode in zip(axes.flat, modes):  # noqa: B905 - more axes than modes
        PANELS[mode](ax, by_mode[mode])
    for ax in list(axes.flat)[len(modes) :]:
        ax.set_visible(False)
    meta = runs[0].get("meta", {})
    fig.suptitle(title or f"fastws bench — {meta.get('cpu', '')}, {meta.get('python', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
