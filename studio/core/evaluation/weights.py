"""Weight histograms of one layer before and after compression, on shared bin edges so the two compare."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the decoder blocks, in model order (what the layer combo lists)."""
    from studio.core.structure import TargetSpec, iter_layers, target_layers

    return [name for name, _ in iter_layers(target_layers(model, TargetSpec()))]


def weight_histogram(original: nn.Module, compressed: nn.Module, bins: int = 100) -> dict[str, Any]:
    """Counts of the two layers' weights over `bins` equal bins spanning both; `edges` has bins + 1 values.
    Also the fraction of exact zeros and the number of distinct values of each (a quantized layer has few)."""
    import torch

    from studio.core.structure import weight_matrix

    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    with torch.no_grad():
        before = weight_matrix(original).detach().float().flatten().cpu()
        after = weight_matrix(compressed).detach().float().flatten().cpu()
        lo = float(torch.minimum(before.min(), after.min()))
        hi = float(torch.maximum(before.max(), after.max()))
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, bins + 1)
        return {
            "edges": edges.tolist(),
            "before": torch.histc(before, bins, lo, hi).long().tolist(),
            "after": torch.histc(after, bins, lo, hi).long().tolist(),
            "zeros_before": float((before == 0).float().mean()),
            "zeros_after": float((after == 0).float().mean()),
            "distinct_before": int(before.unique().numel()),
            "distinct_after": int(after.unique().numel()),
        }


def layer_histograms(original: nn.Module, compressed: nn.Module, name: str, bins: int = 100) -> dict[str, Any]:
    """`weight_histogram` of the layer called `name` in both models."""
    before = dict(original.named_modules()).get(name)
    after = dict(compressed.named_modules()).get(name)
    if before is None or after is None:
        raise KeyError(f"no layer named '{name}' in both models")
    return weight_histogram(before, after, bins) | {"layer": name}
