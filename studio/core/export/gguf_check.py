"""Load a written GGUF file back, to measure what a user of the file gets: with transformers' GGUF loader
(dequantized to float32), or with llama.cpp itself through llama-cpp-python, wrapped so the studio's
perplexity function scores it on the very same token ids."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core.errors import ExportError

if TYPE_CHECKING:
    from torch import nn


def load_with_transformers(file: Path) -> nn.Module:
    """transformers derives Gemma 3's sliding/full layer pattern from its default (every sixth layer full)
    and ignores the pattern in the file, so the file's pattern is put into the config here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from studio.core.loading import detach_gguf_quantizer

    config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    if getattr(config, "layer_types", None) is not None:  # reading the file's keys again takes seconds
        pattern = _sliding_window_pattern(file)
        if pattern is not None:
            config.layer_types = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, config=config,
                                                 dtype=torch.float32)
    detach_gguf_quantizer(model)
    return model.eval().requires_grad_(False)


def _sliding_window_pattern(file: Path) -> list[bool] | None:
    import gguf

    reader = gguf.GGUFReader(str(file))
    arch = reader.fields["general.architecture"].contents()
    field = reader.fields.get(f"{arch}.attention.sliding_window_pattern")
    if field is None or field.types[0] != gguf.GGUFValueType.ARRAY:
        return None
    return [bool(v) for v in field.contents()]


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def llama_cpp_logits_class() -> type:
    import numpy as np
    import torch
    from torch import nn

    class LlamaCppLogits(nn.Module):
        """llama.cpp as a causal LM: forward(input_ids (1, T)) returns an object whose `.logits` is the
        (1, T, vocab) float32 tensor llama.cpp computes for those exact ids (no BOS added)."""

        def __init__(self, model_path: str | Path, n_ctx: int = 2048, n_threads: int | None = None) -> None:
            super().__init__()
            try:
                from llama_cpp import Llama
            except ImportError as exc:
                raise ExportError("llama-cpp-python is not installed, so the GGUF file cannot be checked with "
                                  "llama.cpp here: pip install llama-cpp-python.") from exc
            self.n_ctx = n_ctx
            threads = n_threads or len(os.sched_getaffinity(0))  # llama-cpp-python's default is half the cores
            self.llama = Llama(model_path=str(model_path), logits_all=True, n_ctx=n_ctx,
                               n_batch=min(n_ctx, 512), n_threads=threads, verbose=False)
            self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # so .parameters() has a device

        def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
            ids = input_ids.reshape(-1).tolist()
            if input_ids.shape[0] != 1 or len(ids) > self.n_ctx:
                raise ExportError(f"LlamaCppLogits takes one sequence of at most {self.n_ctx} tokens.")
            self.llama.reset()
            self.llama.eval(ids)
            logits = torch.from_numpy(np.array(self.llama.scores[: len(ids)], dtype=np.float32))
            return _Output(logits[None])

    return LlamaCppLogits


class _Output:
    def __init__(self, logits: Any) -> None:
        self.logits = logits
