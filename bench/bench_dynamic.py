"""Dynamic networks on a real model: confidence-based early exit (threshold sweep) and self-speculative decoding
(skip count x draft length), each through its method's `apply` on a step context like the runner's.

    python bench/bench_dynamic.py [--tokens 16384] [--thresholds 0.8,0.9,0.95,0.99,1.0] [--skips 6,10]
                                  [--drafts 3,5] [--prompts 2] [--max-new-tokens 24] [--repeats 3] [--threads 1]

Early exit: perplexity of the exited predictions on WikiText-2 test (window 1024, stride 1024, BOS at each window
start; `--tokens` tokens), the mean blocks a scored token uses, and tokens/s of greedy generation that really
skips blocks against plain greedy decoding (median of `--repeats`, interleaved in the same process). Each
threshold is its own `apply`, so each row has its own greedy baseline timed next to it (the machine's load drifts).
Self-speculative: the skipped blocks are the least influential on C4 calibration text (8 x 256 tokens), then
acceptance rate, tokens/s against plain greedy and whether the output equals greedy's, per configuration.
Rows are printed as they finish. Timings depend on the machine's load: the header and footer give it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED_DIR") or REPO.parent / "shared")
MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = SHARED / "data" / "text" / "wikitext-2-raw-test.txt"
C4 = SHARED / "data" / "text" / "c4-en-sample.txt"


def machine_line(torch) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} thread(s), load average {load}")


def context(loaded, args, torch):
    from studio.core.calibration import CalibrationData, CalibrationSettings, load_calibration_tokens
    from studio.core.context import Evaluation, StepContext
    from studio.core.evaluation.perplexity import PerplexityConfig, load_eval_tokens
    from studio.core.events import CancelToken

    config = PerplexityConfig(str(WIKITEXT), max_tokens=args.tokens, window=1024, stride=1024)
    tokens = load_eval_tokens(loaded.tokenizer, config)[None]
    settings = CalibrationSettings(text_file=str(C4), samples=8, seq_len=256)
    calibration = CalibrationData(load_calibration_tokens(loaded.tokenizer, settings), 8, settings)
    return StepContext(loaded.model, {}, 0, lambda event: None, CancelToken(), calibration=calibration,
                       tokenizer_or_loader=loaded.tokenizer, evaluation=Evaluation(tokens, config))


def early_exit_rows(ctx, args):
    from studio.methods.early_exit import EarlyExit, EarlyExitParams

    print(f"\nEarly exit (confidence {args.confidence}, exit after every {args.exit_interval} block(s)); "
          f"perplexity on {args.tokens} WikiText-2 tokens; generation: {args.prompts} prompts x "
          f"{args.prompt_tokens} tokens, {args.max_new_tokens} new tokens, median of {args.repeats} runs")
    print(f"{'threshold':>9} {'avg blocks':>10} {'gen blocks':>10} {'perplexity':>10} {'tok/s':>7} "
          f"{'greedy tok/s':>12} {'speedup':>7} {'seconds':>7}")
    rows = []
    for threshold in args.thresholds.split(","):
        params = EarlyExitParams(thresholds=threshold, confidence=args.confidence, exit_interval=args.exit_interval,
                                 tokens=args.tokens, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                                 max_new_tokens=args.max_new_tokens, repeats=args.repeats)
        begin = time.perf_counter()
        summary = EarlyExit().apply(ctx, params).summary
        row = summary["rows"][0] | {"greedy_tokens_per_second": summary["greedy_tokens_per_second"],
                                    "tokens_scored": summary["tokens_scored"],
                                    "seconds": time.perf_counter() - begin}
        rows.append(row)
        print(f"{row['threshold']:>9} {row['avg_blocks']:>10.2f} {row['generation_avg_blocks']:>10.2f} "
              f"{row['perplexity']:>10.2f} {row['tokens_per_second']:>7.2f} {row['greedy_tokens_per_second']:>12.2f} "
              f"{row['speedup']:>7.2f} {row['seconds']:>7.0f}", flush=True)
    return rows


def self_speculative_rows(ctx, args):
    from studio.methods.self_speculative import SelfSpeculative, SelfSpeculativeParams

    print(f"\nSelf-speculative decoding: {args.prompts} prompts x {args.prompt_tokens} tokens, "
          f"{args.max_new_tokens} new tokens, median of {args.repeats} runs")
    print(f"{'skip':>4} {'draft':>5} {'acceptance':>10} {'accepted/round':>14} {'tok/s':>7} {'greedy tok/s':>12} "
          f"{'speedup':>7} {'identical':>9}  skipped blocks")
    rows = []
    for skip in [int(s) for s in args.skips.split(",")]:
        for draft in [int(d) for d in args.drafts.split(",")]:
            params = SelfSpeculativeParams(skip_blocks=skip, draft_tokens=draft, max_new_tokens=args.max_new_tokens,
                                           prompts=args.prompts, prompt_tokens=args.prompt_tokens,
                                           repeats=args.repeats)
            row = SelfSpeculative().apply(ctx, params).summary
            rows.append(row)
            acceptance = row["acceptance_rate"] if row["acceptance_rate"] is not None else float("nan")
            print(f"{skip:>4} {draft:>5} {acceptance:>10.3f} {row['mean_accepted_length']:>14.2f} "
                  f"{row['tokens_per_second']:>7.2f} {row['greedy_tokens_per_second']:>12.2f} {row['speedup']:>7.2f} "
                  f"{str(row['identical_to_greedy']):>9}  {row['skipped_blocks']}", flush=True)
            for mismatch in row["mismatches"]:
                print(f"      differs from greedy: {mismatch}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--thresholds", default="0.8,0.9,0.95,0.99,1.0")
    parser.add_argument("--confidence", default="top_probability")
    parser.add_argument("--exit-interval", type=int, default=1)
    parser.add_argument("--skips", default="6,10")
    parser.add_argument("--drafts", default="3,5")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", choices=["early_exit", "self_speculative"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from studio.core.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(torch), flush=True)
    loaded = load_model(MODEL)
    ctx = context(loaded, args, torch)
    results = {"args": vars(args) | {"json": str(args.json)}}
    if args.only in (None, "self_speculative"):
        results["self_speculative"] = self_speculative_rows(ctx, args)
    if args.only in (None, "early_exit"):
        results["early_exit"] = early_exit_rows(ctx, args)
    print("\n" + machine_line(torch))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
