"""Round-to-nearest (RTN) weight quantization: every weight rounded to the nearest point of a uniform
b-bit grid, one scale (and zero point) per output channel or per group of input columns. The baseline every
calibration-based quantizer (GPTQ, AWQ) is measured against."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:  # torch loads lazily: the window must open fast
    from torch import nn

from studio.core.context import StepContext
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.state import packed_size
from studio.core.structure import in_out_features, iter_layers, weight_matrix
from studio.methods.grid import quantize_rtn_dense

COMMON_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
RTN_WEIGHTS_PER_SECOND = 1.5e8  # bench/bench_engine.py measured 1.9e8 on an idle 2-core CPU; kept cautious


class RTNParams(MethodParams):
    bits: Annotated[int, Field(ge=2, le=8, description="Bits per weight (2-8).")] = 4
    group_size: Annotated[
        int, Field(ge=0, le=8192, description="Input columns sharing one scale; 0 = one scale per output channel.")
    ] = 128
    symmetric: Annotated[bool, Field(description="Symmetric grid around zero (no zero point) or asymmetric.")] = True


def group_size_problems(layers: dict[int, dict[str, nn.Module]], group_size: int) -> list[str]:
    """A sentence for the first layer whose input width the group size does not divide, naming sizes that fit."""
    if group_size == 0:
        return []
    widths = {name: in_out_features(m)[0] for name, m in iter_layers(layers)}
    bad = [(name, w) for name, w in widths.items() if w % group_size]
    if not bad:
        return []
    fits = [g for g in COMMON_GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    name, width = bad[0]
    others = f" and {len(bad) - 1} more layers" if len(bad) > 1 else ""
    return [
        f"field 'group_size': {group_size} does not divide the input width {width} of layer {name}{others}. "
        f"Group sizes that fit every targeted layer: {', '.join(map(str, fits)) or 'none of the usual ones'} "
        "(or 0 for one scale per output channel)."
    ]


@register
class RTN(Method):
    id = "rtn"
    title = "RTN weight quantization"
    family = Family.QUANTIZATION
    summary = "Round each weight to the nearest point of a per-channel or per-group b-bit grid."
    Params = RTNParams
    sweeps_weights_once = True

    def check(self, layers, params: RTNParams) -> list[str]:
        return group_size_problems(layers, params.group_size)

    def estimate(self, layers, params: RTNParams) -> Estimate:
        modules = [m for _, m in iter_layers(layers)]
        n = sum(m.weight.numel() for m in modules)
        # the compressed copy gets new dense weights plus packed codes; the original keeps its own
        extra = self.rewritten_bytes(modules, params)
        return Estimate(extra_bytes=extra, seconds=n / RTN_WEIGHTS_PER_SECOND)

    def stored_bytes(self, module, params: RTNParams) -> int:
        in_f, out_f = in_out_features(module)
        return packed_size(out_f, in_f, params.bits, params.group_size, params.symmetric)

    def apply(self, ctx: StepContext, params: RTNParams) -> StepOutcome:
        for _, layers in ctx.blocks():
            for name, module in layers.items():
                w = weight_matrix(module)
                q, dense = quantize_rtn_dense(w, params.bits, params.group_size, params.symmetric)
                report = LayerReport(name, bits=params.bits, group_size=params.group_size, parameters=w.numel())
                ctx.replace_weight(name, module, dense, report, quant=q)
        return StepOutcome(ctx.reports, {"bits": params.bits, "group_size": params.group_size})
