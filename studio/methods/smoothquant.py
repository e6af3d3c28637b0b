"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models"): W8A8 quantization with the difficulty of activation outliers migrated into the weights.

A few input channels of a transformer's linear layers carry outliers 100x larger than the rest, which wrecks
per-token activation quantization. For layers reading one input X, eq. 3 rewrites the product exactly:

    Y = (X diag(s)^-1) · (diag(s) W),    s_j = max|X_j|^α / max|W_j|^(1-α)      (eq. 4)

with max|X_j| over the calibration tokens and max|W_j| over the weights of every layer reading X. The
division by s is folded into the operation that produces X (the LayerNorm/RMSNorm before the attention and
MLP input projections; optionally a linear layer such as v_proj before o_proj), so the model computes the
same function. Then every targeted layer's weight is quantized per output channel, symmetric (the RTN grid),
and its input is quantized per token at run time (studio.methods.activation_quant), which simulates W8A8.

The equivalence is shared with AWQ, which folds its own scales the same way. Where a scale can be folded is
found structurally, not from per-architecture name tables: the layers reading one input are the targeted
layers that receive identical inputs; the operation that can absorb 1/s is a norm-like module (a leaf with a
per-channel weight) whose output is that input, or a targeted linear layer with as many outputs as the
group has inputs that runs before it. A candidate is accepted only if folding random scales into it leaves
the block's output unchanged and divides the group's input by s, checked by running the block on one
calibration batch; that one test also tells a Gemma RMSNorm, which multiplies by (1 + weight), from the
usual one, rejects a linear layer behind a nonlinearity (GPT-2's GELU) and accepts one behind a positively
homogeneous one (OPT's ReLU, the gated product of Llama's MLP). The answer is kept per block class and
targeted layer names, so it runs once per model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

    from studio.core.calibration import BlockPass

from studio.core.calibration import DEFAULT_CALIBRATION_TOKENS
from studio.core.context import StepContext
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.state import packed_size
from studio.core.structure import (
    in_out_features,
    is_linear,
    iter_layers,
    set_tensor,
    set_weight_matrix,
    weight_matrix,
)
from studio.methods.activation_quant import quantize_inputs
from studio.methods.grid import quantize_rtn_dense
from studio.methods.rtn import RTN_WEIGHTS_PER_SECOND

OBSERVED_ROWS = 64  # input rows per layer compared while finding groups and checking a fold
TRIAL_SCALE_RANGE = 4.0  # trial scales are drawn log-uniformly from [1/4, 4]
WEIGHT_TOKENS_PER_SECOND = 3e10  # weights × tokens a block forward gets through per second on a small CPU


# --- where a per-channel scale can be folded (shared with AWQ) ------------------------------------------


@dataclass(frozen=True)
class Absorber:
    """The operation producing a group's input, able to absorb X·diag(s)^-1."""

    name: str  # inside the block
    kind: str  # "norm": per-channel weight (and bias); "linear": output rows (and bias)
    offset: float = 0.0  # the norm multiplies by (offset + weight); Gemma's RMSNorm: 1


@dataclass(frozen=True)
class InputGroup:
    layers: tuple[str, ...]  # targeted layers reading one input, by name inside the block, in execution order
    absorber: Absorber | None  # None: nothing before the group can absorb a scale

    def modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.get_submodule(name) for name in self.layers]


def inner_names(bp: BlockPass) -> dict[str, str]:
    """Name inside the block of each targeted layer, by full name."""
    inside = {id(module): name for name, module in bp.block.named_modules()}
    return {full: inside[id(module)] for full, module in bp.layers.items()}


def input_groups(bp: BlockPass, known: dict) -> list[InputGroup]:
    """The block's targeted layers grouped by shared input, each with the operation that can absorb a scale.
    `known` caches the answer across blocks of the same class with the same targeted layers."""
    targeted = tuple(sorted(inner_names(bp).values()))
    key = (type(bp.block).__qualname__, targeted)
    if key not in known:
        known[key] = _detect_input_groups(bp, set(targeted))
    return known[key]


