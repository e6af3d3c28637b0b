"""Runs the engine's checks on every step of the pipeline and sorts the messages by the field they name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from studio.core.errors import RecipeError
from studio.core.prediction import predict_compressed_bytes, dense_bytes
from studio.core.recipe import Step, ValidatedStep, check_against_model, validate_step
from studio.core.structure import iter_layers, target_layers
from studio.gui.pipeline_model import StepStatus

WHERE = "pipeline"
FIELD = re.compile(r"field '([^']+)'")
LABEL = re.compile(r"^pipeline, step \d+ \([^)]*\):\s*")


@dataclass
class PipelineCheck:
    statuses: list[StepStatus] = field(default_factory=list)
    valid: bool = False
    reason: str = ""  # why Run must stay disabled; empty when valid
    dense_bytes: int | None = None
    predicted_bytes: int | None = None
    extra_bytes: int | None = None  # the largest step's estimate
    seconds: float | None = None


def split_by_field(message: str) -> dict[str, str]:
    """{'bits': "field 'bits': …", 'targets.include': 'the targets … match no …'} from an engine message."""
    problems: dict[str, str] = {}
    for line in message.splitlines():
        text = LABEL.sub("", line)
        matches = list(FIELD.finditer(text))
        for i, m in enumerate(matches):
            end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
            problems[m.group(1)] = text[m.start():end].strip()
        if not matches and text.startswith("the targets"):
            problems["targets.include"] = text
    return problems


def _check_step(step: Step, index: int, model) -> tuple[StepStatus, ValidatedStep | None]:
    try:
        vs = validate_step(step, index, WHERE)
        if model is not None:
            check_against_model([vs], model, WHERE)
    except RecipeError as exc:
        message = str(exc)
        return StepStatus(message, split_by_field(message)), None
    status = StepStatus()
    if model is not None:
        try:
            from studio.core.runner import estimate  # with a model loaded, torch is too

            status.estimate = estimate([vs], model)[0]
            status.layers = sum(1 for _ in iter_layers(target_layers(model, step.targets)))
        except Exception as exc:  # an estimate must never break editing
            status.message = f"{vs.label}: could not estimate this step ({type(exc).__name__}: {exc})"
            return status, None
    return status, vs


def check_pipeline(steps: list[Step], model=None) -> PipelineCheck:
    """Each step checked on its own (so every step gets its own marks); disabled steps are checked but do not
    block the run."""
    check = PipelineCheck()
    ready: list[ValidatedStep] = []
    first_problem = ""
    for i, step in enumerate(steps):
        status, vs = _check_step(step, i, model)
        check.statuses.append(status)
        if step.enabled and vs is None and not first_problem:
            first_problem = status.message
        if step.enabled and vs is not None:
            ready.append(vs)
    if not steps:
        check.reason = "The pipeline is empty: add a step from the palette."
    elif not any(s.enabled for s in steps):
        check.reason = "Every step is disabled: enable at least one."
    elif first_problem:
        check.reason = first_problem
    check.valid = not check.reason
    if model is not None:
        check.dense_bytes = dense_bytes(model)
        if check.valid:
            check.predicted_bytes = predict_compressed_bytes(ready, model)
            estimates = [st.estimate for s, st in zip(steps, check.statuses) if s.enabled and st.estimate]
            check.extra_bytes = max((e.extra_bytes for e in estimates), default=0)
            check.seconds = sum(e.seconds for e in estimates)
    return check
