"""The uniform integer grid shared by the weight quantizers (RTN now; GPTQ, AWQ later).

Per group of input columns, asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale), the
range widened to include 0 so a zero weight stays exactly zero. Symmetric: the range is [-m, m] with
m = max|w| and the zero point fixed at 2^(b-1), the convention of the GPTQ reference quantizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from studio.core.state import QuantizedWeight

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch


def grid_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of `w` (rows are groups)."""
    import torch

    maxq = 2**bits - 1
    lo = w.min(dim=-1).values.clamp(max=0)
    hi = w.max(dim=-1).values.clamp(min=0)
    if symmetric:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (hi == 0) & (lo == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-lo / scale)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of `w` on the grid, rounded to nearest and clamped to [0, 2^b - 1]."""
    import torch

    return torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 2**bits - 1)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """Round every weight of the (out, in) matrix `w` to the nearest point of its group's grid."""
    import torch

    out_f, in_f = w.shape
    width = group_size or in_f
    groups = w.float().reshape(out_f, in_f // width, width)
    scale, zero = grid_params(groups, bits, symmetric)
    codes = quantize_to_grid(groups, scale, zero, bits)
    return QuantizedWeight(
        codes=codes.reshape(out_f, in_f).to(torch.uint8),
        scales=scale.to(w.dtype),
        zeros=zero.to(torch.uint8),
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )
