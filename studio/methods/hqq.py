"""Half-Quadratic Quantization (HQQ; Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine
Learning Models"): calibration-free, it optimizes each group's zero point so the dequantized weights fit the
originals in a sparsity-promoting lp norm (p < 1), which tolerates the few outlier weights instead of bending
the whole grid towards them.

The grid is asymmetric per group, the scale s fixed from the group's min/max. The problem
    argmin_z ||W - Q_z^-1(Q_z(W))||_p^p
is split with an auxiliary error W_e (half-quadratic splitting) and solved by alternating, with β growing by κ:
    (a) W_e <- shrink_lp(W - Q_z^-1(Q_z(W)), β),  shrink_lp(x, β) = sign(x) relu(|x| - |x|^(p-1) / β)
    (b) z   <- < Q_z(W) - (W - W_e) / s >          (the mean over the group)
    β   <- κ β
with Q_z(W) = round(W / s + z) clamped to [0, 2^b - 1] and Q_z^-1(q) = (q - z) s. Each group keeps its best
iterate (lowest lp error); the first iterate is the round-to-nearest grid.

β is in the weights' units: the threshold drops an error e when |e| < β^(-1/(2-p)) (~0.17 for the defaults), so
on typical LLM weights step (a) gives W_e = 0 and step (b) is the least-squares zero point for the current codes,
as in the authors' reference code with the same defaults.

HQQ's zero point is a float, stored in float16 (each iterate is rounded to float16, so the best one is the best
as stored). `zero_point: integer` instead rounds the optimized zero to the studio's integer zero points and the
codes again on that grid; since the scale is fixed, this gives back nearly all of HQQ's gain over RTN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch

from studio.core.context import StepContext
from studio.core.memory import return_free_memory
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.state import QuantizedWeight, packed_size
from studio.core.structure import in_out_features, iter_layers, weight_matrix
from studio.methods.grid import grid_params, quantize_rtn_dense
from studio.methods.rtn import group_size_problems

HQQ_WEIGHT_ITERATIONS_PER_SECOND = 1e7  # weights x iterations; 2.6e6 measured with ~0.4 of a 2-core CPU free
WORKING_COPIES = 6  # float32 copies of a layer's weight alive during the optimization


class HQQParams(MethodParams):
    bits: Annotated[int, Field(ge=2, le=8, description="Bits per weight (2-8).")] = 4
    group_size: Annotated[
        int, Field(ge=0, le=8192, description="Input columns sharing one scale and zero; 0 = one per output channel.")
    ] = 64
    iterations: Annotated[int, Field(ge=1, le=1000, description="Half-quadratic iterations per layer.")] = 20
    lp_norm: Annotated[
        float, Field(gt=0.0, le=1.0, description="p of the lp error norm; below 1 it tolerates outlier weights.")
    ] = 0.7
    beta: Annotated[float, Field(gt=0.0, le=1e6, description="Initial penalty β of the splitting (in weight units).")] = 10.0
    kappa: Annotated[float, Field(ge=1.0, le=2.0, description="Factor that grows β after each iteration.")] = 1.01
    zero_point: Annotated[
        Literal["float", "integer"],
        Field(description="HQQ's float zero point (16 bits per group), or rounded to an integer on the grid."),
    ] = "float"


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalized soft-threshold, the proximal step of the lp norm: sign(x) relu(|x| - |x|^(p-1) / β)."""
    import torch

    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.pow(p - 1) / beta)


def lp_error(error: torch.Tensor, p: float) -> torch.Tensor:
    """sum |e|^p over the last axis (each group)."""
    return error.abs().pow(p).sum(dim=-1)


