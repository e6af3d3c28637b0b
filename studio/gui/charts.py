"""Live charts of a run: memory over time, model size, per-layer error and accuracy after each step.

Data goes into growing numpy buffers as it arrives; a ~15 Hz timer redraws only the charts whose data changed,
so a burst of events costs appends, not repaints. Memory is sampled here, on the GUI side, with psutil.
"""

from __future__ import annotations

import time

import numpy as np
import psutil
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Slot
from PySide6.QtWidgets import QGridLayout, QWidget

from studio.core.events import Metric
from studio.gui.theme import follow_palette

MIB = 1024 * 1024
SAMPLE_MS = 250
REDRAW_MS = 66
ACCURACY_METRICS = ("perplexity", "kl")
TRAINING_LOSS = "distill_loss"


class Series:
    """x/y values in preallocated arrays that double when full; `x` and `y` are views of the filled part."""

    def __init__(self, capacity: int = 256):
        self._x = np.empty(capacity)
        self._y = np.empty(capacity)
        self.size = 0

    def append(self, x: float, y: float) -> None:
        if self.size == len(self._x):
            self._x = np.concatenate([self._x, np.empty_like(self._x)])
            self._y = np.concatenate([self._y, np.empty_like(self._y)])
        self._x[self.size] = x
        self._y[self.size] = y
        self.size += 1

    def clear(self) -> None:
        self.size = 0

    @property
    def x(self) -> np.ndarray:
        return self._x[: self.size]

    @property
    def y(self) -> np.ndarray:
        return self._y[: self.size]


def _step_x(index: int | None) -> float:
    """Charts put the original (index None) at 0 and step i at i + 1."""
    return 0.0 if index is None else float(index + 1)


def _plot(title: str, left: str, bottom: str) -> pg.PlotWidget:
    widget = pg.PlotWidget(title=title)
    widget.setLabel("left", left)
    widget.setLabel("bottom", bottom)
    widget.showGrid(x=True, y=True, alpha=0.2)
    widget.setMenuEnabled(False)
    widget.getAxis("left").enableAutoSIPrefix(False)  # "MiB (x0.001)" reads worse than 0.139
    return widget


def _integer_ticks(widget: pg.PlotWidget) -> None:
    widget.getAxis("bottom").setTickSpacing(major=1, minor=1)


