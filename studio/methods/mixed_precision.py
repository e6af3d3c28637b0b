"""Mixed precision: a per-layer sensitivity analysis, and bits per layer under a budget.

Sensitivity (in the spirit of HAWQ, Dong et al. 2019, with the layer-wise objective of GPTQ): quantizing layer
l alone at b bits changes its output by ΔW·X; its cost is the relative output error
e_l(b) = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with H = 2XXᵀ/n, computed from the calibration Hessian without running the
model again. Allocation: minimize Σ_l n_l·e_l(b_l) subject to Σ_l n_l·b_l ≤ B·Σ_l n_l (an average of B bits
per weight) or to a packed size in bytes: a greedy ascent from the lowest width that always buys the upgrade
with the largest error reduction per extra byte (exact for the convex error curves quantizers give). Then each
layer is quantized at its width by GPTQ (or RTN), block by block, as the GPTQ step would.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from studio.core.context import StepContext
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.state import packed_size
from studio.core.structure import in_out_features, iter_layers, weight_matrix
from studio.methods.gptq import GPTQParams, gptq_quantize
from studio.methods.hessian import collect_hessians, compress_stages_with_hessians
from studio.methods.grid import quantize_rtn_dense
from studio.methods.rtn import group_size_problems

if TYPE_CHECKING:
    import torch


class MixedPrecisionParams(MethodParams):
    min_bits: Annotated[int, Field(ge=2, le=8, description="Lowest width a layer may get.")] = 2
    max_bits: Annotated[int, Field(ge=2, le=8, description="Highest width a layer may get.")] = 8
    target_bits: Annotated[
        float, Field(ge=2, le=8, description="Average bits per weight of the targeted layers (codes, not scales).")
    ] = 3.5
    target_mb: Annotated[
        float, Field(ge=0, description="Packed size of the targeted layers in MiB, scales included; 0 = use target_bits.")
    ] = 0.0
    group_size: Annotated[int, Field(ge=0, le=8192, description="Input columns sharing one scale; 0 = per channel.")] = 64
    symmetric: Annotated[bool, Field(description="Symmetric grid around zero or asymmetric.")] = False
    quantizer: Annotated[Literal["gptq", "rtn"], Field(description="How each layer is quantized at its width.")] = "gptq"
    damp: Annotated[float, Field(gt=0, le=1, description="GPTQ dampening.")] = 0.01

    @model_validator(mode="after")
    def _range(self):
        if self.min_bits > self.max_bits:
            raise ValueError("min_bits must not exceed max_bits")
        if not self.target_mb and not self.min_bits <= self.target_bits <= self.max_bits:
            raise ValueError("target_bits must lie between min_bits and max_bits")
        return self


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖², from H = 2XXᵀ/n alone."""
    delta = (w - w_hat).float()
    w = w.float()
    return float(((delta @ hessian) * delta).sum() / ((w @ hessian) * w).sum().clamp_min(1e-30))


def allocate_bits(
    sizes: dict[str, dict[int, int]], errors: dict[str, dict[int, float]], weights: dict[str, int], budget: int
) -> dict[str, int]:
    """Bits per layer minimizing Σ weights·error under Σ sizes ≤ budget (sizes in any unit, e.g. bits or bytes).
    Greedy: start every layer at its narrowest width, then repeatedly take the upgrade (to any wider width) with
    the best error drop per unit of size while it fits. Raises ValueError if even the narrowest widths do not fit."""
    choice = {name: min(widths) for name, widths in sizes.items()}
    used = sum(sizes[name][b] for name, b in choice.items())
    if used > budget:
        raise ValueError(f"even {min(min(w) for w in sizes.values())} bits everywhere takes {used} > {budget}")

    def best_upgrade(name):
        """(−error drop per unit of size, layer, from, to) of the layer's best upgrade that fits, or None."""
        now = choice[name]
        options = [
            (-weights[name] * (errors[name][now] - errors[name][b]) / extra, name, now, b)
            for b in sizes[name]
            if b > now and 0 < (extra := sizes[name][b] - sizes[name][now]) <= budget - used
            and errors[name][b] < errors[name][now]
        ]
        return min(options, default=None)

    heap = [u for name in choice if (u := best_upgrade(name))]
    heapq.heapify(heap)
    while heap:
        _, name, now, b = heapq.heappop(heap)
        if choice[name] != now:  # stale: the layer moved since this entry was pushed
            continue
        extra = sizes[name][b] - sizes[name][now]
        if extra <= budget - used:
            used += extra
            choice[name] = b
        if (u := best_upgrade(name)) is not None:  # a narrower one may still fit when this did not
            heapq.heappush(heap, u)
    return choice


