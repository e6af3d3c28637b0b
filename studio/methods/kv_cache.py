"""KV-cache quantization: the keys and values an attention layer caches are stored at b bits instead of 16, so
long contexts need a fraction of the memory. The weights are unchanged; the cache is fake-quantized where the
attention reads it.

Granularity, as the KV-quantization literature names it:
- per_token: one scale (and zero) per token of each head, optionally per group of `group_size` channels
  (the group-wise layout of FlexGen, Sheng et al. 2023);
- per_head: keys per channel of each head over groups of `group_size` tokens, values per token — KIVI
  (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"), whose observation is that
  key outliers sit in fixed channels while value errors must stay confined to their token. As in KIVI the tokens
  after the last full group (the residual) stay in 16 bits until their group fills. With group_size 0 a channel's
  grid spans all tokens of the forward pass (a prefill quantized at once, whose early tokens' scale sees later
  tokens).
Asymmetric: x' = lo + s round((x - lo) / s) with s = (max - min) / (2^b - 1); symmetric: x' = s round(x / s)
with s = max|x| / (2^(b-1) - 1).

Where: transformers dispatches attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` with the
key and value states after the rotary embedding and the cache update — what the cache holds. The step registers
`studio_kv_quant_<inner>` (its mask function is the inner one's), marks the targeted blocks' attention modules
with their settings, and switches the working copy's config to it; the function quantizes the marked modules'
keys and values and calls the inner implementation (sdpa, or the model's own eager function). The config
attribute is not serialized by `save_pretrained`, so an exported folder is plain dense transformers.

The step's targets choose the blocks: a block's cache is quantized when any of its linear layers is targeted.
No weight changes, so the step reports no layers; its summary gives the cache memory at `context_length` tokens.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

from studio.core.context import StepContext
from studio.core.errors import RecipeError
from studio.core.registry import Estimate, Family, Method, MethodParams, StepOutcome, register
from studio.core.structure import find_decoder_blocks

IMPLEMENTATION_PREFIX = "studio_kv_quant_"
SETTINGS_ATTR = "studio_kv_quant"  # on each quantized attention module
FP16_BYTES = 2
META_BYTES = 2  # a 16-bit scale, and a 16-bit zero (the minimum) when asymmetric, per group


class KVCacheParams(MethodParams):
    bits: Annotated[int, Field(ge=2, le=8, description="Bits per cached key and value element (2-8).")] = 8
    granularity: Annotated[
        Literal["per_token", "per_head"],
        Field(description="per_token: scales per token and head; per_head: keys per channel over tokens, "
                          "values per token (KIVI)."),
    ] = "per_token"
    group_size: Annotated[
        int,
        Field(ge=0, le=65536, description="per_token: channels per group (0 = head vector); per_head: tokens per "
                                          "key group (0 = all tokens)."),
    ] = 0
    symmetric: Annotated[bool, Field(description="Symmetric grid around zero, or asymmetric (min/max).")] = False
    context_length: Annotated[
        int, Field(ge=1, le=10_000_000, description="Context length at which the cache memory is reported.")
    ] = 4096


@dataclass(frozen=True)
class KVQuantSettings:
    bits: int
    granularity: str
    group_size: int
    symmetric: bool


# --- the fake quantization ----------------------------------------------------------------------------------


def quantize_groups(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Each row (last axis) rounded to its own b-bit grid and dequantized, in float32."""
    import torch

    x = x.float()
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(dim=-1, keepdim=True) / top).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.clamp(torch.round(x / scale), -top, top) * scale
    lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.clamp(torch.round((x - lo) / scale), 0, 2**bits - 1) * scale + lo