class LiveCharts(QWidget):
    """Four charts fed by `on_metric`, `mark_step` and the memory sampler (`set_sampling`)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._process = psutil.Process()
        self._t0: float | None = None
        self._rss = Series(1024)
        self._used = Series(1024)
        self._marks: list[tuple[int, str, float]] = []
        self._mark_lines: list[pg.InfiniteLine] = []
        self._size = Series(16)
        self._ppl = Series(16)
        self._kl = Series(16)
        self._accuracy: list[tuple[int | None, str, float]] = []
        self._layer_step: int | None = None
        self._layer_method = ""
        self._layer_names: list[str] = []
        self._layer_errors = Series(256)
        self._training_loss = Series(256)  # a distillation step's loss per training step
        self._dirty: set[str] = set()
        self._build()

        self._sampler = QTimer(self)
        self._sampler.setInterval(SAMPLE_MS)
        self._sampler.timeout.connect(self.sample_memory)
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setInterval(REDRAW_MS)
        self._redraw_timer.timeout.connect(self.redraw)
        self._redraw_timer.start()

    def _build(self) -> None:
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)

        self.memory_plot = _plot("Memory", "MiB", "seconds")
        self.memory_plot.addLegend(offset=(-5, 5))
        self.memory_plot.setClipToView(True)
        self.memory_plot.setDownsampling(auto=True, mode="peak")
        self._rss_curve = self.memory_plot.plot(pen=pg.mkPen("#1f77b4", width=2), name="process RSS")
        self._used_curve = self.memory_plot.plot(pen=pg.mkPen("#7f7f7f", width=1), name="system used")

        self.size_plot = _plot("Model size", "MiB (compressed)", "step (0 = original)")
        _integer_ticks(self.size_plot)
        self._size_curve = self.size_plot.plot(pen=pg.mkPen("#2ca02c", width=2), symbol="o", symbolSize=7)

        self.layer_plot = _plot("Per-layer error", "relative error", "layer (in order)")
        self._layer_bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush="#d62728")
        self.layer_plot.addItem(self._layer_bars)
        self._loss_curve = self.layer_plot.plot([], [], pen=pg.mkPen("#9467bd", width=2), symbol="o", symbolSize=4)

        self.accuracy_plot = _plot("Accuracy", "perplexity", "step (0 = original)")
        self.accuracy_plot.addLegend(offset=(5, 5))
        _integer_ticks(self.accuracy_plot)
        self._ppl_curve = self.accuracy_plot.plot(pen=pg.mkPen("#9467bd", width=2), symbol="o", name="perplexity")
        self._kl_view, self._kl_curve = self._add_right_axis_curve(self.accuracy_plot, "KL (nats)", "#ff7f0e", "KL")

        grid.addWidget(self.memory_plot, 0, 0)
        grid.addWidget(self.size_plot, 0, 1)
        grid.addWidget(self.layer_plot, 1, 0)
        grid.addWidget(self.accuracy_plot, 1, 1)
        self.follow_palette()

    def follow_palette(self) -> None:
        """Chart colours from the current palette; the window calls this when the theme changes."""
        for plot in (self.memory_plot, self.size_plot, self.layer_plot, self.accuracy_plot):
            follow_palette(plot)

    @staticmethod
    def _add_right_axis_curve(widget: pg.PlotWidget, label: str, color: str, name: str):
        """A curve on its own y scale, drawn against the right axis (KL is orders of magnitude below ppl)."""
        item = widget.getPlotItem()
        view = pg.ViewBox()
        item.showAxis("right")
        item.scene().addItem(view)
        item.getAxis("right").linkToView(view)
        item.getAxis("right").setLabel(label)
        view.setXLink(item)
        item.vb.sigResized.connect(lambda: view.setGeometry(item.vb.sceneBoundingRect()))
        curve = pg.PlotDataItem(pen=pg.mkPen(color, width=2, style=Qt.PenStyle.DashLine), symbol="t", symbolBrush=color)
        view.addItem(curve)
        if item.legend is not None:
            item.legend.addItem(curve, name)
        return view, curve

    # --- inputs -------------------------------------------------------------------------------------

    def set_sampling(self, on: bool) -> None:
        """Sample memory every 250 ms while on (e.g. while a run is going)."""
        if on and not self._sampler.isActive():
            self.sample_memory()
            self._sampler.start()
        elif not on:
            self._sampler.stop()

    @Slot()
    def sample_memory(self) -> None:
        t = self._now()
        try:
            rss = self._process.memory_info().rss
            used = psutil.virtual_memory().used
        except psutil.Error:
            return
        self._rss.append(t, rss / MIB)
        self._used.append(t, used / MIB)
        self._dirty.add("memory")

    def mark_step(self, index: int, method: str) -> None:
        """A vertical line on the memory chart where a step begins; also starts a fresh per-layer chart."""
        t = self._now()
        self._marks.append((index, method, t))
        line = pg.InfiniteLine(
            pos=t, angle=90, pen=pg.mkPen("#555", style=Qt.PenStyle.DashLine),
            label=f"{index + 1} {method}", labelOpts={"position": 0.9, "color": "#888"},
        )
        self.memory_plot.addItem(line)
        self._mark_lines.append(line)
        self._start_layer_chart(index, method)

    @Slot(object)
    def on_metric(self, metric: Metric) -> None:
        """Index None is the original: the runner reports its perplexity; its size the window may feed as
        Metric("compressed_bytes", bytes, None)."""
        if metric.name == "compressed_bytes":
            self._size.append(_step_x(metric.index), metric.value / MIB)
            self._dirty.add("size")
        elif metric.name == "layer_error":
            if metric.index != self._layer_step:
                self._start_layer_chart(metric.index, "")
            self._layer_names.append(metric.layer or "")
            self._layer_errors.append(len(self._layer_names) - 1, metric.value)
            self._dirty.add("layers")
        elif metric.name == TRAINING_LOSS:  # a distillation step shows its loss curve where layer errors go
            if metric.index != self._layer_step:
                self._start_layer_chart(metric.index, "")
            self._training_loss.append(self._training_loss.size + 1, metric.value)
            self._dirty.add("layers")
        elif metric.name in ACCURACY_METRICS:
            series = self._ppl if metric.name == "perplexity" else self._kl
            series.append(_step_x(metric.index), metric.value)
            self._accuracy.append((metric.index, metric.name, metric.value))
            self._dirty.add("accuracy")

    def attach(self, controller) -> None:
        """Follow a RunController: reset and sample while it runs, mark steps, take its metrics."""
        controller.running_changed.connect(self._on_running_changed)
        controller.step_started.connect(lambda index, method, _total: self.mark_step(index, method))
        controller.metric.connect(self.on_metric)

    @Slot(bool)
    def _on_running_changed(self, running: bool) -> None:
        if running:
            self.reset()
        self.set_sampling(running)

    def reset(self) -> None:
        for series in (self._rss, self._used, self._size, self._ppl, self._kl):
            series.clear()
        for line in self._mark_lines:
            self.memory_plot.removeItem(line)
        self._mark_lines.clear()
        self._marks.clear()
        self._accuracy.clear()
        self._t0 = None
        self._start_layer_chart(None, "")
        self._dirty.update(("memory", "size", "layers", "accuracy"))

    # --- drawing ------------------------------------------------------------------------------------

    @Slot()
    def redraw(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if "memory" in dirty:
            self._rss_curve.setData(self._rss.x, self._rss.y)
            self._used_curve.setData(self._used.x, self._used.y)
        if "size" in dirty:
            self._size_curve.setData(self._size.x, self._size.y)
        if "layers" in dirty:
            training = self._training_loss.size > 0  # a distillation step: its loss curve, not its weight changes
            errors = Series(0) if training else self._layer_errors
            self._layer_bars.setOpts(x=errors.x, height=errors.y, width=0.8)
            self._loss_curve.setData(self._training_loss.x, self._training_loss.y)
            step = f"step {self._layer_step + 1} {self._layer_method}".strip() if self._layer_step is not None else ""
            self.layer_plot.setTitle(f"{'Distillation loss' if training else 'Per-layer error'} {step}".strip())
            self.layer_plot.setLabel("left", "loss" if training else "relative error")
            self.layer_plot.setLabel("bottom", "training step" if training else "layer (in order)")
        if "accuracy" in dirty:
            self._ppl_curve.setData(self._ppl.x, self._ppl.y)
            self._kl_curve.setData(self._kl.x, self._kl.y)
            if self._kl.size:  # from 0, the original's KL to itself
                self._kl_view.setYRange(0.0, float(self._kl.y.max()) * 1.1 or 1.0)

    # --- what the charts hold (for tests and the window's status line) ---------------------------------

    def memory_samples(self) -> int:
        return self._rss.size

    def latest_rss_mib(self) -> float | None:
        return float(self._rss.y[-1]) if self._rss.size else None

    def step_marks(self) -> list[tuple[int, str, float]]:
        """(step index, method, seconds since the first sample) per marked step."""
        return list(self._marks)

    def training_losses(self) -> list[tuple[float, float]]:
        """(training step, loss) of the distillation step the chart follows."""
        return list(zip(self._training_loss.x.tolist(), self._training_loss.y.tolist()))

    def size_points(self) -> list[tuple[float, float]]:
        """(step x, compressed MiB) with x = 0 for the original and i + 1 for step i."""
        return list(zip(self._size.x.tolist(), self._size.y.tolist()))

    def layer_errors(self) -> list[tuple[str, float]]:
        return list(zip(self._layer_names, self._layer_errors.y.tolist()))

    def accuracy_points(self) -> list[tuple[int | None, str, float]]:
        """(step index or None for the original, "perplexity" or "kl", value) in arrival order."""
        return list(self._accuracy)

    # --- helpers ------------------------------------------------------------------------------------

    def _now(self) -> float:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        return now - self._t0

    def _start_layer_chart(self, index: int | None, method: str) -> None:
        self._layer_step, self._layer_method = index, method
        self._layer_names.clear()
        self._layer_errors.clear()
        self._training_loss.clear()
        self._dirty.add("layers")
