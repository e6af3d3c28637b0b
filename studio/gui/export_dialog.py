"""File ▸ Export: pick a format the engine offers and a destination, see what the format does with the model
as it is now (the engine's advice: codes kept, requantized, not possible), write it in a worker — optionally
loading it back and comparing its perplexity with the model in memory — then show what was written.

The destination is checked by the engine (`check_destination`) before any work: an existing non-empty folder
is replaced only after the user agrees, an unwritable place is a clear message, and the window stays usable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
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
    QSizePolicy,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from studio.core.errors import Cancelled, ExportError
from studio.core.events import CancelToken
from studio.core.export import EXPORT_FORMATS, GGUF_TYPES, check_destination
from studio.gui.formatting import human_bytes
from studio.gui.tasks import Task


def _export_and_summarize(model, tokenizer, out: str, format_id: str, options: dict, recipe, report, source,
                          force: bool, cancel: CancelToken, verify) -> dict[str, Any] | None:
    from studio.core.export import export_model, export_summary

    try:
        result = export_model(model, tokenizer, out, format=format_id, options=options, recipe=recipe,
                              report=report, source=source, force=force, cancel=cancel, verify=verify)
    except Cancelled:
        return None
    return export_summary(result.path, result.export)


def advice_text(model, format_id: str, gguf_type: str) -> tuple[bool, str]:
    """(usable, text) for the format, from the engine's advice; never raises (the dialog must open)."""
    from studio.core.export.advice import format_advice, model_state_summary

    try:
        (advice,) = format_advice(model, gguf_type, (format_id,))
        state = model_state_summary(model)
    except Exception as exc:  # advice is a help text: a failure here must not block the export
        return True, f"(no advice: {exc})"
    lines = [f"Model: {state}.", advice.summary, *advice.details]
    return advice.usable, "\n".join(lines)


def verification_text(verification: dict[str, Any]) -> str:
    lines = [f"Perplexity in memory {verification['in_memory']:.4f} ({verification['tokens']} tokens of "
             f"{verification['text']})."]
    for loader, value in verification["reloaded"].items():
        lines.append(f"Reloaded by {loader}: {value['perplexity']:.4f} ({value['relative_difference']:+.2%}).")
    for loader, reason in verification.get("not_checked", {}).items():
        lines.append(f"Not checked with {loader}: {reason}.")
    return "\n".join(lines)



def confirm_replace(parent, path: Path) -> bool:
    """Ask before an export replaces a non-empty folder."""
    answer = QMessageBox.question(
        parent, "Replace the folder?",
        f"'{path}' already exists and is not empty. Replace it? The old folder is removed only after the "
        "new one is complete.")
    return answer == QMessageBox.StandardButton.Yes

