"""What the low-rank factorizations (truncated SVD, ASVD, SVD-LLM) share: the rank each layer keeps, and the
replacement of an (out, in) Linear by the two thin layers of studio.core.factored.LowRankLinear.

Each method turns the weight into a matrix A = W·S (S = I for plain SVD, a diagonal activation scale for ASVD, the
Cholesky factor of the input Gram matrix for SVD-LLM), truncates A's SVD to rank k, and maps the right factor back
through S⁻¹: W' = U_k Σ_k^½ · Σ_k^½ V_kᵀ S⁻¹, so up = U_k Σ_k^½ (out, k) and down = Σ_k^½ V_kᵀ S⁻¹ (k, in).

Rank per layer, from the parameter budget or the energy of A's spectrum:
- "parameter_ratio": k = ⌊(1 − ratio) · out · in / (out + in)⌋, so every factored layer holds (1 − ratio) of its
  parameters (the uniform compression ratio SVD-LLM reports results at);
- "energy": the smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ σ_i² (for SVD-LLM σ_i is the output error that
  truncating the i-th value costs, so this bounds the layer's output error).
Ranks are rounded down to a multiple of `rank_multiple` (a later group-wise quantization of the `up` factor needs
its group size to divide the rank). A layer whose rank would hold as many parameters as the dense weight is left
dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

if TYPE_CHECKING:
    import torch
    from torch import nn

from studio.core.calibration import CPU_FLOPS_PER_SECOND
from studio.core.context import StepContext
from studio.core.registry import Estimate, LayerReport, Method, MethodParams, StepOutcome
from studio.core.state import compression_state
from studio.core.structure import in_out_features, iter_layers, weight_matrix
from studio.methods.wanda import calibration_pass_seconds

SVD_FLOPS_FACTOR = 20  # a dense (m, n) SVD costs about 20·m·n·min(m, n) flops with LAPACK's divide and conquer


class LowRankParams(MethodParams):
    rank_rule: Annotated[
        Literal["parameter_ratio", "energy"],
        Field(description="Rank per layer from a parameter budget, or from the energy of the singular values."),
    ] = "parameter_ratio"
    ratio: Annotated[
        float, Field(ge=0.0, le=0.95, description="Fraction of each factored layer's parameters removed.")
    ] = 0.2
    energy: Annotated[
        float, Field(ge=0.5, le=1.0, description="Energy rule: fraction of Σσ² kept (of the scaled matrix).")
    ] = 0.95
    rank_multiple: Annotated[
        int, Field(ge=1, le=1024, description="Round ranks down to a multiple of this (e.g. a later quantization's "
                                              "group size, which must divide the rank).")
    ] = 1


def dense_break_even(out_f: int, in_f: int) -> float:
    """The rank at which the two factors hold as many parameters as the dense weight."""
    return out_f * in_f / (out_f + in_f)


def budget_rank(out_f: int, in_f: int, ratio: float) -> int:
    return max(1, int((1.0 - ratio) * dense_break_even(out_f, in_f)))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    import torch

    power = singular_values.double().pow(2)
    kept = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


def kept_rank(rank: int, out_f: int, in_f: int, rank_multiple: int) -> int | None:
    """`rank` rounded down to a multiple of `rank_multiple` (at least one), or None to leave the layer dense
    (factoring would not save parameters)."""
    rank = max(rank_multiple, rank - rank % rank_multiple)
    return None if rank >= dense_break_even(out_f, in_f) else rank


def choose_rank(singular_values: torch.Tensor, out_f: int, in_f: int, params: LowRankParams) -> int | None:
    """The rank the layer keeps, or None to leave it dense (factoring would not save parameters)."""
    if params.rank_rule == "parameter_ratio":
        rank = budget_rank(out_f, in_f, params.ratio)
    else:
        rank = energy_rank(singular_values, params.energy)
    return kept_rank(min(rank, len(singular_values)), out_f, in_f, params.rank_multiple)


@dataclass
class Truncation:
    """A = U Σ Vᵀ truncated to `rank`, with the factors of W' (up, down) once mapped back through S⁻¹."""

    up: torch.Tensor  # (out, rank)
    down: torch.Tensor  # (rank, in)
    rank: int


def truncate(a: torch.Tensor, out_in: tuple[int, int], params: LowRankParams,
             unscale_right) -> Truncation | None:
    """Truncated SVD of the (out, in) matrix `a` (float64); `unscale_right(Σ^½Vᵀ)` applies S⁻¹ on the right."""
    import torch

    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    rank = choose_rank(s, *out_in, params)
    if rank is None:
        return None
    root = s[:rank].sqrt()
    return Truncation(u[:, :rank] * root, unscale_right(root[:, None] * vh[:rank]), rank)


