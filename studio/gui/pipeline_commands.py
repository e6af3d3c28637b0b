"""Every edit of the pipeline as an undoable command on the editor's QUndoStack."""

from __future__ import annotations

import time
from dataclasses import replace

from PySide6.QtGui import QUndoCommand

from studio.core.recipe import Step
from studio.core.structure import TargetSpec
from studio.gui.pipeline_model import PipelineModel, copy_step

SET_PARAM_ID = 1001
MERGE_SECONDS = 1.5  # edits of one field closer than this are one undo entry


class AddStep(QUndoCommand):
    def __init__(self, model: PipelineModel, row: int, step: Step):
        super().__init__(f"Add {step.method}")
        self.model, self.row, self.step = model, row, copy_step(step)

    def redo(self) -> None:
        self.model.insert_step(self.row, self.step)

    def undo(self) -> None:
        self.model.remove_step(self.row)


class RemoveStep(QUndoCommand):
    def __init__(self, model: PipelineModel, row: int):
        self.model, self.row, self.step = model, row, model.step(row)
        super().__init__(f"Remove step {row + 1} ({self.step.method})")

    def redo(self) -> None:
        self.model.remove_step(self.row)

    def undo(self) -> None:
        self.model.insert_step(self.row, self.step)


class MoveStep(QUndoCommand):
    def __init__(self, model: PipelineModel, source: int, to: int):
        super().__init__(f"Move {model.step(source).method} to position {to + 1}")
        self.model, self.source, self.to = model, source, to

    def redo(self) -> None:
        self.model.move_step(self.source, self.to)

    def undo(self) -> None:
        self.model.move_step(self.to, self.source)


class _ChangeStep(QUndoCommand):
    """Replaces one step by an edited copy; undo puts the old one back."""

    def __init__(self, text: str, model: PipelineModel, row: int, new: Step):
        super().__init__(text)
        self.model, self.row, self.old, self.new = model, row, model.step(row), copy_step(new)

    def redo(self) -> None:
        self.model.replace_step(self.row, self.new)

    def undo(self) -> None:
        self.model.replace_step(self.row, self.old)


class SetEnabled(_ChangeStep):
    def __init__(self, model: PipelineModel, row: int, enabled: bool):
        verb = "Enable" if enabled else "Disable"
        super().__init__(f"{verb} step {row + 1}", model, row, replace(model.step(row), enabled=enabled))


class SetParam(_ChangeStep):
    """Quick successive edits of the same field (typing, spin-box arrows) merge into one undo entry."""

    def __init__(self, model: PipelineModel, row: int, name: str, value):
        step = model.step(row)
        super().__init__(f"Set {name} = {value!r}", model, row, replace(step, params=step.params | {name: value}))
        self.name = name
        self.at = time.monotonic()

    def id(self) -> int:
        return SET_PARAM_ID

    def mergeWith(self, other: QUndoCommand) -> bool:
        if not isinstance(other, SetParam) or (other.row, other.name) != (self.row, self.name):
            return False
        if other.at - self.at > MERGE_SECONDS:
            return False
        self.new, self.at = other.new, other.at
        self.setText(other.text())
        return True


class SetTargets(_ChangeStep):
    def __init__(self, model: PipelineModel, row: int, targets: TargetSpec):
        super().__init__(f"Set targets of step {row + 1}", model, row, replace(model.step(row), targets=targets))


class ReplaceSteps(QUndoCommand):
    """Opening a recipe or preset: the whole list (and its name) at once."""

    def __init__(self, editor, steps: list[Step], name: str, description: str, text: str):
        super().__init__(text)
        self.editor = editor
        self.new = ([copy_step(s) for s in steps], name, description)
        self.old = (editor.model.steps, editor.recipe_name(), editor.description)

    def redo(self) -> None:
        self.editor._set_contents(*self.new)

    def undo(self) -> None:
        self.editor._set_contents(*self.old)


class SetRecipeName(QUndoCommand):
    def __init__(self, editor, name: str):
        super().__init__("Rename recipe")
        self.editor, self.old, self.new = editor, editor.recipe_name(), name

    def redo(self) -> None:
        self.editor._set_name(self.new)

    def undo(self) -> None:
        self.editor._set_name(self.old)
