"""Typed events of a recipe search, delivered through the same kind of callback as a run's events
(studio.core.events.EventCallback); a GUI worker turns them into queued signals, the CLI into lines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from studio.core.events import Event

if TYPE_CHECKING:
    from studio.core.search.result import CandidateResult, SearchResult


@dataclass(frozen=True)
class SearchStarted(Event):
    search_id: str
    trials: int
    batch_size: int
    executor: str  # "threads" or "ray"
    budget: dict[str, Any]  # {"kind", "value", "context_tokens"}
    baseline: dict[str, Any]  # the original's quick evaluation: perplexity, tokens_scored, config


@dataclass(frozen=True)
class CandidateStarted(Event):
    search_id: str
    trial: int
    recipe_name: str
    params: dict[str, Any]
    predicted_measure: float  # in the budget's unit (an upper bound)


@dataclass(frozen=True)
class CandidateFinished(Event):
    """A candidate ended: finished, failed, cancelled, or over_budget (rejected before it ran)."""

    search_id: str
    candidate: CandidateResult
    front: tuple[int, ...]  # trials on the Pareto front so far, smallest first
    done: int  # candidates ended so far
    total: int


@dataclass(frozen=True)
class SearchFinished(Event):
    result: SearchResult


@dataclass(frozen=True)
class SearchCancelled(Event):
    result: SearchResult  # the candidates that ended before the cancel, and the front among them


@dataclass(frozen=True)
class SearchFailed(Event):
    search_id: str
    error: str
