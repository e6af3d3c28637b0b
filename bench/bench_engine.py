"""Engine benchmark: model load (cold and warm), the RTN W4 g64 step, and evaluation speed against a plain
transformers loop, on one real GGUF model. Prints a table; `--json FILE` also writes the rows.

    python bench/bench_engine.py [--model M.gguf] [--text T.txt] [--repeats 3] [--cold-repeats 1]

Exits 1 when the studio's perplexity and the plain loop's differ by more than 0.1%, or when the dense cache
tokenizes the text differently from the GGUF.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from studio.core.evaluation.perplexity import PerplexityConfig, load_eval_tokens, perplexity
from studio.core.loading import load_model
from studio.core.memory import PeakRSS
from studio.core.recipe import parse_recipe
from studio.core.runner import run_recipe

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED_DIR") or REPO.parent / "shared")
RTN_RECIPE = {"schema_version": 1, "steps": [{"method": "rtn", "params": {"bits": 4, "group_size": 64}}]}
MiB = 2**20


def contention():
    """1-minute load average (this benchmark adds about its thread count) and, on Linux, the share of the
    last 60 s in which some runnable task waited for a CPU: other work on the machine slows every number."""
    try:
        psi = Path("/proc/pressure/cpu").read_text().split()[2].split("=")[1] + "%"
    except (OSError, IndexError):
        psi = "n/a"
    return f"load {os.getloadavg()[0]:.2f}, cpu pressure {psi}"


def row(what, times, peak_bytes, tokens_per_s=None, quality=None, **extra):
    """One table row; `seconds` is the median of `times`, every run's seconds kept for the JSON."""
    return {"what": what, "seconds": statistics.median(times), "runs": len(times), "times": times,
            "tokens_per_s": tokens_per_s, "peak_rss_mib": peak_bytes / MiB, "quality": quality, **extra}


def timed(fn, repeats):
    """Run `fn` `repeats` times; (every run's seconds, peak process RSS over all runs, the last result)."""
    times, result = [], None
    with PeakRSS() as peak:
        for _ in range(repeats):
            result = None
            gc.collect()
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
    return times, peak.bytes, result


def bench_cold_load(model_path, repeats):
    times, peak, loaded = timed(lambda: load_model(model_path, use_cache=False), repeats)
    return row("load cold (GGUF dequantize)", times, peak), loaded


def bench_warm_load(model_path, repeats):
    # the first cached load writes the dense cache if it is missing: that run is a cold load, not counted
    prime = load_model(model_path, use_cache=True)
    if "dense_cache" not in prime.source:
        print("note: the dense GGUF cache was missing; one untimed load wrote it")
    del prime
    times, peak, loaded = timed(lambda: load_model(model_path, use_cache=True), repeats)
    assert "dense_cache" in loaded.source, "the warm load did not come from the dense cache"
    return row("load warm (dense cache)", times, peak), loaded


def windows(n, window, stride, bos):
    """(begin, end, first scored) of strided windows; with a BOS token a window holds one text token less."""
    width = window - 1 if bos else window
    stride, prev_end, begin, out = min(stride, width), 0 if bos else 1, 0, []
    while prev_end < n:
        end = min(begin + width, n)
        out.append((begin, end, prev_end))
        if end == n:
            break
        prev_end, begin = end, begin + stride
    return out


@torch.inference_mode()
def plain_perplexity(model, tokens, window, stride, bos_id):
    """The reference: plain forward passes, log_softmax and gather, no studio code. (ppl, scored tokens)."""
    nll, scored = 0.0, 0
    for begin, end, first in windows(len(tokens), window, stride, bos_id is not None):
        ids = tokens[begin:end]
        if bos_id is not None:
            ids = torch.cat([torch.tensor([bos_id]), ids])
        shift = 1 if bos_id is not None else 0  # logits at input position p predict input position p + 1
        logits = model(ids[None]).logits[0, first - begin - 1 + shift: end - begin - 1 + shift]
        logp = F.log_softmax(logits.float(), dim=-1)
        nll -= logp.gather(1, tokens[first:end, None]).sum().item()
        scored += end - first
    return math.exp(nll / scored), scored


def bench_rtn(loaded, repeats, tokens, config, bos_id):
    recipe = parse_recipe(RTN_RECIPE)
    step_seconds, step_peaks = [], []

    def run_and_record():
        result = run_recipe(recipe, loaded, eval_config=None)
        assert result.status == "finished", result.error
        step_seconds.append(result.report["steps"][0]["seconds"])
        step_peaks.append(result.report["steps"][0]["peak_rss_bytes"])
        return result

    times, peak, result = timed(run_and_record, repeats)
    ppl, _ = plain_perplexity(result.model, tokens, config.window, config.stride, bos_id)  # untimed
    return [row("rtn w4 g64: run_recipe", times, peak, quality=ppl),
            row("rtn w4 g64: report step", step_seconds, max(step_peaks), quality=ppl)]