def factor_layer(ctx: StepContext, name: str, module: nn.Module, factors: Truncation | None) -> LayerReport:
    """Replace `module` by its factors (or keep it dense when `factors` is None) and report the layer."""
    from studio.core.events import Metric
    from studio.core.factored import LowRankLinear
    from studio.core.structure import set_submodule

    w = weight_matrix(module)
    out_f, in_f = w.shape
    if factors is None:
        report = LayerReport(name, error=0.0, parameters=w.numel(), rank=None)
    else:
        dtype = w.dtype
        bias = None if module.bias is None else module.bias.data
        layer = LowRankLinear.from_factors(factors.up.to(dtype), factors.down.to(dtype), bias,
                                           requires_grad=module.weight.requires_grad)
        error = (layer.dense_weight().double() - w.double()).norm() / w.double().norm().clamp_min(1e-300)
        set_submodule(ctx.model, name, layer)
        if compression_state(ctx.model).pop(name, None) is not None:
            ctx.warn(f"{name}: its quantization codes or sparsity mask do not describe the low-rank factors and "
                     "were dropped")
        report = LayerReport(name, error=float(error), parameters=factors.rank * (out_f + in_f), rank=factors.rank)
        ctx.emit(Metric("layer_error", report.error, ctx.index, name))
    ctx.reports.append(report)
    return report


def low_rank_summary(reports: list[LayerReport], dense_parameters: int) -> dict:
    after = sum(r.parameters for r in reports)
    factored = [r for r in reports if r.rank is not None]
    return {
        "layers_factored": len(factored),
        "layers_left_dense": len(reports) - len(factored),
        "parameters_before": dense_parameters,
        "parameters_after": after,
        "parameter_reduction": 1.0 - after / max(dense_parameters, 1),
        "ranks": {r.name: r.rank for r in factored},
    }


class LowRankMethod(Method):
    """Apply: every targeted layer, block by block, through `factor(ctx, name, module, statistics, params)`."""

    def check(self, layers, params: LowRankParams) -> list[str]:
        if params.rank_rule == "parameter_ratio" and params.ratio == 0:
            return ["field 'ratio' is 0, so no layer would be factored; give the fraction of parameters to remove."]
        return []

    def estimate(self, layers, params: LowRankParams) -> Estimate:
        svd_flops = sum(SVD_FLOPS_FACTOR * m.weight.numel() * min(in_out_features(m)) for _, m in iter_layers(layers))
        factors = sum(m.weight.numel() * m.weight.element_size() for _, m in iter_layers(layers))
        widest = max((in_out_features(m)[0] for _, m in iter_layers(layers)), default=0)
        extra = factors + 3 * 8 * widest * widest  # factors, and a float64 SVD's workspace of the widest layer
        seconds = svd_flops / CPU_FLOPS_PER_SECOND
        if self.needs_calibration:
            seconds += calibration_pass_seconds(layers)
        return Estimate(extra_bytes=extra, seconds=seconds)

    def stored_bytes(self, module: nn.Module, params: LowRankParams) -> int:
        in_f, out_f = in_out_features(module)
        size = module.weight.element_size()
        if params.rank_rule == "energy":  # the rank depends on the spectrum: the dense size is the bound
            return module.weight.numel() * size
        rank = kept_rank(min(budget_rank(out_f, in_f, params.ratio), out_f, in_f), out_f, in_f, params.rank_multiple)
        return (out_f * in_f if rank is None else rank * (in_f + out_f)) * size

    def apply(self, ctx: StepContext, params: LowRankParams) -> StepOutcome:
        dense = sum(weight_matrix(m).numel() for _, m in iter_layers(ctx.layers))
        if self.needs_calibration:
            for block in ctx.layerwise():
                statistics = self.observe(block)
                for name, module in block.layers.items():
                    ctx.cancel.check()
                    factor_layer(ctx, name, module, self.factor(module, statistics.pop(name), params))
        else:
            for _, layers in ctx.blocks():
                for name, module in layers.items():
                    factor_layer(ctx, name, module, self.factor(module, None, params))
        return StepOutcome(ctx.reports, low_rank_summary(ctx.reports, dense))

    def observe(self, block) -> dict:
        """The per-layer input statistics the method needs, from one pass over the calibration batches."""
        raise NotImplementedError

    def factor(self, module: nn.Module, statistics, params: LowRankParams) -> Truncation | None:
        raise NotImplementedError
