"""The run history: a sortable, filterable table of past runs, and a scatter of compressed size against final
perplexity with the Pareto front highlighted. Reads and writes go through `studio.core.history.RunHistory`
(small SQLite queries, fine on the GUI thread).

"Compare two runs" sends `compare` a report synthesized by `comparison_report`: the older run's result is the
"before" column and the newer run's the "after" column, so the compare view shows one run against the other.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QLabel,
    QLineEdit,
    QMessageBox,
    QSplitter,
    QTableWidget,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import StudioError
from studio.core.history import STATUSES, RunHistory, RunRecord, comparison_report, pareto_front
from studio.gui.compare_view import SortItem

log = logging.getLogger(__name__)

MIB = 1024 * 1024
COLUMNS = ("#", "Finished", "Model", "Recipe", "Status", "Perplexity before", "Perplexity after", "KL",
           "Size before (MiB)", "Size after (MiB)", "Seconds", "Export")
ALL_STATUSES = "All runs"
POINT_BRUSH = pg.mkBrush(120, 144, 180, 200)
FRONT_COLOR = "#e6550d"


def open_history() -> RunHistory | None:
    """The user's run history, or None (with a warning) when it cannot be opened."""
    try:
        return RunHistory()
    except StudioError as exc:
        log.warning("The run history is unavailable: %s", exc)
        return None


def _mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


def _cell(value: Any, spec: str = "") -> SortItem:
    """A cell that sorts by its value; numbers right-aligned and sorted as numbers."""
    return SortItem("" if value is None else format(value, spec), value)


def _run_label(record: RunRecord) -> str:
    return f"run {record.id} ({record.recipe_name or 'untitled recipe'} on {record.model_name or 'a model'})"


