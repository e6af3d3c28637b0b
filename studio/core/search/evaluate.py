"""One candidate's evaluation: run its recipe on a copy of the model, then the quick evaluation (perplexity, and
KL / top-1 agreement against the original on the same tokens). The same function runs in a local worker thread
and in a Ray task; a Ray task loads the model from its path itself (it cannot share the driver's objects) and
keeps it for the next candidate that worker gets."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from studio.core.events import CancelToken


@dataclass(frozen=True)
class ModelRef:
    """Where a worker loads the model from (the path must exist on every machine that runs candidates)."""

    path: str
    device: str = "cpu"
    dtype: str = "float32"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    use_cache: bool = True

    def load(self):
        from studio.core.loading import load_model

        return load_model(self.path, device=self.device, dtype=self.dtype, allow_pickle=self.allow_pickle,
                          trust_remote_code=self.trust_remote_code, use_cache=self.use_cache)


_loaded_models: dict[ModelRef, Any] = {}
_tokens: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


def loaded_model(ref: ModelRef):
    """The model of `ref`, loaded once per process."""
    with _cache_lock:
        if ref not in _loaded_models:
            _loaded_models.clear()  # a worker keeps one model
            _loaded_models[ref] = ref.load()
        return _loaded_models[ref]


def eval_tokens(tokenizer, config):
    """The evaluation tokens, tokenized once per tokenizer and settings (the cache holds the tokenizer, so its
    id cannot be reused by another while cached)."""
    from studio.core.evaluation.perplexity import load_eval_tokens

    key = (id(tokenizer), config)
    with _cache_lock:
        cached = _tokens.get(key)
        if cached is None or cached[0] is not tokenizer:
            if len(_tokens) >= 4:
                _tokens.clear()
            cached = _tokens[key] = (tokenizer, load_eval_tokens(tokenizer, config))
        return cached[1]


def evaluate_candidate(loaded, recipe_data: dict[str, Any], eval_config, cancel: CancelToken | None = None,
                       where: str = "candidate") -> dict[str, Any]:
    """Compress a copy of `loaded.model` with the recipe and evaluate it against the original.

    Returns a plain dict (it crosses process boundaries): status (finished, failed or cancelled), error,
    bad_input, report (the runner's report with `final`: perplexity, KL, top-1 agreement), seconds."""
    from studio.core.errors import Cancelled
    from studio.core.evaluation.perplexity import perplexity
    from studio.core.recipe import parse_recipe
    from studio.core.runner import run_recipe

    started = time.perf_counter()
    cancel = cancel or CancelToken()
    recipe = parse_recipe(recipe_data, where)
    result = run_recipe(recipe, loaded, cancel=cancel, where=where)
    outcome = {"status": result.status, "error": result.error, "bad_input": result.bad_input,
               "report": result.report}
    if result.status == "finished":
        try:
            tokens = eval_tokens(loaded.tokenizer, eval_config)
            scored = perplexity(result.model, tokens, eval_config, loaded.tokenizer, reference=loaded.model,
                                cancel=cancel)
            outcome["report"]["final"] = scored.to_dict()
        except Cancelled:
            outcome.update(status="cancelled")
        except Exception as exc:  # noqa: BLE001 - the candidate failed; the search goes on
            outcome.update(status="failed", error=f"evaluation failed: {type(exc).__name__}: {exc}")
    outcome["seconds"] = time.perf_counter() - started
    outcome["report"]["seconds"] = outcome["seconds"]
    return outcome


def evaluate_in_worker(ref_data: dict[str, Any], recipe_data: dict[str, Any], eval_config) -> dict[str, Any]:
    """The body of a Ray task: load (or reuse) the model, then evaluate the candidate."""
    return evaluate_candidate(loaded_model(ModelRef(**ref_data)), recipe_data, eval_config)


def model_ref_data(ref: ModelRef) -> dict[str, Any]:
    return asdict(ref)
