"""Before and after a run, from the runner's report: a summary table, a sortable per-layer table, and a bar
chart of the last step's per-layer error.

Optional report sections, in the shapes `studio eval` prints them:
`speed: {"before": throughput(...), "after": throughput(...)}` and
`accuracy: {"before": {task: zero_shot_accuracy(...)}, "after": {task: ...}}`.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

MIB = 1024 * 1024
SUMMARY_COLUMNS = ("", "Before", "After", "Change")
LAYER_COLUMNS = ("Layer", "Step", "Error", "Sparsity", "Bits", "Group size", "Parameters")

Row = tuple[str, Any, Any, Callable[[Any], str]]  # label, before, after, format


class SortItem(QTableWidgetItem):
    """A cell that sorts by its key (numbers as numbers, layer names naturally); empty cells sort last."""

    def __init__(self, text: str, key: Any):
        super().__init__(text)
        self.key = key
        self.setFlags(self.flags() & ~Qt.ItemFlag.ItemIsEditable)
        if isinstance(key, (int, float)):
            self.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        mine, theirs = self.key, getattr(other, "key", None)
        if mine is None or theirs is None:
            return mine is not None and theirs is None
        return mine < theirs


def natural_key(name: str) -> tuple:
    """'model.layers.10.x' after 'model.layers.9.x'."""
    return tuple(int(part) if n % 2 else part for n, part in enumerate(re.split(r"(\d+)", name)))


def _count(v: Any) -> str:
    return f"{int(v):,}"


def _mib(v: Any) -> str:
    mib = v / MIB
    return f"{mib:,.1f}" if mib >= 10 else f"{mib:.3f}"


def _ppl(v: Any) -> str:
    return f"{v:,.3f}"


def _kl(v: Any) -> str:
    return f"{v:.5f}"


def _percent(v: Any) -> str:
    return f"{100 * v:.1f} %"


def _rate(v: Any) -> str:
    return f"{v:,.1f}"


def _change(before: Any, after: Any) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or before == 0:
        return ""
    return f"{100 * (after - before) / before:+.1f} %"


def summary_rows(report: dict[str, Any]) -> list[Row]:
    """What the summary table shows, from the report; rows whose data is missing on both sides are left out."""
    before_size, after_size = report.get("size_before") or {}, report.get("size_after") or {}
    baseline, final = report.get("baseline") or {}, report.get("final") or {}
    rows: list[Row] = [
        ("Parameters", before_size.get("parameters"), after_size.get("parameters"), _count),
        ("Non-zero parameters", before_size.get("nonzero_parameters"), after_size.get("nonzero_parameters"), _count),
        ("Memory (MiB)", before_size.get("memory_bytes"), after_size.get("memory_bytes"), _mib),
        ("Compressed (MiB)", before_size.get("compressed_bytes"), after_size.get("compressed_bytes"), _mib),
        ("On disk (MiB)", before_size.get("disk_bytes"), after_size.get("disk_bytes"), _mib),
        ("Perplexity", baseline.get("perplexity"), final.get("perplexity"), _ppl),
        # the original against itself: KL 0 and full agreement, by definition
        ("KL to original (nats)", 0.0 if final.get("kl") is not None else None, final.get("kl"), _kl),
        ("Top-1 agreement", 1.0 if final.get("top1_agreement") is not None else None, final.get("top1_agreement"),
         _percent),
    ]
    speed = report.get("speed") or {}
    for key, label in (("prefill_tokens_per_s", "Prefill tokens/s"), ("decode_tokens_per_s", "Decode tokens/s")):
        rows.append((label, (speed.get("before") or {}).get(key), (speed.get("after") or {}).get(key), _rate))
    accuracy = report.get("accuracy") or {}
    before_acc, after_acc = accuracy.get("before") or {}, accuracy.get("after") or {}
    for task in sorted(set(before_acc) | set(after_acc)):
        for key in ("acc", "acc_norm"):
            b, a = (before_acc.get(task) or {}).get(key), (after_acc.get(task) or {}).get(key)
            rows.append((f"{task} {key}", b, a, _percent))
    return [row for row in rows if row[1] is not None or row[2] is not None]


def _cell(value: Any, fmt: Callable[[Any], str] = str) -> SortItem:
    return SortItem("" if value is None else fmt(value), value)


class CompareView(QWidget):
    """The outcome of one run: `show_report(report)` fills it, `clear()` empties it."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.title = QLabel("Run a recipe to compare the model before and after.")
        self.summary_table = QTableWidget(0, len(SUMMARY_COLUMNS))
        self.summary_table.setHorizontalHeaderLabels(SUMMARY_COLUMNS)
        self.summary_table.verticalHeader().setVisible(False)
        self.summary_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.summary_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.summary_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)

        self.layer_table = QTableWidget(0, len(LAYER_COLUMNS))
        self.layer_table.setHorizontalHeaderLabels(LAYER_COLUMNS)
        self.layer_table.verticalHeader().setVisible(False)
        self.layer_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.layer_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        # step order first; the sort is stable, so layers keep their model order within a step
        self.layer_table.horizontalHeader().setSortIndicator(1, Qt.SortOrder.AscendingOrder)
        self.layer_table.setSortingEnabled(True)

        self.error_plot = pg.PlotWidget(title="Per-layer error, last step")
        self.error_plot.setLabel("left", "relative error")
        self.error_plot.setLabel("bottom", "layer (in order)")
        self.error_plot.setMenuEnabled(False)
        self.error_plot.getAxis("left").enableAutoSIPrefix(False)
        self._error_bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush="#d62728")
        self.error_plot.addItem(self._error_bars)

        lower = QSplitter(Qt.Orientation.Horizontal)
        lower.addWidget(self.layer_table)
        lower.addWidget(self.error_plot)
        lower.setStretchFactor(0, 3)
        lower.setStretchFactor(1, 2)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.summary_table)
        split.addWidget(lower)
        layout = QVBoxLayout(self)
        layout.addWidget(self.title)
        layout.addWidget(split)

    def clear(self) -> None:
        self.title.setText("Run a recipe to compare the model before and after.")
        self.summary_table.setRowCount(0)
        self.layer_table.setRowCount(0)
        self._error_bars.setOpts(x=[], height=[], width=0.8)

    def show_report(self, report: dict[str, Any]) -> None:
        self.clear()
        model = (report.get("model") or {}).get("name", "the model")
        recipe = (report.get("recipe") or {}).get("name") or f"{len(report.get('steps', []))} step(s)"
        self.title.setText(f"{model}: before and after {recipe}")
        self._fill_summary(summary_rows(report))
        steps = report.get("steps") or []
        self._fill_layers(steps)
        self._plot_errors(steps[-1].get("layers") or [] if steps else [])

    def _fill_summary(self, rows: list[Row]) -> None:
        table = self.summary_table
        table.setRowCount(len(rows))
        for r, (label, before, after, fmt) in enumerate(rows):
            table.setItem(r, 0, SortItem(label, label))
            table.setItem(r, 1, _cell(before, fmt))
            table.setItem(r, 2, _cell(after, fmt))
            change = _change(before, after)
            table.setItem(r, 3, SortItem(change, change))

    def _fill_layers(self, steps: list[dict[str, Any]]) -> None:
        table = self.layer_table
        rows = [(step, layer) for step in steps for layer in step.get("layers") or []]
        table.setSortingEnabled(False)  # inserting into a sorted table reorders rows under our feet
        table.setRowCount(len(rows))
        for r, (step, layer) in enumerate(rows):
            index = step.get("index", 0)
            name = layer.get("name", "")
            cells = (
                SortItem(name, natural_key(name)),
                SortItem(f"{index + 1} {step.get('method', '')}", index),
                _cell(layer.get("error"), lambda v: f"{v:.5f}"),
                _cell(layer.get("sparsity"), _percent),
                _cell(layer.get("bits")),
                _cell(layer.get("group_size"), lambda v: "per channel" if v == 0 else str(v)),
                _cell(layer.get("parameters"), _count),
            )
            for c, item in enumerate(cells):
                table.setItem(r, c, item)
        table.setSortingEnabled(True)
        table.resizeColumnsToContents()

    def _plot_errors(self, layers: list[dict[str, Any]]) -> None:
        errors = [layer.get("error") for layer in layers]
        errors = [e if e is not None else 0.0 for e in errors]
        self._error_bars.setOpts(x=list(range(len(errors))), height=errors, width=0.8)
