"""SparseGPT: one-shot pruning with Optimal Brain Surgeon updates (Frantar & Alistarh 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot").

Per linear layer, the pruned weight Ŵ should keep the layer's output on calibration inputs X: minimise
‖WX − ŴX‖² under the mask, whose Hessian is H = 2XXᵀ/n (studio.methods.hessian). Algorithm 1 of the paper:

- U is the upper Cholesky factor of the dampened (H + λI)⁻¹. Row j of U holds what OBS needs once columns
  < j are fixed: [H_F⁻¹]_jj = U_jj² and the update direction U[j, j:] (section 3.2, "Hessian synchronisation").
- Adaptive mask selection (section 3.3): at the start of every block of B columns, the block's weights with the
  smallest OBS error w_m² / [H⁻¹]_mm = w_m² / U_mm² are pruned, p% of the whole block (all rows); for N:M, at
  the first column of every group of M, each row prunes the M − N smallest errors of that group.
- Column by column inside the block, the pruned weights' error err = w_j / U_jj (zero where kept) is spread
  over the later columns of the block: W[:, j+1:] −= err · U[j, j+1:] (the OBS update, eq. 3).
- Lazy batch updates (section 3.4): the errors of the whole block reach the later blocks in one matrix product,
  W[:, end:] −= Err · U[block, end:].

Blocks of the model are pruned in order, each observed on the inputs the already pruned blocks give it, and
inside a block the layers are pruned in the order the block calls them, each seeing the inputs the layers before
it give once pruned (GPTQ's "true sequential" order; layers reading the same input, q/k/v, share one Hessian).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch

from studio.core.context import StepContext
from studio.core.errors import RecipeError
from studio.core.registry import Estimate, Family, LayerReport, Method, StepOutcome, register
from studio.core.structure import in_out_features, iter_layers, weight_matrix
from studio.methods.hessian import (
    HessianAccumulator,
    InverseHessian,
    compress_stages_with_hessians,
    inverse_hessian_cholesky,
    warn_unreached,
)
from studio.methods.magnitude import nm_mask
from studio.methods.wanda import (
    CPU_FLOPS_PER_SECOND,
    PruningParams,
    calibration_pass_seconds,
    default_calibration_tokens,
    parse_pattern,
    pattern_problems,
    pruned_copy_bytes,
    summary,
)


class SparseGPTParams(PruningParams):
    block_size: Annotated[
        int, Field(ge=1, le=8192, description="Columns pruned together: one mask choice and one lazy batch update.")
    ] = 128
    damp: Annotated[
        float, Field(gt=0.0, le=1.0, description="Dampening added to the Hessian diagonal, as a fraction of its mean.")
    ] = 0.01


def block_mask(w: torch.Tensor, u_diagonal: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Kept weights (True) of a block of columns: round(sparsity · size) smallest w² / U_mm² are pruned."""
    import torch

    errors = (w / u_diagonal[None, :]).pow(2).flatten()
    keep = torch.ones_like(errors, dtype=torch.bool)
    pruned = round(sparsity * errors.numel())
    if pruned:
        keep[errors.topk(pruned, largest=False).indices] = False
    return keep.reshape(w.shape)


def prune_block(w: torch.Tensor, u: torch.Tensor, sparsity: float, nm: tuple[int, int] | None):
    """Prune a block of columns `w` in place, `u` being U restricted to those columns; returns (kept mask, errors)."""
    import torch

    d = u.diagonal()
    keep = block_mask(w, d, sparsity) if nm is None else torch.ones_like(w, dtype=torch.bool)
    errors = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if nm is not None and j % nm[1] == 0:
            group = slice(j, j + nm[1])
            keep[:, group] = nm_mask(w[:, group] / d[group], *nm)  # ranks |w|/U_mm, the same order as w²/U_mm²
        errors[:, j] = w[:, j] * ~keep[:, j] / d[j]  # zero where the weight is kept
        w[:, j + 1 :].addr_(errors[:, j], u[j, j + 1 :], alpha=-1)
        w[:, j] *= keep[:, j]
    return keep, errors


def sparsegpt_prune(
    w: torch.Tensor, inverse: InverseHessian, sparsity: float, nm: tuple[int, int] | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 on a weight (out, in) given the Cholesky factor of its inverse Hessian: (pruned W, kept mask)."""
    import torch

    w = w.float().clone()
    w[:, inverse.dead] = 0  # inputs never active: their weights do not reach the calibrated output
    u = inverse.upper
    keep = torch.ones_like(w, dtype=torch.bool)
    columns = w.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        keep[:, start:end], errors = prune_block(block, u[start:end, start:end], sparsity, nm)
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
    return w, keep


def hessian_flops(out_features: int, in_features: int, block_size: int) -> float:
    """Accumulating H, inverting it, and the OBS updates inside and across blocks."""
    tokens = default_calibration_tokens()
    return 2 * tokens * in_features**2 + 2 * in_features**3 + 2 * out_features * in_features * (block_size + in_features / 2)


@register
class SparseGPT(Method):
    id = "sparsegpt"
    title = "SparseGPT pruning"
    family = Family.PRUNING
    summary = "Prune with Hessian-aware mask selection and OBS updates of the remaining weights: unstructured or N:M."
    needs_calibration = True
    Params = SparseGPTParams

    def check(self, layers, params: SparseGPTParams) -> list[str]:
        return pattern_problems(layers, params.pattern)

    def estimate(self, layers, params: SparseGPTParams) -> Estimate:
        hessians = max((sum(in_out_features(m)[0] ** 2 * 4 * 3 for m in block.values()) for block in layers.values()),
                       default=0)  # H, its inverse and U of each layer of the block being pruned
        flops = sum(hessian_flops(*in_out_features(m)[::-1], params.block_size) for _, m in iter_layers(layers))
        return Estimate(extra_bytes=pruned_copy_bytes(layers) + hessians,
                        seconds=calibration_pass_seconds(layers) + flops / CPU_FLOPS_PER_SECOND)

    def apply(self, ctx: StepContext, params: SparseGPTParams) -> StepOutcome:
        nm = parse_pattern(params.pattern)

        def prune(block_pass, names: tuple[str, ...], hessian: HessianAccumulator):
            inverse = self.inverse_hessian(ctx, names[0], hessian, params.damp)  # one input, one inverse
            for name in names:
                ctx.cancel.check()
                module = block_pass.layers[name]
                w = weight_matrix(module)
                pruned, mask = sparsegpt_prune(w, inverse, params.sparsity, nm, params.block_size)
                report = LayerReport(name, sparsity=1 - mask.float().mean().item(), parameters=w.numel())
                ctx.replace_weight(name, module, pruned.to(w.dtype), report, mask=mask, sparsity_pattern=params.pattern)

        warn_unreached(ctx, compress_stages_with_hessians(ctx, prune), "dense")
        return StepOutcome(ctx.reports, summary(ctx.reports, params.pattern))

    @staticmethod
    def inverse_hessian(ctx: StepContext, name: str, hessian: HessianAccumulator, damp: float) -> InverseHessian:
        try:
            inverse = inverse_hessian_cholesky(hessian.hessian, damp)
        except ValueError as exc:
            raise RecipeError(f"sparsegpt, layer {name}: {exc}.") from None
        if inverse.raised:
            ctx.warn(f"sparsegpt: the Hessian dampening was raised to {inverse.damp:g} for layer {name}, whose "
                     "inputs are nearly linearly dependent on the calibration text")
        return inverse
