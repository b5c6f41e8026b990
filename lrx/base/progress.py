"""A progress bar for training loops (rich), silent when asked to be or off rank 0.

    with progress(len(batches), "epoch 3/20", quiet) as bar:
        for x, y in batches:
            ...
            bar.advance(loss=loss_value)   # fields shown after the bar
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lrx.base import distributed

__all__ = ["T", "Bar", "progress", "track"]

T = TypeVar("T")


class Bar:
    """One task of a rich progress display; every method is a no-op when silent."""

    def __init__(self, progress, task):
        self._progress, self._task = progress, task

    def advance(self, steps: int = 1, **fields: float) -> None:
        """Move ``steps`` forward; ``fields`` (e.g. ``loss=0.31, acc=87.5``) replace the shown values."""
        if self._progress is None:
            return
        if fields:
            self._progress.update(self._task, advance=steps, info=_format(fields))
        else:
            self._progress.advance(self._task, steps)

    def show(self, **fields: float) -> None:
        """Replace the shown fields without moving."""
        if self._progress is not None:
            self._progress.update(self._task, info=_format(fields))

    def wrap(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable``, advancing one step per item."""
        for item in iterable:
            yield item
            self.advance()


def _format(fields: dict) -> str:
    parts = []
    for key, value in fields.items():
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


@contextmanager
def progress(total: int | None, description: str, quiet: bool = False) -> Iterator[Bar]:
    """A progress bar of ``total`` steps on stderr, removed when done.

    Silent (a :class:`Bar` whose methods do nothing) when ``quiet`` is true or this is not rank 0.
    """
    if quiet or not distributed.is_main():
        yield Bar(None, None)
        return
    console = Console(stderr=True)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("<"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    # transient: only the log lines stay on screen; disabled where stderr is not a terminal (logs, CI).
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total, info="")
        yield Bar(bar, task)


def track(iterable: Iterable[T], total: int | None, description: str, quiet: bool = False) -> Iterator[T]:
    """Iterate over ``iterable`` with a progress bar (see :func:`progress`)."""
    with progress(total, description, quiet) as bar:
        yield from bar.wrap(iterable)
