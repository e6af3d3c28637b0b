"""A recipe search on SmolLM2-135M under a budget of 3.5 bits per weight, against the uniform recipes that fit.

    python bench/bench_search.py [--trials 10] [--batch 1] [--quantizers gptq] [--tokens 4096] [--json FILE]

Every recipe, uniform or searched, is evaluated by the same function on the same tokens (the search's quick
evaluation: perplexity on WikiText-2 test, and KL / top-1 agreement against the original, window 1024, stride
1024) after the same calibration (C4 sample, fixed seed). Bits per weight are the packed bits (codes, 16-bit
scales, zero points) of the decoder blocks' linear layers, the quantity the budget limits. The table lists the
uniform recipes that fit, then every candidate the search ran, the front marked; the last lines say whether the
best point of the front beats the best uniform recipe within the same budget (with the search's quantizer, and of
all), and what the front holds at no more than that recipe's size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED_DIR") or REPO.parent / "shared")
MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = SHARED / "data" / "text" / "wikitext-2-raw-test.txt"
C4 = SHARED / "data" / "text" / "c4-en-sample.txt"
MiB = 2**20
BUDGET = 3.5

UNIFORM = {  # W4 does not fit (4 code bits alone exceed 3.5); g128 does not divide SmolLM2's width 576
    "RTN W3 g64 asym": {"method": "rtn", "params": {"bits": 3, "group_size": 64, "symmetric": False}},
    "RTN W3 g32 sym": {"method": "rtn", "params": {"bits": 3, "group_size": 32, "symmetric": True}},
    "RTN W3 per channel asym": {"method": "rtn", "params": {"bits": 3, "group_size": 0, "symmetric": False}},
    "GPTQ W3 g64 asym": {"method": "gptq", "params": {"bits": 3, "group_size": 64, "symmetric": False}},
    "GPTQ W3 g32 sym": {"method": "gptq", "params": {"bits": 3, "group_size": 32, "symmetric": True}},
}


def search_spec(args):
    from studio.core.search import parse_search_spec

    return parse_search_spec({
        "name": f"SmolLM2 at {BUDGET} bits per weight",
        "budget": {"kind": "bits_per_weight", "value": BUDGET},
        "objective": "perplexity",
        "trials": args.trials,
        "batch_size": args.batch,
        "seed": args.seed,
        "space": {"quantization": {"quantizer": args.quantizers.split(","), "group_sizes": [32, 64],
                                   "symmetric": [False], "min_bits": [2, 3], "max_bits": 8,
                                   "budget_fraction": [0.85, 1.0]}},
        "calibration": {"text_file": str(C4), "samples": args.samples, "seq_len": args.seq_len, "seed": 0},
        "evaluation": {"text_file": str(WIKITEXT), "tokens": args.tokens, "window": 1024, "stride": 1024},
    }, "bench search spec")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def uniform_rows(spec, loaded, shape) -> list[dict]:
    from studio.core.recipe import Recipe, Step
    from studio.core.search.engine import budget_measure_bits
    from studio.core.search.evaluate import evaluate_candidate

    rows = []
    for name, step in UNIFORM.items():
        recipe = Recipe([Step(step["method"], dict(step["params"]))], name=name, calibration=spec.calibration)
        outcome = evaluate_candidate(loaded, recipe.to_dict(), spec.evaluation.config())
        if outcome["status"] != "finished":
            raise SystemExit(f"{name}: {outcome['status']}: {outcome['error']}")
        report = outcome["report"]
        size = report["size_after"]["compressed_bytes"]
        rows.append({"kind": "uniform", "name": name, "bits_per_weight": budget_measure_bits(shape, size),
                     "compressed_bytes": size, "perplexity": report["final"]["perplexity"],
                     "kl": report["final"]["kl"], "seconds": outcome["seconds"],
                     "peak_rss_mib": max(s["peak_rss_bytes"] for s in report["steps"]) / MiB})
        print(f"uniform {name}: {rows[-1]['bits_per_weight']:.3f} bits/weight, perplexity "
              f"{rows[-1]['perplexity']:.3f}, {outcome['seconds']:.0f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| recipe | kind | bits/weight | MiB | perplexity | KL | seconds | peak RSS MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r['bits_per_weight']:.3f} | {r['compressed_bytes'] / MiB:.1f} | "
                     f"{r['perplexity']:.3f} | {r['kl']:.4f} | {r['seconds']:.0f} | {r['peak_rss_mib']:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1, help="candidates at once (1: each gets both cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (perplexity and KL)")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--quantizers", default="gptq", help="the search's quantizers: rtn, gptq or rtn,gptq")
    parser.add_argument("--executor", default="threads", choices=["threads", "ray"])
    parser.add_argument("--skip-uniform", default="", help="comma-separated uniform recipes not to run")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import torch
    import transformers

    from studio.core.loading import load_model
    from studio.core.search import CandidateFinished, make_executor, run_search
    from studio.core.search.space import model_shape

    started = time.perf_counter()
    loaded = load_model(MODEL)
    spec = search_spec(args)
    shape = model_shape(loaded.model)
    skip = set(filter(None, args.skip_uniform.split(",")))
    for name in skip:
        UNIFORM.pop(name)
    rows = uniform_rows(spec, loaded, shape)

    def progress(event):
        if isinstance(event, CandidateFinished):
            c = event.candidate
            what = (f"{c.bits_per_weight:.3f} bits/weight, perplexity {c.perplexity:.3f}, {c.seconds:.0f} s"
                    if c.status == "finished" else f"{c.status} {c.error or ''}")
            print(f"candidate {c.trial}: {c.recipe.name if c.recipe else '-'}: {what}", file=sys.stderr, flush=True)

    executor = make_executor(args.executor, workers=args.batch, init_options={"num_cpus": os.cpu_count()})
    result = run_search(spec, loaded, executor=executor, events=progress, history=False)
    for c in result.candidates:
        if c.status == "finished" and c.duplicate_of is None:
            rows.append({"kind": "search, front" if c.on_front else "search", "name": f"#{c.trial} {c.recipe.name}",
                         "bits_per_weight": c.bits_per_weight, "compressed_bytes": c.compressed_bytes,
                         "perplexity": c.perplexity, "kl": c.kl, "seconds": c.seconds,
                         "peak_rss_mib": (c.peak_rss_bytes or 0) / MiB})
    best = result.best()
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF dequantized), budget {BUDGET} bits per weight; original perplexity "
          f"{result.baseline['perplexity']:.3f} ({result.baseline['tokens_scored']} tokens); search: {args.trials} "
          f"trials, batch {args.batch}, seed {args.seed}, quantizers {args.quantizers}, executor {result.executor}, "
          f"{result.seconds:.0f} s; total {time.perf_counter() - started:.0f} s, process peak RSS "
          f"{peak_rss_mib():,.0f} MiB\n")
    print(table(rows))
    if best is not None:
        print(f"\nbest point of the front: #{best.trial} {best.recipe.name} ({best.bits_per_weight:.3f} bits/weight, "
              f"perplexity {best.perplexity:.3f})")
    verdicts = {}
    quantizers = tuple(q.upper() for q in args.quantizers.split(","))
    for scope, names in (("with the search's quantizer", lambda n: n.startswith(quantizers)), ("of all", lambda n: True)):
        uniform = [r for r in rows if r["kind"] == "uniform" and r["bits_per_weight"] <= BUDGET and names(r["name"])]
        if not uniform or best is None:
            continue
        top = min(uniform, key=lambda r: r["perplexity"])
        verdicts[scope] = best.perplexity < top["perplexity"]
        smaller = [c for c in result.front_candidates() if c.compressed_bytes <= top["compressed_bytes"]]
        at_size = min(smaller, key=lambda c: c.perplexity, default=None)
        print(f"best uniform recipe {scope} within the budget: {top['name']} ({top['bits_per_weight']:.3f} "
              f"bits/weight, perplexity {top['perplexity']:.3f}): the front's best point "
              f"{'beats' if verdicts[scope] else 'does not beat'} it within the same budget; "
              + (f"at no more than its size the front's best is #{at_size.trial} (perplexity "
                 f"{at_size.perplexity:.3f}: {'beats' if at_size.perplexity < top['perplexity'] else 'does not beat'} it)"
                 if at_size else "no front point is as small"))
    print(f"\n# python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"optuna {__import__('optuna').__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "search": result.to_dict()}, indent=2, default=str))
    return 0 if verdicts.get("with the search's quantizer") else 1


if __name__ == "__main__":
    raise SystemExit(main())
