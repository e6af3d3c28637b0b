"""`studio search SPEC.yaml --model …`: a recipe search under a budget, one line per candidate as it ends, then
the Pareto front as a table."""

from __future__ import annotations

import sys
from pathlib import Path

from studio.core.errors import StudioError


def add_search_parser(sub):
    """The `search` subcommand's parser (the caller adds the model options)."""
    p = sub.add_parser("search", help="search the recipe with the least loss under a budget (bits, MiB); "
                                      "prints the Pareto front of size against quality")
    p.add_argument("spec", help="search spec YAML (budget, methods and ranges, trials, evaluation)")
    p.add_argument("--model", required=True)
    p.add_argument("--executor", choices=["auto", "threads", "ray"], default="auto",
                   help="where candidates run: Ray (local, or --address) when installed, else local threads")
    p.add_argument("--address", metavar="ADDRESS", help="a Ray cluster to run candidates on (ray://host:10001, auto)")
    p.add_argument("--workers", type=int, help="threads executor: candidates at once (default the spec's batch_size)")
    p.add_argument("--cpus-per-candidate", type=float, default=1, help="ray executor: CPUs each task reserves")
    p.add_argument("--gpus-per-candidate", type=float, default=0,
                   help="ray executor: GPUs each task reserves (with --device cuda the workers load onto them)")
    p.add_argument("--eval-text", metavar="FILE", help="text for perplexity and KL (overrides the spec's)")
    p.add_argument("--calib-text", metavar="FILE", help="calibration text (overrides the spec's)")
    p.add_argument("--trials", type=int, help="override the spec's number of trials")
    p.add_argument("--seed", type=int, help="override the spec's seed")
    p.add_argument("--out", metavar="FILE", help="write the result (every candidate, its recipe, the front) as JSON")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    return p


def cmd_search(args, load) -> int:
    from studio.cli.main import EXIT_INTERRUPTED, EXIT_OK, EXIT_RUN_FAILED
    from studio.core.history import RunHistory
    from studio.core.search import ModelRef, load_search_spec, make_executor, run_search

    changes = {k: v for k, v in (("trials", args.trials), ("seed", args.seed)) if v is not None}
    for section, text in (("evaluation", args.eval_text), ("calibration", args.calib_text)):
        if text:
            changes[section] = {"text_file": str(Path(text).expanduser().resolve())}
            if section == "calibration":
                changes[section]["dataset"] = None
    spec = load_search_spec(args.spec, changes)
    for section in (spec.evaluation.text_file, spec.calibration.text_file):
        if section and not Path(section).is_file():
            raise StudioError(f"{args.spec}: the text file '{section}' does not exist.")
    out = Path(args.out).expanduser() if args.out else None
    if out is not None and not out.parent.is_dir():
        raise StudioError(f"--out: the folder '{out.parent}' does not exist.")
    ray_options = {"cpus_per_candidate": args.cpus_per_candidate, "gpus_per_candidate": args.gpus_per_candidate} \
        if args.executor != "threads" else {}
    executor = make_executor(args.executor, address=args.address, workers=args.workers or spec.batch_size,
                             **ray_options)
    loaded = load(args)
    ref = ModelRef(str(Path(args.model).expanduser().resolve()) if Path(args.model).expanduser().exists()
                   else args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                   trust_remote_code=args.trust_remote_code, use_cache=not args.no_cache)
    printer = CandidatePrinter(sys.stderr if args.json else sys.stdout)
    result = run_search(spec, loaded, model_ref=ref, executor=executor, events=printer, history=_history(RunHistory))
    if out is not None:
        result.save(out)
    if args.json:
        import json

        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(format_front(result))
        if out is not None:
            print(f"result written to {out}")
    if result.status == "cancelled":
        return EXIT_INTERRUPTED
    return EXIT_OK if result.front else EXIT_RUN_FAILED


def _history(cls):
    try:
        return cls()
    except Exception as exc:  # noqa: BLE001 - the search runs without a history
        print(f"warning: candidates will not be recorded in the run history: {exc}", file=sys.stderr)
        return False


class CandidatePrinter:
    """Search events as one line each."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, event) -> None:
        from studio.core.search import CandidateFinished, SearchStarted

        if isinstance(event, SearchStarted):
            b = event.budget
            self._write(f"search {event.search_id}: {event.trials} candidates, {event.batch_size} at a time on "
                        f"{event.executor}; budget {b['value']:g} {b['kind']}; original perplexity "
                        f"{event.baseline['perplexity']:.4f}, {event.baseline['bits_per_weight']:.2f} bits per weight")
        elif isinstance(event, CandidateFinished):
            c = event.candidate
            head = f"[{event.done}/{event.total}] trial {c.trial}"
            if c.status == "finished":
                extra = f" (same recipe as trial {c.duplicate_of})" if c.duplicate_of is not None else ""
                self._write(f"{head}: {c.recipe.name}: {c.bits_per_weight:.3f} bits/weight, "
                            f"{c.compressed_bytes / 2**20:.2f} MiB, perplexity {c.perplexity:.4f}, KL {c.kl:.4f}, "
                            f"{c.seconds or 0:.1f} s{extra}{' *front*' if c.trial in event.front else ''}")
            elif c.status == "over_budget":
                self._write(f"{head}: rejected before running: {c.error}")
            else:
                self._write(f"{head}: {c.status}{': ' + c.error if c.error else ''}")

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def format_front(result) -> str:
    """The front as an aligned table, smallest first, and how many candidates ran."""
    rows = [("trial", "recipe", "bits/w", "MiB", "perplexity", "KL", "seconds", "run")]
    for c in result.front_candidates():
        rows.append((str(c.trial), c.recipe.name, f"{c.bits_per_weight:.3f}", f"{c.compressed_bytes / 2**20:.2f}",
                     f"{c.perplexity:.4f}", f"{c.kl:.4f}", f"{c.seconds or 0:.1f}",
                     "" if c.run_id is None else f"run:{c.run_id}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    counts = {}
    for c in result.candidates:
        counts[c.status] = counts.get(c.status, 0) + 1
    summary = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items())
    head = f"Pareto front of search {result.search_id} ({result.status}; {summary}; {result.seconds:.0f} s):"
    return "\n".join([head, *lines])
