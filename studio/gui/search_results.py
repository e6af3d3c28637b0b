"""A search's candidates as they end: a scatter of size (in the budget's unit) against quality with the Pareto
front highlighted (its own brush and a connecting line), the budget as a vertical line and the original's quality
as a horizontal one, and a sortable table beside it with the front's rows starred. Clicking a point selects its
row and selecting a row rings its point.

Candidates only go into `candidates` as they arrive; a ~15 Hz timer redraws the scatter and the table when
something changed, as the live charts do. The front comes from the engine (the search's own, or
studio.core.search's `front_of` for the other quality)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtWidgets import QAbstractItemView, QComboBox, QSplitter, QTableWidget, QVBoxLayout, QWidget

from studio.core.search.result import front_of
from studio.gui.history_view import MIB, _cell
from studio.gui.charts import REDRAW_MS
from studio.gui.compare_view import SortItem
from studio.gui.history_view import FRONT_COLOR, POINT_BRUSH
from studio.gui.theme import follow_palette

if TYPE_CHECKING:
    from studio.core.search import CandidateResult, SearchResult, SearchSpec

QUALITIES = (("perplexity", "Perplexity"), ("kl", "KL to the original"))
COLUMNS = ("Trial", "Status", "Bits/weight", "Size (MiB)", "Memory (MiB)", "Perplexity", "KL", "Top-1", "Seconds",
           "Run", "Recipe")
MEMORY_COLUMN = COLUMNS.index("Memory (MiB)")
AXIS_LABELS = {"bits_per_weight": "bits per weight", "size_mb": "compressed size (MiB)",
               "memory_mb": "memory with the KV cache (MiB)"}
BUDGET_SUFFIX = {"bits_per_weight": " bits/weight", "size_mb": " MiB", "memory_mb": " MiB"}
SELECTED_PEN = pg.mkPen("#1f77b4", width=3)
BUDGET_PEN = pg.mkPen("#d62728", width=2, style=Qt.PenStyle.DashLine)
ORIGINAL_PEN = pg.mkPen("#7f7f7f", width=1, style=Qt.PenStyle.DotLine)


class SearchResults(QWidget):
    """The scatter and the table of one search: `begin(spec)`, then `set_baseline`, `add` per ended candidate,
    and `finish(result)`."""

    selection_changed = Signal()
    activated = Signal()  # a row was double-clicked

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.spec: SearchSpec | None = None  # the search shown
        self.candidates: dict[int, CandidateResult] = {}
        self.front: tuple[int, ...] = ()  # the search's front (its objective), smallest first
        self.baseline: dict[str, Any] = {}
        self._rows: dict[int, list[SortItem]] = {}
        self._dirty = False
        self._build()
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setInterval(REDRAW_MS)
        self._redraw_timer.timeout.connect(self.redraw)
        self._redraw_timer.start()

    def _build(self) -> None:
        self.quality_combo = QComboBox()
        for value, text in QUALITIES:
            self.quality_combo.addItem(text, value)
        self.quality_combo.setToolTip("The quality on the scatter's vertical axis (the front is the one for it)")

        self.plot = pg.PlotWidget(title="Candidates")
        self.plot.setMenuEnabled(False)
        self.plot.showGrid(x=True, y=True, alpha=0.2)
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).enableAutoSIPrefix(False)
        self.front_line = pg.PlotDataItem(pen=pg.mkPen(FRONT_COLOR, width=2))
        self.points = pg.ScatterPlotItem(size=9, brush=POINT_BRUSH, pen=None, hoverable=True)
        self.front_points = pg.ScatterPlotItem(size=14, brush=pg.mkBrush(FRONT_COLOR), pen=pg.mkPen("w"),
                                               symbol="star", hoverable=True)
        self.selected_point = pg.ScatterPlotItem(size=22, brush=None, pen=SELECTED_PEN)
        self.budget_line = pg.InfiniteLine(angle=90, pen=BUDGET_PEN, movable=False, label="budget",
                                           labelOpts={"position": 0.92, "color": "#d62728"})
        self.original_line = pg.InfiniteLine(angle=0, pen=ORIGINAL_PEN, movable=False, label="original",
                                             labelOpts={"position": 0.3, "color": "#7f7f7f"})
        for item in (self.front_line, self.points, self.front_points, self.selected_point):
            self.plot.addItem(item)
        for line in (self.budget_line, self.original_line):
            line.hide()
            self.plot.addItem(line, ignoreBounds=True)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        self.table.setSortingEnabled(True)
        self.table.sortItems(0, Qt.SortOrder.AscendingOrder)
        self.table.setColumnHidden(MEMORY_COLUMN, True)
        self.table.setMinimumWidth(160)
        self.plot.setMinimumWidth(200)  # a narrow dock squeezes the form and the table first

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.plot)
        split.addWidget(self.table)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setSizes([560, 380])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(split)

        self.quality_combo.currentIndexChanged.connect(self._mark_dirty)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.table.doubleClicked.connect(lambda _index: self.activated.emit())
        self.points.sigClicked.connect(self._point_clicked)
        self.front_points.sigClicked.connect(self._point_clicked)
        self.follow_palette()

    def follow_palette(self) -> None:
        follow_palette(self.plot)

    # --- what arrives -----------------------------------------------------------------------------------
    def begin(self, spec: SearchSpec) -> None:
        """Forget the last search's candidates; show `spec`'s budget, its objective as the quality."""
        self.spec, self.baseline, self.front = spec, {}, ()
        self.candidates.clear()
        self._rows.clear()
        self.table.setRowCount(0)
        self.table.setColumnHidden(MEMORY_COLUMN, spec.budget.kind != "memory_mb")
        self.quality_combo.setCurrentIndex(self.quality_combo.findData(spec.objective))
        self._mark_dirty()

    def set_baseline(self, baseline: dict[str, Any]) -> None:
        """The original model's quick evaluation (SearchStarted.baseline)."""
        self.baseline = dict(baseline)
        self._mark_dirty()

    def add(self, candidate: CandidateResult, front: tuple[int, ...]) -> None:
        """An ended candidate and the search's front so far (CandidateFinished)."""
        self.candidates[candidate.trial] = candidate
        self.front = tuple(front)
        self._mark_dirty()

    def finish(self, result: SearchResult) -> None:
        self.front = tuple(result.front)
        for candidate in result.candidates:
            self.candidates[candidate.trial] = candidate
        self._mark_dirty()
        self.redraw()

    def _mark_dirty(self, *_args) -> None:
        self._dirty = True

    # --- what is shown ----------------------------------------------------------------------------------
    def quality(self) -> str:
        return self.quality_combo.currentData()

    def shown_front(self) -> list[int]:
        """The front drawn: the search's own for its objective, else the engine's front for the quality shown."""
        if self.spec is None:
            return []
        if self.quality() == self.spec.objective:
            return list(self.front)
        return front_of(list(self.candidates.values()), self.quality())

    def plotted(self) -> list[CandidateResult]:
        """The candidates on the scatter: every finished one with a size and the quality shown."""
        quality = self.quality()
        return [c for _, c in sorted(self.candidates.items())
                if c.status == "finished" and c.measure is not None and c.quality(quality) is not None]

    def plotted_trials(self) -> list[int]:
        return [int(t) for t in self.points.data["data"]]

    def front_trials(self) -> list[int]:
        return [int(t) for t in self.front_points.data["data"]]

    @Slot()
    def redraw(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        self._plot()
        self._fill_table()
        self._show_selection()

    def _plot(self) -> None:
        spec, quality = self.spec, self.quality()
        plotted = self.plotted()
        front = [self.candidates[t] for t in self.shown_front() if t in self.candidates]
        xs, ys = [c.measure for c in plotted], [c.quality(quality) for c in plotted]
        self.points.setData(x=xs, y=ys, data=[c.trial for c in plotted])
        fx, fy = [c.measure for c in front], [c.quality(quality) for c in front]
        self.front_points.setData(x=fx, y=fy, data=[c.trial for c in front])
        self.front_line.setData(x=fx, y=fy)
        self.plot.setLabel("left", "perplexity" if quality == "perplexity" else "KL to the original (nats)")
        if spec is None:
            self.plot.setTitle("Candidates")
            self.budget_line.hide()
            self.original_line.hide()
            return
        kind, budget = spec.budget.kind, spec.budget.value
        self.plot.setLabel("bottom", AXIS_LABELS[kind])
        self.plot.setTitle(f"{len(plotted)} candidates; ★ {len(front)} on the Pareto front")
        self.budget_line.setPos(budget)
        self.budget_line.label.setFormat(f"budget {budget:g}{BUDGET_SUFFIX[kind]}")
        self.budget_line.show()
        original = self.baseline.get("perplexity") if quality == "perplexity" else (0.0 if self.baseline else None)
        if original is not None:
            self.original_line.setPos(original)
            self.original_line.label.setFormat(f"original {original:.4g}")
        self.original_line.setVisible(original is not None)
        self._fit_view(xs + [budget], ys + ([original] if original is not None else []))

    def _fit_view(self, xs: list[float], ys: list[float]) -> None:
        """Points, the budget and the original's line in view (the lines themselves do not count for the range)."""
        if xs:
            low, high = min(xs), max(xs)
            pad = (high - low) * 0.08 or max(abs(high) * 0.05, 0.05)
            self.plot.setXRange(low - pad, high + pad, padding=0)
        if ys:
            low, high = min(ys), max(ys)
            pad = (high - low) * 0.1 or max(abs(high) * 0.05, 0.01)
            self.plot.setYRange(low - pad, high + pad, padding=0)

    def _fill_table(self) -> None:
        table, front = self.table, set(self.shown_front())
        memory = self.spec is not None and self.spec.budget.kind == "memory_mb"
        table.setSortingEnabled(False)  # inserting into a sorted table reorders rows under our feet
        for trial, c in sorted(self.candidates.items()):
            status = c.status.replace("_", " ")
            if c.duplicate_of is not None:
                status += f" (= trial {c.duplicate_of})"
            cells = (
                _cell(c.trial), SortItem(status, status), _cell(c.bits_per_weight, ".3f"),
                _cell(None if c.compressed_bytes is None else c.compressed_bytes / MIB, ",.3f"),
                _cell(c.measure if memory else None, ",.3f"),
                _cell(c.perplexity, ",.3f"), _cell(c.kl, ".5f"), _cell(c.top1_agreement, ".3f"),
                _cell(c.seconds, ",.1f"), _cell(c.run_id),
                SortItem(c.recipe.name if c.recipe is not None else "", c.recipe.name if c.recipe else ""),
            )
            cells[0].setData(Qt.ItemDataRole.UserRole, c.trial)
            if trial in front:
                cells[0].setText(f"{c.trial} ★")
                cells[0].setToolTip("On the Pareto front")
            if c.error:
                cells[1].setToolTip(c.error)
            row = self._rows.get(trial)
            if row is None:
                index = table.rowCount()
                table.insertRow(index)
                for column, item in enumerate(cells):
                    table.setItem(index, column, item)
                self._rows[trial] = list(cells)
            else:
                index = row[0].row()
                for column, item in enumerate(cells):
                    if item.text() != row[column].text() or item.toolTip() != row[column].toolTip():
                        table.setItem(index, column, item)  # the table takes the new item and frees the old
                        row[column] = item
        table.setSortingEnabled(True)
        table.resizeColumnsToContents()

    # --- selection ---------------------------------------------------------------------------------------
    def selected_trial(self) -> int | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.table.item(rows[0].row(), 0)
        return None if item is None else item.data(Qt.ItemDataRole.UserRole)

    def selected_candidate(self) -> CandidateResult | None:
        trial = self.selected_trial()
        return None if trial is None else self.candidates.get(trial)

    def select_trial(self, trial: int) -> None:
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None and item.data(Qt.ItemDataRole.UserRole) == trial:
                self.table.selectRow(row)
                self.table.scrollToItem(item)
                return

    def _point_clicked(self, _item, spots, *_args) -> None:
        if len(spots):
            self.select_trial(int(spots[0].data()))

    def _selection_changed(self) -> None:
        self._show_selection()
        self.selection_changed.emit()

    def _show_selection(self) -> None:
        candidate, quality = self.selected_candidate(), self.quality()
        if candidate is None or candidate.measure is None or candidate.quality(quality) is None:
            self.selected_point.setData(x=[], y=[])
        else:
            self.selected_point.setData(x=[candidate.measure], y=[candidate.quality(quality)])