@dataclass
class _Observation:
    order: list[str] = field(default_factory=list)  # modules in the order they first ran
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor | None] = field(default_factory=dict)
    block_output: torch.Tensor | None = None


def _is_norm_like(module: nn.Module) -> bool:
    from torch import nn

    weight = getattr(module, "weight", None)
    return (not is_linear(module) and next(module.children(), None) is None
            and isinstance(weight, nn.Parameter) and weight.dim() == 1)


def _observe(probe: BlockPass, watched: dict[str, nn.Module]) -> _Observation:
    import torch

    seen = _Observation()

    def record(name: str, x: torch.Tensor, output) -> None:
        if name in seen.inputs:
            return
        seen.order.append(name)
        seen.inputs[name] = x[:OBSERVED_ROWS].float().clone()
        is_tensor = isinstance(output, torch.Tensor)
        seen.outputs[name] = output.reshape(-1, output.shape[-1])[:OBSERVED_ROWS].float().clone() if is_tensor else None

    seen.block_output = probe.forward(record, watched)[0].float()
    return seen


def _group_by_input(seen: _Observation, targeted: set[str]) -> list[list[str]]:
    import torch

    groups: list[list[str]] = []
    for name in [n for n in seen.order if n in targeted]:
        x = seen.inputs[name]
        same = next((g for g in groups if seen.inputs[g[0]].shape == x.shape and torch.equal(seen.inputs[g[0]], x)), None)
        if same is None:
            groups.append([name])
        else:
            same.append(name)
    never_ran = sorted(targeted - set(seen.order))
    return groups + [[name] for name in never_ran]


def _candidates(block: nn.Module, layers: list[str], seen: _Observation, targeted: set[str]):
    """Operations that ran before the group and could produce its input, nearest first."""
    import torch

    x = seen.inputs[layers[0]]
    before = seen.order[: seen.order.index(layers[0])]
    for name in reversed(before):
        module = block.get_submodule(name)
        if is_linear(module):
            if name in targeted and weight_matrix(module).shape[0] == x.shape[-1]:
                yield Absorber(name, "linear")
        else:
            y = seen.outputs[name]
            if y is not None and y.shape == x.shape and torch.equal(y, x):
                offsets = (1.0, 0.0) if "Gemma" in type(module).__name__ else (0.0, 1.0)
                yield from (Absorber(name, "norm", offset) for offset in offsets)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _fold_tolerance(dtype: torch.dtype) -> float:
    import torch

    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def _absorbs(probe: BlockPass, watched: dict[str, nn.Module], group: InputGroup, reference: _Observation) -> bool:
    """Fold random scales into `group`, run the block, undo: does it compute the same with X scaled by 1/s?"""
    import torch

    width = reference.inputs[group.layers[0]].shape[-1]
    bound = math.log(TRIAL_SCALE_RANGE)
    s = torch.empty(width).uniform_(-bound, bound, generator=torch.Generator().manual_seed(0)).exp()
    modules = group.modules(probe.block) + [probe.block.get_submodule(group.absorber.name)]
    saved = [(p, p.data) for m in modules for p in (m.weight, getattr(m, "bias", None)) if p is not None]
    try:
        fold_scales(probe.block, group, s)
        trial = _observe(probe, watched)
    finally:
        for parameter, data in saved:
            parameter.data = data
    tolerance = _fold_tolerance(modules[0].weight.dtype)
    if _relative_error(trial.block_output, reference.block_output) > tolerance:
        return False
    for name, x in reference.inputs.items():
        expected = x / s if name in group.layers else x
        if name not in trial.inputs or _relative_error(trial.inputs[name], expected) > tolerance:
            return False
    return True


