"""Proof that an export works where it is meant to run: the written files are loaded back by the consumer
library (plain transformers for the dense folder, transformers with compressed-tensors for compressed-tensors,
transformers' GGUF loader — and llama.cpp itself when llama-cpp-python is installed — for GGUF) and scored with
the same perplexity function, on the same tokens, as the model in memory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core.errors import ExportError

if TYPE_CHECKING:
    from torch import nn

    from studio.core.evaluation.perplexity import PerplexityConfig

TOLERANCE = 0.005  # relative perplexity difference accepted between the reloaded export and the model in memory
# llama.cpp's CPU kernels round the activations to 8 bits for every dot product with a quantized weight, which
# alone moves SmolLM2's perplexity by 0.4-0.8% on a file transformers reloads bit for bit (bench/README.md)
LLAMA_CPP_TOLERANCE = 0.01
LLAMA_CPP = "llama.cpp (llama-cpp-python)"
TRANSFORMERS_GGUF = "transformers (GGUF loader)"


def consumer_loaders(format_id: str, path: Path, written: dict[str, Any]) -> dict[str, Any]:
    """{loader name: function returning the reloaded model, or the reason it cannot check this export} for the
    export at `path` (a folder or a .gguf); `written` is the writer's summary."""
    if format_id == "hf-safetensors":
        return {"transformers": lambda: _plain_transformers(path)}
    if format_id == "compressed-tensors":
        from studio.core.export.compressed_tensors import load_compressed_tensors

        return {"transformers + compressed-tensors": lambda: load_compressed_tensors(path)}
    if format_id == "gguf":
        from studio.core.export import gguf_file
        from studio.core.export.gguf_check import llama_cpp_available

        file = path if path.suffix == ".gguf" else next(path.glob("*.gguf"))
        loaders: dict[str, Any] = {}
        loaders[TRANSFORMERS_GGUF] = written.get("transformers_drops") or (lambda: gguf_file.load_gguf_with_transformers(file))
        loaders[LLAMA_CPP] = (lambda: gguf_file.LlamaCppLogits(file)) if llama_cpp_available() else \
            "llama-cpp-python is not installed (pip install -e \".[llama]\")"
        return loaders
    raise ExportError(f"No loader to verify format '{format_id}'.")


def verify_export(model: nn.Module, tokenizer: Any, format_id: str, path: Path, written: dict[str, Any],
                  config: PerplexityConfig, cancel=None) -> dict[str, Any]:
    """Perplexity of the model in memory and of each consumer's reload of `path` (whose writer returned the
    summary `written`) on the same tokens."""
    from studio.core.evaluation.perplexity import load_eval_tokens, perplexity

    tokens = load_eval_tokens(tokenizer, config)
    in_memory = perplexity(model, tokens, config, tokenizer, cancel=cancel).perplexity
    result: dict[str, Any] = {"text": Path(config.text_file).name, "tokens": int(tokens.numel()),
                              "window": config.window, "stride": config.stride, "in_memory": in_memory,
                              "reloaded": {}, "not_checked": {}}
    for name, load in consumer_loaders(format_id, path, written).items():
        if isinstance(load, str):
            result["not_checked"][name] = load
            continue
        started = time.perf_counter()
        reloaded = load()
        loaded_seconds = time.perf_counter() - started
        value = perplexity(reloaded, tokens, config, tokenizer, cancel=cancel).perplexity
        del reloaded
        tolerance = LLAMA_CPP_TOLERANCE if name == LLAMA_CPP else TOLERANCE
        result["reloaded"][name] = {"perplexity": value, "relative_difference": value / in_memory - 1,
                                    "tolerance": tolerance, "load_seconds": round(loaded_seconds, 2)}
    if not result["reloaded"]:
        raise ExportError("No consumer library here can load this export back: "
                          + "; ".join(f"{k}: {v}" for k, v in result["not_checked"].items()))
    result["within_tolerance"] = all(abs(r["relative_difference"]) <= r["tolerance"]
                                     for r in result["reloaded"].values())
    return result


def _plain_transformers(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()
