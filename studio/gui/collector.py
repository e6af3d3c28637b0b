"""Python's cycle collector runs in whichever thread happens to allocate. Run in a worker, it destroys the Qt
objects found in garbage cycles (closed menus, old views) off the GUI thread, and a QObject destructor there can
deadlock against the GUI thread: it holds Qt's mutex while Shiboken waits for the GIL, and the GUI thread holds the
GIL while it waits for that mutex (seen in a test: a run's deepcopy in a worker collecting a window's QMenu).
So before a worker starts, automatic collection is turned off and the GUI thread collects on a timer instead —
the pattern pyqtgraph's GarbageCollector documents for Qt applications."""

from __future__ import annotations

import gc

from PySide6.QtCore import QCoreApplication, QTimer

INTERVAL_MS = 1000
_timer: QTimer | None = None


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
    """What the automatic collector would have done since the last tick: the generations past their threshold."""
    counts, thresholds = gc.get_count(), gc.get_threshold()
    generation = -1
    for g in range(3):
        if counts[g] > thresholds[g]:
            generation = g
        else:
            break
    if generation >= 0:
        gc.collect(generation)
