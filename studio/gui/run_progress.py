"""The status bar's run progress: overall bar (steps, and blocks within the current step), evaluation windows,
and the time left as the run controller estimates it."""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QWidget

from studio.gui.formatting import human_seconds

RESOLUTION = 1000


class RunProgress(QWidget):
    def __init__(self, time_left: Callable[[], float | None], parent: QWidget | None = None):
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setMinimumWidth(240)
        self.bar.setMaximumWidth(380)
        self.bar.setTextVisible(True)
        self.time_label = QLabel()
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar)
        layout.addWidget(self.time_label)
        self._time_left = time_left
        self._clock = QTimer(self)
        self._clock.setInterval(500)
        self._clock.timeout.connect(self._show_time_left)
        self._steps = self._number = 0
        self._method = ""
        self.hide()

    def format(self) -> str:
        return self.bar.format()

    def value(self) -> int:
        return self.bar.value()

    def busy(self, text: str) -> None:
        """An activity of unknown length (loading a model, starting a run)."""
        self.bar.setRange(0, 0)
        self.bar.setFormat(text)
        self.show()

    def begin(self) -> None:
        self._steps = self._number = 0
        self.busy("Starting…")
        self._clock.start()

    def end(self) -> None:
        self._clock.stop()
        self.time_label.clear()
        self.hide()

    def run_started(self, steps: int, evaluating: bool) -> None:
        self._steps = steps
        self.busy("Evaluating the original…" if evaluating else "Preparing…")

    def step_started(self, method: str, total: int) -> None:
        self._number += 1
        self._steps, self._method = total, method
        self._show_blocks(0, 0)

    def progress(self, index: int, done: int, total: int, message: str) -> None:
        if index < 0 or message.startswith("evaluat"):  # perplexity windows, of the original or a step's result
            where = "the original" if index < 0 else f"step {index + 1}"
            self.bar.setRange(0, max(total, 1))
            self.bar.setValue(done)
            self.bar.setFormat(f"Evaluating {where} · window {done}/{total}")
        else:
            self._show_blocks(done, total)

    def step_finished(self, evaluating: bool) -> None:
        if self._number >= self._steps:
            self.busy("Evaluating…" if evaluating else "Finishing…")

    def _show_blocks(self, done: int, total: int) -> None:
        steps = max(self._steps, 1)
        fraction = ((self._number - 1) + (done / total if total else 0)) / steps
        self.bar.setRange(0, RESOLUTION)
        self.bar.setValue(int(fraction * RESOLUTION))
        blocks = f" · block {done}/{total}" if total else ""
        self.bar.setFormat(f"Step {self._number}/{steps} ({self._method}){blocks}")

    def _show_time_left(self) -> None:
        left = self._time_left()
        self.time_label.setText("" if left is None else f"{human_seconds(left)} left")
