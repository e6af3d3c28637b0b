"""The runner: validates a recipe against the model, applies its steps in order to a working copy, evaluates,
and reports typed events. The loaded original is never modified (unless the caller asks for an in-place run):
a cancelled or failed run drops the copy."""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from studio.core.calibration import CalibrationData, load_calibration_tokens
from studio.core.clone import clone_sharing_weights
from studio.core.context import Evaluation, StepContext
from studio.core.errors import Cancelled, RecipeError, StudioError
from studio.core.evaluation.perplexity import PerplexityConfig, load_eval_tokens, perplexity
from studio.core.evaluation.size import size_report
from studio.core.events import (
    CancelToken,
    EventCallback,
    Metric,
    Progress,
    RunCancelled,
    RunFailed,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
    ignore,
)
from studio.core.loading import LoadedModel
from studio.core.memory import PeakRSS, mappings_read_once, rss_bytes
from studio.core.recipe import (
    Recipe,
    ValidatedStep,
    check_against_model,
    check_calibration,
    step_problems,
    validate_recipe,
)
from studio.core.registry import Estimate
from studio.core.structure import iter_layers, target_layers

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    status: str  # "finished", "cancelled" or "failed"
    model: nn.Module | None  # the compressed copy when finished
    report: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    bad_input: bool = False  # the failure is the user's to fix (recipe, data), not a bug


def prepare(recipe: Recipe, model: nn.Module, where: str = "recipe") -> list[ValidatedStep]:
    """Schema and model checks; raises RecipeError naming the step, method and field."""
    steps = validate_recipe(recipe, where)
    check_calibration(steps, recipe.calibration, where)
    check_against_model(steps, model, where)
    return steps


def estimate(steps: list[ValidatedStep], model: nn.Module) -> list[Estimate]:
    return [vs.method.estimate(target_layers(model, vs.step.targets), vs.params) for vs in steps]


def _overwritten_first(steps: list[ValidatedStep], model: nn.Module) -> list:
    """The weights the first step reads and writes back within moments of starting (Method.sweeps_weights_once)."""
    if not steps or not steps[0].method.sweeps_weights_once:
        return []
    return [module.weight for _, module in iter_layers(target_layers(model, steps[0].step.targets))]


def _window_progress(emit: EventCallback, index: int | None):
    def report(done: int, total: int) -> None:
        emit(Progress(-1 if index is None else index, done, total, "window", "evaluating"))

    return report


def _evaluate(model, original, tokens, config, tokenizer, cancel, emit, index) -> dict[str, Any]:
    result = perplexity(model, tokens, config, tokenizer, reference=original, cancel=cancel,
                        on_window=_window_progress(emit, index))
    emit(Metric("perplexity", result.perplexity, index))
    if result.kl is not None:
        emit(Metric("kl", result.kl, index))
    return result.to_dict()