def bench_eval(loaded, tokens, config, repeats, bos_id):
    def studio_loop(ids):
        result = perplexity(loaded.model, ids, config, loaded.tokenizer)
        return result.perplexity, result.tokens_scored

    def plain_loop(ids):
        return plain_perplexity(loaded.model, ids, config.window, config.stride, bos_id)

    loops = {"studio": studio_loop, "plain": plain_loop}
    times, peaks, results = {k: [] for k in loops}, dict.fromkeys(loops, 0), {}
    for loop in loops.values():  # warm-up, untimed: one window each
        loop(tokens[: config.window])
    for i in range(repeats):  # take turns going first, so drift in machine speed hits both alike
        for name in (("studio", "plain") if i % 2 == 0 else ("plain", "studio")):
            with PeakRSS() as peak:
                start = time.perf_counter()
                results[name] = loops[name](tokens)
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], peak.bytes)
    (studio_ppl, studio_scored), (plain_ppl, plain_scored) = results["studio"], results["plain"]
    studio_t, plain_t, studio_peak, plain_peak = times["studio"], times["plain"], peaks["studio"], peaks["plain"]
    assert studio_scored == plain_scored, (studio_scored, plain_scored)
    studio_s, plain_s = statistics.median(studio_t), statistics.median(plain_t)
    rel = abs(studio_ppl - plain_ppl) / plain_ppl
    rows = [row("eval: studio perplexity()", studio_t, studio_peak, plain_scored / studio_s, studio_ppl,
                tokens_scored=plain_scored),
            row("eval: plain transformers", plain_t, plain_peak, plain_scored / plain_s, plain_ppl,
                tokens_scored=plain_scored)]
    summary = {"studio_over_plain_tokens_per_s": plain_s / studio_s, "perplexity_rel_diff": rel,
               "agree_within_0.1pct": rel <= 1e-3}
    return rows, summary


def print_table(machine, rows, summary):
    print(f"\nmachine: {machine['cpus']} CPUs, torch {machine['torch']} ({machine['threads']} threads), "
          f"transformers {machine['transformers']}, python {machine['python']}, "
          f"{machine['contention_before']} before; {machine['contention_after']} after")
    print(f"model: {machine['model']}  text: {machine['text']}")
    header = f"{'what':<30} {'seconds':>9} {'runs':>5} {'tokens/s':>9} {'peak RSS MiB':>13} {'quality (ppl)':>14}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        quality = f"{r['quality']:.4f}" if r["quality"] else "-"
        print(f"{r['what']:<30} {r['seconds']:>9.3f} {r['runs']:>5} {tps:>9} {r['peak_rss_mib']:>13.0f} {quality:>14}")
    verdict = "agree" if summary["agree_within_0.1pct"] else "DISAGREE"
    print(f"\nstudio/plain eval speed: {summary['studio_over_plain_tokens_per_s']:.3f}x; perplexity relative "
          f"difference {summary['perplexity_rel_diff']:.2e} ({verdict} within 0.1%)")
    print(f"dense cache gives the GGUF's tokens and BOS: {summary['cache_same_tokens']}; load rows' quality is "
          "the plain-loop perplexity of the model each load returned; rtn rows': of the W4 g64 copy")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--text", default=str(SHARED / "data" / "text" / "wikitext-2-raw-test.txt"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold-repeats", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    machine = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "python": platform.python_version(),
               "model": args.model, "text": args.text, "contention_before": contention()}
    config = PerplexityConfig(args.text, max_tokens=args.max_tokens, window=1024, stride=1024)

    cold_row, cold = bench_cold_load(args.model, args.cold_repeats)
    # the dense cache must give back the model the GGUF gives: same tokens, BOS and perplexity
    cold_tokens, cold_bos = load_eval_tokens(cold.tokenizer, config), cold.tokenizer.bos_token_id
    cold_row["quality"], _ = plain_perplexity(cold.model, cold_tokens, config.window, config.stride, cold_bos)
    del cold
    warm_row, loaded = bench_warm_load(args.model, args.repeats)
    tokens = load_eval_tokens(loaded.tokenizer, config)  # the same tokens for both evaluation loops
    bos_id = loaded.tokenizer.bos_token_id  # PerplexityConfig's default bos="auto": BOS when there is one
    eval_rows, summary = bench_eval(loaded, tokens, config, args.repeats, bos_id)
    summary["cache_same_tokens"] = torch.equal(cold_tokens, tokens) and cold_bos == bos_id
    warm_row["quality"] = eval_rows[1]["quality"]
    rows = [cold_row, warm_row]
    rows += bench_rtn(loaded, args.repeats, tokens, config, bos_id) + eval_rows
    machine["contention_after"] = contention()
    print_table(machine, rows, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows, "summary": summary}, indent=2))
    return 0 if summary["agree_within_0.1pct"] and summary["cache_same_tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
