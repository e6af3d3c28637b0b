"""Prefill and decode tokens per second (medians of repeated runs), and greedy generations for fixed prompts."""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any

import torch
from torch import nn

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Compressing a language model means",
    "def fibonacci(n):",
)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _step(model: nn.Module, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One forward with the KV cache; transformers 5 renamed `past_key_values` to `cache`."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(ids, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits[:, -1:].argmax(-1), getattr(out, name)


@torch.inference_mode()
def throughput(
    model: nn.Module, prompt_tokens: int = 256, new_tokens: int = 32, repeats: int = 3, vocab_size: int | None = None
) -> dict[str, float]:
    """Prefill: one forward over `prompt_tokens`. Decode: `new_tokens` single-token steps with the KV cache."""
    vocab = vocab_size or model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=generator).to(_device(model))
    prefill, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        token, cache = _step(model, ids, None)
        prefill.append(prompt_tokens / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(new_tokens):
            token, cache = _step(model, token, cache)
        decode.append(new_tokens / (time.perf_counter() - start))
    return {
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
    }


@torch.inference_mode()
def generate_samples(
    model: nn.Module, tokenizer: Any, prompts: tuple[str, ...] = DEFAULT_PROMPTS, max_new_tokens: int = 24
) -> list[dict[str, str]]:
    out = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(_device(model))
        ids = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
        out.append({"prompt": prompt, "completion": tokenizer.decode(ids[0, enc["input_ids"].shape[1]:])})
    return out