def _detect_input_groups(bp: BlockPass, targeted: set[str]) -> list[InputGroup]:
    probe = dataclasses.replace(bp, inputs=bp.inputs[:1])  # one batch is enough to tell
    watched = {name: m for name, m in bp.block.named_modules() if name and (is_linear(m) or _is_norm_like(m))}
    reference = _observe(probe, watched)
    groups = []
    for layers in _group_by_input(reference, targeted):
        absorber = None
        if layers[0] in reference.inputs:
            for candidate in _candidates(bp.block, layers, reference, targeted):
                if _absorbs(probe, watched, InputGroup(tuple(layers), candidate), reference):
                    absorber = candidate
                    break
        groups.append(InputGroup(tuple(layers), absorber))
    return groups


def fold_scales(block: nn.Module, group: InputGroup, s: torch.Tensor, in_place: bool = False) -> None:
    """Eq. 3: the group's weights become W·diag(s), the absorber's output X·diag(s)^-1. Rebinds tensors,
    never writes into them (the working copy shares storage with the original model), unless the run is
    `in_place`: then every tensor is written into."""
    s = s.float()
    for module in group.modules(block):
        set_weight_matrix(module, weight_matrix(module).float() * s, in_place=in_place)
    absorber = block.get_submodule(group.absorber.name)
    if group.absorber.kind == "norm":
        weight, offset = absorber.weight, group.absorber.offset
        set_tensor(weight, (weight.data.float() + offset) / s - offset, in_place=in_place)
    else:
        set_weight_matrix(absorber, weight_matrix(absorber).float() / s[:, None], in_place=in_place)
    bias = getattr(absorber, "bias", None)
    if bias is not None:
        set_tensor(bias, bias.data.float() / s, in_place=in_place)


# --- calibration statistics ----------------------------------------------------------------------------


