"""The Model dock: what the loaded model is (architecture, parameters, bytes by dtype) and a tree of its
decoder blocks and their linear layers with shapes, parameter counts and sizes."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFormLayout, QHeaderView, QLabel, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

from studio.core.structure import find_decoder_blocks, in_out_features, is_linear
from studio.gui.formatting import human_bytes, human_count

COLUMNS = ("Layer", "Kind", "Shape (in → out)", "Parameters", "Size")


def _tensor_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def _layer_item(name: str, module) -> QTreeWidgetItem:
    in_f, out_f = in_out_features(module)
    params = sum(p.numel() for p in module.parameters(recurse=False))
    item = QTreeWidgetItem([name, type(module).__name__, f"{in_f} → {out_f}", human_count(params),
                            human_bytes(_tensor_bytes(module))])
    item.setToolTip(0, name)
    item.setData(3, Qt.ItemDataRole.UserRole, params)
    return item


def _group_item(title: str, tooltip: str, children: list[QTreeWidgetItem]) -> QTreeWidgetItem:
    params = sum(c.data(3, Qt.ItemDataRole.UserRole) for c in children)
    item = QTreeWidgetItem([title, "", f"{len(children)} linear", human_count(params), ""])
    item.setToolTip(0, tooltip)
    item.addChildren(children)
    return item


class ModelPanel(QWidget):
    """`show_model(loaded, summary)` fills the panel; `clear()` empties it."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.title = QLabel("No model loaded. Open one with File ▸ Open model (Ctrl+O).")
        self.title.setWordWrap(True)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        font = self.title.font()
        font.setBold(True)
        self.title.setFont(font)
        self.facts = QFormLayout()
        self.facts.setContentsMargins(0, 0, 0, 0)
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(COLUMNS)
        self.tree.setUniformRowHeights(True)
        self.tree.setAlternatingRowColors(True)
        header = self.tree.header()
        # layer names never shrink to nothing in a narrow dock: the tree scrolls sideways instead
        header.setStretchLastSection(True)
        for col in range(len(COLUMNS)):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        layout = QVBoxLayout(self)
        layout.addWidget(self.title)
        layout.addLayout(self.facts)
        layout.addWidget(self.tree, 1)

    def clear(self) -> None:
        self.title.setText("No model loaded. Open one with File ▸ Open model (Ctrl+O).")
        while self.facts.rowCount():
            self.facts.removeRow(0)
        self.tree.clear()

    def show_model(self, loaded, summary) -> None:
        self.clear()
        self.title.setText(loaded.name)
        self.title.setToolTip(str(loaded.source.get("path") or loaded.source.get("repo_id") or loaded.name))
        by_dtype = summary.bytes_by_dtype
        dtypes = next(iter(by_dtype)) if len(by_dtype) == 1 else ", ".join(
            f"{d} {human_bytes(b)}" for d, b in by_dtype.items())
        for label, value in (
            ("Architecture", f"{summary.architecture} ({summary.model_type})"),
            ("Parameters", f"{summary.parameters:,} ({human_count(summary.parameters)})"),
            ("Memory", f"{human_bytes(summary.total_bytes)} ({dtypes})"),
            ("Decoder blocks", f"{summary.num_blocks} at {summary.blocks_path}"),
            ("Hidden / vocabulary", f"{summary.hidden_size} / {summary.vocab_size}"),
            ("Device", str(loaded.source.get("device", "cpu"))),
        ):
            value_label = QLabel(value)
            value_label.setWordWrap(True)
            value_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.facts.addRow(f"{label}:", value_label)
        self._fill_tree(loaded.model)

    def _fill_tree(self, model) -> None:
        decoder = find_decoder_blocks(model)
        in_blocks: set[int] = set()
        items = []
        for i, block in enumerate(decoder.blocks):
            layers = [_layer_item(sub, m) for sub, m in block.named_modules() if sub and is_linear(m)]
            in_blocks.update(id(m) for m in block.modules())
            items.append(_group_item(f"block {i}", decoder.name(i), layers))
        outside = [_layer_item(n, m) for n, m in model.named_modules() if is_linear(m) and id(m) not in in_blocks]
        if outside:
            items.append(_group_item("outside the blocks", "not targeted by default (e.g. lm_head)", outside))
        self.tree.addTopLevelItems(items)
        if items:
            items[0].setExpanded(True)
