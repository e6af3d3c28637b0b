"""The pipeline editor: a palette of methods, the pipeline as connected step cards, and an inspector form for
the selected step. Every edit is an undoable command; the engine validates each step as it changes, and with
a model set each card shows its estimated memory and time and the footer the predicted compressed size."""

from __future__ import annotations

import html
import logging
from pathlib import Path

from PySide6.QtCore import QByteArray, QIODevice, QModelIndex, QSaveFile, Qt, Signal
from PySide6.QtGui import QKeySequence, QPainter, QShortcut, QUndoStack
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QMenu,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QSplitter,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from studio.core.calibration import CalibrationSettings
from studio.core.errors import RecipeError
from studio.core.paths import PRESETS_DIR
from studio.core.recipe import Recipe, Step, load_recipe
from studio.core.registry import get_method, param_specs
from studio.core.structure import TargetSpec
from studio.gui import pipeline_commands as cmd
from studio.gui.formatting import human_bytes, human_seconds
from studio.gui.method_palette import MethodPalette
from studio.gui.pipeline_model import PipelineModel
from studio.gui.pipeline_validation import PipelineCheck, check_pipeline
from studio.gui.step_card import StepCardDelegate
from studio.gui.step_inspector import StepInspector

log = logging.getLogger("studio.gui.pipeline")
RECIPE_FILTER = "Recipes (*.yaml *.yml);;All files (*)"


def _needs_calibration(method_id: str) -> bool:
    try:
        return get_method(method_id).needs_calibration
    except KeyError:  # an unknown method is reported by the step's own check
        return False


class PipelineView(QListView):
    """The step cards; says what to do when there are none."""

    def paintEvent(self, event) -> None:
        super().paintEvent(event)
        if self.model() is not None and self.model().rowCount() == 0:
            painter = QPainter(self.viewport())
            painter.setPen(self.palette().placeholderText().color())
            painter.drawText(self.viewport().rect().adjusted(12, 12, -12, -12),
                             Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                             "Double-click a method in the palette, or drag it here, to add a step.")


