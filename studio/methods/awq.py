"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
low-bit weight-only quantization that protects the weights of salient input channels by scaling them up.

Channels with large activations matter most. Scaling input channel j of W by s_j > 1 before quantization
(and X_j by 1/s_j) lowers its relative rounding error, so for the layers reading one input X (§3.2):

    s = s_X^α,  s_X = mean |X| per input channel over the calibration tokens (normalized: √(max·min) = 1)
    α* = argmin over α in {0, 1/n, ..., (n-1)/n} of  Σ_layers ‖ (Q(W·diag(s))·diag(s)^-1) X − W X ‖²

with Q the RTN grid of studio.methods.grid and the error measured on a random sample of calibration tokens
(α = 0 is plain RTN, so the search never does worse on that sample). The optional "duo" scaling of the
AutoAWQ implementation uses s = s_X^α / s_W^(1-α), s_W the mean group-normalized |W| per input channel.
Then the weight clipping search of the reference implementation: per output channel and group, the range
max|w| is shrunk by ratios 1, 1 - 1/n, ... down to one half, keeping the ratio of least output error of
that group on the sampled tokens. Like the reference, the query and key projections are not clipped (their
errors are amplified by the q·k product, which a per-layer output error does not see).

The scale is folded exactly as in SmoothQuant (studio.methods.smoothquant.fold_scales): diag(s)^-1 goes into
the operation producing X (the norm before the attention or MLP, or a linear layer such as v_proj before
o_proj or up_proj before down_proj), diag(s) into W before quantization, so the stored codes describe the
layer exactly and the model stays a plain model. Where no such operation exists (GPT-2's c_proj after a
GELU, o_proj under grouped-query attention) s stays 1 and only the clipping is searched. The operation is
found structurally, by a check run on the block (see studio.methods.smoothquant), not by per-architecture
name tables; the only names used are those that skip clipping of query/key projections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch

from studio.core.context import StepContext
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.state import QuantizedWeight, packed_size
from studio.core.structure import in_out_features, iter_layers, weight_matrix
from studio.methods.grid import quantize_rtn_dense
from studio.methods.rtn import group_size_problems
from studio.methods.smoothquant import (
    DEFAULT_CALIBRATION_TOKENS,
    WEIGHT_TOKENS_PER_SECOND,
    collect_statistics,
    fold_scales,
    inner_names,
    input_groups,
    sample_token_indices,
)

QUERY_KEY_NAMES = ("q_proj", "k_proj", "query", "key", "qkv", "c_attn")  # the reference skips their clipping
MAX_SHRINK = 0.5  # the clipping search shrinks the range down to half, as in the reference
ERROR_CHUNK = 1 << 24  # floats of partial outputs held at once by the clipping search


class AWQParams(MethodParams):
    bits: Annotated[int, Field(ge=2, le=8, description="Bits per weight (2-8).")] = 4
    group_size: Annotated[
        int, Field(ge=0, le=8192, description="Input columns sharing one scale; 0 = one scale per output channel.")
    ] = 128
    symmetric: Annotated[bool, Field(description="Symmetric grid without zero point; AWQ uses asymmetric.")] = False
    grid: Annotated[
        int, Field(ge=2, le=200, description="Points of the search over the exponent α in [0, 1) and over clip ratios.")
    ] = 20
    clip: Annotated[bool, Field(description="Search a clipped weight range per output channel and group.")] = True
    duo_scaling: Annotated[
        bool, Field(description="Scale by mean|x|^α / mean|w|^(1-α) (AutoAWQ) instead of mean|x|^α (the paper).")
    ] = False
    search_tokens: Annotated[
        int, Field(ge=16, le=1_000_000, description="Calibration tokens sampled to measure output errors in both searches.")
    ] = 1024


def _quantize_dequantize(w: torch.Tensor, params: AWQParams) -> torch.Tensor:
    return quantize_rtn_dense(w, params.bits, params.group_size, params.symmetric)[1].float()


