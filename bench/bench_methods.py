"""Calibration methods on a real model: perplexity, KL against the original, seconds and peak RSS per method,
with the plain-torch baseline (one forward pass over the same calibration tokens) measured the same way.

    python bench/bench_methods.py [--only gptq-w4,rtn-w4] [--tokens 16384] [--json FILE]

Every configuration runs in a fresh process (`--worker NAME`), so its peak RSS is that of the process from start
to the end of compression: the model, the runtime and what the method adds. Evaluation happens afterwards in the
same worker: perplexity on WikiText-2 test (window 1024, stride 1024, BOS at each window start), KL divergence
and top-1 agreement against the original on its first 4,096 tokens. Structural methods are also exported,
reloaded with plain transformers and evaluated again; low-rank ones are saved factored and reloaded by the studio,
and exported dense and reloaded by transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED_DIR") or REPO.parent / "shared")
MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = SHARED / "data" / "text" / "wikitext-2-raw-test.txt"
C4 = SHARED / "data" / "text" / "c4-en-sample.txt"
MiB = 2**20
KL_TOKENS = 4096

W4 = {"bits": 4, "group_size": 64}
W3 = {"bits": 3, "group_size": 64}
CONFIGS: dict[str, list[dict]] = {
    "rtn-w4-sym": [{"method": "rtn", "params": {**W4, "symmetric": True}}],
    "rtn-w4-asym": [{"method": "rtn", "params": {**W4, "symmetric": False}}],
    "gptq-w4-sym": [{"method": "gptq", "params": {**W4, "symmetric": True}}],
    "gptq-w4-asym": [{"method": "gptq", "params": {**W4, "symmetric": False}}],
    "rtn-w3-sym": [{"method": "rtn", "params": {**W3, "symmetric": True}}],
    "rtn-w3-asym": [{"method": "rtn", "params": {**W3, "symmetric": False}}],
    "gptq-w3-sym": [{"method": "gptq", "params": {**W3, "symmetric": True}}],
    "gptq-w3-asym": [{"method": "gptq", "params": {**W3, "symmetric": False}}],
    "awq-w3-asym": [{"method": "awq", "params": {**W3, "symmetric": False}}],
    "awq-w4-asym": [{"method": "awq", "params": {**W4, "symmetric": False}}],
    "hqq-w4": [{"method": "hqq", "params": {**W4}}],
    "hqq-w3": [{"method": "hqq", "params": {**W3}}],
    "mixed-3.5bit-gptq": [{"method": "mixed_precision", "params": {"target_bits": 3.5, "min_bits": 2, "max_bits": 8,
                                                                   "group_size": 64}}],
    "smoothquant-w8a8": [{"method": "smoothquant", "params": {"alpha": 0.5}}],
    "naive-w8a8": [{"method": "smoothquant", "params": {"smooth": False}}],
    "kv-int8": [{"method": "kv_cache", "params": {"bits": 8}}],
    "kv-int4": [{"method": "kv_cache", "params": {"bits": 4}}],
    "magnitude-50": [{"method": "magnitude", "params": {"sparsity": 0.5}}],
    "wanda-50": [{"method": "wanda", "params": {"sparsity": 0.5}}],
    "sparsegpt-50": [{"method": "sparsegpt", "params": {"sparsity": 0.5}}],
    "magnitude-2:4": [{"method": "magnitude", "params": {"sparsity": 0.5, "pattern": "2:4"}}],
    "wanda-2:4": [{"method": "wanda", "params": {"sparsity": 0.5, "pattern": "2:4"}}],
    "sparsegpt-2:4": [{"method": "sparsegpt", "params": {"sparsity": 0.5, "pattern": "2:4"}}],
    "structured-mlp20": [{"method": "structured", "params": {"mlp_ratio": 0.2}}],
    "layer-drop-4": [{"method": "layer_drop", "params": {"blocks": 4}}],
    "svd-20": [{"method": "svd", "params": {"ratio": 0.2}}],
    "asvd-20": [{"method": "asvd", "params": {"ratio": 0.2}}],
    "svd-llm-20": [{"method": "svd_llm", "params": {"ratio": 0.2}}],
    "gqa-kv1": [{"method": "gqa", "params": {"kv_heads": 1}}],
}
STRUCTURAL = {"structured-mlp20", "layer-drop-4", "gqa-kv1"}
LOW_RANK = {"svd-20", "asvd-20", "svd-llm-20"}  # saved factored (the studio reloads it) and dense (transformers)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def eval_config(tokens: int):
    from studio.core.evaluation.perplexity import PerplexityConfig

    return PerplexityConfig(str(WIKITEXT), max_tokens=tokens, window=1024, stride=1024)


def calibration(samples: int, seq_len: int):
    from studio.core.calibration import CalibrationSettings

    return CalibrationSettings(text_file=str(C4), samples=samples, seq_len=seq_len, batch_size=8)


def worker(name: str, args) -> dict:
    import torch

    from studio.core.calibration import load_calibration_tokens
    from studio.core.evaluation.perplexity import load_eval_tokens, perplexity
    from studio.core.loading import load_model
    from studio.core.recipe import parse_recipe
    from studio.core.runner import run_recipe

    torch.manual_seed(0)
    loaded = load_model(MODEL)
    settings = calibration(args.samples, args.seq_len)
    row: dict = {"name": name}
    if name == "forward":  # the plain-torch reference: one forward pass over the calibration tokens
        tokens = load_calibration_tokens(loaded.tokenizer, settings)
        begin = time.perf_counter()
        with torch.no_grad():
            for batch in tokens.split(settings.batch_size):
                loaded.model(input_ids=batch, use_cache=False)
        return {**row, "seconds": time.perf_counter() - begin, "peak_rss_bytes": peak_rss_bytes()}
    config = eval_config(args.tokens)
    eval_tokens = load_eval_tokens(loaded.tokenizer, config)
    if name == "original":
        result = perplexity(loaded.model, eval_tokens, config, loaded.tokenizer)
        return {**row, "perplexity": result.perplexity, "parameters": sum(p.numel() for p in loaded.model.parameters())}
    recipe = parse_recipe({"schema_version": 2, "calibration": settings.model_dump(), "steps": CONFIGS[name]})
    result = run_recipe(recipe, loaded)
    if result.status != "finished":
        return {**row, "error": result.error}
    step = result.report["steps"][0]
    row.update(seconds=step["seconds"], peak_rss_bytes=peak_rss_bytes(),
               parameters=result.report["size_after"]["parameters"],
               compressed_mib=result.report["size_after"]["compressed_bytes"] / MiB)
    summary = step["summary"]
    if "parameter_reduction" in summary:  # of the targeted decoder Linear layers
        row["linear_parameter_reduction"] = summary["parameter_reduction"]
    quality = perplexity(result.model, eval_tokens, config, loaded.tokenizer)
    # KL needs the original's logits beside the model's: measured on the first KL_TOKENS to halve the time
    kl_tokens = eval_tokens[:KL_TOKENS]
    agreement = perplexity(result.model, kl_tokens, config, loaded.tokenizer, reference=loaded.model)
    row.update(perplexity=quality.perplexity, kl=agreement.kl, top1=agreement.top1_agreement)
    if name in STRUCTURAL:
        from transformers import AutoModelForCausalLM

        from studio.core.export import export_hf_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "export"
            export_hf_folder(result.model, loaded.tokenizer, folder, recipe=recipe, report=result.report)
            reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            row["reloaded_parameters"] = sum(p.numel() for p in reloaded.parameters())
            row["reloaded_perplexity"] = perplexity(reloaded, eval_tokens, config, loaded.tokenizer).perplexity
    if name in LOW_RANK:
        from transformers import AutoModelForCausalLM

        from studio.core.export import export_hf_folder, export_model

        with tempfile.TemporaryDirectory() as tmp:
            folder = export_hf_folder(result.model, loaded.tokenizer, Path(tmp) / "factored", recipe=recipe,
                                      report=result.report)
            factored = load_model(folder).model
            row["reloaded_parameters"] = sum(p.numel() for p in factored.parameters())
            row["reloaded_perplexity"] = perplexity(factored, eval_tokens, config, loaded.tokenizer).perplexity
            dense = export_model(result.model, loaded.tokenizer, Path(tmp) / "dense").path
            plain = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
            row["dense_reloaded_perplexity"] = perplexity(plain, eval_tokens, config, loaded.tokenizer).perplexity
    return row


def table(rows: list[dict]) -> str:
    lines = [
        f"{'configuration':<20} {'perplexity':>10} {'KL':>7} {'top-1':>6} {'seconds':>8} {'peak RSS MiB':>12} "
        f"{'parameters':>11} {'packed MiB':>10} {'reloaded ppl':>12}",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<20} failed: {r['error']}")
            continue

        def f(key, fmt):
            width = int(fmt[: len(fmt) - len(fmt.lstrip("0123456789"))])
            return format(r[key], fmt) if r.get(key) is not None else "-".rjust(width)

        rss = format(r["peak_rss_bytes"] / MiB, ".0f") if r.get("peak_rss_bytes") else "-"
        lines.append(
            f"{r['name']:<20} {f('perplexity', '10.3f')} {f('kl', '7.4f')} {f('top1', '6.3f')} {f('seconds', '8.1f')} "
            f"{rss:>12} {f('parameters', '11,d')} {f('compressed_mib', '10.1f')} {f('reloaded_perplexity', '12.3f')}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated configurations (default: all); see CONFIGS")
    parser.add_argument("--tokens", type=int, default=16384, help="WikiText-2 tokens scored (default 16384)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--forward-repeats", type=int, default=3, help="runs of the forward-pass reference")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    rows = []
    jobs = ["original"] + ["forward"] * args.forward_repeats + names
    for name in jobs:
        command = [sys.executable, __file__, "--worker", name, "--tokens", str(args.tokens),
                   "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"name": name, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {name}: {rows[-1]}", file=sys.stderr, flush=True)

    forward = [r for r in rows if r["name"] == "forward" and "error" not in r]
    if forward:
        seconds = statistics.median(r["seconds"] for r in forward)
        rss = statistics.median(r["peak_rss_bytes"] for r in forward)
        rows = [r for r in rows if r["name"] != "forward"]
        rows.insert(1, {"name": "forward (median)", "seconds": seconds, "peak_rss_bytes": rss})
        for r in rows:
            if r.get("name", "").startswith("gptq") and "seconds" in r:
                r["vs_forward"] = {"time": r["seconds"] / seconds, "peak_rss": r["peak_rss_bytes"] / rss}
    print(f"SmolLM2-135M, calibration {args.samples} x {args.seq_len} tokens of C4 sample, WikiText-2 test "
          f"{args.tokens} tokens, window 1024, stride 1024; KL on the first {KL_TOKENS} tokens")
    print(table(rows))
    for r in rows:
        if "linear_parameter_reduction" in r:
            dense = f", dense export reloaded by transformers {r['dense_reloaded_perplexity']:.3f}" \
                if "dense_reloaded_perplexity" in r else ""
            print(f"{r['name']}: the decoder's Linear layers hold {r['linear_parameter_reduction']:.2%} fewer "
                  f"parameters{dense}")
        if "vs_forward" in r:
            print(f"{r['name']}: {r['vs_forward']['time']:.2f} x the forward pass's time, "
                  f"{r['vs_forward']['peak_rss']:.2f} x its peak RSS")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
