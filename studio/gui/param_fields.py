"""One form field per method parameter, generated from the engine's ParamSpec: a spin box with the spec's
range, a check box, a combo box of choices, or a line edit; each can be marked invalid (red border and the
engine's message as tooltip)."""

from __future__ import annotations

import math
from typing import Any, Callable

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFrame,
    QLabel,
    QLineEdit,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.core.registry import ParamSpec

INT_LIMIT = 2**31 - 1
FLOAT_LIMIT = 1e12
INVALID_STYLE = "QFrame#paramField[invalid=\"true\"] { border: 2px solid #d32f2f; border-radius: 4px; }"


class FieldFrame(QFrame):
    """Holds an editor and its one-line help; `set_problem` marks it."""

    def __init__(self, editor: QWidget, help_text: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("paramField")
        self.setStyleSheet(INVALID_STYLE)
        self.editor = editor
        self.help = help_text
        self.problem: str | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.setSpacing(1)
        layout.addWidget(editor)
        if help_text:
            note = QLabel(help_text)
            note.setWordWrap(True)
            note.setEnabled(False)  # greyed: a hint, not a value
            layout.addWidget(note)
        self.set_problem(None)

    @property
    def invalid(self) -> bool:
        return self.problem is not None

    def set_problem(self, problem: str | None) -> None:
        self.problem = problem
        self.setProperty("invalid", problem is not None)
        self.style().unpolish(self)
        self.style().polish(self)
        tip = f"⚠ {problem}\n\n{self.help}" if problem else self.help
        self.setToolTip(tip)
        self.editor.setToolTip(tip)


class ParamField(FieldFrame):
    """A parameter's editor; `value()` is typed as the method expects, `on_change(value)` fires on edits."""

    def __init__(self, spec: ParamSpec, value: Any, on_change: Callable[[Any], None]):
        self.spec = spec
        self._on_change = on_change
        self._silent = False
        editor = self._make_editor(spec)
        super().__init__(editor, _help(spec))
        self.set_value(value)
        self._connect()

    def _make_editor(self, spec: ParamSpec) -> QWidget:
        if spec.type == "bool":
            return QCheckBox("on")
        if spec.type == "choice":
            box = QComboBox()
            for choice in spec.choices:
                box.addItem(str(choice), choice)
            return box
        if spec.type == "int":
            box = QSpinBox()
            box.setRange(_bound(spec.minimum, -INT_LIMIT), _bound(spec.maximum, INT_LIMIT))
            return box
        if spec.type == "float":
            box = QDoubleSpinBox()
            box.setDecimals(4)
            box.setSingleStep(0.05)
            box.setRange(_bound(spec.minimum, -FLOAT_LIMIT), _bound(spec.maximum, FLOAT_LIMIT))
            return box
        return QLineEdit()

    def _connect(self) -> None:
        e = self.editor
        if isinstance(e, QCheckBox):
            e.toggled.connect(self._emit)
        elif isinstance(e, QComboBox):
            e.currentIndexChanged.connect(lambda _i: self._emit(e.currentData()))
        elif isinstance(e, (QSpinBox, QDoubleSpinBox)):
            e.valueChanged.connect(self._emit)
        else:
            e.editingFinished.connect(lambda: self._emit(e.text()))

    def _emit(self, value: Any) -> None:
        if not self._silent:
            self._on_change(value)

    def value(self) -> Any:
        e = self.editor
        if isinstance(e, QCheckBox):
            return e.isChecked()
        if isinstance(e, QComboBox):
            return e.currentData()
        if isinstance(e, (QSpinBox, QDoubleSpinBox)):
            return e.value()
        return e.text()

    def set_value(self, value: Any) -> None:
        """Show `value` as it is, even when it is out of range or of the wrong type (then it is marked)."""
        self._silent = True
        try:
            e = self.editor
            if isinstance(e, QCheckBox):
                e.setChecked(bool(value))
            elif isinstance(e, QComboBox):
                if e.findData(value) < 0:
                    e.addItem(f"{value} (not a choice)", value)
                e.setCurrentIndex(e.findData(value))
            elif isinstance(e, (QSpinBox, QDoubleSpinBox)) and _is_number(value):
                if isinstance(e, QSpinBox):
                    value = int(value)
                e.setRange(min(e.minimum(), value), max(e.maximum(), value))  # never clamp what a file says
                e.setValue(value)
            elif isinstance(e, QLineEdit):
                e.setText("" if value is None else str(value))
        finally:
            self._silent = False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bound(value: float | None, fallback: float) -> float:
    if value is None or math.isinf(value):
        return fallback
    return value


def _help(spec: ParamSpec) -> str:
    parts = [spec.help] if spec.help else []
    if spec.minimum is not None or spec.maximum is not None:
        parts.append(f"Range {spec.minimum if spec.minimum is not None else '…'} to "
                     f"{spec.maximum if spec.maximum is not None else '…'}; default {spec.default!r}.")
    else:
        parts.append(f"Default {spec.default!r}.")
    return " ".join(parts)
