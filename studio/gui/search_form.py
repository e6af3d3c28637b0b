"""The search spec form, generated from the fields of studio.core.search's SearchSpec: a group per section, an
editor per field (its kind and range from the field's type and constraints, its tooltip from the field's
description), and the engine's validation errors shown under the field they name."""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from studio.core.search import SearchSpec
from studio.gui.param_fields import FLOAT_LIMIT, INT_LIMIT, _bound

HIDDEN = {"schema_version"}  # the form always writes the version this studio reads
REQUIRED_SECTIONS = {"calibration"}  # optional in the type, required by the spec's validator: not switchable
# Required fields without a default start from these; a switched-on optional section from these too
STARTING_VALUES: dict[str, Any] = {
    "budget.value": 4.0,
    "space.sparsity.levels": [0.0, 0.1],
    "space.low_rank.ratios": [0.0, 0.1],
}
FIRST_GROUPS = ("budget",)  # what a search is about comes first
TOP_GROUP = "Search"  # the spec's own scalar fields (name, objective, trials, …)
ERROR_STYLE = "color: #d32f2f;"
INVALID_STYLE = "QFrame#specField[invalid=\"true\"] { border: 2px solid #d32f2f; border-radius: 4px; }"


def humanize(name: str) -> str:
    return name.replace("_", " ")


@dataclass(frozen=True)
class FieldType:
    """What an editor needs to know about a field's annotation."""

    kind: str  # choice, bool, int, float, text, options (a list of choices), numbers (a list of numbers)
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    number: type = float  # the element type of `numbers`
    optional: bool = False  # `str | None`: an empty text is None


def _bounds(metadata) -> tuple[float | None, float | None]:
    low = high = None
    for item in metadata:
        low = getattr(item, "ge", None) if getattr(item, "ge", None) is not None else low
        low = getattr(item, "gt", None) if getattr(item, "gt", None) is not None else low
        high = getattr(item, "le", None) if getattr(item, "le", None) is not None else high
        high = getattr(item, "lt", None) if getattr(item, "lt", None) is not None else high
    return low, high


def _unwrap(annotation) -> tuple[Any, list, bool]:
    """(type, its constraints, optional) of `Annotated[T, …]`, `T | None`."""
    metadata, optional = [], False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        for item in extra:
            metadata += list(getattr(item, "metadata", [item]))
    return annotation, metadata, optional


def field_type(annotation, metadata) -> FieldType:
    annotation, inner_metadata, optional = _unwrap(annotation)
    metadata = [*metadata, *inner_metadata]
    if typing.get_origin(annotation) is Literal:
        return FieldType("choice", typing.get_args(annotation))
    if annotation is bool:
        return FieldType("bool")
    if annotation in (int, float):
        low, high = _bounds(metadata)
        return FieldType(annotation.__name__, minimum=low, maximum=high)
    if typing.get_origin(annotation) is list:
        element, element_metadata, _ = _unwrap(typing.get_args(annotation)[0])
        if typing.get_origin(element) is Literal:
            return FieldType("options", typing.get_args(element))
        if element is bool:
            return FieldType("options", (True, False))
        low, high = _bounds(element_metadata)
        return FieldType("numbers", minimum=low, maximum=high, number=element)
    return FieldType("text", optional=optional)


def _is_section(annotation) -> tuple[type[BaseModel] | None, bool]:
    annotation, _, optional = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, optional
    return None, False


def _format_number(value: Any) -> str:
    return str(value) if not isinstance(value, float) or not value.is_integer() else f"{value:.1f}"


def _parse_numbers(text: str, number: type) -> list:
    """'32, 64' -> [32, 64]; a token that is not a number is kept as text, so the spec's check names it."""
    values = []
    for token in (t for t in re.split(r"[,\s]+", text.strip()) if t):
        try:
            values.append(int(token) if number is int else float(token))
        except ValueError:
            try:
                values.append(float(token))
            except ValueError:
                values.append(token)
    return values


