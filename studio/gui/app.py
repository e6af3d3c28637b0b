"""Start the studio window: `run_app(model)` opens it, and with `model` starts loading that model."""

from __future__ import annotations

import sys

from PySide6.QtWidgets import QApplication

from studio.gui.main_window import APPLICATION, ORGANIZATION, MainWindow
from studio.gui.tasks import LoadModelTask

__all__ = ["MainWindow", "LoadModelTask", "run_app"]


def run_app(model: str | None = None) -> int:
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setStyle("Fusion")  # one look everywhere, and palettes (light/dark) that apply fully
    window = MainWindow()
    window.show()
    if model:
        window.load(model)
    return app.exec()