@register
class MixedPrecision(Method):
    id = "mixed_precision"
    title = "Mixed-precision quantization"
    family = Family.QUANTIZATION
    summary = "Measure each layer's sensitivity at every width, then give bits where they matter most under a budget."
    needs_calibration = True
    Params = MixedPrecisionParams

    def check(self, layers, params: MixedPrecisionParams) -> list[str]:
        return group_size_problems(layers, params.group_size)

    def estimate(self, layers, params: MixedPrecisionParams) -> Estimate:
        widths = [in_out_features(m) for _, m in iter_layers(layers)]
        extra = sum(i * o * 4 + packed_size(o, i, params.max_bits, params.group_size, params.symmetric)
                    for i, o in widths) + max((i * i * 4 * 3 for i, _ in widths), default=0)
        candidates = params.max_bits - params.min_bits + 1
        seconds = sum(i * o for i, o in widths) * candidates / 5e7 + sum(i * i * o for i, o in widths) / 2e9
        return Estimate(extra_bytes=extra, seconds=seconds)

    def stored_bytes(self, module, params: MixedPrecisionParams) -> int:
        in_f, out_f = in_out_features(module)
        bits = params.target_bits
        whole = packed_size(out_f, in_f, 8, params.group_size, params.symmetric)
        return int(whole - out_f * in_f * (8 - bits) / 8)

    def stored_bytes_by_layer(self, modules, params: MixedPrecisionParams) -> dict[str, int]:
        """With `target_mb` the allocation spends at most that many bytes over the layers: split here by weights."""
        if not params.target_mb:
            return super().stored_bytes_by_layer(modules, params)
        total = sum(m.weight.numel() for m in modules.values()) or 1
        budget = int(params.target_mb * 2**20)
        return {name: budget * m.weight.numel() // total for name, m in modules.items()}

    def _sensitivities(self, ctx: StepContext, params: MixedPrecisionParams):
        errors: dict[str, dict[int, float]] = {}
        for block_pass in ctx.layerwise():  # the block is not changed here, so each is run once
            hessians = collect_hessians(block_pass, keep_outputs=True)
            for name, module in block_pass.layers.items():
                w = weight_matrix(module)
                h = hessians[name].hessian
                errors[name] = {
                    b: relative_output_error(w, quantize_rtn_dense(w, b, params.group_size, params.symmetric)[1], h)
                    for b in range(params.min_bits, params.max_bits + 1)
                }
        return errors

    def apply(self, ctx: StepContext, params: MixedPrecisionParams) -> StepOutcome:
        errors = self._sensitivities(ctx, params)
        shapes = {name: in_out_features(m) for name, m in iter_layers(ctx.layers)}
        widths = range(params.min_bits, params.max_bits + 1)
        weights = {name: i * o for name, (i, o) in shapes.items()}
        if params.target_mb:
            sizes = {name: {b: packed_size(o, i, b, params.group_size, params.symmetric) for b in widths}
                     for name, (i, o) in shapes.items()}
            budget = int(params.target_mb * 2**20)
        else:
            sizes = {name: {b: n * b for b in widths} for name, n in weights.items()}
            budget = int(params.target_bits * sum(weights.values()))
        try:
            bits = allocate_bits(sizes, errors, weights, budget)
        except ValueError as exc:
            from studio.core.errors import RecipeError

            raise RecipeError(f"step {ctx.index + 1} (mixed_precision): the budget is too small: {exc}.") from None

        def quantize(name: str, module, hessian=None) -> None:
            w = weight_matrix(module)
            if hessian is not None:
                gptq = GPTQParams(bits=bits[name], group_size=params.group_size, symmetric=params.symmetric,
                                  damp=params.damp)
                result = gptq_quantize(w, hessian, gptq)
                quant, new = result.quant, result.weight
            else:
                quant, new = quantize_rtn_dense(w, bits[name], params.group_size, params.symmetric)
            report = LayerReport(name, bits=bits[name], group_size=params.group_size, parameters=w.numel())
            ctx.replace_weight(name, module, new, report, quant=quant)

        if params.quantizer == "rtn":
            for _, layers in ctx.blocks():
                for name, module in layers.items():
                    quantize(name, module)
        else:  # stage by stage, as the GPTQ step does; a layer no calibration token reached is rounded (RTN)
            def compress(block_pass, stage, accumulator):
                for name in stage:
                    quantize(name, block_pass.layers[name], accumulator.hessian)

            modules = dict(iter_layers(ctx.layers))
            for name in compress_stages_with_hessians(ctx, compress):
                quantize(name, modules[name])

        total = sum(weights.values())
        average = sum(weights[n] * b for n, b in bits.items()) / total
        table = [{"layer": n, "parameters": weights[n], "bits": bits[n],
                  "error": {str(b): e for b, e in errors[n].items()}} for n in errors]
        histogram = {str(b): sum(1 for v in bits.values() if v == b) for b in widths}
        summary = {"average_bits": average, "layers_per_width": histogram, "quantizer": params.quantizer,
                   "sensitivity": table}
        return StepOutcome(ctx.reports, summary)