class SpecField(QFrame):
    """One field's editor and, under it, the engine's message when the field is invalid."""

    def __init__(self, path: str, ftype: FieldType, description: str, on_change: Callable[[], None]):
        super().__init__()
        self.setObjectName("specField")
        self.setStyleSheet(INVALID_STYLE)
        self.path, self.ftype, self.description = path, ftype, description
        self._on_change = on_change
        self._silent = False
        self.problem: str | None = None
        self.editor = self._make_editor()
        self.problem_label = QLabel()
        self.problem_label.setWordWrap(True)
        self.problem_label.setStyleSheet(ERROR_STYLE)
        self.problem_label.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 1, 2, 1)
        layout.setSpacing(1)
        layout.addWidget(self.editor)
        layout.addWidget(self.problem_label)
        self.setToolTip(description)

    def _make_editor(self) -> QWidget:
        t = self.ftype
        if t.kind == "choice":
            box = QComboBox()
            for choice in t.choices:
                box.addItem(str(choice), choice)
            box.currentIndexChanged.connect(self._changed)
            return box
        if t.kind == "bool":
            box = QCheckBox()
            box.toggled.connect(self._changed)
            return box
        if t.kind == "int":
            box = QSpinBox()
            box.setRange(int(_bound(t.minimum, -INT_LIMIT)), int(_bound(t.maximum, INT_LIMIT)))
            box.valueChanged.connect(self._changed)
            return box
        if t.kind == "float":
            box = QDoubleSpinBox()
            box.setDecimals(3)
            box.setSingleStep(0.1)
            box.setRange(_bound(t.minimum, -FLOAT_LIMIT), _bound(t.maximum, FLOAT_LIMIT))
            box.valueChanged.connect(self._changed)
            return box
        if t.kind == "options":
            holder = QWidget()
            row = QHBoxLayout(holder)
            row.setContentsMargins(0, 0, 0, 0)
            self.options: list[QCheckBox] = []
            for choice in t.choices:
                self._add_option(row, choice)
            row.addStretch(1)
            return holder
        edit = QLineEdit()
        if t.kind == "numbers":
            edit.setPlaceholderText("values separated by commas")
        edit.editingFinished.connect(self._changed)
        if self.path.endswith("text_file"):
            holder = QWidget()
            row = QHBoxLayout(holder)
            row.setContentsMargins(0, 0, 0, 0)
            row.addWidget(edit, 1)
            browse = QPushButton("Browse…")
            browse.clicked.connect(self._browse)
            row.addWidget(browse)
            self.line_edit = edit
            return holder
        self.line_edit = edit
        return edit

    def _add_option(self, row: QHBoxLayout, choice: Any, label: str | None = None) -> QCheckBox:
        box = QCheckBox(label or str(choice))
        box.setProperty("choice", choice)
        box.toggled.connect(self._changed)
        row.insertWidget(len(self.options), box)
        self.options.append(box)
        return box

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, humanize(self.path), self.line_edit.text(),
                                              "Text (*.txt);;All files (*)")
        if path:
            self.set_value(path)
            self._changed()

    def _changed(self, *_args) -> None:
        if not self._silent:
            self._on_change()

    def value(self) -> Any:
        t, e = self.ftype, self.editor
        if t.kind == "choice":
            return e.currentData()
        if t.kind == "bool":
            return e.isChecked()
        if t.kind in ("int", "float"):
            return e.value()
        if t.kind == "options":
            return [box.property("choice") for box in self.options if box.isChecked()]
        text = self.line_edit.text().strip()
        if t.kind == "numbers":
            return _parse_numbers(text, t.number)
        return None if t.optional and not text else text

    def set_value(self, value: Any) -> None:
        """Show `value` as it is, even out of range or not a choice (the spec's check then marks it)."""
        t, e = self.ftype, self.editor
        self._silent = True
        try:
            if t.kind == "choice":
                if e.findData(value) < 0:
                    e.addItem(f"{value} (not a choice)", value)
                e.setCurrentIndex(e.findData(value))
            elif t.kind == "bool":
                e.setChecked(bool(value))
            elif t.kind in ("int", "float") and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = int(value) if t.kind == "int" else float(value)
                e.setRange(min(e.minimum(), value), max(e.maximum(), value))  # never clamp what a file says
                e.setValue(value)
            elif t.kind == "options":
                chosen = list(value) if isinstance(value, (list, tuple)) else [value]
                known = [box.property("choice") for box in self.options]
                for choice in chosen:
                    if choice not in known:
                        self._add_option(e.layout(), choice, f"{choice} (not a choice)")
                for box in self.options:
                    box.setChecked(box.property("choice") in chosen)
            elif t.kind == "numbers":
                values = value if isinstance(value, (list, tuple)) else [value]
                self.line_edit.setText(", ".join(_format_number(v) for v in values))
            else:
                self.line_edit.setText("" if value is None else str(value))
        finally:
            self._silent = False

    def set_problem(self, problem: str | None) -> None:
        if problem == self.problem:
            return
        self.problem = problem
        self.setProperty("invalid", problem is not None)
        self.style().unpolish(self)
        self.style().polish(self)
        self.problem_label.setText(problem or "")
        self.problem_label.setVisible(problem is not None)


