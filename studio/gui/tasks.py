"""Slow work off the GUI thread: a QRunnable that runs one function and reports back through queued signals.

A failure never escapes the worker: a StudioError becomes its message (the user can act on it), anything
else its message with the traceback (a bug), and the window decides how to show it.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot


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

        try:
            result = self.work()
        except StudioError as exc:
            self.signals.failed.emit(str(exc))
        except Exception as exc:  # the window must survive anything a worker meets
            self.signals.failed.emit(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        else:
            self.signals.done.emit(result)
        finally:
            self.work = None

    def start(self) -> "Task":
        QThreadPool.globalInstance().start(self)
        return self


def _load_and_summarize(spec: str):
    from studio.core.loading import load_model
    from studio.core.summary import summarize

    loaded = load_model(spec)
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
