"""SVD-LLM: truncation-aware data whitening (Wang, Zheng, Zhang & Zhang 2024, "SVD-LLM: Truncation-aware Singular
Value Decomposition for Large Language Model Compression").

With X (in, n) the layer's calibration inputs, let S be the Cholesky factor of their Gram matrix, S Sᵀ = X Xᵀ
(section 3.1). S⁻¹ whitens the inputs (S⁻¹X has orthonormal rows), and for W S = U Σ Vᵀ truncating the i-th
singular value costs exactly σ_i of output error ‖(W − W')X‖_F (Theorem 3.2), so dropping the smallest
singular values is the least loss, unlike ASVD's scaling. The compressed weight is W' = U_k Σ_k V_kᵀ S⁻¹, stored as
up = U_k Σ_k^½ and down = Σ_k^½ V_kᵀ S⁻¹ (eq. 6). A Gram matrix that is only semi-definite (a channel that never
fires, fewer tokens than channels) is dampened by λ·mean(diag) until its Cholesky factor exists, as GPTQ dampens
its Hessian. The paper's optional LoRA update of the factors after truncation is the studio's distillation step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:
    import torch
    from torch import nn

from studio.core.registry import Family, register
from studio.core.structure import weight_matrix
from studio.methods.hessian import HessianAccumulator, collect_hessians
from studio.methods.low_rank import LowRankMethod, LowRankParams, Truncation, truncate


class SVDLLMParams(LowRankParams):
    damp: Annotated[
        float, Field(ge=0.0, le=1.0, description="Dampening λ added as λ·mean(diag) to the Gram matrix if needed.")
    ] = 1e-6


def whitening_factor(gram: torch.Tensor, damp: float, attempts: int = 8) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = G (+ λ·mean(diag G)·I when G alone is not positive definite)."""
    import torch

    g = gram.double()
    scale = g.diagonal().mean().clamp_min(1e-300)
    identity = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    lam = 0.0
    for _ in range(attempts):
        factor, info = torch.linalg.cholesky_ex(g + lam * scale * identity)
        if info == 0:
            return factor
        lam = damp if lam == 0 else lam * 10
    raise ValueError(f"the layer's input Gram matrix is not positive definite even with dampening {lam / 10:g}; "
                     "use more calibration samples or longer ones")


@register
class SVDLLM(LowRankMethod):
    id = "svd_llm"
    title = "SVD-LLM (whitened low-rank)"
    family = Family.COMPACT_ARCHITECTURE
    summary = "Truncated SVD after whitening the inputs with their Gram matrix's Cholesky factor. Needs calibration."
    needs_calibration = True
    Params = SVDLLMParams

    def observe(self, block) -> dict[str, HessianAccumulator]:
        return collect_hessians(block)  # 2 X Xᵀ / n: a positive multiple of the Gram matrix, the same whitening

    def factor(self, module: nn.Module, statistics: HessianAccumulator, params: SVDLLMParams) -> Truncation | None:
        import torch

        w = weight_matrix(module).double()
        s = whitening_factor(statistics.hessian.to(w.device), params.damp)

        def unwhiten(right: torch.Tensor) -> torch.Tensor:  # right · S⁻¹, solving Z S = right
            return torch.linalg.solve_triangular(s, right, upper=False, left=False)

        return truncate(w @ s, tuple(w.shape), params, unscale_right=unwhiten)
