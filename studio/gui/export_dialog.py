"""File ▸ Export: pick a format the engine offers and a destination folder, write it in a worker, then show
what was written (path, size on disk, files).

The destination is checked by the engine (`check_destination`) before any work: an existing non-empty folder
is replaced only after the user agrees, an unwritable place is a clear message, and the window stays usable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import ExportError
from studio.core.export import EXPORT_FORMATS, check_destination
from studio.gui.formatting import human_bytes
from studio.gui.tasks import Task


def _export_and_summarize(model, tokenizer, out: str, recipe, report, force: bool) -> dict[str, Any]:
    from studio.core.export import export_hf_folder, export_summary

    return export_summary(export_hf_folder(model, tokenizer, out, recipe=recipe, report=report, force=force))



def confirm_replace(parent, path: Path) -> bool:
    """Ask before an export replaces a non-empty folder."""
    answer = QMessageBox.question(
        parent, "Replace the folder?",
        f"'{path}' already exists and is not empty. Replace it? The old folder is removed only after the "
        "new one is complete.")
    return answer == QMessageBox.StandardButton.Yes

class ExportDialog(QDialog):
    """Exports `model` (with its tokenizer, recipe and report) to a folder the user picks.

    `exported(summary)` carries `export_summary` of the written folder; failures are shown in a message box
    and through `failed(message)`, and the dialog stays open so another folder can be tried."""

    exported = Signal(dict)
    failed = Signal(str)

    def __init__(self, model, tokenizer, recipe=None, report=None, default_path: str = "",
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Export model")
        self.setMinimumWidth(560)
        self._args = (model, tokenizer, recipe, report)
        self._task: Task | None = None
        self.summary: dict[str, Any] | None = None

        self.format_list = QListWidget()
        for fmt in EXPORT_FORMATS:
            item = QListWidgetItem(fmt.name if fmt.available else f"{fmt.name} (coming)")
            item.setData(Qt.ItemDataRole.UserRole, fmt.id)
            item.setToolTip(fmt.description)
            if not fmt.available:
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEnabled & ~Qt.ItemFlag.ItemIsSelectable)
            self.format_list.addItem(item)
        self.format_list.setCurrentRow(next(i for i, f in enumerate(EXPORT_FORMATS) if f.available))
        self.format_list.setMaximumHeight(self.format_list.sizeHintForRow(0) * (len(EXPORT_FORMATS) + 1))
        self.format_help = QLabel()
        self.format_help.setWordWrap(True)
        self.format_help.setEnabled(False)

        self.path_edit = QLineEdit(default_path)
        self.path_edit.setPlaceholderText("A new or empty folder")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(browse)

        self.progress = QProgressBar()
        self.progress.setRange(0, 0)  # indeterminate: the writer reports no steps
        self.progress.setTextVisible(False)
        self.progress.hide()
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.files = QTreeWidget()
        self.files.setHeaderLabels(["File", "Size"])
        self.files.setRootIsDecorated(False)
        self.files.hide()

        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.export_button = self.buttons.addButton("Export", QDialogButtonBox.ButtonRole.AcceptRole)
        self.export_button.setDefault(True)
        self.buttons.accepted.connect(self.start_export)
        self.buttons.rejected.connect(self.reject)

        form = QFormLayout()
        form.addRow("Format:", self.format_list)
        form.addRow("", self.format_help)
        form.addRow("Folder:", path_row)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.files, 1)
        layout.addWidget(self.buttons)
        self.format_list.currentRowChanged.connect(self._format_changed)
        self._format_changed(self.format_list.currentRow())

    def format_id(self) -> str:
        item = self.format_list.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else ""

    def is_busy(self) -> bool:
        return self._task is not None

    def _format_changed(self, row: int) -> None:
        self.format_help.setText(EXPORT_FORMATS[row].description if 0 <= row < len(EXPORT_FORMATS) else "")

    def _browse(self) -> None:
        start = self.path_edit.text() or str(Path.home())
        path, _ = QFileDialog.getSaveFileName(self, "Export to a new folder", start, "Folder (*)",
                                              options=QFileDialog.Option.DontConfirmOverwrite)
        if path:
            self.path_edit.setText(path)

    def _error(self, title: str, message: str) -> None:
        self.status.setText(message)
        self.failed.emit(message)
        QMessageBox.critical(self, title, message)

    def start_export(self) -> None:
        """Check the destination (asking before replacing a folder), then write in a worker."""
        if self._task is not None:
            return
        text = self.path_edit.text().strip()
        if not text:
            self._error("Choose a folder", "Choose the folder to export to.")
            return
        force = False
        try:
            out = check_destination(text, force=False)
        except ExportError as exc:
            path = Path(text).expanduser()
            if not (path.is_dir() and any(path.iterdir())):
                self._error("Cannot export there", str(exc))
                return
            if not confirm_replace(self, path):
                return
            force = True
            try:
                out = check_destination(text, force=True)
            except ExportError as again:
                self._error("Cannot export there", str(again))
                return
        model, tokenizer, recipe, report = self._args
        task = self._task = Task(lambda: _export_and_summarize(model, tokenizer, str(out), recipe, report, force))
        task.signals.done.connect(self._done)
        task.signals.failed.connect(self._failed)
        self._set_busy(True, f"Exporting to {out} …")
        task.start()

    def _set_busy(self, busy: bool, message: str) -> None:
        self.progress.setVisible(busy)
        self.export_button.setEnabled(not busy)
        self.path_edit.setEnabled(not busy)
        self.format_list.setEnabled(not busy)
        self.status.setText(message)

    def _done(self, summary: dict[str, Any]) -> None:
        self._task = None
        self.summary = summary
        self._set_busy(False, f"Exported to {summary['path']}: {human_bytes(summary['disk_bytes'])} on disk, "
                              f"{len(summary['files'])} files.")
        self.files.clear()
        for name, size in summary["files"]:
            item = QTreeWidgetItem([name, human_bytes(size)])
            item.setTextAlignment(1, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.files.addTopLevelItem(item)
        self.files.resizeColumnToContents(0)
        self.files.show()
        self.export_button.setText("Export again")
        self.exported.emit(summary)

    def _failed(self, message: str) -> None:
        self._task = None
        self._set_busy(False, "")
        self._error("The export failed", message)

    def reject(self) -> None:
        if self._task is not None:  # the write goes on in the worker; closing would hide its outcome
            self.status.setText("Wait for the export to finish: it cannot be interrupted safely.")
            return
        super().reject()
