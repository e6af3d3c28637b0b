"""LoRA adapters (Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang & Chen 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"), used by distillation to train a compressed model with few parameters.

A frozen weight W (out, in) is adapted as (eq. 3)

    W' = W + (alpha / r) · B A,    A: (r, in), B: (out, r),

A initialized randomly (Kaiming-uniform) and B at zero, so training starts from the unchanged model (Sec. 4.1).
Only A and B train. At the end the product is merged into W, leaving a plain linear layer with no extra cost.

A layer with a sparsity mask M gets the masked update (alpha / r) · (B A) ⊙ M: the merged weight keeps its zeros,
and the adapted layer computes during training exactly what the merged layer computes afterwards.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from studio.core.structure import weight_matrix

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn


class LoraAdapter:
    """A (r, in) and B (out, r) beside a linear layer; a forward hook adds the update to the layer's output."""

    def __init__(self, module: nn.Module, rank: int, alpha: float, mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        import torch

        out_f, in_f = weight_matrix(module).shape
        device = module.weight.device
        bound = 1 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)), the nn.Linear default the paper's code uses
        a = (torch.rand(rank, in_f, generator=generator) * 2 - 1) * bound
        self.a = torch.nn.Parameter(a.to(device))
        self.b = torch.nn.Parameter(torch.zeros(out_f, rank, device=device))
        self.scale = alpha / rank
        self.mask = mask
        self._handle = module.register_forward_hook(self._add_update)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.a, self.b]

    def delta(self) -> torch.Tensor:
        """(alpha / r) · B A as an (out, in) matrix, masked when the layer is sparse."""
        update = self.scale * (self.b @ self.a)
        return update if self.mask is None else update * self.mask

    def _add_update(self, module, args, output):
        x = args[0].to(self.a.dtype)
        if self.mask is None:  # never forms the (out, in) product: two thin matmuls
            update = (x @ self.a.t()) @ self.b.t() * self.scale
        else:
            update = x @ self.delta().t()
        return output + update.to(output.dtype)

    def merged_weight(self, module: nn.Module) -> torch.Tensor:
        """W + (alpha / r) · B A in the layer's dtype, as (out, in); zeros of the mask stay exactly zero."""
        import torch

        with torch.no_grad():
            w = weight_matrix(module)
            merged = (w.float() + self.delta().float()).to(w.dtype)
            return merged if self.mask is None else merged * self.mask

    def remove(self) -> None:
        self._handle.remove()


def lora_parameter_count(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)
