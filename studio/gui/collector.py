"""Python's cycle collector runs in whichever thread happens to allocate. Run in a worker, it destroys the Qt
objects found in garbage cycles (closed menus, old views) off the GUI thread, and a QObject destructor there can
deadlock against the GUI thread: it holds Qt's mutex while Shiboken waits for the GIL, and the GUI thread holds the
GIL while it waits for that mutex (seen in a test: a run's deepcopy in a worker collecting a window's QMenu).
So before a worker starts, automatic collection is turned off and the GUI thread collects on a timer instead —
the pattern pyqtgraph's GarbageCollector documents for Qt applications — with CPython's own rule for the oldest
generation: a full pass only once the objects grown old since the last one are a quarter of those it kept. A full
pass over the objects of a process with transformers, the window and a model loaded (465,000) took 0.27 s, and
longer in a bigger one: run on every tenth pass of the middle generation, it froze the window for that long."""

from __future__ import annotations

import gc

from PySide6.QtCore import QCoreApplication, QTimer

INTERVAL_MS = 1000
_timer: QTimer | None = None
_OLDEST = 2


class _LongLived:
    """CPython's long_lived_total and long_lived_pending (Modules/gcmodule.c), which gc does not expose."""

    total: int | None = None  # objects in the oldest generation after the last full pass
    pending = 0  # objects moved into it since


def _full_pass_due() -> bool:
    if _LongLived.total is None:
        _LongLived.total = len(gc.get_objects(_OLDEST))
    return _LongLived.pending > _LongLived.total / 4


def collect_in_gui_thread() -> None:
    """Call in the GUI thread before starting a worker; idempotent."""
    global _timer
    gc.disable()
    app = QCoreApplication.instance()
    if _timer is None or _timer.parent() is not app:
        _timer = QTimer(app)
        _timer.timeout.connect(_collect)
        _timer.start(INTERVAL_MS)


def _collect() -> None:
    """What the automatic collector would have done since the last tick: the generations past their threshold,
    the oldest only when a full pass is due."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    generation = -1
    for g in range(3):
        if counts[g] > thresholds[g]:
            generation = g
        else:
            break
    if generation == _OLDEST and not _full_pass_due():
        generation = _OLDEST - 1
    if generation < 0:
        return
    if generation == _OLDEST:
        gc.collect(generation)
        _LongLived.total, _LongLived.pending = len(gc.get_objects(_OLDEST)), 0
    elif generation == _OLDEST - 1:  # the survivors of both young generations grow old
        young = len(gc.get_objects(0)) + len(gc.get_objects(1))
        _LongLived.pending += young - gc.collect(generation)
    else:
        gc.collect(generation)