def run_recipe(
    recipe: Recipe,
    loaded: LoadedModel,
    *,
    events: EventCallback = ignore,
    cancel: CancelToken | None = None,
    eval_config: PerplexityConfig | None = None,
    evaluate_each_step: bool = True,
    where: str = "recipe",
    in_place: bool = False,
) -> RunResult:
    """Run `recipe` on a copy of `loaded.model`. With `eval_config`, the original and the result of each step
    (or only the last, without `evaluate_each_step`) are evaluated on the same tokens.

    With `in_place`, the steps change `loaded.model` itself: compressed weights are written into the original
    tensors, so the run needs no second set of weights, but nothing is left to compare with or to teach
    (distillation fails), and a failed or cancelled run leaves the model half-compressed. For headless runs
    that only export."""
    if in_place and eval_config is not None:
        raise ValueError("an in-place run cannot evaluate against the original it overwrites")
    cancel = cancel or CancelToken()
    original = loaded.model
    report: dict[str, Any] = {"recipe": recipe.to_dict(), "model": dict(loaded.source), "steps": []}
    index: int | None = None
    started = time.perf_counter()
    try:
        steps = prepare(recipe, original, where)
        events(RunStarted(len(steps)))
        calibration = None
        if any(vs.method.needs_calibration for vs in steps):  # read before anything slow, so a bad file fails fast
            calibration_tokens = load_calibration_tokens(loaded.tokenizer, recipe.calibration)
            calibration = CalibrationData(calibration_tokens, recipe.calibration.batch_size, recipe.calibration)
            report["calibration"] = {**recipe.calibration.model_dump(), "tokens": int(calibration_tokens.numel())}
        tokens = None
        report["size_before"] = size_report(original, about_to_overwrite=_overwritten_first(steps, original)
                                            if in_place else ())
        events(Metric("compressed_bytes", report["size_before"]["compressed_bytes"], None))
        if eval_config is not None:
            tokens = load_eval_tokens(loaded.tokenizer, eval_config)
            baseline = perplexity(original, tokens, eval_config, loaded.tokenizer, cancel=cancel,
                                  on_window=_window_progress(events, None))
            events(Metric("perplexity", baseline.perplexity, None))
            report["baseline"] = baseline.to_dict()
        model = original if in_place else clone_sharing_weights(original)
        for n, vs in enumerate(steps):
            index = vs.index
            events(StepStarted(index, vs.step.method, len(steps), n))
            if n > 0 and (problems := step_problems(vs, model, f"{where} (after step {steps[n - 1].index + 1})")):
                raise RecipeError("\n".join(problems))
            layers = target_layers(model, vs.step.targets)
            ctx = StepContext(model, layers, index, events, cancel, calibration=calibration,
                              teacher=None if in_place else original, in_place=in_place,
                              tokenizer_or_loader=loaded.tokenizer_or_loader,
                              evaluation=None if tokens is None else Evaluation(tokens, eval_config))
            begin = time.perf_counter()
            rss_before = rss_bytes()
            with PeakRSS() as peak, mappings_read_once():  # the model's mappings outlive the step
                outcome = vs.method.apply(ctx, vs.params)
            step_report = {
                "index": index,
                "method": vs.step.method,
                "params": vs.params.model_dump(),
                "targets": {"include": list(vs.step.targets.include), "exclude": list(vs.step.targets.exclude)},
                "seconds": time.perf_counter() - begin,
                "peak_rss_bytes": peak.bytes,  # the whole process, original model included
                "rss_before_bytes": rss_before,
                "summary": outcome.summary,
                "layers": [vars(r) for r in outcome.layers],
                "size": size_report(model),
            }
            events(Metric("compressed_bytes", step_report["size"]["compressed_bytes"], index))
            last = n == len(steps) - 1
            if tokens is not None and (evaluate_each_step or last):
                step_report["evaluation"] = _evaluate(
                    model, original, tokens, eval_config, loaded.tokenizer, cancel, events, index
                )
            report["steps"].append(step_report)
            events(StepFinished(index, step_report))
        if report["steps"] and "evaluation" in report["steps"][-1]:
            report["final"] = report["steps"][-1]["evaluation"]
        # the last step already measured the model as it is now
        report["size_after"] = report["steps"][-1]["size"] if report["steps"] else report["size_before"]
        report["seconds"] = time.perf_counter() - started
        events(RunFinished(report))
        return RunResult("finished", model, report)
    except Cancelled:
        events(RunCancelled(index))
        return RunResult("cancelled", None, report)
    except StudioError as exc:
        events(RunFailed(str(exc), index))
        return RunResult("failed", None, report, str(exc), bad_input=True)
    except Exception as exc:  # a bug or an unexpected torch error: keep the app alive, keep the traceback
        log.debug("run failed:\n%s", traceback.format_exc())
        step = f" in step {index + 1}" if index is not None else ""
        message = f"The run failed{step}: {type(exc).__name__}: {exc}"
        events(RunFailed(message, index))
        return RunResult("failed", None, report, message)
