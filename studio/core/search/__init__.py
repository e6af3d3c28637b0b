"""Recipe search under a budget: Optuna proposes candidates, threads or Ray evaluate them, and the Pareto front
of size against quality is returned. Optuna and Ray load only when a search runs."""

from studio.core.search.engine import new_search_id, run_search
from studio.core.search.evaluate import ModelRef
from studio.core.search.events import (
    CandidateFinished,
    CandidateStarted,
    SearchCancelled,
    SearchFailed,
    SearchFinished,
    SearchStarted,
)
from studio.core.search.executors import Executor, ExecutorError, RayExecutor, ThreadExecutor, make_executor
from studio.core.search.result import CandidateResult, SearchResult
from studio.core.search.spec import SearchSpec, SearchSpecError, load_search_spec, parse_search_spec

__all__ = [
    "CandidateFinished", "CandidateResult", "CandidateStarted", "Executor", "ExecutorError", "ModelRef",
    "RayExecutor", "SearchCancelled", "SearchFailed", "SearchFinished", "SearchResult", "SearchSpec",
    "SearchSpecError", "SearchStarted", "ThreadExecutor", "load_search_spec", "make_executor", "new_search_id",
    "parse_search_spec", "run_search",
]
