"""The studio window (a first version): opens a model in a worker thread and shows its summary.

The full window (pipeline editor, live charts, compare view) builds on this; everything slow runs in a
QThreadPool worker and reaches the window through queued signals, so the window never freezes.
"""

from __future__ import annotations

import sys
import traceback

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QInputDialog,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
)

from studio import __version__


class _Signals(QObject):
    done = Signal(object)
    failed = Signal(str)


class LoadModelTask(QRunnable):
    def __init__(self, spec: str):
        super().__init__()
        self.spec = spec
        self.signals = _Signals()

    @Slot()
    def run(self) -> None:
        from studio.core.errors import StudioError
        from studio.core.loading import load_model
        from studio.core.summary import summarize

        try:
            loaded = load_model(self.spec)
            self.signals.done.emit((loaded, summarize(loaded.model)))
        except StudioError as exc:
            self.signals.failed.emit(str(exc))
        except Exception as exc:  # the window must survive anything a worker meets
            self.signals.failed.emit(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")


class MainWindow(QMainWindow):
    def __init__(self):
        super().__init__()
        self.setWindowTitle(f"Compression Studio {__version__}")
        self.resize(900, 600)
        self.view = QPlainTextEdit(readOnly=True)
        self.view.setPlainText("Open a model (File ▸ Open) to see what it is. The command line does the rest: studio --help")
        self.setCentralWidget(self.view)
        self.loaded = None
        self._tasks: set[LoadModelTask] = set()
        menu = self.menuBar().addMenu("&File")
        for text, shortcut, slot in (
            ("&Open model file…", QKeySequence.StandardKey.Open, self.open_file),
            ("Open model &folder…", None, self.open_folder),
            ("Open &hub id or 'sample'…", None, self.open_spec),
            ("&Quit", QKeySequence.StandardKey.Quit, self.close),
        ):
            action = QAction(text, self)
            if shortcut is not None:
                action.setShortcut(shortcut)
            action.triggered.connect(slot)
            menu.addAction(action)
        self.statusBar().showMessage("Ready")

    def open_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open model", "", "Models (*.gguf *.safetensors)")
        if path:
            self.load(path)

    def open_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open Hugging Face model folder")
        if path:
            self.load(path)

    def open_spec(self) -> None:
        spec, ok = QInputDialog.getText(self, "Open", "Hub id (owner/name) or 'sample':", text="sample")
        if ok and spec.strip():
            self.load(spec.strip())

    def load(self, spec: str) -> None:
        self.statusBar().showMessage(f"Loading {spec} …")
        task = LoadModelTask(spec)
        task.signals.done.connect(self._loaded)
        task.signals.failed.connect(self._failed)
        self._tasks.add(task)
        task.signals.done.connect(lambda *_: self._tasks.discard(task))
        task.signals.failed.connect(lambda *_: self._tasks.discard(task))
        QThreadPool.globalInstance().start(task)

    def _loaded(self, payload) -> None:
        self.loaded, summary = payload
        self.view.setPlainText(f"{self.loaded.name}\n\n{summary.format()}")
        self.statusBar().showMessage(f"Loaded {self.loaded.name}: {summary.parameters:,} parameters")

    def _failed(self, message: str) -> None:
        self.statusBar().showMessage("Loading failed")
        QMessageBox.critical(self, "Could not open the model", message)


def run_app(model: str | None = None) -> int:
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Compression Studio")
    window = MainWindow()
    window.show()
    if model:
        window.load(model)
    return app.exec()
