"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning
Approach for Large Language Models").

Each weight is scored by its magnitude times the norm of the input feature it multiplies (eq. 1):

    S_ij = |W_ij| · ‖X_j‖₂,

with ‖X_j‖₂ the l2 norm of input feature j over every calibration token. Weights are compared within each
output row (the paper's per-output comparison group): a row loses its round(sparsity · in) lowest scores, or,
for N:M, every group of M consecutive inputs of a row keeps its N highest scores. The kept weights are not
updated. Blocks are pruned in order, each observed on the inputs the already pruned blocks give it.
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
from studio.core.calibration import CPU_FLOPS_PER_SECOND, DEFAULT_CALIBRATION_TOKENS
from studio.methods.magnitude import nm_mask, pattern_problems



class PruningParams(MethodParams):
    sparsity: Annotated[
        float, Field(ge=0.0, le=0.99, description="Fraction of weights set to zero (unstructured pattern only).")
    ] = 0.5
    pattern: Annotated[
        Literal["unstructured", "2:4", "4:8"],
        Field(description="Unstructured, or N:M: N weights kept in every M consecutive inputs."),
    ] = "unstructured"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an "N:M" pattern; None for unstructured."""
    if pattern == "unstructured":
        return None
    n, m = pattern.split(":")
    return int(n), int(m)


def default_calibration_tokens() -> int:
    """Tokens of the default calibration section, for estimates made before the recipe's data is read."""
    return DEFAULT_CALIBRATION_TOKENS


def calibration_pass_seconds(layers: dict[int, dict[str, nn.Module]]) -> float:
    """Time of running every targeted block twice over the calibration tokens (observe, then propagate)."""
    weights = sum(m.weight.numel() for _, m in iter_layers(layers))
    return 2 * 2 * default_calibration_tokens() * weights / CPU_FLOPS_PER_SECOND


def pruned_copy_bytes(layers: dict[int, dict[str, nn.Module]]) -> int:
    """New dense weights and their bool masks for every targeted layer."""
    return sum(m.weight.numel() * (m.weight.element_size() + 1) for _, m in iter_layers(layers))


def wanda_scores(w: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """S = |W| · ‖X_j‖₂, the norm broadcast along each input column."""
    return w.abs().float() * input_norms[None, :].float()


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """False for the round(sparsity · in) lowest scores of every row."""
    import torch

    pruned_per_row = round(sparsity * scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if pruned_per_row:
        lowest = scores.topk(pruned_per_row, dim=1, largest=False).indices
        keep.scatter_(1, lowest, False)
    return keep


def wanda_mask(w: torch.Tensor, input_norms: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """The kept weights (True) of a layer with weight `w` (out, in) and input column norms `input_norms` (in)."""
    scores = wanda_scores(w, input_norms)
    nm = parse_pattern(pattern)
    return row_mask(scores, sparsity) if nm is None else nm_mask(scores, *nm)


class InputNorms:
    """Running sum of squares of each input feature over the calibration tokens; ‖X_j‖₂ is its square root."""

    def __init__(self) -> None:
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        batch = x.float().pow(2).sum(dim=0)
        self.squares = batch if self.squares is None else self.squares + batch

    def norms(self) -> torch.Tensor:
        return self.squares.sqrt()


@register
class Wanda(Method):
    id = "wanda"
    title = "Wanda pruning"
    family = Family.PRUNING
    summary = "Zero the weights of smallest |weight| × input norm in each output row: unstructured or N:M."
    needs_calibration = True
    Params = PruningParams

    def check(self, layers, params: PruningParams) -> list[str]:
        return pattern_problems(layers, params.pattern)

    def estimate(self, layers, params: PruningParams) -> Estimate:
        norms = sum(in_out_features(m)[0] * 4 for _, m in iter_layers(layers))
        return Estimate(extra_bytes=pruned_copy_bytes(layers) + norms, seconds=calibration_pass_seconds(layers))

    def apply(self, ctx: StepContext, params: PruningParams) -> StepOutcome:
        for block in ctx.layerwise():
            inputs = {name: InputNorms() for name in block.layers}
            block.observe_inputs(lambda name, x: inputs[name].add(x))
            for name, module in block.layers.items():
                ctx.cancel.check()
                w = weight_matrix(module)
                mask = wanda_mask(w, inputs.pop(name).norms(), params.sparsity, params.pattern)
                report = LayerReport(name, sparsity=1 - mask.float().mean().item(), parameters=w.numel())
                ctx.replace_weight(name, module, w * mask, report, mask=mask, sparsity_pattern=params.pattern)
        return StepOutcome(ctx.reports, summary(ctx.reports, params.pattern))


def summary(reports: list[LayerReport], pattern: str) -> dict:
    total = sum(r.parameters for r in reports)
    overall = sum(r.sparsity * r.parameters for r in reports) / max(total, 1)
    return {"pattern": pattern, "sparsity": overall}
