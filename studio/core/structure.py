"""Find a causal LM's decoder blocks and the linear layers inside them, for any transformers architecture.

The decoder blocks are the longest `nn.ModuleList` whose children all share one class (Llama/Qwen2/Gemma
`model.layers`, OPT `model.decoder.layers`, GPT-2 `transformer.h`), so no per-architecture table is needed.
GPT-2's `Conv1D` stores its weight as (in, out); `weight_matrix` always returns the (out, in) view.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a model is inspected, so the window opens without it
    import torch
    from torch import nn


def _linear_types() -> tuple[type, ...]:
    """nn.Linear, and transformers' GPT-2 style Conv1D when transformers has loaded it (a model that has one
    was built by transformers, so the module is already imported)."""
    from torch import nn

    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def _is_dense_linear(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, _linear_types())


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out_features, in_features)."""
    w = module.weight.data
    return w.t() if not _is_dense_linear(module) else w


def set_weight_matrix(module: nn.Module, w: torch.Tensor, *, in_place: bool = False) -> None:
    """Give the layer a new (out, in) weight tensor. Rebinds `.data`, never writes in place, so a clone that
    shares storage with the original model leaves the original untouched. With `in_place` (a run on the model
    itself, nothing shares it) the weight is written into the layer's own tensor when the shape is kept: a new
    tensor would leave the old one alive where the checkpoint is memory-mapped, since one mapping holds every
    weight of the file until the last of them is freed. Writing into such a tensor starts on fresh pages
    (fresh_pages_for_overwrite), which is faster than copying each from the file first."""
    set_tensor(module.weight, w if _is_dense_linear(module) else w.t(), in_place=in_place)


def set_tensor(parameter: torch.Tensor, new: torch.Tensor, *, in_place: bool = False) -> None:
    """Give a parameter new values in its own dtype: rebound to a new tensor, or with `in_place` written into
    its own one when the shape is kept (see set_weight_matrix for why either)."""
    import torch

    from studio.core.memory import fresh_pages_for_overwrite

    if in_place and parameter.shape == new.shape:
        old = parameter.data
        span = (old.data_ptr(), old.numel() * old.element_size())
        source = new.untyped_storage()  # the new values must not live in the pages about to be replaced
        apart = source.data_ptr() >= span[0] + span[1] or source.data_ptr() + source.nbytes() <= span[0]
        if apart and old.device.type == "cpu" and new.device.type == "cpu" and old.is_contiguous():
            fresh_pages_for_overwrite(*span)
        with torch.no_grad():
            old.copy_(new)
    else:
        parameter.data = new.contiguous().to(parameter.dtype)


def text_config(model: nn.Module):
    """The language model's config (the text part of a multimodal config)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (dotted, relative to `root`) in place of what is there."""
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = weight_matrix(module).shape
    return in_f, out_f


@dataclass(frozen=True)
class DecoderBlocks:
    path: str  # e.g. "model.layers"
    blocks: tuple[nn.Module, ...]

    def name(self, index: int) -> str:
        return f"{self.path}.{index}"


def find_decoder_blocks(model: nn.Module) -> DecoderBlocks:
    from torch import nn

    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            if not any(is_linear(m) for m in module[0].modules()):
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(
            f"Could not find the decoder blocks of {type(model).__name__}: no list of identical blocks with "
            "linear layers inside. Only causal language models with repeated decoder blocks are supported."
        )
    return DecoderBlocks(best[0], tuple(best[1]))


@dataclass(frozen=True)
class TargetSpec:
    """Which modules a step touches: glob patterns on full module names (`*` matches dots too).

    The default targets every linear layer inside the decoder blocks, which leaves out the embeddings and
    the LM head."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.include) and not any(
            fnmatchcase(name, p) for p in self.exclude
        )


def target_layers(model: nn.Module, spec: TargetSpec) -> dict[int, dict[str, nn.Module]]:
    """Targeted linear layers grouped by decoder block index, in execution order, keyed by full name."""
    decoder = find_decoder_blocks(model)
    grouped: dict[int, dict[str, nn.Module]] = {}
    for i, block in enumerate(decoder.blocks):
        prefix = decoder.name(i)
        layers = {
            f"{prefix}.{sub}": m
            for sub, m in block.named_modules()
            if sub and is_linear(m) and spec.matches(f"{prefix}.{sub}")
        }
        if layers:
            grouped[i] = layers
    return grouped


def iter_layers(layers: dict[int, dict[str, nn.Module]]):
    """(name, module) of every layer in a `target_layers` grouping, in block order."""
    for block in layers.values():
        yield from block.items()