@dataclass
class InputStatistics:
    """Per input channel sum and max of |x| over every calibration token, and the tokens at `keep`."""

    keep: torch.Tensor | None = None  # sorted token indices over the whole calibration set
    tokens: int = 0
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor) -> None:
        import torch

        magnitude = x.detach().float().abs()
        total, peak = magnitude.sum(0), magnitude.amax(0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.abs_max = peak if self.abs_max is None else torch.maximum(self.abs_max, peak)
        if self.keep is not None:
            start, stop = torch.searchsorted(self.keep, torch.tensor([self.tokens, self.tokens + x.shape[0]]))
            if stop > start:
                self.rows.append(x[self.keep[start:stop] - self.tokens].float())
        self.tokens += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def sample(self) -> torch.Tensor:
        import torch

        return torch.cat(self.rows)


def sample_token_indices(total: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` of the `total` calibration tokens, chosen at random (fixed seed), sorted."""
    import torch

    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def collect_statistics(
    bp: BlockPass, groups: list[InputGroup], keep: torch.Tensor | None = None
) -> dict[str, InputStatistics]:
    """One pass of the block over the calibration set; statistics of each group's input, by first layer."""
    full = {inner: name for name, inner in inner_names(bp).items()}
    watched = {full[g.layers[0]]: bp.block.get_submodule(g.layers[0]) for g in groups}
    stats = {name: InputStatistics(keep) for name in watched}
    bp.observe_inputs(lambda name, x: stats[name].add(x), watched)
    return {g.layers[0]: stats[full[g.layers[0]]] for g in groups}


# --- SmoothQuant -----------------------------------------------------------------------------------------


class SmoothQuantParams(MethodParams):
    alpha: Annotated[
        float,
        Field(ge=0.0, le=1.0, description="Migration strength α: how much of the outliers moves into the weights."),
    ] = 0.5
    weight_bits: Annotated[int, Field(ge=2, le=8, description="Bits per weight, per output channel, symmetric.")] = 8
    activation_bits: Annotated[
        int, Field(ge=2, le=16, description="Bits per activation, per token, symmetric, computed at run time.")
    ] = 8
    smooth: Annotated[bool, Field(description="Migrate the outliers first; off gives the naive W8A8 baseline.")] = True
    smooth_after_linear: Annotated[
        bool,
        Field(description="Also smooth inputs made by a linear layer (v→o, up→down); the paper smooths after norms only."),
    ] = False


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Eq. 4 for the (out, in) weights of the layers reading one input."""
    import torch

    w_max = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    s = (act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    # a channel that never fired in calibration keeps its scale: 1/s would blow up if it fires later
    return torch.where(act_max > 0, s, torch.ones_like(s))


def smooth_block(bp: BlockPass, known: dict, alpha: float, after_linear: bool = False,
                 in_place: bool = False) -> list[InputGroup]:
    """Migrate the activation outliers of the block's groups into their weights; the block's function is
    unchanged. Every scale is computed from the block as it was, then all are folded."""
    groups = [
        g for g in input_groups(bp, known)
        if g.absorber is not None and (g.absorber.kind == "norm" or after_linear)
    ]
    if not groups:
        return []
    stats = collect_statistics(bp, groups)
    scales = [
        smoothing_scales(stats[g.layers[0]].abs_max, [weight_matrix(m) for m in g.modules(bp.block)], alpha)
        for g in groups
    ]
    for group, s in zip(groups, scales):
        fold_scales(bp.block, group, s, in_place=in_place)
    return groups


def _quantize_w8a8(ctx: StepContext, layers: dict[str, nn.Module], params: SmoothQuantParams) -> None:
    for name, module in layers.items():
        w = weight_matrix(module)
        q, dense = quantize_rtn_dense(w, params.weight_bits, 0, True)
        report = LayerReport(name, bits=params.weight_bits, group_size=0, parameters=w.numel())
        ctx.replace_weight(name, module, dense, report, quant=q)
        quantize_inputs(module, params.activation_bits)


@register
class SmoothQuant(Method):
    id = "smoothquant"
    title = "SmoothQuant W8A8"
    family = Family.QUANTIZATION
    summary = "Migrate activation outliers into the weights, then quantize weights per channel and activations per token."
    needs_calibration = True
    Params = SmoothQuantParams

    def estimate(self, layers, params: SmoothQuantParams) -> Estimate:
        modules = [m for _, m in iter_layers(layers)]
        n = sum(m.weight.numel() for m in modules)
        extra = self.rewritten_bytes(modules, params)
        calibration_pass = n * DEFAULT_CALIBRATION_TOKENS / WEIGHT_TOKENS_PER_SECOND if params.smooth else 0.0
        return Estimate(extra_bytes=extra, seconds=n / RTN_WEIGHTS_PER_SECOND + 2 * calibration_pass)

    def stored_bytes(self, module, params: SmoothQuantParams) -> int:
        in_f, out_f = in_out_features(module)
        return packed_size(out_f, in_f, params.weight_bits, 0, True)

    def apply(self, ctx: StepContext, params: SmoothQuantParams) -> StepOutcome:
        smoothed: list[str] = []
        if params.smooth:
            known: dict = {}
            for bp in ctx.layerwise():
                full = {inner: name for name, inner in inner_names(bp).items()}
                for group in smooth_block(bp, known, params.alpha, params.smooth_after_linear, ctx.in_place):
                    smoothed.extend(full[inner] for inner in group.layers)
                _quantize_w8a8(ctx, bp.layers, params)
        else:
            for _, layers in ctx.blocks():
                _quantize_w8a8(ctx, layers, params)
        return StepOutcome(ctx.reports, {
            "alpha": params.alpha if params.smooth else None,
            "weight_bits": params.weight_bits,
            "activation_bits": params.activation_bits,
            "activation_quantization": "dynamic per-token symmetric",
            "smoothed_layers": len(smoothed),
            "quantized_layers": len(ctx.reports),
        })
