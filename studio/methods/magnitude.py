"""Magnitude pruning: zero the weights of smallest |w|, the classic baseline of the pruning literature
(Han et al. 2015, "Learning both Weights and Connections").

- unstructured, per layer: each layer loses exactly round(sparsity * size) weights;
- unstructured, global: one threshold over all targeted layers, so layers lose different fractions;
- N:M semi-structured: in every group of M consecutive input weights of a row, the N largest survive
  (2:4 is what sparse tensor cores accelerate).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

from studio.core.context import StepContext
from studio.core.registry import Estimate, Family, LayerReport, Method, MethodParams, StepOutcome, register
from studio.core.structure import in_out_features, iter_layers, weight_matrix

PRUNE_WEIGHTS_PER_SECOND = 5e7


class MagnitudeParams(MethodParams):
    sparsity: Annotated[
        float, Field(ge=0.0, lt=1.0, description="Fraction of weights set to zero (unstructured patterns only).")
    ] = 0.5
    pattern: Annotated[
        Literal["unstructured", "2:4", "4:8"],
        Field(description="Unstructured, or N:M: N weights kept in every M consecutive inputs."),
    ] = "unstructured"
    scope: Annotated[
        Literal["layer", "global"],
        Field(description="Unstructured threshold per layer, or one threshold across all targeted layers."),
    ] = "layer"


def nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True for the n largest |w| in every group of m consecutive columns of each row."""
    import torch

    out_f, in_f = w.shape
    groups = w.abs().reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def layer_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """False for exactly round(sparsity * numel) weights of smallest |w|."""
    import torch

    k = round(sparsity * w.numel())
    keep = torch.ones(w.numel(), dtype=torch.bool)
    if k:
        keep[w.abs().flatten().topk(k, largest=False).indices] = False
    return keep.reshape(w.shape)


def pattern_problems(layers: dict[int, dict[str, nn.Module]], pattern: str) -> list[str]:
    """A sentence for the first layer whose input width an N:M pattern's M does not divide."""
    if pattern == "unstructured":
        return []
    m = int(pattern.split(":")[1])
    for name, module in iter_layers(layers):
        width = in_out_features(module)[0]
        if width % m:
            return [f"field 'pattern': {pattern} needs input widths divisible by {m}; layer {name} has {width}."]
    return []


def global_threshold(weights: list[torch.Tensor], sparsity: float) -> float:
    import torch

    magnitudes = torch.cat([w.abs().flatten().float() for w in weights])
    k = round(sparsity * magnitudes.numel())
    return magnitudes.kthvalue(k).values.item() if k else -1.0


@register
class MagnitudePruning(Method):
    id = "magnitude"
    title = "Magnitude pruning"
    family = Family.PRUNING
    summary = "Zero the smallest weights: unstructured (per layer or global) or N:M such as 2:4."
    Params = MagnitudeParams
    sweeps_weights_once = True

    def check(self, layers, params: MagnitudeParams) -> list[str]:
        return pattern_problems(layers, params.pattern)

    def estimate(self, layers, params: MagnitudeParams) -> Estimate:
        weights = [m.weight for _, m in iter_layers(layers)]
        n = sum(w.numel() for w in weights)
        extra = sum(w.numel() * (w.element_size() + 1) for w in weights)  # new weights and bool masks
        if params.scope == "global" and params.pattern == "unstructured":
            extra += n * 4  # all magnitudes at once to find the threshold
        return Estimate(extra_bytes=extra, seconds=n / PRUNE_WEIGHTS_PER_SECOND)

    def apply(self, ctx: StepContext, params: MagnitudeParams) -> StepOutcome:
        threshold = None
        if params.pattern == "unstructured" and params.scope == "global":
            all_weights = [weight_matrix(m) for _, m in iter_layers(ctx.layers)]
            threshold = global_threshold(all_weights, params.sparsity)
            del all_weights
        for _, layers in ctx.blocks():
            for name, module in layers.items():
                w = weight_matrix(module)
                if params.pattern != "unstructured":
                    n, m = map(int, params.pattern.split(":"))
                    mask = nm_mask(w, n, m)
                elif threshold is not None:
                    mask = w.abs() > threshold
                else:
                    mask = layer_mask(w, params.sparsity)
                pruned = w * mask
                report = LayerReport(name, sparsity=1 - mask.float().mean().item(), parameters=w.numel())
                ctx.replace_weight(name, module, pruned, report, mask=mask, sparsity_pattern=params.pattern)
        total = sum(r.parameters for r in ctx.reports)
        overall = sum(r.sparsity * r.parameters for r in ctx.reports) / max(total, 1)
        return StepOutcome(ctx.reports, {"pattern": params.pattern, "sparsity": overall})
