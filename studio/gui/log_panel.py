"""The Log dock: run events, warnings and errors, and the records of the `studio` Python logger.

Log records may come from worker threads; the handler hands them to the GUI thread through a queued signal."""

from __future__ import annotations

import html
import logging
import time

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QHBoxLayout, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

COLORS = {"error": "#d32f2f", "warning": "#e08a1e", "info": None, "event": "#3d7bd9"}
MAX_LINES = 5000


class _Bridge(QObject):
    record = Signal(str, str)  # level, text


class QtLogHandler(logging.Handler):
    """Forwards log records to a LogPanel; safe to call from any thread."""

    def __init__(self, panel: "LogPanel", level: int = logging.INFO):
        super().__init__(level)
        self.bridge = _Bridge()
        self.bridge.record.connect(panel.append, Qt.ConnectionType.QueuedConnection)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "error" if record.levelno >= logging.ERROR else (
                "warning" if record.levelno >= logging.WARNING else "info")
            self.bridge.record.emit(level, f"{record.name}: {record.getMessage()}")
        except RuntimeError:  # the panel is gone (window closed): drop the record
            pass


class LogPanel(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.text = QPlainTextEdit(readOnly=True)
        self.text.setMaximumBlockCount(MAX_LINES)
        self.text.setLineWrapMode(QPlainTextEdit.LineWrapMode.WidgetWidth)
        clear = QPushButton("Clear")
        clear.clicked.connect(self.text.clear)
        bar = QHBoxLayout()
        bar.addStretch(1)
        bar.addWidget(clear)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.text, 1)
        layout.addLayout(bar)
        self._handler: QtLogHandler | None = None
        self._logger: logging.Logger | None = None

    def append(self, level: str, message: str) -> None:
        """level: 'info', 'event', 'warning' or 'error'."""
        stamp = time.strftime("%H:%M:%S")
        body = html.escape(message).replace("\n", "<br>")
        color = COLORS.get(level)
        tag = "" if level in ("info", "event") else f"{level.upper()}: "
        if color:
            body = f'<span style="color:{color}">{tag}{body}</span>'
        self.text.appendHtml(f'<span style="color:gray">{stamp}</span> {body}')

    def info(self, message: str) -> None:
        self.append("info", message)

    def note(self, message: str) -> None:
        """A run or file event, in the accent color."""
        self.append("event", message)

    def warning(self, message: str) -> None:
        self.append("warning", message)

    def error(self, message: str) -> None:
        self.append("error", message)

    def plain_text(self) -> str:
        return self.text.toPlainText()

    def capture(self, logger_name: str = "studio", level: int = logging.INFO) -> None:
        """Show the records of `logger_name` (and its children) here until `release()`."""
        self.release()
        self._logger = logging.getLogger(logger_name)
        if self._logger.level == logging.NOTSET or self._logger.level > level:
            self._logger.setLevel(level)
        self._handler = QtLogHandler(self, level)
        self._logger.addHandler(self._handler)

    def release(self) -> None:
        if self._handler is not None and self._logger is not None:
            self._logger.removeHandler(self._handler)
        self._handler = self._logger = None
