"""Start the studio window: `run_app(model)` opens it, and with `model` starts loading that model.

Nothing here, nor in the window's modules, imports torch or transformers: they load in workers when a model
is opened, so the window paints in well under two seconds. With STUDIO_EXIT_AFTER_PAINT=1 the app prints
the seconds from process start to the first painted frame of the window and quits (bench/bench_gui.py).
"""

from __future__ import annotations

import os
import sys
import time

from PySide6.QtCore import QEvent, QObject, QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from studio.core.paths import RESOURCES_DIR
from studio.gui.main_window import APPLICATION, ORGANIZATION, MainWindow
from studio.gui.tasks import LoadModelTask

__all__ = ["MainWindow", "LoadModelTask", "run_app", "seconds_since_process_start"]

EXIT_AFTER_PAINT = "STUDIO_EXIT_AFTER_PAINT"
LAUNCH_TIME = "STUDIO_LAUNCH_TIME"


def seconds_since_process_start() -> float:
    """Wall seconds since the launcher's STUDIO_LAUNCH_TIME (time.time() when it started us), else since the
    OS created this process (coarser: the kernel counts in clock ticks)."""
    launched = os.environ.get(LAUNCH_TIME)
    if launched:
        return time.time() - float(launched)
    import psutil

    return time.time() - psutil.Process().create_time()


class _FirstPaint(QObject):
    """Prints the time to the window's first paint event, then quits the application."""

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.Paint:
            watched.removeEventFilter(self)
            print(f"first paint after {seconds_since_process_start():.3f} s", flush=True)
            QTimer.singleShot(0, QApplication.quit)
        return False


DESKTOP_ENTRY = "compression-studio"  # packaging/linux/compression-studio.desktop, and the icons' name


def studio_application() -> QApplication:
    """The QApplication, named and with the studio's icon (the desktop entry's name lets Wayland match them)."""
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setDesktopFileName(DESKTOP_ENTRY)
    app.setWindowIcon(QIcon(str(RESOURCES_DIR / "icons" / f"{DESKTOP_ENTRY}.png")))
    app.setStyle("Fusion")  # one look everywhere, and palettes (light/dark) that apply fully
    return app


def run_app(model: str | None = None) -> int:
    app = studio_application()
    window = MainWindow()
    if os.environ.get(EXIT_AFTER_PAINT) == "1":
        watcher = _FirstPaint(window)
        window.installEventFilter(watcher)
    window.show()
    if model:
        window.load(model)
    return app.exec()
