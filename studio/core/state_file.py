"""The studio's compression records (integer codes, scales, zero points, sparsity masks, activation-quantization
marks) saved beside a dense export as `studio_state.safetensors`, and restored when the studio loads that folder
again, so `studio export RUN_FOLDER --format gguf` still writes the codes the run chose instead of quantizing
the dense weights a second time. Plain transformers ignores the file.

Codes are stored packed at their bit width as the record holds them (studio.core.packing; files written before
that kept codes of 4 bits or fewer two to a byte, and are still read), masks one bit per weight. On load every record is checked
against the dense weight it describes; one that no longer matches (the weights were edited) is dropped."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.core.packing import packed_length
from studio.core.state import STATE_ATTR, LayerRecord, QuantizedWeight, compression_state

if TYPE_CHECKING:
    import torch
    from torch import nn

STATE_FILE = "studio_state.safetensors"
BIT_PACKING = "bits"  # `packing` of a layer whose codes are stored as studio.core.packing packs them


def save_state(model: nn.Module, folder: Path) -> bool:
    """Write the model's records into `folder`; False (and nothing written) when it has none."""
    from safetensors.torch import save_file

    from studio.methods.activation_quant import input_quantization

    state = getattr(model, STATE_ATTR, None) or {}
    input_quant = input_quantization(model)
    if not state and not input_quant:
        return False
    tensors, layers = {}, {}
    for name, record in state.items():
        info: dict[str, Any] = {"sparsity_pattern": record.sparsity_pattern}
        if record.quant is not None:
            q = record.quant
            info.update(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric, shape=list(q.shape),
                        packing=BIT_PACKING)
            tensors[f"{name}.codes"] = q.packed_codes().contiguous()
            tensors[f"{name}.scales"] = q.scales.contiguous()
            tensors[f"{name}.zeros"] = q.zeros.contiguous()
        if record.packed_mask is not None:
            info["mask_shape"] = list(record.packed_mask.shape)
            tensors[f"{name}.mask"] = _pack_bits(record.mask)
        layers[name] = info
    metadata = {"layers": json.dumps(layers), "input_quant": json.dumps(input_quant)}
    save_file({k: v.cpu() for k, v in tensors.items()}, str(folder / STATE_FILE), metadata=metadata)
    return True


def restore_state(model: nn.Module, folder: Path) -> list[str]:
    """Give `model` (loaded from `folder`) the records saved beside it; returns warnings for records dropped."""
    import torch
    from safetensors import safe_open

    from studio.core.structure import weight_matrix
    from studio.methods.activation_quant import quantize_inputs

    path = folder / STATE_FILE
    if not path.is_file():
        return []
    warnings = []
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            layers = json.loads(meta.get("layers", "{}"))
            input_quant = json.loads(meta.get("input_quant", "{}"))
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # a damaged file costs the codes, never the model
        return [f"{path}: could not be read ({exc}); the model loads without its compression records"]
    modules = dict(model.named_modules())
    state = compression_state(model)
    for name, info in layers.items():
        module = modules.get(name)
        if module is None:
            warnings.append(f"{path}: layer {name} is not in the model; its record was dropped")
            continue
        record = LayerRecord(sparsity_pattern=info.get("sparsity_pattern"))
        weight = weight_matrix(module)
        if "bits" in info:
            try:
                quant = _quantized_weight(info, tensors[f"{name}.codes"],
                                          tensors[f"{name}.scales"].to(weight.dtype), tensors[f"{name}.zeros"])
                problem = None if quant.describes(weight) else "no longer match its weights"
            except (KeyError, ValueError) as exc:
                problem = f"are damaged ({exc})"
            if problem:
                warnings.append(f"{path}: the codes of {name} {problem} and were dropped")
            else:
                read_back = quant.on_weight(weight)  # kept packed unless the weight gives exactly these codes
                if read_back is not quant and torch.equal(read_back.codes, quant.codes):
                    quant = read_back
                record = LayerRecord(quant=quant, sparsity_pattern=record.sparsity_pattern)
        if "mask_shape" in info:
            mask = _unpack_bits(tensors[f"{name}.mask"], tuple(info["mask_shape"]))
            if mask.shape != weight.shape or bool(weight[~mask.to(weight.device)].any()):
                warnings.append(f"{path}: the sparsity mask of {name} no longer matches its weights and was dropped")
            else:
                record = record.with_changes(mask=mask)
        if record.quant is not None or record.packed_mask is not None:
            state[name] = record
    for name, spec in input_quant.items():
        if name in modules:
            quantize_inputs(modules[name], int(spec["bits"]))
    return warnings


def _quantized_weight(info: dict[str, Any], stored: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor) -> QuantizedWeight:
    bits, shape = info["bits"], tuple(info["shape"])
    if info.get("packing") == BIT_PACKING:
        if stored.numel() != packed_length(math.prod(shape), bits):
            raise ValueError(f"{stored.numel()} bytes do not hold {shape} codes of {bits} bits")
        return QuantizedWeight(stored, shape, scales, zeros, bits, info["group_size"], info["symmetric"])
    codes = _unpack_nibbles(stored, shape) if bits <= 4 else stored  # a file from before bit packing
    return QuantizedWeight.from_codes(codes, scales, zeros, bits, info["group_size"], info["symmetric"])


def _unpack_nibbles(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    flat = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)
    return flat[: math.prod(shape)].reshape(shape).contiguous()


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    import numpy as np
    import torch

    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(bool)))


def _unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    import numpy as np
    import torch

    return torch.from_numpy(np.unpackbits(packed.numpy(), count=math.prod(shape)).astype(bool)).reshape(shape)
