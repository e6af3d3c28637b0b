"""Slow work off the GUI thread: a QRunnable that runs one function and reports back through queued signals.

A failure never escapes the worker: a StudioError becomes its message (the user can act on it), anything
else its message with the traceback (a bug), and the window decides how to show it.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot


WORKER_NICENESS = 5  # CPU weight about a third of the GUI thread's: paints win over torch's threads


def lower_worker_priority() -> None:
    """Lower the calling worker thread's CPU priority (Linux: niceness is per thread, and the thread pools
    torch starts from this thread inherit it), so the GUI thread is scheduled first when the cores are busy.
    Elsewhere, or when not allowed, it does nothing."""
    import os
    import sys
    import threading

    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < WORKER_NICENESS:
            os.setpriority(os.PRIO_PROCESS, tid, WORKER_NICENESS)
    except OSError:
        pass


class TaskSignals(QObject):
    done = Signal(object)
    failed = Signal(str)


class Task(QRunnable):
    """Runs `work()` in the global thread pool; `signals.done(result)` or `signals.failed(message)`."""

    def __init__(self, work: Callable[[], Any]):
        super().__init__()
        self.work = work
        self.signals = TaskSignals()

    @Slot()
    def run(self) -> None:
        from studio.core.errors import StudioError

        lower_worker_priority()
        try:
            try:
                result = self.work()
            except StudioError as exc:
                self.signals.failed.emit(str(exc))
            except Exception as exc:  # the window must survive anything a worker meets
                self.signals.failed.emit(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
            else:
                self.signals.done.emit(result)
        except RuntimeError:  # the receiver (a closed window) is gone: nobody is waiting for the result
            pass
        finally:
            self.work = None

    def start(self) -> "Task":
        from studio.gui.collector import collect_in_gui_thread

        collect_in_gui_thread()
        QThreadPool.globalInstance().start(self)
        return self


def _load_and_summarize(spec: str):
    from studio.core.loading import load_model
    from studio.core.summary import summarize

    loaded = load_model(spec)
    loaded.tokenizer_or_loader = loaded.tokenizer  # loaded here, in the worker: the window needs it later
    return loaded, summarize(loaded.model)


class LoadModelTask(Task):
    """Loads `spec` (path, hub id or 'sample'); done carries (LoadedModel, ModelSummary)."""

    def __init__(self, spec: str):
        super().__init__(lambda: _load_and_summarize(spec))
        self.spec = spec


class ExportTask(Task):
    """Writes a Hugging Face folder (studio.core.export); done carries the folder's path."""

    def __init__(self, model, tokenizer, out: str, recipe=None, report=None, force: bool = False):
        from studio.core.export import export_hf_folder

        super().__init__(
            lambda: export_hf_folder(model, tokenizer, out, recipe=recipe, report=report, force=force)
        )
        self.out = out
