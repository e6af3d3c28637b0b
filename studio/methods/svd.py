"""Truncated SVD: the best rank-k approximation of a weight in the Frobenius norm (Eckart & Young 1936),
W ≈ U_k Σ_k V_kᵀ, stored as the two thin layers U_k Σ_k^½ and Σ_k^½ V_kᵀ.

It knows nothing of the inputs, so it minimizes ‖W − W'‖ rather than the error of the layer's output ‖(W − W')X‖,
which is why the activation-aware methods (ASVD, SVD-LLM) lose far less at the same rank. No calibration needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

from studio.core.registry import Family, register
from studio.core.structure import weight_matrix
from studio.methods.low_rank import LowRankMethod, LowRankParams, Truncation, truncate


@register
class TruncatedSVD(LowRankMethod):
    id = "svd"
    title = "Truncated SVD (low-rank)"
    family = Family.COMPACT_ARCHITECTURE
    summary = "Replace each Linear by two thin ones from the weight's truncated SVD; no calibration."
    Params = LowRankParams

    def factor(self, module: nn.Module, statistics, params: LowRankParams) -> Truncation | None:
        w = weight_matrix(module).double()
        return truncate(w, tuple(w.shape), params, unscale_right=lambda right: right)
