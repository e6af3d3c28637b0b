"""Simulated dynamic per-token activation quantization, the "A8" of SmoothQuant's W8A8 (Xiao et al. 2022,
"SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models", §2: per-token
quantization, scales computed at run time).

Every row x of a layer's input (one token) is rounded to a symmetric b-bit integer grid with its own step
Δ = max|x| / (2^(b-1) - 1) and dequantized at once, so the layer computes with exactly the values an integer
kernel would see. The rounding runs in a forward pre-hook on the layer; the layer is marked with the
`studio_input_quant` attribute so reports and exporters can find it. Both the hook (a module-level function)
and the mark are copied by `copy.deepcopy`, and live on the working copy's modules only, so the original
model evaluates as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when used, so listing the methods does not load torch
    import torch
    from torch import nn

INPUT_QUANT_ATTR = "studio_input_quant"


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round each row (last dimension) of `x` to its own symmetric `bits` grid and dequantize."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    values = x.float()
    step = values.abs().amax(dim=-1, keepdim=True) / qmax
    step = torch.where(step == 0, torch.ones_like(step), step)  # an all-zero row stays zero
    return (torch.clamp(torch.round(values / step), -qmax - 1, qmax) * step).to(x.dtype)


def _quantize_layer_input(module: nn.Module, args: tuple) -> tuple | None:
    spec = module.__dict__.get(INPUT_QUANT_ATTR)
    if spec is None or not args:
        return None
    return (fake_quantize_per_token(args[0], spec["bits"]), *args[1:])


def quantize_inputs(module: nn.Module, bits: int) -> None:
    """Make `module` see its input quantized per token to `bits` from now on. Calling it again changes the
    bits; it never stacks a second rounding."""
    hooked = INPUT_QUANT_ATTR in module.__dict__
    setattr(module, INPUT_QUANT_ATTR, {"bits": bits, "granularity": "per_token", "dynamic": True, "symmetric": True})
    if not hooked:
        module.register_forward_pre_hook(_quantize_layer_input)


def input_quantization(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The layers whose inputs are quantized, by name, with their settings."""
    return {
        name: dict(spec) for name, module in model.named_modules()
        if (spec := module.__dict__.get(INPUT_QUANT_ATTR)) is not None
    }
