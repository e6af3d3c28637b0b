"""What a search returns: every candidate with its recipe, size and quality, and which are on the Pareto front
of size against quality."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core.history import pareto_points
from studio.core.recipe import Recipe

def told_value(value: float) -> float:
    """A quality rounded to 4 significant digits: what the optimizer is told and the front is drawn on, so that
    the last bits of float noise (a worker's thread count) cannot change the search."""
    return float(f"{value:.4g}")


@dataclass
class CandidateResult:
    trial: int
    params: dict[str, Any]  # Optuna's parameters of the trial
    recipe: Recipe | None  # the recipe to open ("open as recipe"); None when nothing fit the budget
    status: str  # "finished", "failed", "cancelled" or "over_budget"
    predicted_measure: float  # in the budget's unit, before it ran (an upper bound)
    bits_per_weight: float | None = None  # measured: packed bits per weight of the decoder blocks' linear layers
    compressed_bytes: int | None = None  # measured: the whole model's compressed bytes
    measure: float | None = None  # measured, in the budget's unit
    perplexity: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    seconds: float | None = None
    peak_rss_bytes: int | None = None  # the worker process's peak during the candidate's steps
    error: str | None = None
    run_id: int | None = None  # its run in the run history
    duplicate_of: int | None = None  # the trial whose identical recipe gave these numbers
    on_front: bool = False

    def quality(self, objective: str) -> float | None:
        value = self.perplexity if objective == "perplexity" else self.kl
        return None if value is None else told_value(value)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "recipe"}
        data["recipe"] = self.recipe.to_dict() if self.recipe is not None else None
        return data


def front_of(candidates: list[CandidateResult], objective: str) -> list[int]:
    """Trials of the finished candidates no other beats on both compressed size and quality, smallest first
    (a repeat of an earlier recipe is left out: it is that recipe)."""
    return pareto_points([
        (c.trial, c.compressed_bytes, c.quality(objective)) for c in candidates
        if c.status == "finished" and c.duplicate_of is None and c.compressed_bytes is not None
        and c.quality(objective) is not None
    ])


@dataclass
class SearchResult:
    search_id: str
    status: str  # finished, cancelled or failed
    spec: dict[str, Any]
    executor: str
    baseline: dict[str, Any] = field(default_factory=dict)  # the original: perplexity, compressed_bytes, ...
    candidates: list[CandidateResult] = field(default_factory=list)  # in trial order
    front: list[int] = field(default_factory=list)  # trials, smallest size first
    seconds: float = 0.0
    error: str | None = None

    def candidate(self, trial: int) -> CandidateResult | None:
        return next((c for c in self.candidates if c.trial == trial), None)

    def front_candidates(self) -> list[CandidateResult]:
        return [self.candidate(t) for t in self.front]

    def best(self) -> CandidateResult | None:
        """The front's point of best quality (the largest that fits)."""
        objective = self.spec.get("objective", "perplexity")
        return min(self.front_candidates(), key=lambda c: c.quality(objective), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"search_id": self.search_id, "status": self.status, "spec": self.spec, "executor": self.executor,
                "baseline": self.baseline, "front": self.front, "seconds": self.seconds, "error": self.error,
                "candidates": [c.to_dict() for c in self.candidates]}

    def save(self, path: str | os.PathLike) -> None:
        """JSON through a temporary file in the same folder, renamed into place."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh, indent=2, default=str)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
