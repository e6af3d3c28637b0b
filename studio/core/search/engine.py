"""The recipe search: Optuna proposes candidates (mixed-precision bits, sparsity, rank) under a budget, each is
compressed and quickly evaluated, and the Pareto front of size against quality is returned.

Determinism: the sampler is seeded, candidates are asked for in batches of `batch_size`, a batch is evaluated in
any order (threads or Ray tasks), and results are told to Optuna in ask order; each evaluation uses the same
calibration and evaluation tokens. So the same seed gives the same candidates, and the same front, on any
executor. Every candidate that ran lands in the run history under the search's id."""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from studio.core.errors import Cancelled, StudioError
from studio.core.events import CancelToken, EventCallback, ignore
from studio.core.search.evaluate import ModelRef, eval_tokens
from studio.core.search.events import (
    CandidateFinished,
    CandidateStarted,
    SearchCancelled,
    SearchFailed,
    SearchFinished,
    SearchStarted,
)
from studio.core.search.executors import POLL_SECONDS, Executor, Job, make_executor
from studio.core.search.result import CandidateResult, SearchResult, front_of
from studio.core.search.space import (
    Candidate,
    CandidateKey,
    ModelShape,
    bits_per_weight,
    budget_measure,
    build_candidate,
    layouts,
    model_shape,
    suggest,
)
from studio.core.search.spec import SearchSpec

if TYPE_CHECKING:  # torch loads lazily
    from studio.core.loading import LoadedModel

log = logging.getLogger(__name__)


