"""Runs a recipe in a worker thread and turns the engine's events into Qt signals on the GUI thread.

The worker hands every event to a relay object; the relay's signal reaches the controller through a queued
connection, so the controller's public signals are always emitted on the GUI thread, in the engine's order.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, QRunnable, Qt, QThreadPool, Signal, Slot

from studio.core import events as ev
from studio.gui.collector import collect_in_gui_thread

if TYPE_CHECKING:  # the runner (and torch) load with the first run, so the window opens fast
    from studio.core.evaluation.perplexity import PerplexityConfig
    from studio.core.loading import LoadedModel
    from studio.core.recipe import Recipe
    from studio.core.runner import RunResult

log = logging.getLogger(__name__)


class Relay(QObject):
    """Carries a worker's items to the GUI thread (a run's: run id, monotonic time, event or RunResult)."""

    item = Signal(object)


class _RunTask(QRunnable):
    def __init__(self, run_id: int, relay: Relay, recipe, loaded, eval_config, token: ev.CancelToken):
        super().__init__()
        self.run_id, self.relay, self.token = run_id, relay, token
        self.recipe, self.loaded, self.eval_config = recipe, loaded, eval_config

    def _send(self, payload: Any) -> None:
        self.relay.item.emit((self.run_id, time.monotonic(), payload))

    def run(self) -> None:
        from studio.core.runner import RunResult, run_recipe
        from studio.gui.tasks import lower_worker_priority

        lower_worker_priority()
        try:
            result = run_recipe(
                self.recipe, self.loaded, events=self._send, cancel=self.token, eval_config=self.eval_config
            )
        except Exception as exc:  # run_recipe returns failures; this guards the rest (bad arguments, relay)
            log.debug("run crashed outside the runner:\n%s", traceback.format_exc())
            result = RunResult("failed", None, {}, f"The run could not start: {type(exc).__name__}: {exc}")
        finally:
            self.recipe = self.loaded = None  # the worker must not keep the model alive
        self._send(result)


@dataclass
class _Timing:
    """What time_left() needs, recorded as events arrive (times are the worker's, not the delivery's)."""

    steps: int = 0
    steps_started: int = 0
    step_began: float | None = None
    done: int = 0
    total: int = 0
    last_progress: float = 0.0
    finished_seconds: list[float] = field(default_factory=list)


class RunController(QObject):
    """Starts, cancels and reports one run at a time.

    `running` is already False when finished/failed/cancelled arrive, so their slots may start the next run.
    """

    started = Signal(int)
    step_started = Signal(int, str, int)
    progress = Signal(int, int, int, str)
    evaluating = Signal(int, int, int)  # step index (-1: the original), windows done, windows total
    metric = Signal(object)
    warning = Signal(str)
    step_finished = Signal(int, dict)
    finished = Signal(object)
    failed = Signal(str)
    cancelled = Signal()
    ended = Signal(object)  # the RunResult of every run that ends, whatever its status, before the three above
    running_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._run_id = 0
        self._running = False
        self._token: ev.CancelToken | None = None
        self._relay = Relay()  # one for the controller's life: a worker may still be inside emit() at a run's end
        self._relay.item.connect(self._on_item, Qt.ConnectionType.QueuedConnection)
        self._task: _RunTask | None = None
        self._timing = _Timing()

    @property
    def running(self) -> bool:
        return self._running

    def start(self, recipe: Recipe, loaded: LoadedModel, eval_config: PerplexityConfig | None = None) -> None:
        if self._running:
            raise RuntimeError("A run is already going; cancel it or wait for it to end before starting another.")
        self._run_id += 1
        self._token = ev.CancelToken()
        self._task = _RunTask(self._run_id, self._relay, recipe, loaded, eval_config, self._token)
        self._timing = _Timing()
        self._set_running(True)
        collect_in_gui_thread()
        self._pool.start(self._task)

    def cancel(self) -> None:
        """Ask the run to stop; it does at its next block (or evaluation window) and emits `cancelled`."""
        if self._running and self._token is not None:
            self._token.cancel()

    def wait(self, msecs: int = -1) -> bool:
        """Block until the worker thread is idle (for closing the window); True if it is."""
        return self._pool.waitForDone(msecs)

    def time_left(self) -> float | None:
        """Seconds left, from the current step's rate per block and the steps still to come; None until known."""
        t = self._timing
        if not self._running or t.step_began is None:
            return None
        now = time.monotonic()
        per_step = sum(t.finished_seconds) / len(t.finished_seconds) if t.finished_seconds else None
        if t.done > 0 and t.total > 0:
            per_block = (t.last_progress - t.step_began) / t.done
            current = max(per_block * (t.total - t.done) - (now - t.last_progress), 0.0)
            per_step = per_step if per_step is not None else per_block * t.total
        elif per_step is not None:
            current = max(per_step - (now - t.step_began), 0.0)
        else:
            return None
        return current + max(t.steps - t.steps_started, 0) * per_step

    def _set_running(self, running: bool) -> None:
        if running != self._running:
            self._running = running
            self.running_changed.emit(running)

    @Slot(object)
    def _on_item(self, item: tuple[int, float, Any]) -> None:
        run_id, at, payload = item
        from studio.core.runner import RunResult

        if run_id != self._run_id:
            return  # a late item of a run that has already ended
        try:
            if isinstance(payload, RunResult):
                self._end(payload)
            else:
                self._dispatch(payload, at)
        except Exception:  # a failing slot must not take the run's bookkeeping down with it
            log.exception("error while handling run event %r", payload)

    def _dispatch(self, event: ev.Event, at: float) -> None:
        t = self._timing
        if isinstance(event, ev.RunStarted):
            t.steps = event.steps
            self.started.emit(event.steps)
        elif isinstance(event, ev.StepStarted):
            t.steps_started += 1
            t.step_began, t.done, t.total = at, 0, 0
            self.step_started.emit(event.index, event.method, event.total_steps)
        elif isinstance(event, ev.Progress) and event.unit == "window":
            self.evaluating.emit(event.index, event.done, event.total)
        elif isinstance(event, ev.Progress):
            t.done, t.total, t.last_progress = event.done, event.total, at
            self.progress.emit(event.index, event.done, event.total, event.message)
        elif isinstance(event, ev.Metric):
            self.metric.emit(event)
        elif isinstance(event, ev.Warning):
            self.warning.emit(event.message)
        elif isinstance(event, ev.StepFinished):
            if t.step_began is not None:
                t.finished_seconds.append(at - t.step_began)
            self.step_finished.emit(event.index, event.report)
        # RunFinished / RunFailed / RunCancelled are reported from the RunResult that follows them

    def _end(self, result: RunResult) -> None:
        self._token = self._task = None
        self._set_running(False)
        self.ended.emit(result)
        if result.status == "finished":
            self.finished.emit(result)
        elif result.status == "cancelled":
            self.cancelled.emit()
        else:
            self.failed.emit(result.error or "The run failed.")
