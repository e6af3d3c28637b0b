"""The palette: methods from the engine's registry grouped by the survey's five families, with a search box.
Double-click (or Enter) adds a method; dragging one onto the pipeline inserts it where it is dropped."""

from __future__ import annotations

from PySide6.QtCore import QByteArray, QMimeData, Qt, Signal
from PySide6.QtWidgets import QAbstractItemView, QLineEdit, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

from studio.core.registry import Family, all_methods
from studio.gui.pipeline_model import METHOD_MIME

FAMILY_TITLES = {
    Family.QUANTIZATION: "Quantization",
    Family.PRUNING: "Pruning",
    Family.DISTILLATION: "Knowledge distillation",
    Family.COMPACT_ARCHITECTURE: "Compact architecture / low-rank",
    Family.DYNAMIC: "Dynamic networks",
}
METHOD_ROLE = Qt.ItemDataRole.UserRole


class _MethodTree(QTreeWidget):
    def mimeData(self, items) -> QMimeData:
        mime = QMimeData()
        ids = [i.data(0, METHOD_ROLE) for i in items if i.data(0, METHOD_ROLE)]
        if ids:
            mime.setData(METHOD_MIME, QByteArray(ids[0].encode()))
        return mime

    def mimeTypes(self) -> list[str]:
        return [METHOD_MIME]

    def startDrag(self, _actions) -> None:
        super().startDrag(Qt.DropAction.CopyAction)  # a palette entry is copied, never moved out


class MethodPalette(QWidget):
    method_chosen = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.search = QLineEdit(placeholderText="Search methods…", clearButtonEnabled=True)
        self.tree = _MethodTree()
        self.tree.setHeaderHidden(True)
        self.tree.setRootIsDecorated(False)
        self.tree.setIndentation(10)
        self.tree.setDragEnabled(True)
        self.tree.setDragDropMode(QAbstractItemView.DragDropMode.DragOnly)
        self.tree.setDefaultDropAction(Qt.DropAction.CopyAction)
        self.tree.itemActivated.connect(self._activated)
        self.search.textChanged.connect(self._filter)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.search)
        layout.addWidget(self.tree)
        self._fill()

    def _fill(self) -> None:
        methods = all_methods()
        for family in Family:
            members = [m for m in methods if m.family == family]
            title = FAMILY_TITLES[family] + ("" if members else "  (coming)")
            head = QTreeWidgetItem([title])
            head.setFlags(Qt.ItemFlag.ItemIsEnabled)
            font = head.font(0)
            font.setBold(True)
            head.setFont(0, font)
            head.setToolTip(0, FAMILY_TITLES[family])
            if not members:
                head.setFlags(Qt.ItemFlag.NoItemFlags)  # drawn greyed in the current palette, light or dark
                head.setToolTip(0, f"{FAMILY_TITLES[family]}: no method of this family is available yet.")
            self.tree.addTopLevelItem(head)
            for method in members:
                item = QTreeWidgetItem([f"{method.title}  ·  {method.id}"])
                item.setData(0, METHOD_ROLE, method.id)
                calibration = "\nNeeds calibration data." if method.needs_calibration else ""
                item.setToolTip(0, f"{method.summary}{calibration}\nDouble-click or drag into the pipeline.")
                item.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsDragEnabled)
                head.addChild(item)
            head.setExpanded(True)

    def item_for(self, method_id: str) -> QTreeWidgetItem | None:
        for i in range(self.tree.topLevelItemCount()):
            head = self.tree.topLevelItem(i)
            for j in range(head.childCount()):
                if head.child(j).data(0, METHOD_ROLE) == method_id:
                    return head.child(j)
        return None

    def _activated(self, item: QTreeWidgetItem, _column: int) -> None:
        method_id = item.data(0, METHOD_ROLE)
        if method_id:
            self.method_chosen.emit(method_id)

    def _filter(self, text: str) -> None:
        words = text.lower().split()
        for i in range(self.tree.topLevelItemCount()):
            head = self.tree.topLevelItem(i)
            shown = 0
            for j in range(head.childCount()):
                child = head.child(j)
                haystack = f"{child.text(0)} {child.toolTip(0)} {head.text(0)}".lower()
                match = all(w in haystack for w in words)
                child.setHidden(not match)
                shown += match
            head.setHidden(bool(words) and shown == 0)