def new_search_id() -> str:
    return f"search-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def make_sampler(spec: SearchSpec):
    import optuna

    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(spec.batch_size, 2), seed=spec.seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, max(spec.trials // 3, 2)))


def run_search(
    spec: SearchSpec,
    loaded: LoadedModel,
    *,
    model_ref: ModelRef | None = None,
    executor: Executor | str = "auto",
    events: EventCallback = ignore,
    cancel: CancelToken | None = None,
    history=None,
    search_id: str | None = None,
) -> SearchResult:
    """Search recipes for `loaded` under `spec`. `model_ref` says where Ray workers load the model from
    (default: `loaded.source['path']`). `history`: a RunHistory to record candidates in (None: the default one,
    False: none). Returns the result; cancelling `cancel` stops the running candidates and returns what ended."""
    from studio.core.history import RunHistory

    cancel = cancel or CancelToken()
    search_id = search_id or new_search_id()
    if isinstance(executor, str):
        executor = make_executor(executor, workers=spec.batch_size)
    if history is None:
        history = RunHistory()
    if model_ref is None and loaded.source.get("path"):
        model_ref = ModelRef(str(loaded.source["path"]), device=str(loaded.source.get("device", "cpu")),
                             dtype=str(loaded.source.get("dtype", "float32")))
    result = SearchResult(search_id, "failed", spec.to_dict(), executor.name)
    started = time.perf_counter()
    try:
        search = _Search(spec, loaded, executor, events, cancel, history or None, result)
        executor.start(loaded, model_ref)
        search.run()
    except StudioError as exc:
        result.error = str(exc)
        events(SearchFailed(search_id, str(exc)))
        raise
    except BaseException:  # Ctrl-C, or a bug: stop the candidates still running before leaving
        executor.cancel_all()
        raise
    finally:
        executor.close()
        result.seconds = time.perf_counter() - started
    events(SearchCancelled(result) if result.status == "cancelled" else SearchFinished(result))
    return result


class _Search:
    def __init__(self, spec, loaded, executor, events, cancel, history, result: SearchResult):
        self.spec, self.loaded, self.executor, self.events, self.cancel = spec, loaded, executor, events, cancel
        self.history, self.result = history, result
        self.shape: ModelShape = model_shape(loaded.model)
        self.keys = CandidateKey()
        self.layouts = layouts(spec, self.shape)
        self.reasked = 0  # proposals of a recipe that had already run, told its numbers and asked again

    def run(self) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = self.spec
        try:
            self.result.baseline = self._baseline()
        except Cancelled:
            self.result.status = "cancelled"
            return
        self.events(SearchStarted(self.result.search_id, spec.trials, spec.batch_size, self.executor.name,
                                  spec.budget.model_dump(), self.result.baseline))
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(spec))
        asked = 0
        while asked < spec.trials:
            if self.cancel.cancelled:
                self.result.status = "cancelled"
                return
            batch = self._ask_batch(study, min(spec.batch_size, spec.trials - asked))
            asked += len(batch)
            ended = self._run_batch(batch)
            if ended is None:
                self.result.status = "cancelled"
                return
            for trial, _ in batch:  # told in ask order: the same history for any executor
                self._tell(study, trial, ended[trial.number])
        self.result.status = "finished"

    def _ask_batch(self, study, size: int) -> list[tuple[Any, Candidate]]:
        """`size` new candidates. A recipe that has already run is not run again: the sampler is told its numbers
        and asked once more (at most `2 × trials` times in a search; after that a repeat is listed as one)."""
        batch = []
        while len(batch) < size:
            trial = study.ask()
            candidate = build_candidate(self.spec, self.shape, trial.number, suggest(trial, self.spec, self.layouts))
            earlier = self.keys.earlier(candidate)
            ran = None if earlier is None else self.result.candidate(earlier)
            if ran is not None and self.reasked < 2 * self.spec.trials:
                self.reasked += 1
                self._tell(study, trial, ran)
                continue
            batch.append((trial, candidate))
        return batch

    def _baseline(self) -> dict[str, Any]:
        from studio.core.evaluation.perplexity import perplexity
        from studio.core.evaluation.size import size_report

        config = self.spec.evaluation.config()
        scored = perplexity(self.loaded.model, eval_tokens(self.loaded.tokenizer, config), config,
                            self.loaded.tokenizer, cancel=self.cancel)
        size = size_report(self.loaded.model)
        return {**scored.to_dict(), "size": size, "compressed_bytes": size["compressed_bytes"],
                "bits_per_weight": budget_measure_bits(self.shape, size["compressed_bytes"])}

    def _run_batch(self, batch: list[tuple[Any, Candidate]]) -> dict[int, CandidateResult] | None:
        ended: dict[int, CandidateResult] = {}
        for _, candidate in batch:
            if not candidate.fits:
                self._ended(ended, CandidateResult(candidate.trial, candidate.params, None, "over_budget",
                                                   candidate.predicted_measure, error=candidate.reason))
                continue
            first = self.keys.first_with(candidate)
            if first is not None:  # the same recipe as an earlier trial: its numbers, once it has them
                if (earlier := self.result.candidate(first)) is not None:
                    self._ended(ended, self._repeat(candidate, earlier))
                continue
            self.events(CandidateStarted(self.result.search_id, candidate.trial, candidate.recipe.name,
                                         dict(candidate.params), candidate.predicted_measure))
            self.executor.submit(Job(candidate.trial, candidate.recipe.to_dict(), self.spec.evaluation.config()))
        candidates = {c.trial: c for _, c in batch}
        while self.executor.pending:
            if self.cancel.cancelled:
                for trial in self.executor.cancel_all():
                    self._ended(ended, self._from_outcome(candidates[trial], {"status": "cancelled", "report": {}}))
                return None
            for trial, outcome in self.executor.wait(POLL_SECONDS):
                self._ended(ended, self._from_outcome(candidates[trial], outcome))
        # a repeat of a candidate of this very batch takes its numbers once that one has ended
        for _, candidate in batch:
            if candidate.trial not in ended:
                self._ended(ended, self._repeat(candidate, ended[self.keys.first_with(candidate)]))
        return ended

    def _repeat(self, candidate: Candidate, earlier: CandidateResult) -> CandidateResult:
        copy = CandidateResult(**{**vars(earlier), "trial": candidate.trial, "params": candidate.params,
                                  "recipe": candidate.recipe,
                                  "duplicate_of": earlier.trial if earlier.duplicate_of is None else earlier.duplicate_of,
                                  "on_front": False})
        return copy

    def _from_outcome(self, candidate: Candidate, outcome: dict[str, Any]) -> CandidateResult:
        report = dict(outcome.get("report") or {})
        final = report.get("final") or {}
        status = outcome["status"] if outcome["status"] != "finished" or final else "failed"
        size = (report.get("size_after") or {}).get("compressed_bytes")
        peaks = [s.get("peak_rss_bytes") for s in report.get("steps", []) if s.get("peak_rss_bytes")]
        result = CandidateResult(
            candidate.trial, candidate.params, candidate.recipe, status, candidate.predicted_measure,
            bits_per_weight=None if size is None else budget_measure_bits(self.shape, size),
            compressed_bytes=size, measure=None if size is None else budget_measure(self.spec, self.shape, size),
            perplexity=final.get("perplexity"), kl=final.get("kl"), top1_agreement=final.get("top1_agreement"),
            seconds=outcome.get("seconds"), peak_rss_bytes=max(peaks, default=None), error=outcome.get("error"),
        )
        if self.history is not None and status in ("finished", "failed", "cancelled"):
            result.run_id = self._record(result, report)
        return result

    def _record(self, candidate: CandidateResult, report: dict[str, Any]) -> int | None:
        report = {**report, "baseline": self.result.baseline,
                  "search": {"id": self.result.search_id, "trial": candidate.trial, "params": candidate.params,
                             "bits_per_weight": candidate.bits_per_weight, "budget": self.spec.budget.model_dump()}}
        report.setdefault("model", dict(self.loaded.source))
        try:
            return self.history.record(candidate.status, report, candidate.recipe, dict(self.loaded.source),
                                       error=candidate.error, search_id=self.result.search_id)
        except Exception as exc:  # noqa: BLE001 - a history that cannot be written never stops the search
            log.warning("candidate %d was not recorded in the run history: %s", candidate.trial, exc)
            return None

    def _ended(self, ended: dict[int, CandidateResult], candidate: CandidateResult) -> None:
        ended[candidate.trial] = candidate
        self.result.candidates.append(candidate)
        self.result.candidates.sort(key=lambda c: c.trial)
        self.result.front = front_of(self.result.candidates, self.spec.objective)
        for c in self.result.candidates:
            c.on_front = c.trial in self.result.front
        self.events(CandidateFinished(self.result.search_id, candidate, tuple(self.result.front),
                                      len(self.result.candidates), self.spec.trials))

    def _tell(self, study, trial, candidate: CandidateResult) -> None:
        from optuna.trial import TrialState

        if candidate.status == "over_budget":
            study.tell(trial, state=TrialState.PRUNED)
        elif candidate.status == "finished":
            study.tell(trial, [float(candidate.compressed_bytes), candidate.quality(self.spec.objective)])
        else:
            study.tell(trial, state=TrialState.FAIL)


budget_measure_bits = bits_per_weight  # the name tests and benches import