class HistoryView(QWidget):
    """Past runs from a RunHistory (None: history unavailable). `refresh()` reloads from the store."""

    open_recipe = Signal(object)  # the Recipe of the selected run
    compare = Signal(dict)  # a report for CompareView.show_report comparing two runs (see comparison_report)

    def __init__(self, history: RunHistory | None, parent: QWidget | None = None):
        super().__init__(parent)
        self.history = history
        self.records: dict[int, RunRecord] = {}  # what the table shows, by run id
        self.front: list[int] = []

        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter by model, recipe, status or export path")
        self.filter_edit.setClearButtonEnabled(True)
        self.status_combo = QComboBox()
        self.status_combo.addItems([ALL_STATUSES, *STATUSES])
        self.open_recipe_action = QAction("Open recipe", self)
        self.open_recipe_action.setToolTip("Load the selected run's recipe into the pipeline editor")
        self.compare_action = QAction("Compare two runs", self)
        self.compare_action.setToolTip("Select two finished runs: the compare view shows the older against the newer")
        self.delete_action = QAction("Delete", self)
        self.delete_action.setToolTip("Remove the selected runs from the history (exported folders are kept)")
        self.refresh_action = QAction("Refresh", self)
        toolbar = QToolBar()
        toolbar.addWidget(self.filter_edit)
        toolbar.addWidget(self.status_combo)
        toolbar.addSeparator()
        toolbar.addActions([self.open_recipe_action, self.compare_action, self.delete_action, self.refresh_action])

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        self.table.addActions([self.open_recipe_action, self.compare_action, self.delete_action])
        self.table.horizontalHeader().setSortIndicator(1, Qt.SortOrder.DescendingOrder)
        self.table.setSortingEnabled(True)

        self.plot = pg.PlotWidget(title="Size against perplexity (finished runs)")
        self.plot.setLabel("bottom", "compressed size (MiB)")
        self.plot.setLabel("left", "final perplexity")
        self.plot.setMenuEnabled(False)
        for axis in ("left", "bottom"):
            self.plot.getAxis(axis).enableAutoSIPrefix(False)
        self.front_line = pg.PlotDataItem(pen=pg.mkPen(FRONT_COLOR, width=2))
        self.points = pg.ScatterPlotItem(size=9, brush=POINT_BRUSH, pen=None, hoverable=True)
        self.front_points = pg.ScatterPlotItem(size=13, brush=pg.mkBrush(FRONT_COLOR), pen=pg.mkPen("w"),
                                               symbol="star", hoverable=True)
        for item in (self.front_line, self.points, self.front_points):
            self.plot.addItem(item)

        self.status_label = QLabel()
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.table)
        split.addWidget(self.plot)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        layout = QVBoxLayout(self)
        layout.addWidget(toolbar)
        layout.addWidget(split)
        layout.addWidget(self.status_label)

        self.filter_edit.textChanged.connect(self.refresh)
        self.status_combo.currentIndexChanged.connect(self.refresh)
        self.table.itemSelectionChanged.connect(self._update_actions)
        self.table.doubleClicked.connect(self._request_recipe)
        self.open_recipe_action.triggered.connect(self._request_recipe)
        self.compare_action.triggered.connect(self._request_comparison)
        self.delete_action.triggered.connect(self.delete_selected)
        self.refresh_action.triggered.connect(self.refresh)
        self.points.sigClicked.connect(self._point_clicked)
        self.front_points.sigClicked.connect(self._point_clicked)
        self.refresh()

    # --- recording (called by the window when a run ends or is exported) ---------------------------------
    def record_run(self, result, recipe, model_source: dict | None, started_at: float | None) -> int | None:
        """Store an ended RunResult; its id, or None when the history is unavailable (a warning, never an error)."""
        if self.history is None:
            return None
        try:
            run_id = self.history.record(result.status, result.report, recipe, model_source,
                                         error=result.error, started_at=started_at)
        except StudioError as exc:
            log.warning("The run was not recorded in the history: %s", exc)
            return None
        self.refresh()
        return run_id

    def record_export(self, run_id: int | None, path: str) -> None:
        if self.history is None or run_id is None:
            return
        try:
            self.history.set_export(run_id, path)
        except StudioError as exc:
            log.warning("The export was not recorded in the history: %s", exc)
        self.refresh()

    # --- showing --------------------------------------------------------------------------------------------
    def status_filter(self) -> str | None:
        text = self.status_combo.currentText()
        return None if text == ALL_STATUSES else text

    def refresh(self) -> None:
        if self.history is None:
            self._show([], "The run history is unavailable (see the log).")
            return
        try:
            records = self.history.list(self.filter_edit.text(), self.status_filter())
        except StudioError as exc:
            self._show([], f"The run history could not be read: {exc}")
            return
        self._show(records)

    def _show(self, records: list[RunRecord], message: str = "") -> None:
        selected = set(self.selected_ids())
        self.records = {r.id: r for r in records}
        self.front = pareto_front(records)
        self._fill_table(records, selected)
        self._plot(records)
        finished = sum(r.status == "finished" for r in records)
        self.status_label.setText(message or f"{len(records)} run(s), {finished} finished; "
                                             f"{len(self.front)} on the Pareto front (starred)")
        self._update_actions()

    def _fill_table(self, records: list[RunRecord], selected: set[int]) -> None:
        table = self.table
        table.setSortingEnabled(False)  # inserting into a sorted table reorders rows under our feet
        table.clearSelection()
        table.setRowCount(len(records))
        for row, r in enumerate(records):
            finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.finished_at))
            cells = (
                _cell(r.id), SortItem(finished, r.finished_at), SortItem(r.model_name, r.model_name.lower()),
                SortItem(r.recipe_name, r.recipe_name.lower()), SortItem(r.status, r.status),
                _cell(r.baseline_perplexity, ",.3f"), _cell(r.final_perplexity, ",.3f"), _cell(r.kl, ".5f"),
                _cell(_mib(r.size_before), ",.3f"), _cell(_mib(r.size_after), ",.3f"), _cell(r.seconds, ",.1f"),
                SortItem(r.export_path or "", r.export_path or ""),
            )
            cells[0].setData(Qt.ItemDataRole.UserRole, r.id)
            cells[2].setToolTip(r.model_identity)
            if r.error:
                cells[4].setToolTip(r.error)
            if r.id in self.front:
                cells[0].setText(f"{r.id} ★")
            for column, item in enumerate(cells):
                table.setItem(row, column, item)
        table.setSortingEnabled(True)
        table.resizeColumnsToContents()
        if selected:
            self.select_ids(list(selected))

    def _plot(self, records: list[RunRecord]) -> None:
        plotted = [r for r in records
                   if r.status == "finished" and r.size_after is not None and r.final_perplexity is not None]
        self.points.setData(x=[_mib(r.size_after) for r in plotted], y=[r.final_perplexity for r in plotted],
                            data=[r.id for r in plotted])
        front = [self.records[i] for i in self.front]
        xs, ys = [_mib(r.size_after) for r in front], [r.final_perplexity for r in front]
        self.front_points.setData(x=xs, y=ys, data=[r.id for r in front])
        self.front_line.setData(x=xs, y=ys)

    def plotted_ids(self) -> list[int]:
        """The runs shown as points on the scatter."""
        return [int(i) for i in self.points.data["data"]]

    # --- selection and actions ------------------------------------------------------------------------------
    def _row_id(self, row: int) -> int | None:
        item = self.table.item(row, 0)
        return None if item is None else item.data(Qt.ItemDataRole.UserRole)

    def selected_ids(self) -> list[int]:
        rows = sorted({index.row() for index in self.table.selectionModel().selectedRows()})
        return [i for i in (self._row_id(r) for r in rows) if i is not None]

    def select_ids(self, run_ids: list[int]) -> None:
        self.table.clearSelection()
        mode = self.table.selectionMode()
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        for row in range(self.table.rowCount()):
            if self._row_id(row) in run_ids:
                self.table.selectRow(row)
        self.table.setSelectionMode(mode)

    def _update_actions(self) -> None:
        ids = self.selected_ids()
        available = self.history is not None
        self.open_recipe_action.setEnabled(available and len(ids) == 1)
        both_finished = len(ids) == 2 and all(self.records[i].status == "finished" for i in ids)
        self.compare_action.setEnabled(available and both_finished)
        self.delete_action.setEnabled(available and bool(ids))
        self.refresh_action.setEnabled(available)

    def _point_clicked(self, _item, spots, *_args) -> None:
        if spots:
            self.select_ids([int(spots[0].data())])

    def _request_recipe(self, *_args) -> None:
        ids = self.selected_ids()
        if len(ids) != 1:
            return
        try:
            recipe = self.records[ids[0]].recipe()
        except StudioError as exc:
            QMessageBox.warning(self, "Cannot open the recipe", str(exc))
            return
        self.open_recipe.emit(recipe)

    def _request_comparison(self) -> None:
        ids = sorted(self.selected_ids())
        if len(ids) != 2 or self.history is None:
            return
        try:
            first, second = (self.history.get(i) for i in ids)
        except StudioError as exc:
            QMessageBox.warning(self, "Cannot compare the runs", str(exc))
            return
        self.compare.emit(comparison_report(first.report or {}, second.report or {},
                                            _run_label(first), _run_label(second)))

    def delete_selected(self, *_args, confirm: bool = True) -> None:
        ids = self.selected_ids()
        if not ids or self.history is None:
            return
        if confirm:
            answer = QMessageBox.question(
                self, "Delete from the history?",
                f"Remove {len(ids)} run(s) from the history? Exported model folders are not touched.")
            if answer != QMessageBox.StandardButton.Yes:
                return
        try:
            for run_id in ids:
                self.history.delete(run_id)
        except StudioError as exc:
            QMessageBox.warning(self, "Cannot delete", str(exc))
        self.refresh()
