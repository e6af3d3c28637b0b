"""Runs a recipe search (studio.core.search.run_search) in a worker Task and turns its events into Qt signals on
the GUI thread, the way RunController does for a run. The events travel through a relay whose signal reaches
the controller by a queued connection, so they arrive in the engine's order and before the Task's own report."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, Qt, QThreadPool, Signal, Slot

from studio.core.events import CancelToken
from studio.gui.collector import collect_in_gui_thread
from studio.gui.run_controller import Relay
from studio.gui.tasks import Task

if TYPE_CHECKING:
    from studio.core.loading import LoadedModel
    from studio.core.search import SearchSpec

log = logging.getLogger(__name__)


class SearchController(QObject):
    """Starts, cancels and reports one search at a time; `running` is False by the time finished, cancelled or
    failed arrive."""

    started = Signal(object)  # SearchStarted: the original's evaluation is done, candidates begin
    candidate_started = Signal(object)  # CandidateStarted
    candidate_finished = Signal(object)  # CandidateFinished (finished, failed, cancelled or over budget)
    finished = Signal(object)  # SearchResult
    cancelled = Signal(object)  # SearchResult of the candidates that ended before the cancel
    failed = Signal(str)
    running_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._pool = QThreadPool(self)  # the window's load and compare tasks keep the global pool
        self._pool.setMaxThreadCount(1)
        self._number = 0
        self._running = False
        self._token: CancelToken | None = None
        self._task: Task | None = None
        self._relay = Relay()  # (search number, event)
        self._relay.item.connect(self._on_item, Qt.ConnectionType.QueuedConnection)

    @property
    def running(self) -> bool:
        return self._running

    def start(self, spec: SearchSpec, loaded: LoadedModel, executor: str = "threads", address: str | None = None,
              history: Any = None) -> None:
        """Search in a worker: `executor` threads or ray (`address`: a Ray cluster, else a local Ray); `history`
        a RunHistory for the candidates (False: none; None: the user's)."""
        if self._running:
            raise RuntimeError("A search is already going; cancel it or wait for it to end.")
        self._number += 1
        number, relay = self._number, self._relay
        token = self._token = CancelToken()

        def send(event) -> None:
            relay.item.emit((number, event))

        def search():
            from studio.core.search import make_executor, run_search

            made = make_executor(executor, address=address or None, workers=spec.batch_size)
            return run_search(spec, loaded, executor=made, events=send, cancel=token, history=history)

        task = self._task = Task(search)
        task.signals.done.connect(self._done)
        task.signals.failed.connect(self._failed)
        self._set_running(True)
        collect_in_gui_thread()
        self._pool.start(task)

    def cancel(self) -> None:
        """Stop the search: the candidates running stop at their next block, and `cancelled` follows."""
        if self._running and self._token is not None:
            self._token.cancel()

    def wait(self, msecs: int = -1) -> bool:
        """Block until the worker is idle (closing the window); True if it is."""
        return self._pool.waitForDone(msecs)

    def _set_running(self, running: bool) -> None:
        if running != self._running:
            self._running = running
            self.running_changed.emit(running)

    @Slot(object)
    def _on_item(self, item: tuple[int, Any]) -> None:
        from studio.core.search import CandidateFinished, CandidateStarted, SearchStarted

        number, event = item
        if number != self._number or not self._running:
            return  # a late event of a search that has ended
        try:
            if isinstance(event, SearchStarted):
                self.started.emit(event)
            elif isinstance(event, CandidateStarted):
                self.candidate_started.emit(event)
            elif isinstance(event, CandidateFinished):
                self.candidate_finished.emit(event)
            # SearchFinished / SearchCancelled / SearchFailed: reported from the Task's result or error
        except Exception:  # a failing slot must not take the search's bookkeeping down with it
            log.exception("error while handling search event %r", event)

    def _end(self) -> bool:
        """True when the reporting task is the current search's (bound slots: queued to the GUI thread)."""
        if self._task is None or self.sender() is not self._task.signals:
            return False
        self._token = self._task = None
        self._set_running(False)
        return True

    @Slot(object)
    def _done(self, result) -> None:
        if self._end():
            (self.cancelled if result.status == "cancelled" else self.finished).emit(result)

    @Slot(str)
    def _failed(self, message: str) -> None:
        if self._end():
            self.failed.emit(message)
