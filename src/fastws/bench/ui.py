"""Terminal output of `fastws bench`: progress while it runs, a table at the end (rich when installed)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from typing import Any

try:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
except ImportError:  # pragma: no cover - the [bench] extra brings rich
    Console = None  # type: ignore[assignment,misc]


_VALUE_UNIT = re.compile(r"^([-+\d.,]+(?: (?:/|\+|of) [-+\d.,]+)*) ([^\d\s]{1,6})$")


class UI:
    """Progress and summaries; ``quiet`` keeps only the summary table."""

    def __init__(self, quiet: bool = False, min_progress_seconds: float = 2.0) -> None:
        self.quiet = quiet
        self.min_progress_seconds = min_progress_seconds
        self.console = Console(stderr=False, highlight=False) if Console is not None else None
        self._progress: Any = None
        self._task: Any = None
        self._last = 0.0

    # -- progress ---------------------------------------------------------------

    def start(self, description: str, total: float, expected_seconds: float | None = None) -> None:
        """Show a progress bar over ``total`` units (seconds, connections...) unless quiet or a short run."""
        self.stop()
        if self.quiet or self.console is None:
            return
        if expected_seconds is not None and expected_seconds < self.min_progress_seconds:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self._progress.add_task(description, total=total or None, info="")
        self._progress.start()

    def update(
        self, completed: float, info: str = "", description: str | None = None, total: float | None = None
    ) -> None:
        if self._progress is None:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        kw: dict[str, Any] = {"completed": completed, "info": info}
        if description is not None:
            kw["description"] = description
        if total is not None:
            kw["total"] = total
        self._progress.update(self._task, **kw)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- messages ------------------------------------------------------------------

    def note(self, text: str) -> None:
        if self.quiet:
            return
        if self.console is not None:
            self.console.print(text)
        else:
            print(text)

    def warn(self, text: str) -> None:
        if self.console is not None:
            self.console.print(f"[yellow]warning:[/] {text}")
        else:
            print(f"warning: {text}", file=sys.stderr)

    def table(self, title: str, rows: Sequence[tuple[str, Any]]) -> None:
        """A two-column summary (printed even when quiet)."""
        self.stop()
        if self.console is None:
            print(title)
            for k, v in rows:
                print(f"  {k:<28} {v}")
            return
        self.console.print(f"[bold]{title}[/]")
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_column()
        for k, v in rows:
            m = _VALUE_UNIT.match(str(v))
            table.add_row(k, *(m.groups() if m else (str(v), "")))
        self.console.print(table)


def num(x: float, digits: int = 0) -> str:
    """1234567.8 -> '1,234,568'."""
    return f"{x:,.{digits}f}"
