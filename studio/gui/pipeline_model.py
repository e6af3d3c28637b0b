"""The pipeline's steps as a Qt list model, with what validation found for each step.

The model never changes itself in answer to the view: drops, moves and check-box clicks become requests
(signals) that the editor turns into undoable commands, which then call the mutators here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from PySide6.QtCore import QAbstractListModel, QByteArray, QMimeData, QModelIndex, Qt, Signal

from studio.core.recipe import Step
from studio.core.registry import Estimate

STEP_MIME = "application/x-studio-step-row"
METHOD_MIME = "application/x-studio-method"
STEP_ROLE = Qt.ItemDataRole.UserRole + 1
STATUS_ROLE = Qt.ItemDataRole.UserRole + 2


@dataclass
class StepStatus:
    """Validation of one step: the full message, the part naming each field, and (with a model) the estimate."""

    message: str = ""
    field_problems: dict[str, str] = field(default_factory=dict)
    estimate: Estimate | None = None
    layers: int | None = None  # targeted linear layers, with a model

    @property
    def valid(self) -> bool:
        return not self.message


def copy_step(step: Step) -> Step:
    return replace(step, params=dict(step.params))


class PipelineModel(QAbstractListModel):
    add_requested = Signal(str, int)  # method id, row
    move_requested = Signal(int, int)  # from row, to row (final position)
    enabled_requested = Signal(int, bool)
    steps_changed = Signal(int)  # a mutation happened; the row to select afterwards (-1: none)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._steps: list[Step] = []
        self._statuses: list[StepStatus] = []

    # --- reading ---------------------------------------------------------------------------------------
    @property
    def steps(self) -> list[Step]:
        return [copy_step(s) for s in self._steps]

    def step(self, row: int) -> Step:
        return copy_step(self._steps[row])

    def status(self, row: int) -> StepStatus:
        return self._statuses[row] if 0 <= row < len(self._statuses) else StepStatus()

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._steps)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or not 0 <= index.row() < len(self._steps):
            return None
        step = self._steps[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return step.method
        if role == Qt.ItemDataRole.CheckStateRole:
            return Qt.CheckState.Checked if step.enabled else Qt.CheckState.Unchecked
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.status(index.row()).message or None
        if role == STEP_ROLE:
            return step
        if role == STATUS_ROLE:
            return self.status(index.row())
        return None

    def setData(self, index, value, role=Qt.ItemDataRole.EditRole) -> bool:
        if role == Qt.ItemDataRole.CheckStateRole and index.isValid():
            checked = Qt.CheckState(value) == Qt.CheckState.Checked
            self.enabled_requested.emit(index.row(), checked)
            return True
        return False

    def flags(self, index):
        if not index.isValid():
            return Qt.ItemFlag.ItemIsDropEnabled
        return (
            Qt.ItemFlag.ItemIsEnabled
            | Qt.ItemFlag.ItemIsSelectable
            | Qt.ItemFlag.ItemIsDragEnabled
            | Qt.ItemFlag.ItemIsUserCheckable
        )

    # --- drag and drop: palette methods are added, our own rows are moved ------------------------------
    def supportedDropActions(self):
        return Qt.DropAction.MoveAction | Qt.DropAction.CopyAction

    def supportedDragActions(self):
        return Qt.DropAction.MoveAction

    def mimeTypes(self) -> list[str]:
        return [STEP_MIME, METHOD_MIME]

    def mimeData(self, indexes) -> QMimeData:
        mime = QMimeData()
        rows = sorted({i.row() for i in indexes if i.isValid()})
        mime.setData(STEP_MIME, QByteArray(",".join(map(str, rows)).encode()))
        return mime

    def canDropMimeData(self, data, action, row, column, parent) -> bool:
        return data.hasFormat(METHOD_MIME) or data.hasFormat(STEP_MIME)

    def dropMimeData(self, data, action, row, column, parent) -> bool:
        target = row if row >= 0 else (parent.row() if parent.isValid() else len(self._steps))
        if data.hasFormat(METHOD_MIME):
            self.add_requested.emit(bytes(data.data(METHOD_MIME)).decode(), target)
            return True
        return False  # our own rows arrive through moveRows

    def moveRows(self, source_parent, source_row, count, dest_parent, dest_child) -> bool:
        if count != 1 or source_parent.isValid() or dest_parent.isValid():
            return False
        to = dest_child if dest_child <= source_row else dest_child - 1
        to = max(0, min(to, len(self._steps) - 1))
        if to != source_row:
            self.move_requested.emit(source_row, to)
        return True

    # --- mutators, called by the undo commands ----------------------------------------------------------
    def insert_step(self, row: int, step: Step) -> None:
        self.beginInsertRows(QModelIndex(), row, row)
        self._steps.insert(row, copy_step(step))
        self._statuses.insert(row, StepStatus())
        self.endInsertRows()
        self.steps_changed.emit(row)

    def remove_step(self, row: int) -> Step:
        self.beginRemoveRows(QModelIndex(), row, row)
        step = self._steps.pop(row)
        self._statuses.pop(row)
        self.endRemoveRows()
        self.steps_changed.emit(min(row, len(self._steps) - 1))
        return step

    def move_step(self, source: int, to: int) -> None:
        self.beginMoveRows(QModelIndex(), source, source, QModelIndex(), to if to < source else to + 1)
        self._steps.insert(to, self._steps.pop(source))
        self._statuses.insert(to, self._statuses.pop(source))
        self.endMoveRows()
        self.steps_changed.emit(to)

    def replace_step(self, row: int, step: Step) -> None:
        self._steps[row] = copy_step(step)
        index = self.index(row)
        self.dataChanged.emit(index, index)
        self.steps_changed.emit(row)

    def set_steps(self, steps: list[Step]) -> None:
        self.beginResetModel()
        self._steps = [copy_step(s) for s in steps]
        self._statuses = [StepStatus() for _ in steps]
        self.endResetModel()
        self.steps_changed.emit(0 if steps else -1)

    def set_statuses(self, statuses: list[StepStatus]) -> None:
        """Validation results; a display change only, so it does not emit steps_changed."""
        self._statuses = list(statuses)
        if self._steps:
            self.dataChanged.emit(self.index(0), self.index(len(self._steps) - 1), [STATUS_ROLE])
