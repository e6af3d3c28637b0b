"""Where candidates run: local worker threads (concurrent.futures), or Ray tasks on the local machine
(`ray.init()`) or on a cluster (`address=`). Both take a batch of jobs, report each as it ends, and stop the
ones still running when the search is cancelled. Ray is imported only when its executor is asked for."""

from __future__ import annotations

import concurrent.futures
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from studio.core.errors import StudioError
from studio.core.events import CancelToken
from studio.core.search.evaluate import ModelRef, evaluate_candidate, evaluate_in_worker, model_ref_data

RAY_MISSING = ('Running a search on Ray needs Ray: pip install "compression-studio[cluster]" '
               '(or choose the threads executor).')
POLL_SECONDS = 0.2


class ExecutorError(StudioError):
    pass


@dataclass
class Job:
    key: int  # the trial number
    recipe: dict[str, Any]  # Recipe.to_dict()
    eval_config: Any  # PerplexityConfig


class Executor(ABC):
    """Runs jobs; `wait` returns the keys of jobs that ended with their outcome dicts (evaluate_candidate's).
    run_search calls start, then submit / wait / cancel_all, then close; an executor can serve several searches
    one after the other."""

    name = ""

    def start(self, loaded, ref: ModelRef | None) -> None:
        """Called once before the first job with the driver's model and where workers load it from."""

    @abstractmethod
    def submit(self, job: Job) -> None: ...

    @abstractmethod
    def wait(self, timeout: float) -> list[tuple[int, dict[str, Any]]]: ...

    @abstractmethod
    def cancel_all(self) -> list[int]:
        """Stop every job still running; returns their keys (their outcomes are not awaited)."""

    @property
    @abstractmethod
    def pending(self) -> int: ...

    def close(self) -> None:
        pass


class ThreadExecutor(Executor):
    """Candidates in worker threads of this process, sharing the driver's loaded model (read-only: each run works
    on a copy that shares the weights until they are replaced)."""

    name = "threads"

    def __init__(self, workers: int = 2):
        self.workers = max(1, workers)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._futures: dict[concurrent.futures.Future, tuple[int, CancelToken]] = {}
        self._loaded = None

    def start(self, loaded, ref) -> None:
        self._loaded = loaded
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="studio-search")

    def submit(self, job: Job) -> None:
        token = CancelToken()
        future = self._pool.submit(evaluate_candidate, self._loaded, job.recipe, job.eval_config, token,
                                   f"candidate {job.key}")
        self._futures[future] = (job.key, token)

    def wait(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        done, _ = concurrent.futures.wait(list(self._futures), timeout, concurrent.futures.FIRST_COMPLETED)
        return [(self._futures.pop(f)[0], _outcome(f.result)) for f in done]

    def cancel_all(self) -> list[int]:
        keys = []
        for future, (key, token) in list(self._futures.items()):
            token.cancel()
            future.cancel()
            keys.append(key)
        concurrent.futures.wait(list(self._futures))  # the runs stop at their next block
        self._futures.clear()
        return keys

    @property
    def pending(self) -> int:
        return len(self._futures)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _outcome(get) -> dict[str, Any]:
    try:
        return get()
    except Exception as exc:  # noqa: BLE001 - one candidate's crash is its own failure
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "bad_input": False, "report": {}}


def import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError(RAY_MISSING) from None
    return ray


class RayExecutor(Executor):
    """Each candidate is a Ray task that loads the model from its path (ModelRef) and evaluates the recipe.

    Without `address`, `ray.init()` starts Ray on this machine; with one (`ray://host:10001`, `auto`), it joins
    that cluster, whose workers need the studio installed and the model and text files at the same paths. Ray
    started here is shut down by `close`; one already running is left as it is."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_candidate: float = 1, gpus_per_candidate: float = 0,
                 init_options: dict[str, Any] | None = None):
        self._ray = import_ray()
        self.address = address
        self._started_here = False
        self._init_options = {"include_dashboard": False, "log_to_driver": False, **(init_options or {})}
        self._options = {"num_cpus": cpus_per_candidate, "num_gpus": gpus_per_candidate, "max_retries": 0}
        self._refs: dict[Any, int] = {}
        self._remote = None
        self._ref_data = None

    def start(self, loaded, ref: ModelRef | None) -> None:
        ray = self._ray
        if ref is None:
            raise ExecutorError("A search on Ray needs the model's path: Ray workers load the model themselves.")
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, **self._init_options)
            except Exception as exc:  # noqa: BLE001 - connection refused, bad address: the user's to fix
                where = f"the Ray cluster at '{self.address}'" if self.address else "a local Ray instance"
                raise ExecutorError(f"Could not start or join {where}: {exc}") from None
            self._started_here = True
        self._remote = ray.remote(**self._options)(evaluate_in_worker)
        self._ref_data = model_ref_data(ref)

    def submit(self, job: Job) -> None:
        self._refs[self._remote.remote(self._ref_data, job.recipe, job.eval_config)] = job.key

    def wait(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        if not self._refs:
            return []
        done, _ = self._ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        return [(self._refs.pop(r), _outcome(lambda r=r: self._ray.get(r))) for r in done]

    def cancel_all(self) -> list[int]:
        keys = list(self._refs.values())
        for ref in self._refs:
            self._ray.cancel(ref, force=True)  # kills the worker process: torch kernels do not see interrupts
        self._refs.clear()
        return keys

    @property
    def pending(self) -> int:
        return len(self._refs)

    def close(self) -> None:
        if self._started_here and self._ray.is_initialized():
            self._ray.shutdown()
        self._started_here = False


def make_executor(kind: str = "auto", *, address: str | None = None, workers: int = 2, **ray_options) -> Executor:
    """`threads`, `ray`, or `auto` (Ray when it is installed or an address is given, threads otherwise).
    `ray_options` go to RayExecutor (cpus_per_candidate, gpus_per_candidate, init_options)."""
    if kind not in ("auto", "threads", "ray"):
        raise ExecutorError(f"Unknown executor '{kind}': choose threads, ray or auto.")
    if kind == "threads" and address:
        raise ExecutorError("--address names a Ray cluster; it needs the ray executor, not threads.")
    if kind == "auto":
        kind = "ray" if address or _ray_installed() else "threads"
    if kind == "ray":
        return RayExecutor(address, **ray_options)
    return ThreadExecutor(workers)


def _ray_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None
