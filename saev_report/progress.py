"""Progress bars (rich) shared by every long stage: rate, ETA, and quiet when not a terminal."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

console = Console(stderr=True)


def _enabled() -> bool:
    return os.environ.get("SAEV_REPORT_PROGRESS", "1") != "0"


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not _enabled(),
        transient=False,
    )


class Bar:
    """A handle to advance one progress bar with a unit-aware rate."""

    def __init__(self, progress: Progress, task_id: int, unit: str):
        self._progress, self._task_id, self._unit = progress, task_id, unit

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task_id, n)
        task = self._progress.tasks[self._task_id]
        speed = task.speed
        self._progress.update(self._task_id, rate=f"{speed:,.0f} {self._unit}/s" if speed else "")


@contextmanager
def bar(description: str, total: float | None, unit: str = "it", completed: float = 0) -> Iterator[Bar]:
    """`with bar("record dino", total=n, unit="img") as b: b.advance(k)`."""
    progress = make_progress()
    with progress:
        task_id = progress.add_task(description, total=total, completed=completed, rate="")
        yield Bar(progress, task_id, unit)


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate with a progress bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(description, total, unit) as b:
        for item in items:
            yield item
            b.advance(1)


def log(message: str) -> None:
    """A status line on stderr (rich markup allowed; escape user text with rich.markup.escape)."""
    console.print(message, highlight=False)