class ExportDialog(QDialog):
    """Exports `model` (with its tokenizer, recipe and report) in a format and to a destination the user picks.

    `exported(summary)` carries `export_summary` of the written folder; failures are shown in a message box
    and through `failed(message)`, and the dialog stays open so another folder can be tried."""

    exported = Signal(dict)
    failed = Signal(str)

    def __init__(self, model, tokenizer, recipe=None, report=None, default_path: str = "",
                 parent: QWidget | None = None, source: dict | None = None, eval_config=None):
        super().__init__(parent)
        self.setWindowTitle("Export model")
        self.setMinimumWidth(620)
        self._args = (model, tokenizer, recipe, report, source)
        self._eval_config = eval_config
        self._task: Task | None = None
        self._cancel: CancelToken | None = None
        self.summary: dict[str, Any] | None = None

        self.format_list = QListWidget()
        for fmt in EXPORT_FORMATS:
            item = QListWidgetItem(fmt.name)
            item.setData(Qt.ItemDataRole.UserRole, fmt.id)
            item.setToolTip(fmt.description)
            self.format_list.addItem(item)
        self.format_list.setCurrentRow(0)
        self.format_list.setMaximumHeight(self.format_list.sizeHintForRow(0) * (len(EXPORT_FORMATS) + 1))
        self.format_help = QLabel()
        self.format_help.setWordWrap(True)
        self.format_help.setEnabled(False)
        self.advice = QLabel()
        self.advice.setWordWrap(True)
        self.advice.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.advice.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)  # never squeezed

        self.gguf_type = QComboBox()
        self.gguf_type.addItems(list(GGUF_TYPES))
        self.gguf_type.setToolTip("auto: the type that holds the studio's own codes exactly; otherwise the "
                                  "weights are quantized (again) to the type chosen")
        self.embedding_int8 = QCheckBox("Store the token embedding as int8 (per row)")
        self.embedding_int8.setChecked(True)
        self.verify = QCheckBox("Load it back and compare its perplexity with the model in memory")
        self.verify.setChecked(eval_config is not None)
        self.verify.setEnabled(eval_config is not None)
        if eval_config is None:
            self.verify.setToolTip("Set an evaluation text in the Pipeline dock to verify exports")

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
        self.cancel_button = self.buttons.addButton("Cancel export", QDialogButtonBox.ButtonRole.ActionRole)
        self.cancel_button.hide()
        self.cancel_button.clicked.connect(self.cancel_export)
        self.buttons.accepted.connect(self.start_export)
        self.buttons.rejected.connect(self.reject)

        form = QFormLayout()
        form.addRow("Format:", self.format_list)
        form.addRow("", self.format_help)
        form.addRow("GGUF type:", self.gguf_type)
        form.addRow("", self.embedding_int8)
        form.addRow("Fits?", self.advice)
        form.addRow("Destination:", path_row)
        form.addRow("", self.verify)
        self._form = form
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.files, 1)
        layout.addWidget(self.buttons)
        self.format_list.currentRowChanged.connect(self._format_changed)
        self.gguf_type.currentTextChanged.connect(lambda _: self._update_advice())
        self._format_changed(self.format_list.currentRow())

    def format_id(self) -> str:
        item = self.format_list.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else ""

    def is_busy(self) -> bool:
        return self._task is not None

    def options(self) -> dict[str, Any]:
        if self.format_id() == "gguf":
            return {"type": self.gguf_type.currentText()}
        if self.format_id() == "compressed-tensors":
            return {"embedding_bits": 8 if self.embedding_int8.isChecked() else None}
        return {}

    def _format_changed(self, row: int) -> None:
        self.format_help.setText(EXPORT_FORMATS[row].description if 0 <= row < len(EXPORT_FORMATS) else "")
        fmt = self.format_id()
        self._form.setRowVisible(self.gguf_type, fmt == "gguf")
        self._form.setRowVisible(self.embedding_int8, fmt == "compressed-tensors")
        self.path_edit.setPlaceholderText("A new folder, or a file name ending in .gguf" if fmt == "gguf"
                                          else "A new or empty folder")
        self._update_advice()

    def _update_advice(self) -> None:
        usable, text = advice_text(self._args[0], self.format_id(), self.gguf_type.currentText())
        self.advice.setText(text)
        self.advice.setStyleSheet("" if usable else "color: #c0392b;")
        self.export_button.setEnabled(usable and self._task is None)

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
        model, tokenizer, recipe, report, source = self._args
        fmt, options = self.format_id(), self.options()
        verify = self._eval_config if self.verify.isChecked() else None
        cancel = self._cancel = CancelToken()
        task = self._task = Task(lambda: _export_and_summarize(model, tokenizer, str(out), fmt, options, recipe,
                                                               report, source, force, cancel, verify))
        task.signals.done.connect(self._done)
        task.signals.failed.connect(self._failed)
        self._set_busy(True, f"Exporting to {out} …")
        task.start()

    def cancel_export(self) -> None:
        """Stop the writer at its next tensor; the temporary files are removed and nothing reaches the
        destination."""
        if self._cancel is not None:
            self._cancel.cancel()
            self.status.setText("Cancelling the export …")

    def _set_busy(self, busy: bool, message: str) -> None:
        self.progress.setVisible(busy)
        self.cancel_button.setVisible(busy)
        self.export_button.setEnabled(not busy)
        for widget in (self.path_edit, self.format_list, self.gguf_type, self.embedding_int8, self.verify):
            widget.setEnabled(not busy and (widget is not self.verify or self._eval_config is not None))
        self.status.setText(message)

    def _done(self, summary: dict[str, Any] | None) -> None:
        self._task = self._cancel = None
        if summary is None:
            self._set_busy(False, "Export cancelled: nothing was written.")
            return
        self.summary = summary
        message = f"Exported to {summary['path']}: {human_bytes(summary['disk_bytes'])} on disk, " \
                  f"{len(summary['files'])} file{'s' if len(summary['files']) != 1 else ''}."
        verification = summary["export"].get("verification")
        self._set_busy(False, message + ("\n" + verification_text(verification) if verification else ""))
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
        self._task = self._cancel = None
        self._set_busy(False, "")
        self._error("The export failed", message)

    def reject(self) -> None:
        if self._task is not None:  # the write goes on in the worker; closing would hide its outcome
            self.status.setText("The export is still running: cancel it first (nothing will be written).")
            return
        super().reject()
