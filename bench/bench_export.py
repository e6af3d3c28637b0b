"""Export formats on a real model: size on disk, export seconds and perplexity after the file is loaded back
by the consumer library, against the perplexity of the same model in memory.

    python bench/bench_export.py [--only NAME,...] [--tokens 16384] [--repeat 3] [--json FILE]

Each compressed model (the original, RTN W4 g64 sym / asym, RTN W8 per channel, RTN W3 g64 asym, SmoothQuant
W8A8) is made once in this process and scored in memory on WikiText-2 test (window 1024, stride 1024, BOS at each
window start). Every export is written `--repeat` times (the median seconds is quoted; the plain-torch baseline
is `save_pretrained` of the dense model, the hf-safetensors row), then loaded back — by plain transformers, by
transformers with compressed-tensors, by transformers' GGUF loader and, when llama-cpp-python is installed, by
llama.cpp — and scored with the same function on the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

MODELS: dict[str, list[dict]] = {
    "original": [],
    "rtn-w4-g64-sym": [{"method": "rtn", "params": {"bits": 4, "group_size": 64, "symmetric": True}}],
    "rtn-w4-g64-asym": [{"method": "rtn", "params": {"bits": 4, "group_size": 64, "symmetric": False}}],
    "rtn-w8-channel": [{"method": "rtn", "params": {"bits": 8, "group_size": 0, "symmetric": True}}],
    "rtn-w3-g64-asym": [{"method": "rtn", "params": {"bits": 3, "group_size": 64, "symmetric": False}}],
    "smoothquant-w8a8": [{"method": "smoothquant", "params": {"alpha": 0.5}}],
}
EXPORTS: dict[str, list[tuple[str, dict]]] = {  # model -> (format, options)
    "original": [("hf-safetensors", {}), ("gguf", {"type": "F16"}), ("gguf", {"type": "Q8_0"}),
                 ("gguf", {"type": "Q4_0"}), ("gguf", {"type": "Q4_1"})],
    "rtn-w4-g64-sym": [("compressed-tensors", {}), ("gguf", {"type": "auto"})],
    "rtn-w4-g64-asym": [("compressed-tensors", {}), ("compressed-tensors", {"embedding_bits": None}),
                        ("gguf", {"type": "auto"})],
    "rtn-w8-channel": [("compressed-tensors", {}), ("gguf", {"type": "auto"})],
    "rtn-w3-g64-asym": [("gguf", {"type": "auto"}), ("gguf", {"type": "Q4_0"})],
    "smoothquant-w8a8": [("compressed-tensors", {})],
}


def make_model(name: str, base):
    from studio.core.loading import LoadedModel
    from studio.core.recipe import parse_recipe
    from studio.core.runner import run_recipe

    if not MODELS[name]:
        return base.model
    recipe = parse_recipe({"schema_version": 2, "name": name, "steps": MODELS[name],
                           "calibration": {"text_file": str(C4), "samples": 32, "seq_len": 512}})
    result = run_recipe(recipe, LoadedModel(base.model, base.tokenizer, base.source))
    if result.status != "finished":
        raise SystemExit(f"{name}: {result.error}")
    return result.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()

    from studio.core.evaluation.perplexity import PerplexityConfig, load_eval_tokens, perplexity
    from studio.core.evaluation.size import size_report
    from studio.core.export import export_model
    from studio.core.export.verify import consumer_loaders
    from studio.core.loading import load_model

    base = load_model(str(MODEL))
    fp16_bytes = size_report(base.model)["parameters"] * 2
    config = PerplexityConfig(str(WIKITEXT), max_tokens=args.tokens, window=1024, stride=1024)
    tokens = load_eval_tokens(base.tokenizer, config)
    names = args.only.split(",") if args.only else list(MODELS)
    rows = []
    for name in names:
        model = make_model(name, base)
        in_memory = perplexity(model, tokens, config, base.tokenizer).perplexity
        print(f"{name}: perplexity in memory {in_memory:.4f}", file=sys.stderr)
        for fmt, options in EXPORTS[name]:
            with tempfile.TemporaryDirectory(dir=os.environ.get("STUDIO_BENCH_TMP")) as tmp:
                out = Path(tmp) / ("model.gguf" if fmt == "gguf" else "out")
                seconds = []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    result = export_model(model, base.tokenizer, out, format=fmt, options=options, force=True,
                                          source=base.source)
                    seconds.append(time.perf_counter() - started)
                disk = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
                row = {"model": name, "format": fmt, "options": options, "disk_bytes": disk,
                       "ratio_to_fp16": disk / fp16_bytes, "export_seconds": statistics.median(seconds),
                       "bits_per_weight": result.export.get("bits_per_weight"),
                       "kept": result.export.get("studio_codes_kept", result.export.get("layers_packed")),
                       "in_memory": in_memory, "reloaded": {}}
                for loader, load in consumer_loaders(fmt, out, result.export).items():
                    if isinstance(load, str):  # this library cannot check this export: the reason
                        row.setdefault("not_checked", {})[loader] = load
                        continue
                    reloaded = load()
                    row["reloaded"][loader] = perplexity(reloaded, tokens, config, base.tokenizer).perplexity
                    del reloaded
                rows.append(row)
                print(_format_row(row), file=sys.stderr)
        del model
    print(_table(rows, fp16_bytes, len(tokens), args.repeat))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _format_row(row: dict) -> str:
    option = ",".join(f"{k}={v}" for k, v in row["options"].items())
    reloaded = "; ".join(f"{k}: {v:.4f} ({v / row['in_memory'] - 1:+.2%})" for k, v in row["reloaded"].items())
    bpw = f"{row['bits_per_weight']:.2f}" if row["bits_per_weight"] else "—"
    return (f"| {row['model']} | {row['format']} {option} | {row['disk_bytes'] / MiB:,.1f} | "
            f"{row['ratio_to_fp16']:.1%} | {bpw} | {row['export_seconds']:.1f} | {row['in_memory']:.4f} | {reloaded} |")


def _table(rows: list[dict], fp16_bytes: int, tokens: int, repeat: int) -> str:
    import torch
    import transformers

    head = [f"SmolLM2-135M, WikiText-2 test {tokens} tokens (window 1024, stride 1024); fp16 size "
            f"{fp16_bytes / MiB:,.1f} MiB; export seconds: median of {repeat}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}",
            "",
            "| model | format | MiB on disk | of fp16 | bits/weight | export s | ppl in memory | ppl after reload |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    return "\n".join(head + [_format_row(r) for r in rows])


if __name__ == "__main__":
    main()