class PipelineEditor(QWidget):
    changed = Signal()
    validity_changed = Signal(bool, str)
    recipe_file_used = Signal(str)  # a recipe file was opened or saved (for the recent list)
    eval_text_changed = Signal(str)
    calibration_text_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.undo_stack = QUndoStack(self)
        self.model = PipelineModel(self)
        self.description = ""
        self._name = ""
        self.current_path: Path | None = None
        self._loaded = None
        self._check = PipelineCheck(reason="The pipeline is empty: add a step from the palette.")
        self._validity: tuple[bool, str] | None = None
        self._calibration = CalibrationSettings()  # the recipe's section; the fields below edit part of it
        self._build()
        self._connect()
        self._revalidate()

    # --- construction -----------------------------------------------------------------------------------
    def _build(self) -> None:
        self.name_edit = QLineEdit(placeholderText="Untitled recipe")
        self.name_edit.setToolTip("The recipe's name, saved in its YAML file.")
        self.open_button = QPushButton("Open…")
        self.open_button.setToolTip("Open a recipe YAML file")
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the pipeline as a recipe YAML file")
        self.presets_button = QToolButton(text="Presets")
        self.presets_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.presets_menu = QMenu(self.presets_button)
        self.presets_menu.aboutToShow.connect(self._fill_presets)
        self.presets_button.setMenu(self.presets_menu)
        top = QHBoxLayout()
        top.addWidget(QLabel("Recipe:"))
        top.addWidget(self.name_edit, 1)
        for button in (self.open_button, self.save_button, self.presets_button):
            top.addWidget(button)

        self.palette = MethodPalette()
        self.view = PipelineView()
        self.view.setModel(self.model)
        self.view.setItemDelegate(StepCardDelegate(self.view))
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.view.setDragDropMode(QAbstractItemView.DragDropMode.DragDrop)
        self.view.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.view.setDragEnabled(True)
        self.view.setAcceptDrops(True)
        self.view.setDropIndicatorShown(True)
        self.view.setDragDropOverwriteMode(False)
        self.view.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.view.setToolTip("Drag to reorder; Delete removes; Space or the check box enables or disables a step.")
        self.remove_button = QPushButton("Remove")
        self.up_button = QPushButton("▲ Up")
        self.down_button = QPushButton("▼ Down")
        buttons = QHBoxLayout()
        for button in (self.up_button, self.down_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(self.remove_button)
        middle = QWidget()
        middle_layout = QVBoxLayout(middle)
        middle_layout.setContentsMargins(0, 0, 0, 0)
        middle_layout.addWidget(self.view, 1)
        middle_layout.addLayout(buttons)

        self.inspector = StepInspector()
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        for widget, stretch in ((self.palette, 2), (middle, 3), (self.inspector, 3)):
            self.splitter.addWidget(widget)
            self.splitter.setStretchFactor(self.splitter.count() - 1, stretch)
        self.splitter.setChildrenCollapsible(False)
        self.palette.setMinimumWidth(150)
        self.inspector.setMinimumWidth(220)
        self.splitter.setSizes([240, 460, 360])

        self.eval_edit = QLineEdit(placeholderText="none: no perplexity (choose a UTF-8 .txt file)")
        self.eval_edit.setToolTip(
            "A text file on which the original and each step's result are scored (perplexity, KL divergence "
            "to the original) during the run. Leave empty to skip evaluation."
        )
        self.eval_browse = QPushButton("Browse…")
        eval_row = QHBoxLayout()
        eval_row.addWidget(QLabel("Evaluation text:"))
        eval_row.addWidget(self.eval_edit, 1)
        eval_row.addWidget(self.eval_browse)
        self.calib_edit = QLineEdit(placeholderText="needed by GPTQ, AWQ, SparseGPT, Wanda… (a UTF-8 .txt file)")
        self.calib_edit.setToolTip(
            "Text whose activations calibration methods look at: random windows of it are run through the model. "
            "Saved in the recipe's calibration section."
        )
        self.calib_browse = QPushButton("Browse…")
        self.calib_samples = QSpinBox(minimum=1, maximum=4096, value=32, suffix=" samples")
        self.calib_samples.setToolTip("How many windows of the calibration text are used.")
        self.calib_seq_len = QSpinBox(minimum=8, maximum=16384, value=512, singleStep=64, suffix=" tokens")
        self.calib_seq_len.setToolTip("Tokens per calibration window.")
        calib_row = QHBoxLayout()
        calib_row.addWidget(QLabel("Calibration text:"))
        calib_row.addWidget(self.calib_edit, 1)
        calib_row.addWidget(self.calib_browse)
        calib_row.addWidget(self.calib_samples)
        calib_row.addWidget(QLabel("×"))
        calib_row.addWidget(self.calib_seq_len)
        self.footer = QLabel()
        self.footer.setWordWrap(True)
        self.footer.setTextFormat(Qt.TextFormat.RichText)
        self.reason_label = QLabel()
        self.reason_label.setTextFormat(Qt.TextFormat.PlainText)
        self.reason_label.setWordWrap(True)
        self.reason_label.setStyleSheet("color: #d32f2f;")

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.splitter, 1)
        layout.addLayout(eval_row)
        layout.addLayout(calib_row)
        layout.addWidget(self.footer)
        layout.addWidget(self.reason_label)

    def _connect(self) -> None:
        self.palette.method_chosen.connect(self.add_method)
        self.model.add_requested.connect(self.add_method)
        self.model.move_requested.connect(self.move_step)
        self.model.enabled_requested.connect(self.set_enabled)
        self.model.steps_changed.connect(self._on_steps_changed)
        self.view.selectionModel().currentChanged.connect(self._show_selected)
        self.inspector.param_edited.connect(self._param_edited)
        self.inspector.targets_edited.connect(self._targets_edited)
        self.remove_button.clicked.connect(self.remove_selected)
        self.up_button.clicked.connect(self._move_up)
        self.down_button.clicked.connect(self._move_down)
        self.open_button.clicked.connect(self.open_recipe_dialog)
        self.save_button.clicked.connect(self.save_recipe_dialog)
        self.name_edit.editingFinished.connect(self._name_finished)
        self.eval_browse.clicked.connect(self._browse_eval_text)
        self.eval_edit.editingFinished.connect(self._eval_text_finished)
        self.calib_browse.clicked.connect(self._browse_calibration_text)
        self.calib_edit.editingFinished.connect(self._calibration_finished)
        self.calib_samples.valueChanged.connect(lambda _value: self._revalidate())
        self.calib_seq_len.valueChanged.connect(lambda _value: self._revalidate())
        for key in (QKeySequence.StandardKey.Delete, QKeySequence(Qt.Key.Key_Backspace)):
            QShortcut(key, self.view, self.remove_selected, context=Qt.ShortcutContext.WidgetShortcut)
        QShortcut(QKeySequence(Qt.Key.Key_Space), self.view, self._toggle_selected,
                  context=Qt.ShortcutContext.WidgetShortcut)

    # --- the recipe -------------------------------------------------------------------------------------
    def recipe(self) -> Recipe:
        return Recipe(self.model.steps, self.recipe_name(), self.description, self.calibration())

    def set_recipe(self, recipe: Recipe, text: str = "Set recipe") -> None:
        """Replace the pipeline by `recipe` (one undoable edit). A recipe without a calibration section keeps
        the calibration text already chosen."""
        if recipe.calibration is not None:
            self.set_calibration(recipe.calibration)
        self.undo_stack.push(cmd.ReplaceSteps(self, recipe.steps, recipe.name, recipe.description, text))

    def recipe_name(self) -> str:
        return self._name

    def _set_contents(self, steps: list[Step], name: str, description: str) -> None:
        self._set_name(name)
        self.description = description
        self.model.set_steps(steps)

    def _set_name(self, name: str) -> None:
        self._name = name
        self.name_edit.setText(name)
        self.changed.emit()

    def _name_finished(self) -> None:
        typed = self.name_edit.text().strip()
        if typed != self._name:
            self.undo_stack.push(cmd.SetRecipeName(self, typed))

    # --- edits (each one undoable) ----------------------------------------------------------------------
    def add_method(self, method_id: str, row: int | None = None) -> None:
        """Append a step of `method_id` with its default parameters (or insert it at `row`)."""
        try:
            method = get_method(method_id)
        except KeyError as exc:
            self._error("Unknown method", exc.args[0])
            return
        params = {spec.name: spec.default for spec in param_specs(method.Params)}
        row = self.model.rowCount() if row is None or row < 0 else min(row, self.model.rowCount())
        self.undo_stack.push(cmd.AddStep(self.model, row, Step(method_id, params)))

    def remove_step(self, row: int) -> None:
        if 0 <= row < self.model.rowCount():
            self.undo_stack.push(cmd.RemoveStep(self.model, row))

    def remove_selected(self, *_args) -> None:
        self.remove_step(self.selected_row())

    def move_step(self, source: int, to: int) -> None:
        count = self.model.rowCount()
        if 0 <= source < count and 0 <= to < count and source != to:
            self.undo_stack.push(cmd.MoveStep(self.model, source, to))

    def set_enabled(self, row: int, enabled: bool) -> None:
        if 0 <= row < self.model.rowCount() and self.model.step(row).enabled != enabled:
            self.undo_stack.push(cmd.SetEnabled(self.model, row, enabled))

    def set_param(self, row: int, name: str, value) -> None:
        if 0 <= row < self.model.rowCount():
            step = self.model.step(row)
            if name not in step.params or step.params[name] != value or type(step.params[name]) is not type(value):
                self.undo_stack.push(cmd.SetParam(self.model, row, name, value))

    def set_targets(self, row: int, targets: TargetSpec) -> None:
        if 0 <= row < self.model.rowCount() and self.model.step(row).targets != targets:
            self.undo_stack.push(cmd.SetTargets(self.model, row, targets))

    def _param_edited(self, name: str, value) -> None:
        self.set_param(self.inspector.row, name, value)

    def _targets_edited(self, spec: TargetSpec) -> None:
        self.set_targets(self.inspector.row, spec)

    def _move_up(self) -> None:
        self._move_selected(-1)

    def _move_down(self) -> None:
        self._move_selected(+1)

    def _move_selected(self, delta: int) -> None:
        row = self.selected_row()
        self.move_step(row, row + delta)

    def _toggle_selected(self) -> None:
        row = self.selected_row()
        if row >= 0:
            self.set_enabled(row, not self.model.step(row).enabled)

    # --- selection and validation -----------------------------------------------------------------------
    def selected_row(self) -> int:
        index = self.view.currentIndex()
        return index.row() if index.isValid() else -1

    def select_row(self, row: int) -> None:
        if 0 <= row < self.model.rowCount():
            self.view.setCurrentIndex(self.model.index(row))
        else:
            self.view.setCurrentIndex(QModelIndex())
        self._show_selected()

    def _on_steps_changed(self, row: int) -> None:
        self._revalidate()
        self.select_row(row)
        self.changed.emit()

    def _show_selected(self, *_args) -> None:
        row = self.selected_row()
        self.inspector.show_step(row, self.model.step(row) if row >= 0 else None)
        if row >= 0:
            self.inspector.show_status(self.model.status(row))
        self.remove_button.setEnabled(row >= 0)
        self.up_button.setEnabled(row > 0)
        self.down_button.setEnabled(0 <= row < self.model.rowCount() - 1)

    def _revalidate(self) -> None:
        model = self._loaded.model if self._loaded is not None else None
        self._check = check = check_pipeline(self.model.steps, model)
        self.model.set_statuses(check.statuses)
        text_problem = self._eval_text_problem() or self._calibration_problem()
        valid, reason = check.valid and not text_problem, check.reason or text_problem
        self.reason_label.setText(reason)
        self.reason_label.setVisible(bool(reason))
        self.footer.setText(self._footer_text(check))
        row = self.selected_row()
        if row >= 0:
            self.inspector.show_status(self.model.status(row))
        if self._validity != (valid, reason):
            self._validity = (valid, reason)
            self.validity_changed.emit(valid, reason)

    @staticmethod
    def _footer_text(check: PipelineCheck) -> str:
        if check.dense_bytes is None:
            return "Open a model to see each step's memory and time and the predicted compressed size."
        size = f"Model {human_bytes(check.dense_bytes)}"
        if check.predicted_bytes is None:
            return f"{size}  ·  a valid pipeline shows its predicted size here."
        ratio = check.predicted_bytes / max(check.dense_bytes, 1)
        return (
            f"{size}  →  predicted <b>{human_bytes(check.predicted_bytes)}</b> ({ratio:.0%})  ·  "
            f"peak extra memory ≈ {human_bytes(check.extra_bytes or 0)}  ·  "
            f"{html.escape(human_seconds(check.seconds or 0))} without evaluation"
        )

    @property
    def check(self) -> PipelineCheck:
        return self._check

    @property
    def is_valid(self) -> bool:
        return bool(self._validity and self._validity[0])

    @property
    def invalid_reason(self) -> str:
        return self._validity[1] if self._validity else ""

    def set_model(self, loaded) -> None:
        """With a model, steps are also checked against its layers and estimated; None removes it."""
        self._loaded = loaded
        self._revalidate()

    # --- evaluation text --------------------------------------------------------------------------------
    def eval_text(self) -> str:
        return self.eval_edit.text().strip()

    def set_eval_text(self, path: str) -> None:
        self.eval_edit.setText(path)
        self._eval_text_finished()

    def _eval_text_problem(self) -> str:
        text = self.eval_text() if hasattr(self, "eval_edit") else ""
        if text and not Path(text).expanduser().is_file():
            return f"Evaluation text '{text}' does not exist: choose a file or clear the field."
        return ""

    def _eval_text_finished(self) -> None:
        self._revalidate()
        self.eval_text_changed.emit(self.eval_text())

    def _browse_eval_text(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Evaluation text", self.eval_text(), "Text (*.txt);;All files (*)")
        if path:
            self.set_eval_text(path)

    # --- calibration text ---------------------------------------------------------------------------------
    def calibration(self) -> CalibrationSettings | None:
        text = self.calib_edit.text().strip()
        if not text and not self._calibration.dataset:
            return None
        changes = {"samples": self.calib_samples.value(), "seq_len": self.calib_seq_len.value()}
        if text:
            changes |= {"text_file": text, "dataset": None}
        return self._calibration.model_copy(update=changes)

    def set_calibration(self, settings: CalibrationSettings) -> None:
        self._calibration = settings
        self.calib_edit.setText(settings.text_file or "")
        self.calib_samples.setValue(settings.samples)
        self.calib_seq_len.setValue(settings.seq_len)
        self._calibration_finished()

    def calibration_text(self) -> str:
        return self.calib_edit.text().strip()

    def set_calibration_text(self, path: str) -> None:
        self.calib_edit.setText(path)
        self._calibration_finished()

    def _calibration_problem(self) -> str:
        if not hasattr(self, "calib_edit"):
            return ""
        text = self.calibration_text()
        if text and not Path(text).expanduser().is_file():
            return f"Calibration text '{text}' does not exist: choose a file or clear the field."
        if not text and not self._calibration.dataset:
            needing = [s.method for s in self.model.steps if s.enabled and _needs_calibration(s.method)]
            if needing:
                return (f"{', '.join(dict.fromkeys(needing))} needs calibration text: choose a file in "
                        "'Calibration text' below.")
        return ""

    def _calibration_finished(self) -> None:
        self._revalidate()
        self.calibration_text_changed.emit(self.calibration_text())

    def _browse_calibration_text(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Calibration text", self.calibration_text(),
                                              "Text (*.txt);;All files (*)")
        if path:
            self.set_calibration_text(path)

    # --- files ------------------------------------------------------------------------------------------
    def open_recipe(self, path: str | Path) -> bool:
        try:
            recipe = load_recipe(path)
        except RecipeError as exc:
            self._error("Could not open the recipe", str(exc))
            return False
        self.set_recipe(recipe, f"Open {Path(path).name}")
        self.current_path = Path(path)
        self.undo_stack.setClean()
        self.recipe_file_used.emit(str(path))
        log.info("Opened recipe %s", path)
        return True

    def load_preset(self, path: str | Path) -> bool:
        """Like open_recipe, but the bundled file is never the one saved to."""
        if not self.open_recipe(path):
            return False
        self.current_path = None
        return True

    def save_recipe(self, path: str | Path) -> bool:
        """Write the recipe YAML through QSaveFile, so a failure never leaves half a file."""
        if not self.model.rowCount():
            self._error("Nothing to save", "The pipeline is empty: add a step before saving a recipe.")
            return False
        file = QSaveFile(str(path))
        ok = file.open(QIODevice.OpenModeFlag.WriteOnly)
        if ok:
            file.write(QByteArray(self.recipe().to_yaml().encode("utf-8")))
            ok = file.commit()
        else:
            file.cancelWriting()
        if not ok:
            self._error("Could not save the recipe", f"Could not write '{path}': {file.errorString()}")
            return False
        self.current_path = Path(path)
        self.undo_stack.setClean()
        self.recipe_file_used.emit(str(path))
        log.info("Saved recipe %s", path)
        return True

    def open_recipe_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open recipe", self._dialog_dir(), RECIPE_FILTER)
        if path:
            self.open_recipe(path)

    def save_recipe_dialog(self) -> None:
        start = str(self.current_path) if self.current_path else self._dialog_dir()
        path, _ = QFileDialog.getSaveFileName(self, "Save recipe", start, RECIPE_FILTER)
        if path:
            if not Path(path).suffix:
                path += ".yaml"
            self.save_recipe(path)

    def save(self) -> None:
        if self.current_path is not None:
            self.save_recipe(self.current_path)
        else:
            self.save_recipe_dialog()

    def _dialog_dir(self) -> str:
        return str(self.current_path.parent) if self.current_path else str(Path.home())

    def _fill_presets(self) -> None:
        self.presets_menu.clear()
        presets = sorted(PRESETS_DIR.glob("*.y*ml"))
        if not presets:
            self.presets_menu.addAction("No presets found").setEnabled(False)
        for path in presets:
            action = self.presets_menu.addAction(path.stem)
            action.triggered.connect(lambda _=False, p=path: self.load_preset(p))

    def _error(self, title: str, message: str) -> None:
        log.error("%s: %s", title, message)
        QMessageBox.critical(self, title, message)
