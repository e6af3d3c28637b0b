"""ASVD: activation-aware SVD (Yuan, Shang, Song, Wu, Yan & Sun 2023, "ASVD: Activation-aware Singular Value
Decomposition for Compressing Large Language Models").

Input channels with large activations matter more to the output, so the weight's columns are scaled by them before
the decomposition (section 3.2): S = diag(s) with s_j = (mean_n |X_nj|)^α, the mean absolute activation of input
channel j over the calibration tokens, α = 0.5 by default. Then W S = U Σ Vᵀ is truncated to rank k and the scale
is taken back out of the right factor: W' = U_k Σ_k V_kᵀ S⁻¹ (eq. 4-5). The paper also searches a rank per layer
from each layer's perplexity sensitivity; here the rank follows the studio's parameter budget or energy rule
(studio.methods.low_rank), the same for every method, so the three compare at the same size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:
    import torch
    from torch import nn

from studio.core.registry import Family, register
from studio.core.structure import weight_matrix
from studio.methods.low_rank import LowRankMethod, LowRankParams, Truncation, truncate

SMALLEST_SCALE = 1e-6  # an input channel that never fired gets this scale instead of a division by zero


class ASVDParams(LowRankParams):
    alpha: Annotated[
        float, Field(ge=0.0, le=2.0, description="Exponent α of the activation scale (mean |x|)^α; 0 = plain SVD.")
    ] = 0.5


class MeanAbsoluteInput:
    """Running mean over calibration tokens of |x_j| for every input channel j."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        batch = x.double().abs().sum(dim=0)
        self.total = batch if self.total is None else self.total + batch
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def activation_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = (mean |X_j|)^α."""
    return mean_abs.clamp_min(SMALLEST_SCALE).pow(alpha)


@register
class ASVD(LowRankMethod):
    id = "asvd"
    title = "ASVD (activation-aware low-rank)"
    family = Family.COMPACT_ARCHITECTURE
    summary = "Truncated SVD of the weight scaled by mean |activation| per input channel. Needs calibration text."
    needs_calibration = True
    Params = ASVDParams

    def observe(self, block) -> dict[str, MeanAbsoluteInput]:
        means = {name: MeanAbsoluteInput() for name in block.layers}
        block.observe_inputs(lambda name, x: means[name].add(x))
        return means

    def factor(self, module: nn.Module, statistics: MeanAbsoluteInput, params: ASVDParams) -> Truncation | None:
        w = weight_matrix(module).double()
        scale = activation_scale(statistics.mean().to(w.device), params.alpha)
        return truncate(w * scale[None, :], tuple(w.shape), params, unscale_right=lambda right: right / scale[None, :])
