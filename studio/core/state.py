"""What compression did to each layer, kept beside the model's dense weights.

The model always holds dense weights, so every evaluation and the plain safetensors export just work. The
records keep what exporters need to write the compressed form: integer codes with their scales and zero
points, and sparsity masks. They live in a dict attribute of the model (`studio_state`) keyed by layer name.
What the dense weights already say is not held twice: a float32 layer's codes are read back from its weight
(`QuantizedWeight.on_weight`), and masks take one bit per weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from typing import TYPE_CHECKING

from studio.core.packing import pack_codes, packed_length, unpack_codes

if TYPE_CHECKING:  # torch loads lazily: the window must open fast
    import torch
    from torch import nn

STATE_ATTR = "studio_state"


@dataclass(frozen=True)
class QuantizedWeight:
    """W ≈ (codes - zeros) * scales, per group of `group_size` input columns (0: one group per row).

    The codes are held packed at their bit width (studio.core.packing): a 4-bit layer keeps half a byte per
    weight, not a byte. Build one from plain codes with `from_codes`; `codes` unpacks them. Once the layer holds
    the dequantized weight, `on_weight` drops the packed codes and reads them back from that weight when asked:
    the studio keeps a dense model anyway, so the codes would be a second copy of the same information."""

    packed: torch.Tensor | None  # uint8, the (out, in) codes in [0, 2**bits - 1] packed at `bits` bits each
    shape: tuple[int, int]  # (out, in)
    scales: torch.Tensor  # (out, groups)
    zeros: torch.Tensor  # (out, groups): integer-valued uint8 (2**(bits-1) when symmetric), or float16 (HQQ)
    bits: int
    group_size: int
    symmetric: bool
    source: torch.Tensor | None = None  # with `packed` None: the layer's (out, in) weight the codes are read from

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                   group_size: int, symmetric: bool) -> QuantizedWeight:
        out_f, in_f = codes.shape
        return cls(pack_codes(codes, bits), (out_f, in_f), scales, zeros, bits, group_size, symmetric)

    def on_weight(self, weight: torch.Tensor) -> QuantizedWeight:
        """These codes read back from `weight`, the layer's tensor holding their dequantization, instead of kept.

        Exact for float32: weight = (q - z)·s carries a relative error of at most 2^-24, so weight / s + z is
        within |q - z|·2^-23 < 0.5 of the integer q for every code of up to 8 bits, and rounds back to it.
        16-bit weights keep their packed codes (bfloat16's 2^-9 leaves too little margin at 8 bits)."""
        import torch

        if weight.dtype != torch.float32 or tuple(weight.shape) != tuple(self.shape):
            return self
        return replace(self, packed=None, source=weight)

    @property
    def codes(self) -> torch.Tensor:
        """The (out, in) uint8 codes, unpacked (a new tensor each time)."""
        import torch

        if self.packed is not None:
            return unpack_codes(self.packed, self.bits, self.shape)
        out_f, in_f = self.shape
        width = self.group_size or in_f
        grid = self.source.float().reshape(out_f, in_f // width, width) / self.scales[..., None].float()
        grid.add_(self.zeros[..., None].float()).round_().clamp_(0, 2**self.bits - 1)
        return grid.to(torch.uint8).view(out_f, in_f)

    def packed_codes(self) -> torch.Tensor:
        """The codes packed at their bit width, as the state file stores them."""
        return self.packed if self.packed is not None else pack_codes(self.codes, self.bits)

    def take_rows(self, start: int, stop: int, scale_dtype: torch.dtype) -> QuantizedWeight:
        """Output rows [start, stop) as a layer of their own (scales in `scale_dtype`); the packed bytes are
        sliced as they are when the rows start on a whole run of 8 codes."""
        out_f, in_f = self.shape
        if self.packed is not None and (start * in_f) % 8 == 0 and ((stop * in_f) % 8 == 0 or stop == out_f):
            packed = self.packed[start * in_f // 8 * self.bits : packed_length(stop * in_f, self.bits)].clone()
        else:
            packed = pack_codes(self.codes[start:stop], self.bits)
        return QuantizedWeight(packed, (stop - start, in_f), self.scales[start:stop].to(scale_dtype),
                               self.zeros[start:stop], self.bits, self.group_size, self.symmetric)

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.shape
        width = self.group_size or in_f
        codes = self.codes.view(out_f, in_f // width, width).float()
        w = (codes - self.zeros[..., None].float()) * self.scales[..., None].float()
        return w.view(out_f, in_f)

    def describes(self, weight: torch.Tensor) -> bool:
        """Whether these codes still give `weight` (a later edit of the weights leaves stale codes)."""
        import torch

        if tuple(self.shape) != tuple(weight.shape):
            return False
        return torch.allclose(self.dequantize().to(weight.dtype).float(), weight.float(), rtol=1e-3, atol=1e-6)

    def packed_bytes(self) -> int:
        out_f, in_f = self.shape
        return packed_size(out_f, in_f, self.bits, self.group_size, self.symmetric,
                           float_zeros=self.zeros.is_floating_point())


def packed_size(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool,
                float_zeros: bool = False) -> int:
    """Bytes of a quantized (out, in) weight: codes at `bits` each, plus a 16-bit scale per group and a zero
    point per group when asymmetric, of `bits` bits or 16 when it is a float (`group_size` 0: one group per row)."""
    groups = out_features * (in_features // (group_size or in_features))
    zero_bits = 0 if symmetric else 16 if float_zeros else bits
    meta = groups * 2 + math.ceil(groups * zero_bits / 8)
    return math.ceil(out_features * in_features * bits / 8) + meta


@dataclass(frozen=True)
class PackedMask:
    """A bool (out, in) sparsity mask held at one bit per weight (studio.core.packing at 1 bit): a byte per
    weight for every pruned layer would be as large as 8-bit codes, kept to the end of the run."""

    bits: torch.Tensor  # uint8
    shape: tuple[int, int]

    @classmethod
    def of(cls, mask: torch.Tensor) -> PackedMask:
        import torch

        return cls(pack_codes(mask.to(torch.uint8), 1), tuple(mask.shape))

    def unpack(self) -> torch.Tensor:
        return unpack_codes(self.bits, 1, self.shape).bool()


@dataclass(frozen=True)
class LayerRecord:
    quant: QuantizedWeight | None = None
    packed_mask: PackedMask | None = None
    sparsity_pattern: str | None = None  # "unstructured" or "N:M"

    @property
    def mask(self) -> torch.Tensor | None:
        """bool (out, in), True where the weight is kept (unpacked, a new tensor each time)."""
        return None if self.packed_mask is None else self.packed_mask.unpack()

    def with_changes(self, **changes) -> LayerRecord:
        """`dataclasses.replace` that also takes `mask=` (a bool tensor or None) and packs it."""
        if "mask" in changes:
            mask = changes.pop("mask")
            changes["packed_mask"] = None if mask is None else PackedMask.of(mask)
        return replace(self, **changes)


def compression_state(model: nn.Module) -> dict[str, LayerRecord]:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = {}
        object.__setattr__(model, STATE_ATTR, state)  # a plain attribute, not a submodule or buffer
    return state


def update_record(model: nn.Module, name: str, **changes) -> LayerRecord:
    state = compression_state(model)
    record = state.get(name, LayerRecord()).with_changes(**changes)
    state[name] = record
    return record