def weight_magnitude(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over the rows of |w| / max|w| of its group, per input column (the duo-scaling s_W)."""
    import torch

    w = torch.cat([w.float() for w in weights])
    rows, columns = w.shape
    groups = w.abs().reshape(-1, group_size or columns)
    normalized = groups / groups.amax(-1, keepdim=True).clamp_min(1e-12)
    return normalized.reshape(rows, columns).mean(0)


def candidate_scales(mean_abs: torch.Tensor, alpha: float, w_magnitude: torch.Tensor | None = None) -> torch.Tensor:
    s = mean_abs.float().pow(alpha).clamp(min=1e-4)
    if w_magnitude is not None:
        s = (s / w_magnitude.pow(1 - alpha).clamp(min=1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_output_error(w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, params: AWQParams) -> float:
    """‖(Q(W·diag(s))·diag(s)^-1 − W) Xᵀ‖² on the sampled tokens X (tokens, in)."""
    w = w.float()
    effective = _quantize_dequantize(w * s, params) / s
    return float(((effective - w) @ x.T).pow(2).sum())


def search_scales(
    weights: list[torch.Tensor], x: torch.Tensor, mean_abs: torch.Tensor, params: AWQParams
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale s = s_X^α of least output error over the α grid, and that α."""
    w_magnitude = weight_magnitude(weights, params.group_size) if params.duo_scaling else None
    best: tuple[float, float, torch.Tensor] | None = None
    for step in range(params.grid):
        alpha = step / params.grid
        s = candidate_scales(mean_abs, alpha, w_magnitude)
        error = sum(scaled_output_error(w, s, x, params) for w in weights)
        if best is None or error < best[0]:
            best = (error, alpha, s)
    return best[2], best[1]


def _group_output_error(delta: torch.Tensor, x_groups: torch.Tensor) -> torch.Tensor:
    """Σ_tokens (Σ_{k in group} delta[o, g, k] x[t, g, k])², per output channel o and group g."""
    import torch

    out_f, groups, width = delta.shape
    tokens = x_groups.shape[-1]
    chunk = max(1, ERROR_CHUNK // (groups * tokens))
    errors = []
    for start in range(0, out_f, chunk):
        partial = torch.bmm(delta[start : start + chunk].transpose(0, 1), x_groups)  # (groups, rows, tokens)
        errors.append(partial.pow(2).sum(-1).T)
    return torch.cat(errors)


def search_clip(w: torch.Tensor, x: torch.Tensor, params: AWQParams) -> torch.Tensor:
    """Per output channel and group, the clipping bound max|w|·r, r in {1, 1 - 1/n, ...} down to 1/2, of least
    output error of the group's quantized weights on the sampled tokens X (tokens, in). Shape (out, groups)."""
    import torch

    out_f, in_f = w.shape
    width = params.group_size or in_f
    groups = w.float().reshape(out_f, in_f // width, width)
    x_groups = x.float().T.reshape(in_f // width, width, -1)
    full_range = groups.abs().amax(-1)
    best_error = torch.full_like(full_range, float("inf"))
    best_bound = full_range.clone()
    for step in range(max(1, int(MAX_SHRINK * params.grid))):
        bound = full_range * (1 - step / params.grid)
        clipped = torch.clamp(groups, -bound[..., None], bound[..., None])
        quantized = _quantize_dequantize(clipped.reshape(out_f, in_f), params).reshape(groups.shape)
        error = _group_output_error(quantized - groups, x_groups)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_bound = torch.where(better, bound, best_bound)
    return best_bound


def clip_to(w: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    import torch

    out_f, in_f = w.shape
    groups = w.reshape(out_f, bound.shape[1], -1)
    return torch.clamp(groups, -bound[..., None], bound[..., None]).reshape(out_f, in_f)


def _is_query_or_key(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(part in leaf for part in QUERY_KEY_NAMES)


def quantize_layer(w: torch.Tensor, x: torch.Tensor, params: AWQParams, clip: bool) -> QuantizedWeight:
    """Codes of the (already scaled) weight, its range clipped by the search when `clip`."""
    return quantize_layer_dense(w, x, params, clip)[0]


def quantize_layer_dense(w: torch.Tensor, x: torch.Tensor, params: AWQParams,
                         clip: bool) -> tuple[QuantizedWeight, torch.Tensor]:
    """`quantize_layer` and its dequantized weight in `w`'s dtype (quantize_rtn_dense)."""
    if clip:
        w = clip_to(w.float(), search_clip(w, x, params)).to(w.dtype)
    return quantize_rtn_dense(w, params.bits, params.group_size, params.symmetric)


@register
class AWQ(Method):
    id = "awq"
    title = "AWQ activation-aware weight quantization"
    family = Family.QUANTIZATION
    summary = "Scale salient input channels before rounding (searched on calibration data), clip ranges, fold the scales."
    needs_calibration = True
    Params = AWQParams

    def check(self, layers, params: AWQParams) -> list[str]:
        return group_size_problems(layers, params.group_size)

    def estimate(self, layers, params: AWQParams) -> Estimate:
        modules = [m for _, m in iter_layers(layers)]
        n = sum(m.weight.numel() for m in modules)
        largest = max((m.weight.numel() for m in modules), default=0)
        extra = self.rewritten_bytes(modules, params)
        extra += 8 * largest * 4
        searches = params.grid + (int(MAX_SHRINK * params.grid) if params.clip else 0)
        work = n * (params.search_tokens * searches + 2 * DEFAULT_CALIBRATION_TOKENS)
        return Estimate(extra_bytes=extra, seconds=work / WEIGHT_TOKENS_PER_SECOND)

    def stored_bytes(self, module, params: AWQParams) -> int:
        in_f, out_f = in_out_features(module)
        return packed_size(out_f, in_f, params.bits, params.group_size, params.symmetric)

    def apply(self, ctx: StepContext, params: AWQParams) -> StepOutcome:
        known: dict = {}
        warned: set[tuple[str, ...]] = set()
        keep = sample_token_indices(ctx.calibration.tokens.numel(), params.search_tokens)
        alphas: list[float] = []
        for bp in ctx.layerwise():
            full = {inner: name for name, inner in inner_names(bp).items()}
            groups = input_groups(bp, known)
            stats = collect_statistics(bp, groups, keep)
            scales = {}
            for group in groups:
                if group.absorber is None:
                    if group.layers not in warned:
                        warned.add(group.layers)
                        ctx.warn(f"{full[group.layers[0]]} (and the same layer of later blocks): no operation before "
                                 "it can absorb a per-channel scale, so only its clipping range is searched")
                    continue
                group_stats = stats[group.layers[0]]
                weights = [weight_matrix(m) for m in group.modules(bp.block)]
                scales[group], alpha = search_scales(weights, group_stats.sample, group_stats.mean_abs, params)
                alphas.append(alpha)
            for group, s in scales.items():
                fold_scales(bp.block, group, s, in_place=ctx.in_place)
            for group in groups:
                x = stats[group.layers[0]].sample
                if group in scales:
                    x = x / scales[group]  # what the layers read once the absorber divides by s
                for inner, module in zip(group.layers, group.modules(bp.block)):
                    name = full[inner]
                    w = weight_matrix(module)
                    q, dense = quantize_layer_dense(w, x, params, params.clip and not _is_query_or_key(name))
                    report = LayerReport(name, bits=params.bits, group_size=params.group_size, parameters=w.numel())
                    ctx.replace_weight(name, module, dense.to(w.dtype), report, quant=q)
        return StepOutcome(ctx.reports, {
            "bits": params.bits,
            "group_size": params.group_size,
            "symmetric": params.symmetric,
            "scaled_groups": len(alphas),
            "mean_alpha": sum(alphas) / len(alphas) if alphas else None,
        })
