"""A working copy of a model that shares every weight with the original until a method replaces it.

A run compresses the copy. Methods give a layer a new tensor (`set_weight_matrix`) instead of writing into
the shared one, so the original stays intact for comparison, and a cancelled or failed run only has to drop
the copy. Memory grows by the layers actually changed, not by a second model."""

import copy

from torch import nn

from studio.core.state import STATE_ATTR


def clone_sharing_weights(model: nn.Module) -> nn.Module:
    memo: dict[int, object] = {}
    for param in set(model.parameters()):  # tied weights stay tied: one new Parameter per original one
        memo[id(param)] = nn.Parameter(param.data, requires_grad=param.requires_grad)
    for buf in model.buffers():
        memo[id(buf)] = buf
    if (state := getattr(model, STATE_ATTR, None)) is not None:  # records are immutable: share them
        memo[id(state)] = dict(state)
    hf_quantizer = getattr(model, "hf_quantizer", None)
    clone = copy.deepcopy(model, memo)
    if hf_quantizer is not None:
        clone.hf_quantizer = hf_quantizer
    return clone
