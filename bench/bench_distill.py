"""Knowledge distillation after compression on a real model: perplexity and KL against the original before and
after the `distill` step, its loss curve, seconds and peak RSS.

    python bench/bench_distill.py [--scenario wanda50|svd20] [--steps 48] [--trainable lora] [--json FILE]

Scenarios: (wanda50) Wanda 50% unstructured, then distill; (svd20) SVD-LLM keeping 80% of the parameters
(method "svd_llm", ratio 0.2), then distill — skipped with a message when that method is not registered.
One process runs the recipe through studio.core.runner.run_recipe, which evaluates the original and the model
after each step on WikiText-2 test (window 1024, stride 1024, BOS at each window start): perplexity, and KL
divergence and top-1 agreement against the original on the same tokens. The calibration text (C4 sample) is
both the compression step's calibration data and the distillation's training text.
"""

from __future__ import annotations

import argparse
import json
import os
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

SCENARIOS = {
    "wanda50": {"method": "wanda", "params": {"sparsity": 0.5}},
    "svd20": {"method": "svd_llm", "params": {"ratio": 0.2}},
}


def distill_step(args) -> dict:
    params = {"loss": args.loss, "trainable": args.trainable, "learning_rate": args.lr, "steps": args.steps,
              "batch_size": args.batch_size, "seq_len": args.train_seq_len, "eval_every": args.eval_every,
              "patience": args.patience, "teacher_logits": args.teacher_logits}
    if args.trainable == "lora":
        params.update(lora_rank=args.rank, lora_alpha=2.0 * args.rank)
    return {"method": "distill", "params": params}


def print_events(started: float):
    from studio.core.events import Metric, StepStarted

    def on_event(event) -> None:
        elapsed = time.perf_counter() - started
        if isinstance(event, StepStarted):
            print(f"[{elapsed:6.0f} s] step {event.index + 1}: {event.method}", flush=True)
        elif isinstance(event, Metric) and event.name == "distill_eval_loss":
            print(f"[{elapsed:6.0f} s]   held-out loss {event.value:.4f}", flush=True)

    return on_event


def rows_of(report: dict) -> list[dict]:
    rows = [{"stage": "original", **report["baseline"]}]
    for step in report["steps"]:
        rows.append({"stage": f"after {step['method']}", **step["evaluation"], "seconds": step["seconds"],
                     "peak_rss_bytes": step["peak_rss_bytes"], "parameters": step["size"]["parameters"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'stage':<16} {'perplexity':>10} {'KL':>8} {'top-1':>6} {'seconds':>8} {'peak RSS MiB':>12}"]
    for r in rows:
        kl = f"{r['kl']:8.4f}" if r.get("kl") is not None else f"{'-':>8}"
        top1 = f"{r['top1_agreement']:6.3f}" if r.get("top1_agreement") is not None else f"{'-':>6}"
        seconds = f"{r['seconds']:8.1f}" if "seconds" in r else f"{'-':>8}"
        rss = f"{r['peak_rss_bytes'] / MiB:12.0f}" if "peak_rss_bytes" in r else f"{'-':>12}"
        lines.append(f"{r['stage']:<16} {r['perplexity']:10.3f} {kl} {top1} {seconds} {rss}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="wanda50")
    parser.add_argument("--tokens", type=int, default=16384, help="WikiText-2 tokens scored (default 16384)")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (also the training text)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    parser.add_argument("--loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "gkd"])
    parser.add_argument("--trainable", default=None, choices=["all", "norms_biases", "lora"])
    parser.add_argument("--teacher-logits", default="on_the_fly", choices=["on_the_fly", "cached_topk"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--train-seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (on a CPU shared with other work, 1 can be faster than 2)")
    parser.add_argument("--json", help="also write the rows and the loss curve to this file")
    args = parser.parse_args()

    from studio.core.registry import get_method
    from studio.methods.distillation import DistillParams

    defaults = DistillParams()
    for name, field in [("trainable", "trainable"), ("steps", "steps"), ("batch_size", "batch_size"),
                        ("train_seq_len", "seq_len"), ("lr", "learning_rate"), ("rank", "lora_rank"),
                        ("eval_every", "eval_every"), ("patience", "patience")]:
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, field))

    compression = SCENARIOS[args.scenario]
    try:
        get_method(compression["method"])
    except KeyError:
        print(f"scenario {args.scenario} skipped: method '{compression['method']}' is not registered yet")
        return 0

    import torch

    from studio.core.evaluation.perplexity import PerplexityConfig
    from studio.core.loading import load_model
    from studio.core.recipe import parse_recipe
    from studio.core.runner import run_recipe

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(MODEL)
    calibration = {"text_file": str(C4), "samples": args.samples, "seq_len": args.seq_len}
    steps = [compression, distill_step(args)]
    recipe = parse_recipe({"schema_version": 2, "calibration": calibration, "steps": steps})
    config = PerplexityConfig(str(WIKITEXT), max_tokens=args.tokens, window=1024, stride=1024)
    started = time.perf_counter()
    result = run_recipe(recipe, loaded, events=print_events(started), eval_config=config)
    if result.status != "finished":
        print(f"run {result.status}: {result.error}", file=sys.stderr)
        return 1
    report = result.report
    summary = report["steps"][1]["summary"]
    print(f"\nSmolLM2-135M, scenario {args.scenario}; calibration {args.samples} x {args.seq_len} tokens of the C4 "
          f"sample; WikiText-2 test {args.tokens} tokens, window 1024, stride 1024; torch threads "
          f"{torch.get_num_threads()}")
    print(f"distill: {json.dumps(steps[1]['params'])}")
    print("\nstep  training loss")
    for step, loss in enumerate(summary["loss_curve"], 1):
        print(f"{step:4d}  {loss:.4f}")
    print(f"held-out loss (step, value): {[(s, round(v, 4)) for s, v in summary['held_out_curve']]}")
    print(f"steps run {summary['steps_run']} ({summary['stop_reason']}), trainable parameters "
          f"{summary['trainable_parameters']:,}, {summary['training_windows']} training windows of "
          f"{summary['window_tokens']} tokens, distillation {summary['seconds'] / 60:.1f} min\n")
    rows = rows_of(report)
    print(table(rows))
    print(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB, "
          f"whole run {report['seconds'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "distill": summary, "params": steps[1]["params"]},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