def quantize_per_token(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """x (batch, heads, tokens, head_dim): a grid per token and head, per group of `group_size` channels."""
    width = group_size or x.shape[-1]
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // width, width)
    return quantize_groups(grouped, bits, symmetric).reshape(x.shape).to(x.dtype)


def quantize_per_channel(x: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """x (batch, heads, tokens, head_dim): a grid per channel over each group of `group_size` tokens (0: all of
    them); the tokens after the last full group stay as they are."""
    import torch

    tokens = x.shape[-2]
    width = group_size or tokens
    full = tokens // width * width
    if full == 0:
        return x
    channels_first = x[..., :full, :].transpose(-1, -2)  # (batch, heads, head_dim, full)
    grouped = channels_first.reshape(*channels_first.shape[:-1], full // width, width)
    quantized = quantize_groups(grouped, bits, symmetric).reshape(channels_first.shape).transpose(-1, -2)
    return torch.cat([quantized.to(x.dtype), x[..., full:, :]], dim=-2)


def quantize_keys(keys: torch.Tensor, settings: KVQuantSettings) -> torch.Tensor:
    if settings.granularity == "per_head":
        return quantize_per_channel(keys, settings.bits, settings.group_size, settings.symmetric)
    return quantize_per_token(keys, settings.bits, settings.group_size, settings.symmetric)


def quantize_values(values: torch.Tensor, settings: KVQuantSettings) -> torch.Tensor:
    group = settings.group_size if settings.granularity == "per_token" else 0
    return quantize_per_token(values, settings.bits, group, settings.symmetric)


# --- the attention function -----------------------------------------------------------------------------------


def inner_attention(inner: str, module: nn.Module):
    """The implementation the model used: a registered one (sdpa, ...), or the model's own eager function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def kv_quant_attention(inner: str, module, query, key, value, attention_mask, *args, **kwargs):
    """Fake-quantize the cached keys and values of a marked attention module, then attend as `inner` does."""
    settings = getattr(module, SETTINGS_ATTR, None)
    if settings is not None:
        key, value = quantize_keys(key, settings), quantize_values(value, settings)
    return inner_attention(inner, module)(module, query, key, value, attention_mask, *args, **kwargs)


def supports_implementation(inner: str) -> bool:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return inner in ALL_MASK_ATTENTION_FUNCTIONS and (inner == "eager" or inner in ALL_ATTENTION_FUNCTIONS)


def register_implementation(inner: str) -> str:
    """The name of the quantizing implementation around `inner`, registered with transformers (attention and
    mask functions) on first use."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = IMPLEMENTATION_PREFIX + inner
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(kv_quant_attention, inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def has_eager_function(module: nn.Module) -> bool:
    """With eager attention the inner function is the model's own `eager_attention_forward`."""
    return hasattr(sys.modules[type(module).__module__], "eager_attention_forward")


def dispatches_attention(module: nn.Module) -> bool:
    """Whether the module's forward picks its attention from transformers' ALL_ATTENTION_FUNCTIONS."""
    return class_dispatches_attention(type(module))


@functools.cache  # reading the source per class, not per module: the check runs whenever the pipeline changes
def class_dispatches_attention(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def architecture_name(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return f"{type(model).__name__} ({model_type})" if model_type else type(model).__name__


def attention_modules(model: nn.Module, blocks: list[int]) -> dict[int, list[tuple[str, nn.Module]]]:
    """The modules of each of `blocks` (decoder block indices) that dispatch through ALL_ATTENTION_FUNCTIONS."""
    decoder = find_decoder_blocks(model)
    return {
        index: [(f"{decoder.name(index)}.{sub}", m) for sub, m in decoder.blocks[index].named_modules()
                if sub and dispatches_attention(m)]
        for index in blocks
    }


def model_problems(model: nn.Module, quantized: dict[int, list[tuple[str, nn.Module]]],
                   params: KVCacheParams) -> list[str]:
    """Sentences for what keeps the caches of `quantized` (block -> attention modules) from being quantized."""
    architecture = architecture_name(model)
    if not all(quantized.values()):
        block = find_decoder_blocks(model).name(next(i for i, modules in quantized.items() if not modules))
        return [f"kv_cache needs attention that transformers dispatches through ALL_ATTENTION_FUNCTIONS; "
                f"{architecture} does not (no such module in block {block}), so its cache cannot be quantized."]
    modules = [entry for entries in quantized.values() for entry in entries]
    inner = current_implementation(model.config)
    if not supports_implementation(inner):
        return [f"kv_cache cannot wrap the attention implementation '{inner}' of {architecture}; load the model "
                "with attn_implementation 'sdpa' or 'eager'."]
    problems = []
    if inner == "eager":
        problems += [f"kv_cache cannot find the eager attention function of {name} ({architecture}); load the model "
                     "with attn_implementation 'sdpa'." for name, module in modules if not has_eager_function(module)]
    if params.granularity == "per_token" and params.group_size:
        block_of = {name: block for block, entries in quantized.items() for name, _ in entries}
        problems += [f"field 'group_size': {params.group_size} does not divide the head dimension {head_dim} of "
                     f"{name}." for name, module in modules
                     if (head_dim := cache_geometry(model, module, block_of[name]).head_dim) % params.group_size]
    return problems[:1] + ([f"(and {len(problems) - 1} more like it)"] if len(problems) > 1 else [])


def current_implementation(config) -> str:
    name = config._attn_implementation or "eager"
    return name.removeprefix(IMPLEMENTATION_PREFIX)


# --- memory ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheGeometry:
    """What one attention layer caches per token: kv_heads x head_dim keys and as many values."""

    kv_heads: int
    head_dim: int
    max_tokens: int | None  # a sliding-window layer caches at most this many tokens


def per_token_bytes(elements_per_token: int, tokens: int, bits: int, group: int, symmetric: bool) -> int:
    groups = tokens * (elements_per_token // group)
    meta = META_BYTES * (1 if symmetric else 2)
    return math.ceil(elements_per_token * tokens * bits / 8) + groups * meta


def layer_cache_bytes(geometry: CacheGeometry, context: int, settings: KVQuantSettings | None) -> int:
    """Bytes of one layer's keys and values at `context` tokens: 16-bit without `settings`."""
    tokens = min(context, geometry.max_tokens or context)
    vector = geometry.kv_heads * geometry.head_dim
    if settings is None:
        return 2 * vector * tokens * FP16_BYTES
    meta = META_BYTES * (1 if settings.symmetric else 2)
    if settings.granularity == "per_token":
        group = settings.group_size or geometry.head_dim
        return 2 * per_token_bytes(vector, tokens, settings.bits, group, settings.symmetric)
    values = per_token_bytes(vector, tokens, settings.bits, geometry.head_dim, settings.symmetric)
    width = settings.group_size or tokens
    full = tokens // width * width
    keys = math.ceil(vector * full * settings.bits / 8) + vector * (full // width) * meta
    residual = vector * (tokens - full) * FP16_BYTES
    return values + keys + residual


def cache_geometry(model: nn.Module, module: nn.Module, block: int) -> CacheGeometry:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    layer = getattr(module, "layer_idx", None)
    layer = block if layer is None else layer
    layer_types = getattr(config, "layer_types", None) or []
    sliding = layer < len(layer_types) and layer_types[layer] == "sliding_attention"
    return CacheGeometry(kv_heads, head_dim, getattr(config, "sliding_window", None) if sliding else None)


def memory_summary(model: nn.Module, quantized: dict[int, list[tuple[str, nn.Module]]], context: int,
                   settings: KVQuantSettings) -> dict:
    """The whole model's KV cache at `context` tokens, 16-bit vs with the quantized layers."""
    every = attention_modules(model, list(range(len(find_decoder_blocks(model).blocks))))
    fp16 = after = 0
    for block, modules in every.items():
        for _, module in modules:
            geometry = cache_geometry(model, module, block)
            fp16 += layer_cache_bytes(geometry, context, None)
            after += layer_cache_bytes(geometry, context, settings if block in quantized else None)
    return {
        "context_length": context,
        "kv_cache_fp16_bytes": fp16,
        "kv_cache_bytes": after,
        "kv_cache_saved_bytes": fp16 - after,
        "kv_cache_ratio": after / fp16 if fp16 else 1.0,
    }


@register
class KVCache(Method):
    id = "kv_cache"
    title = "KV-cache quantization"
    family = Family.QUANTIZATION
    summary = "Store the attention's cached keys and values at b bits (per token, or KIVI's per-channel keys)."
    needs_calibration = False
    changes_weights = False
    Params = KVCacheParams

    def check_model(self, model, params: KVCacheParams) -> list[str]:
        return model_problems(model, attention_modules(model, list(range(len(find_decoder_blocks(model).blocks)))),
                              params)

    def estimate(self, layers, params: KVCacheParams) -> Estimate:
        return Estimate(extra_bytes=0, seconds=0.01 * len(layers))  # marks modules; the cost is in each forward

    def apply(self, ctx: StepContext, params: KVCacheParams) -> StepOutcome:
        model = ctx.model
        quantized = attention_modules(model, list(ctx.layers))
        if problems := model_problems(model, quantized, params):
            raise RecipeError(" ".join(problems))
        settings = KVQuantSettings(params.bits, params.granularity, params.group_size, params.symmetric)
        inner = current_implementation(model.config)
        implementation = register_implementation(inner)
        for block, _ in ctx.blocks():
            for _, module in quantized[block]:
                setattr(module, SETTINGS_ATTR, settings)
                module.config._attn_implementation = implementation
        model.config._attn_implementation = implementation  # the masks are built from the model's config
        summary = {
            "bits": params.bits,
            "granularity": params.granularity,
            "group_size": params.group_size,
            "symmetric": params.symmetric,
            "attention": inner,
            "attention_layers": sum(len(m) for m in quantized.values()),
            **memory_summary(model, quantized, params.context_length, settings),
        }
        return StepOutcome(ctx.reports, summary)  # no weight changed, so no layer to report
