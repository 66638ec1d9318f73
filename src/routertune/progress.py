"""Progress of the long parts of a job: a tqdm bar with a count on the terminal, and the same counts as events
for whoever listens.

A part that runs longer than a few seconds opens a `bar(part, total)` and advances it as it goes; every advance
is also an `Event` sent to the listeners of the current context (`listening`). The demo's test listens and
checks that every stage and every part of the trade-off reported a count, so a part that goes silent (its bar
removed, or work moved outside it) fails a test instead of leaving a user staring at a frozen terminal.
Listeners live in a context variable: nothing global, and a job that nobody listens to pays only the bar.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    stage: str  # the demo's stage while one runs (train, generate, tradeoff, bench, report), else ""
    part: str  # what is counted, e.g. "KL lambada", "accuracy piqa", "importance fit"
    done: int  # units finished so far
    total: int | None  # units in all, when known
    seconds: float  # since the part began


Listener = Callable[[Event], None]
_listeners: contextvars.ContextVar[tuple[Listener, ...]] = contextvars.ContextVar("routertune_progress", default=())
_stage: contextvars.ContextVar[str] = contextvars.ContextVar("routertune_stage", default="")


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every progress event of the code run inside to `listener` as well."""
    token = _listeners.set(_listeners.get() + (listener,))
    try:
        yield
    finally:
        _listeners.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Tag the events of the code run inside with a stage name."""
    token = _stage.set(name)
    try:
        yield
    finally:
        _stage.reset(token)


def set_stage(name: str) -> None:
    """Tag the events from here on with a stage name, in the current context ("" ends the tagging)."""
    _stage.set(name)


class Bar:
    """A tqdm bar that also reports each advance as an Event. `show=False` reports without drawing (for a part
    whose bar another module draws)."""

    def __init__(self, part: str, total: int | None, unit: str = "it", show: bool = True):
        from tqdm.auto import tqdm

        self.part, self.total, self.done = part, total, 0
        self.started = time.perf_counter()
        self._bar = tqdm(total=total, desc=part, unit=unit, disable=not show, dynamic_ncols=True)
        self._emit()  # a part that starts is visible before its first unit finishes

    def _emit(self) -> None:
        event = Event(_stage.get(), self.part, self.done, self.total, time.perf_counter() - self.started)
        for listener in _listeners.get():
            listener(event)

    def update(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        self._emit()

    def grow(self, n: int) -> None:
        """More units than first planned (e.g. settings added after the first pass)."""
        self.total = (self.total or 0) + n
        self._bar.total = self.total
        self._bar.refresh()

    def note(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(part: str, total: int | None, unit: str = "it", show: bool = True) -> Bar:
    return Bar(part, total, unit, show)
