"""The inspector: a form for the selected step, generated from its method's `param_specs`, plus the target
patterns; shows the engine's validation at each field."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFormLayout, QLabel, QLineEdit, QScrollArea, QVBoxLayout, QWidget

from studio.core.recipe import Step
from studio.core.registry import get_method, param_specs
from studio.core.structure import TargetSpec
from studio.gui.param_fields import FieldFrame, ParamField
from studio.gui.pipeline_model import StepStatus

TARGETS_HELP = (
    "Glob patterns on full layer names, separated by commas ('*' also matches dots), e.g. *.mlp.*. The default "
    "'*' means every linear layer of the decoder blocks (never embeddings or lm_head)."
)


def _patterns(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


class StepInspector(QWidget):
    param_edited = Signal(str, object)
    targets_edited = Signal(object)  # TargetSpec

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.heading = QLabel()
        self.heading.setWordWrap(True)
        self.problem = QLabel()
        self.problem.setTextFormat(Qt.TextFormat.PlainText)
        self.problem.setWordWrap(True)
        self.problem.setStyleSheet("color: #d32f2f;")
        self.problem.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.form_host = QWidget()
        self.form = QFormLayout(self.form_host)
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapAllRows)  # labels above fields: fits narrow docks
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setWidget(self.form_host)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.heading)
        layout.addWidget(self.problem)
        layout.addWidget(scroll, 1)
        self.fields: dict[str, FieldFrame] = {}
        self._method_id: str | None = None
        self._row = -1
        self.show_step(-1, None)

    @property
    def row(self) -> int:
        return self._row

    def field(self, name: str) -> FieldFrame:
        """The field of a parameter, or 'targets.include' / 'targets.exclude'."""
        return self.fields[name]

    def show_step(self, row: int, step: Step | None) -> None:
        """Rebuild the form for `step`, or refresh its values when it is the same step and method."""
        if step is not None and row == self._row and step.method == self._method_id and self.fields:
            self._refresh(step)
            return
        while self.form.rowCount():
            self.form.removeRow(0)
        self.fields = {}
        self._row, self._method_id = row, step.method if step else None
        self.problem.hide()
        if step is None:
            self.heading.setText("<i>Select a step to edit its parameters.</i>")
            return
        try:
            method = get_method(step.method)
        except KeyError:
            self.heading.setText(f"<b>{row + 1}. {html.escape(step.method)}</b>: not a method of this studio.")
            return
        self.heading.setText(f"<b>{row + 1}. {method.title}</b><br><small>{method.summary}</small>")
        for spec in param_specs(method.Params):
            value = step.params.get(spec.name, spec.default)
            field = ParamField(spec, value, lambda v, name=spec.name: self.param_edited.emit(name, v))
            self.fields[spec.name] = field
            self.form.addRow(spec.name, field)
        for key, label in (("include", "targets: include"), ("exclude", "targets: exclude")):
            edit = QLineEdit()
            edit.setPlaceholderText("*" if key == "include" else "nothing excluded")
            edit.editingFinished.connect(self._targets_finished)
            field = FieldFrame(edit, TARGETS_HELP if key == "include" else "")
            self.fields[f"targets.{key}"] = field
            self.form.addRow(label, field)
        self._refresh(step)

    def _refresh(self, step: Step) -> None:
        for name, field in self.fields.items():
            if isinstance(field, ParamField):
                spec = field.spec
                field.set_value(step.params.get(name, spec.default))
        self._edit("include").setText(", ".join(step.targets.include))
        self._edit("exclude").setText(", ".join(step.targets.exclude))

    def _edit(self, key: str) -> QLineEdit:
        return self.fields[f"targets.{key}"].editor

    def _targets_finished(self) -> None:
        spec = TargetSpec(_patterns(self._edit("include").text()) or ("*",), _patterns(self._edit("exclude").text()))
        self.targets_edited.emit(spec)

    def show_status(self, status: StepStatus) -> None:
        """Mark the fields the engine named; a problem no field owns goes above the form."""
        unplaced = []
        for name, message in status.field_problems.items():
            if name in self.fields:
                continue
            unplaced.append(message)
        for name, field in self.fields.items():
            field.set_problem(status.field_problems.get(name))
        if status.message and (unplaced or not status.field_problems):
            self.problem.setText("⚠ " + ("\n".join(unplaced) if unplaced else status.message))
            self.problem.show()
        else:
            self.problem.hide()
