"""Progress on stderr (rich), so that stdout stays machine-readable."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


@contextlib.contextmanager
def progress_bar(label: str, unit: str = ""):
    """Yields update(done, total)."""
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=_console, transient=False,
                  disable=not sys.stderr.isatty()) as p:
        task = p.add_task(label, total=None)

        def update(done: int, total: int):
            p.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def status(initial: str = "starting"):
    """Yields say(text): a one-line spinner for work of unknown length."""
    if not sys.stderr.isatty():
        yield lambda text: None
        return
    with _console.status(initial) as s:
        yield lambda text: s.update(text)
