"""What a recipe should leave behind, before it runs: the model's predicted compressed size.

Each targeted layer's weight takes what the last step touching it says (`Method.stored_bytes`: packed codes
and scales for a quantizer, dense for pruning); everything else keeps its current size."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads lazily: the window must open fast
    from torch import nn

from studio.core.recipe import ValidatedStep
from studio.core.structure import iter_layers, target_layers
from studio.core.summary import unique_tensors


def dense_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_tensors(model))


def predict_compressed_bytes(steps: list[ValidatedStep], model: nn.Module) -> int:
    """Bytes of the model's compressed form after `steps` (validated, enabled, in order)."""
    stored: dict[str, tuple[nn.Module, int]] = {}
    for vs in steps:
        if not vs.method.changes_weights:
            continue
        modules = dict(iter_layers(target_layers(model, vs.step.targets)))
        for name, size in vs.method.stored_bytes_by_layer(modules, vs.params).items():
            stored[name] = (modules[name], size)
    change = sum(size - m.weight.numel() * m.weight.element_size() for m, size in stored.values())
    return dense_bytes(model) + change