class SpecGroup(QGroupBox):
    """A section's fields; an optional section has a check box that switches it on (off: the spec leaves it out)."""

    def __init__(self, path: str, title: str, optional: bool, description: str = ""):
        super().__init__(title)
        self.path, self.optional = path, optional
        self.setCheckable(optional)
        self.form = QFormLayout(self)
        self.form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.form.setContentsMargins(6, 4, 6, 4)
        self.problem_label = QLabel()
        self.problem_label.setWordWrap(True)
        self.problem_label.setStyleSheet(ERROR_STYLE)
        self.problem_label.hide()
        self.problem: str | None = None
        self.form.addRow(self.problem_label)
        if description:
            self.setToolTip(description)

    @property
    def switched_on(self) -> bool:
        return not self.optional or self.isChecked()

    def set_problem(self, problem: str | None) -> None:
        self.problem = problem
        self.problem_label.setText(problem or "")
        self.problem_label.setVisible(problem is not None)


class SearchSpecForm(QWidget):
    """Every field of a SearchSpec. `data()` is the spec as a dict (as YAML holds it), `set_data` shows one, and
    `show_problems(message)` marks the fields a SearchSpecError names; what names no field it returns."""

    edited = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.fields: dict[str, SpecField] = {}
        self.groups: dict[str, SpecGroup] = {}
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        top = self._group("", TOP_GROUP, optional=False)
        self._add_fields(SearchSpec, "", top)
        for path in sorted(self.groups, key=lambda p: p not in FIRST_GROUPS):  # stable: the spec's order after
            self._layout.addWidget(self.groups[path])
        self._layout.addStretch(1)
        self.set_data({})

    # --- construction -----------------------------------------------------------------------------------
    def _group(self, path: str, title: str, optional: bool, description: str = "") -> SpecGroup:
        group = SpecGroup(path, title, optional, description)
        if optional:
            group.toggled.connect(lambda _on: self.edited.emit())
        self.groups[path] = group
        return group

    def _add_fields(self, model: type[BaseModel], prefix: str, group: SpecGroup) -> None:
        for name, info in model.model_fields.items():
            if name in HIDDEN:
                continue
            path = f"{prefix}{name}"
            section, optional = _is_section(info.annotation)
            if section is not None:
                all_sections = all(_is_section(f.annotation)[0] is not None for f in section.model_fields.values())
                if all_sections:  # e.g. `space`: its sections become groups of their own
                    self._add_fields(section, path + ".", group)
                else:
                    switchable = optional and name not in REQUIRED_SECTIONS
                    self._add_fields(section, path + ".", self._group(path, humanize(name).capitalize(), switchable,
                                                                      (section.__doc__ or "").strip()))
                continue
            field = SpecField(path, field_type(info.annotation, info.metadata), info.description or "",
                              self.edited.emit)
            label = QLabel(humanize(name))
            label.setToolTip(info.description or "")
            group.form.addRow(label, field)
            self.fields[path] = field

    # --- values -----------------------------------------------------------------------------------------
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for path, field in self.fields.items():
            group = self._group_of(path)
            if group is not None and not group.switched_on:
                _put(data, group.path, None)
                continue
            _put(data, path, field.value())
        return data

    def set_data(self, data: dict[str, Any]) -> None:
        """Show the spec `data` (a dict as read from YAML); what it leaves out shows the field's default."""
        for path, group in self.groups.items():
            if group.optional:
                group.blockSignals(True)
                group.setChecked(isinstance(_get(data, path), dict))
                group.blockSignals(False)
        for path, field in self.fields.items():
            value = _get(data, path)
            field.set_value(value if value is not None else self._default(path, field))
        self.edited.emit()

    def _default(self, path: str, field: SpecField) -> Any:
        if path in STARTING_VALUES:
            return STARTING_VALUES[path]
        model: type[BaseModel] = SearchSpec
        *sections, name = path.split(".")
        for section in sections:
            model = _is_section(model.model_fields[section].annotation)[0]
        info = model.model_fields[name]
        if not info.is_required():
            return info.get_default(call_default_factory=True)
        t = field.ftype
        return t.choices[0] if t.choices else t.minimum if t.kind in ("int", "float") else ""

    def field(self, path: str) -> SpecField:
        return self.fields[path]

    def _group_of(self, path: str) -> SpecGroup | None:
        parent = path.rpartition(".")[0]
        return self.groups.get(parent)

    # --- problems ---------------------------------------------------------------------------------------
    def clear_problems(self) -> None:
        for item in (*self.fields.values(), *self.groups.values()):
            item.set_problem(None)

    def show_problems(self, message: str) -> str:
        """Mark each field `message` names ("field 'budget.value': …") with its part of the message; returns the
        parts that name no field of the form (shown by the caller)."""
        self.clear_problems()
        matches = list(re.finditer(r"field '([^']+)'", message))
        if not matches:
            return message
        rest = [message[: matches[0].start()].strip().rstrip(":")]
        marked: dict[str, list[str]] = {}
        for match, following in zip(matches, [*matches[1:], None]):
            part = message[match.start(): following.start() if following else len(message)].strip()
            target = self._target(match.group(1))
            if target is None:
                rest.append(part)
            else:
                marked.setdefault(target, []).append(part)
        for target, parts in marked.items():
            (self.fields.get(target) or self.groups[target]).set_problem(" ".join(parts))
        where = rest[0]
        left = " ".join(rest[1:])
        return f"{where}: {left}" if left and where else left

    def _target(self, name: str) -> str | None:
        """The field or group a message names: 'space.quantization.group_sizes.0' is the group sizes field."""
        parts = name.split(".")
        while parts:
            path = ".".join(parts)
            if path in self.fields or (path in self.groups and path):
                return path
            parts.pop()
        return None

    def set_problem(self, path: str, problem: str) -> None:
        self.fields[path].set_problem(problem)

    def problems(self) -> dict[str, str]:
        """The marked fields and groups with their messages."""
        return {path: item.problem for path, item in (*self.fields.items(), *self.groups.items()) if item.problem}


def _put(data: dict, path: str, value: Any) -> None:
    *sections, name = path.split(".")
    for section in sections:
        data = data.setdefault(section, {})
        if data is None:
            return
    data[name] = value


def _get(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data