def error_and_shrink(residual: torch.Tensor, beta: float, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`lp_error(residual, p)` and `shrink_lp(residual, beta, p)` from one power |x|^(p-1), the costly part of
    an iteration: |x|^p = |x| · |x|^(p-1) (0 where x = 0, where the power is infinite)."""
    import torch

    magnitude = residual.abs()
    power = magnitude.pow(p - 1)
    error = torch.mul(magnitude, power).nan_to_num_(nan=0.0).sum(dim=-1)
    shrunk = magnitude.sub_(power.div_(beta)).relu_().copysign_(residual)
    return error, shrunk


def codes_on_grid(scaled: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Q_z(W) = round(W / s + z) clamped to [0, 2^b - 1], from `scaled` = W / s; z may be a float."""
    import torch

    return torch.clamp(torch.round(scaled + zero[..., None]), 0, 2**bits - 1)


def optimize_zero(scaled: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, params: HQQParams,
                  stored_as: torch.dtype | None = None) -> torch.Tensor:
    """The float zero point of each group (rows of `scaled` = W / s) after the half-quadratic iterations, each
    group's best iterate by its lp error; `zero` is the starting point. With `stored_as`, every iterate is
    rounded to that dtype, so the best one is the best as stored."""
    import torch

    step = scale[..., None]

    def codes_and_residual(z):
        codes = codes_on_grid(scaled, z, bits)
        return codes, torch.sub(scaled, codes).add_(z[..., None]).mul_(step)  # W - Q_z^-1(Q_z(W)), in weight units

    best_zero, best_error = zero.clone(), torch.full_like(zero, float("inf"))
    beta = params.beta
    for _ in range(params.iterations):
        codes, residual = codes_and_residual(zero)
        error, error_part = error_and_shrink(residual, beta, params.lp_norm)  # step (a): W_e
        better = error < best_error
        best_zero, best_error = torch.where(better, zero, best_zero), torch.where(better, error, best_error)
        zero = codes.sub_(scaled).add_(error_part.div_(step)).mean(dim=-1)  # step (b): <Q_z(W) - (W - W_e) / s>
        if stored_as is not None:
            zero = zero.to(stored_as).float()
        beta *= params.kappa
    _, residual = codes_and_residual(zero)  # the last update is a candidate too
    return torch.where(lp_error(residual, params.lp_norm) < best_error, zero, best_zero)


def quantize_hqq(w: torch.Tensor, params: HQQParams, zero_point: str | None = None) -> QuantizedWeight:
    """HQQ codes of the (out, in) matrix `w`. With float zero points (the paper's) they are kept as float16;
    with integer ones the optimized zero is rounded and the codes rounded again on that grid."""
    import torch

    zero_point = zero_point or params.zero_point
    out_f, in_f = w.shape
    width = params.group_size or in_f
    groups = w.float().reshape(out_f, in_f // width, width)
    scale, rtn_zero = grid_params(groups, params.bits, symmetric=False)  # the RTN grid is the first iterate
    scale = scale.to(w.dtype).float()  # optimize for the scale as it is stored
    scaled = groups / scale[..., None]
    if zero_point == "integer":
        zero = optimize_zero(scaled, scale, rtn_zero, params.bits, params)
        zero = zero.round().clamp(0, 2**params.bits - 1).to(torch.uint8)
    else:  # HQQ stores float16 zero points
        zero = optimize_zero(scaled, scale, rtn_zero, params.bits, params, stored_as=torch.float16)
        zero = zero.to(torch.float16)
    codes = codes_on_grid(scaled, zero.float(), params.bits)
    return QuantizedWeight.from_codes(
        codes=codes.reshape(out_f, in_f).to(torch.uint8),
        scales=scale.to(w.dtype),
        zeros=zero,
        bits=params.bits,
        group_size=params.group_size,
        symmetric=False,
    )


def hqq_packed_size(out_features: int, in_features: int, params: HQQParams) -> int:
    """Packed bytes: codes, a 16-bit scale per group, and a zero point per group (16 bits when float)."""
    return packed_size(out_features, in_features, params.bits, params.group_size, symmetric=False,
                       float_zeros=params.zero_point == "float")


@register
class HQQ(Method):
    id = "hqq"
    title = "HQQ half-quadratic quantization"
    family = Family.QUANTIZATION
    summary = "Calibration-free: optimize each group's zero point for a robust lp error by half-quadratic splitting."
    needs_calibration = False
    Params = HQQParams

    def check(self, layers, params: HQQParams) -> list[str]:
        return group_size_problems(layers, params.group_size)

    def estimate(self, layers, params: HQQParams) -> Estimate:
        modules = [m for _, m in iter_layers(layers)]
        n = sum(m.weight.numel() for m in modules)
        largest = max((m.weight.numel() for m in modules), default=0)
        # new dense weights and packed codes per layer, plus the float32 working copies of the largest layer
        extra = self.rewritten_bytes(modules, params)
        extra += largest * 4 * WORKING_COPIES
        return Estimate(extra_bytes=extra, seconds=n * (params.iterations + 2) / HQQ_WEIGHT_ITERATIONS_PER_SECOND)

    def stored_bytes(self, module, params: HQQParams) -> int:
        in_f, out_f = in_out_features(module)
        return hqq_packed_size(out_f, in_f, params)

    def apply(self, ctx: StepContext, params: HQQParams) -> StepOutcome:
        squared = {"hqq": 0.0, "rtn": 0.0, "weights": 0.0}
        for _, layers in ctx.blocks():
            for name, module in layers.items():
                ctx.cancel.check()  # a block of a large model takes long: stop between its layers too
                w = weight_matrix(module)
                q = quantize_hqq(w, params)
                dense = q.dequantize()
                rtn = quantize_rtn_dense(w, params.bits, params.group_size, symmetric=False)[1]
                squared["hqq"] += float((dense - w.float()).pow(2).sum())
                squared["rtn"] += float((rtn - w.float()).pow(2).sum())
                squared["weights"] += float(w.float().pow(2).sum())
                report = LayerReport(name, bits=params.bits, group_size=params.group_size, parameters=w.numel())
                ctx.replace_weight(name, module, dense.to(w.dtype), report, quant=q)
                del w, q, dense, rtn
                return_free_memory()  # each layer's temporaries, which the heap would otherwise keep to the block's end
        norm = max(squared["weights"], 1e-30) ** 0.5
        summary = {
            "bits": params.bits,
            "group_size": params.group_size,
            "zero_point": params.zero_point,
            "relative_error": squared["hqq"] ** 0.5 / norm,  # over all targeted weights
            "relative_error_rtn": squared["rtn"] ** 0.5 / norm,  # asymmetric RTN on the same grid, for comparison
        }
        return StepOutcome(ctx.reports, summary)
