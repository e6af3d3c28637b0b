"""Factored (low-rank) linear layers: W ≈ U·V stored as two smaller layers, y = U (V x) + b.

A low-rank method replaces an nn.Linear of shape (out, in) by a `LowRankLinear` whose `down` layer holds V
(rank, in) and whose `up` layer holds U (out, rank) and the bias, so the model really holds rank·(in + out)
parameters instead of in·out and runs two thin products. Both are plain nn.Linear: later steps quantize or prune
them like any other layer, and the engine finds them as the block's linear layers `….down` and `….up`.

No tool outside the studio knows this layer, so the model is saved in two forms:
- factored (`save_factored` / `load_factored`): config.json and `studio_low_rank.safetensors`, which holds every
  weight with the factors under their own names and the ranks in its metadata. There is deliberately no
  model.safetensors, so plain transformers refuses the folder instead of loading random weights in place of the
  missing dense ones;
- dense (`densified`): a copy of the model with each factored layer multiplied back into one nn.Linear, which
  every exporter writes for transformers, compressed-tensors and llama.cpp.

This module imports torch at the top (the layer is an nn.Module); it is imported only where a model is changed,
saved or loaded, never while the window opens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from studio.core.state import STATE_ATTR
from studio.core.structure import set_submodule

FACTORED_FILE = "studio_low_rank.safetensors"
RANKS_KEY = "studio_low_rank"  # metadata of FACTORED_FILE: {layer name: rank}


class LowRankLinear(nn.Module):
    """y = up(down(x)), standing in for nn.Linear(in_features, out_features)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
                     requires_grad: bool = False) -> LowRankLinear:
        """The layer computing up @ down @ x + bias, with up (out, rank) and down (rank, in)."""
        (out_f, rank), in_f = up.shape, down.shape[1]
        with torch.device("meta"):  # the weights are given, not initialized
            layer = cls(in_f, out_f, rank, bias=bias is not None)
        layer.down.weight = nn.Parameter(down.contiguous(), requires_grad=requires_grad)
        layer.up.weight = nn.Parameter(up.contiguous(), requires_grad=requires_grad)
        if bias is not None:
            layer.up.bias = nn.Parameter(bias.contiguous(), requires_grad=requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """U·V, the (out, in) weight the factors stand for."""
        return (self.up.weight.float() @ self.down.weight.float()).to(self.up.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def densified(model: nn.Module) -> nn.Module:
    """A copy of `model` (sharing every other weight) with each factored layer multiplied into one nn.Linear.
    Records of the factors (codes, masks) describe U and V, not their product, so they are left out."""
    from studio.core.clone import clone_sharing_weights

    factored = low_rank_layers(model)
    if not factored:
        return model
    dense = clone_sharing_weights(model)
    for name, layer in low_rank_layers(dense).items():
        with torch.device("meta"):
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.up.bias is not None)
        linear.weight = nn.Parameter(layer.dense_weight(), requires_grad=False)
        if layer.up.bias is not None:
            linear.bias = nn.Parameter(layer.up.bias.data, requires_grad=False)
        set_submodule(dense, name, linear)
    state = getattr(dense, STATE_ATTR, None)
    if state:
        object.__setattr__(dense, STATE_ATTR, {n: r for n, r in state.items()
                                               if not any(n.startswith(f + ".") for f in factored)})
    return dense


def save_factored(model: nn.Module, folder: Path) -> dict[str, int]:
    """Write config, generation config and every weight (factors included) into `folder`; returns the ranks."""
    from safetensors.torch import save_file

    ranks = {name: layer.rank for name, layer in low_rank_layers(model).items()}
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    tensors: dict[str, torch.Tensor] = {}
    stored: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in stored:
            continue  # a tied weight (the LM head sharing the embedding) is stored once
        stored.add(tensor.data_ptr())
        tensors[name] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(folder / FACTORED_FILE), metadata={RANKS_KEY: json.dumps(ranks), "format": "pt"})
    return ranks


def is_factored_folder(folder: Path) -> bool:
    return (folder / FACTORED_FILE).is_file()


def load_factored(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model `save_factored` wrote: built from config.json, its factored layers put back, then every weight
    loaded. Raises ValueError naming what does not match."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    file = folder / FACTORED_FILE
    with safe_open(str(file), framework="pt") as handle:
        ranks = json.loads((handle.metadata() or {}).get(RANKS_KEY, "{}"))
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with _weights_left_uninitialized():  # every weight is loaded below; buffers such as rotary tables are built
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"'{file}' factors a layer '{name}' that config.json does not build") from None
        with torch.device("meta"):
            layer = LowRankLinear(old.in_features, old.out_features, int(rank), bias=old.bias is not None)
        set_submodule(model, name, layer)
    expected = set(model.state_dict())
    missing = expected - set(state)
    tied = {k for k in missing if "lm_head" in k} if getattr(config, "tie_word_embeddings", False) else set()
    missing -= tied
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ValueError(f"'{file}' does not match config.json beside it: {len(missing)} weights missing "
                         f"(e.g. {sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})")
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                          strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def _weights_left_uninitialized():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older transformers: initializing costs time, not correctness
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()
