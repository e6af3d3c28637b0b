"""Grouped-query attention conversion (Ainslie, Lee-Thorp, de Jong, Zemlyanskiy, Lebrón & Sanghai 2023, "GQA:
Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints").

A multi-head (or already grouped) checkpoint is turned into one with fewer key/value heads (section 2.1): the key
and value projection matrices of the heads in each group are mean-pooled into one head, W_K' = (1/g) Σ_{h∈group}
W_K^h (and the same for W_V and the biases). Groups are runs of g = kv_heads / new_kv_heads adjacent key/value
heads, so every query head keeps attending the pooled head of the heads it used to read. The config's
`num_key_value_heads` is rewritten, so `save_pretrained` writes a model plain transformers rebuilds, and the
KV cache shrinks by the same factor. The paper recovers quality by uptraining (about 5% of pretraining); here
that is a distillation step after this one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:
    import torch
    from torch import nn

from studio.core.context import StepContext
from studio.core.errors import RecipeError
from studio.core.events import Metric
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.state import compression_state
from studio.core.structure import find_decoder_blocks, iter_layers, set_submodule, text_config, weight_matrix
from studio.methods.structured import (
    changed_config,
    conform_to,
    model_heads,
    new_linear,
    rebuild_block,
    parameter_count,
    shape_mismatches,
)

KEY_VALUE_PROJECTIONS = ("k_proj", "v_proj")  # Llama, Qwen2, Gemma, Mistral, Phi-3 style separate projections
CACHE_BYTES_PER_ELEMENT = 2  # a 16-bit KV cache, what inference engines keep
REPORTED_CONTEXT = 4096


class GQAParams(MethodParams):
    kv_heads: Annotated[
        int, Field(ge=1, le=4096, description="Key/value heads after the conversion (1 = multi-query attention).")
    ] = 1


def pooled_heads(w: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """Rows of `w` (kv_heads·head_dim, …) as `groups` heads, each the mean of its adjacent heads."""
    kv_heads = w.shape[0] // head_dim
    pooled = w.reshape(groups, kv_heads // groups, head_dim, *w.shape[1:]).float().mean(dim=1)
    return pooled.reshape(groups * head_dim, *w.shape[1:]).to(w.dtype)


def pooling_error(w: torch.Tensor, pooled: torch.Tensor, groups: int, head_dim: int) -> float:
    """‖W − W'‖ / ‖W‖ with W' every head replaced by its group's mean."""
    kv_heads = w.shape[0] // head_dim
    repeated = pooled.reshape(groups, 1, head_dim, -1).expand(groups, kv_heads // groups, head_dim, -1)
    diff = w.float() - repeated.reshape(w.shape).float()
    return float(diff.norm() / w.float().norm().clamp_min(1e-12))


def attention_projections(block: nn.Module) -> dict[str, nn.Module]:
    """The block's key and value projections by name relative to the block."""
    return {name: m for name, m in block.named_modules() if name.rsplit(".", 1)[-1] in KEY_VALUE_PROJECTIONS}


def cache_bytes_per_token(blocks: int, kv_heads: int, head_dim: int) -> int:
    return 2 * blocks * kv_heads * head_dim * CACHE_BYTES_PER_ELEMENT  # keys and values


def convert_block(block: nn.Module, groups: int, head_dim: int) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Replace the block's key/value projections by pooled ones; {relative name: (old, new)}."""
    changed = {}
    for name, old in attention_projections(block).items():
        w = weight_matrix(old)
        bias = None if old.bias is None else pooled_heads(old.bias.data, groups, head_dim)
        new = new_linear(old, pooled_heads(w, groups, head_dim), bias)
        set_submodule(block, name, new)
        changed[name] = (old, new)
    return changed


def conversion_problems(model: nn.Module, params: GQAParams) -> list[str]:
    config = text_config(model)
    if not hasattr(config, "num_attention_heads"):
        return [f"{type(config).__name__} has no num_attention_heads, so its attention heads cannot be grouped."]
    heads = model_heads(config)
    if params.kv_heads > heads.kv_heads:
        return [f"field 'kv_heads' is {params.kv_heads}, but the model has only {heads.kv_heads} key/value heads; "
                "choose fewer."]
    if heads.kv_heads % params.kv_heads:
        fits = [d for d in range(1, heads.kv_heads) if heads.kv_heads % d == 0]
        return [f"field 'kv_heads' {params.kv_heads} does not divide the model's {heads.kv_heads} key/value heads "
                f"into equal groups; choose one of {fits}."]
    block = find_decoder_blocks(model).blocks[0]
    if sorted(n.rsplit(".", 1)[-1] for n in attention_projections(block)) != sorted(KEY_VALUE_PROJECTIONS):
        return [f"{type(block).__name__} has no separate k_proj and v_proj layers (a fused or differently named "
                "projection), so its key/value heads cannot be pooled."]
    new_config = changed_config(config, {"num_key_value_heads": params.kv_heads})
    try:
        probe = rebuild_block(block, config, 0)
        reference = rebuild_block(block, new_config, 0)
    except Exception as exc:
        return [f"{type(config).__name__} with num_key_value_heads={params.kv_heads} does not build a decoder block "
                f"({type(exc).__name__}: {exc})."]
    convert_block(probe, params.kv_heads, heads.head_dim)
    mismatches = shape_mismatches(probe, reference)
    if mismatches:
        return [f"{type(config).__name__} cannot describe {params.kv_heads} key/value heads ({mismatches[0]}); this "
                "architecture does not read num_key_value_heads."]
    return []


@register
class GQAConversion(Method):
    id = "gqa"
    title = "Grouped-query attention"
    family = Family.COMPACT_ARCHITECTURE
    summary = "Mean-pool key/value heads into fewer groups (GQA / MQA): a smaller KV cache and fewer parameters."
    Params = GQAParams

    def check(self, layers, params: GQAParams) -> list[str]:
        gaps = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
        if gaps:
            return [f"blocks {gaps} are not targeted, but one config head count applies to every block; "
                    "target every decoder block."]
        return []

    def check_model(self, model: nn.Module, params: GQAParams) -> list[str]:
        return conversion_problems(model, params)

    def estimate(self, layers, params: GQAParams) -> Estimate:
        projections = [m for name, m in iter_layers(layers) if name.rsplit(".", 1)[-1] in KEY_VALUE_PROJECTIONS]
        return Estimate(extra_bytes=sum(m.weight.numel() * m.weight.element_size() for m in projections),
                        seconds=0.1 + sum(m.weight.numel() for m in projections) / 1e9)

    def stored_bytes(self, module: nn.Module, params: GQAParams) -> int:
        return module.weight.numel() * module.weight.element_size()  # k/v shrink; the prediction stays an upper bound

    def apply(self, ctx: StepContext, params: GQAParams) -> StepOutcome:
        problems = conversion_problems(ctx.model, params)
        if problems:
            raise RecipeError("\n".join(f"step {ctx.index + 1} (gqa): {p}" for p in problems))
        config = text_config(ctx.model)
        heads = model_heads(config)
        new_config = changed_config(config, {"num_key_value_heads": params.kv_heads})
        decoder = find_decoder_blocks(ctx.model)
        before = parameter_count(ctx.model)
        for index, _ in ctx.blocks():
            block = decoder.blocks[index]
            for name, (old, new) in convert_block(block, params.kv_heads, heads.head_dim).items():
                full = f"{decoder.name(index)}.{name}"
                error = pooling_error(weight_matrix(old), weight_matrix(new), params.kv_heads, heads.head_dim)
                if compression_state(ctx.model).pop(full, None) is not None:
                    ctx.warn(f"{full}: its quantization codes or sparsity mask do not describe the pooled heads and "
                             "were dropped")
                report = LayerReport(full, error=error, parameters=weight_matrix(new).numel())
                ctx.reports.append(report)
                ctx.emit(Metric("layer_error", error, ctx.index, full))
            reference = rebuild_block(block, new_config, index)
            conform_to(block, reference)
            mismatches = shape_mismatches(block, reference)
            if mismatches:
                raise RuntimeError(f"block {index} does not match its new config: {mismatches[:3]}")
        config.num_key_value_heads = params.kv_heads
        after = parameter_count(ctx.model)
        blocks = len(decoder.blocks)
        cache_before = cache_bytes_per_token(blocks, heads.kv_heads, heads.head_dim)
        cache_after = cache_bytes_per_token(blocks, params.kv_heads, heads.head_dim)
        return StepOutcome(ctx.reports, {
            "key_value_heads": [heads.kv_heads, params.kv_heads],
            "attention_heads": heads.heads,
            "parameters_before": before,
            "parameters_after": after,
            "kv_cache_bytes_per_token": [cache_before, cache_after],
            f"kv_cache_bytes_at_{REPORTED_CONTEXT}_tokens": [cache_before * REPORTED_CONTEXT,
                                                            cache_after * REPORTED_CONTEXT],
            "config": {"num_key_value_heads": params.kv_heads},
        })
