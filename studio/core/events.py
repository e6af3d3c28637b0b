"""Typed events a run reports through one callback, and the token that cancels it.

The runner knows nothing of Qt or terminals: the GUI worker turns events into queued signals, the CLI into
progress bars. Progress is throttled at the source by the callers (one event per decoder block)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from studio.core.errors import Cancelled


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class RunStarted(Event):
    steps: int


@dataclass(frozen=True)
class StepStarted(Event):
    index: int  # 0-based position in the recipe (disabled steps count)
    method: str
    total_steps: int  # steps this run executes
    ordinal: int = 0  # 0-based position among the steps this run executes: "step ordinal+1 of total_steps"


@dataclass(frozen=True)
class Progress(Event):
    index: int  # the step; -1 while evaluating the original
    done: int  # units finished
    total: int
    unit: str = "block"  # "block" while compressing, "window" while evaluating
    message: str = ""


@dataclass(frozen=True)
class Metric(Event):
    name: str  # e.g. "layer_error", "perplexity", "rss_bytes"
    value: float
    index: int | None = None  # step, None for the baseline
    layer: str | None = None


@dataclass(frozen=True)
class Warning(Event):  # noqa: A001 - an event type, not the builtin
    message: str
    index: int | None = None


@dataclass(frozen=True)
class StepFinished(Event):
    index: int
    report: dict[str, Any]


@dataclass(frozen=True)
class RunFinished(Event):
    report: dict[str, Any]


@dataclass(frozen=True)
class RunFailed(Event):
    error: str
    index: int | None = None


@dataclass(frozen=True)
class RunCancelled(Event):
    index: int | None = None


EventCallback = Callable[[Event], None]


def ignore(_event: Event) -> None:
    pass


@dataclass
class CancelToken:
    """Set from any thread; the run checks it at least once per decoder block."""

    _flag: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._flag.set()

    @property
    def cancelled(self) -> bool:
        return self._flag.is_set()

    def check(self) -> None:
        if self._flag.is_set():
            raise Cancelled()
