"""ggml's legacy block formats, built from the studio's integer codes without quantizing a second time.

Every block holds 32 consecutive weights of one row and an fp16 scale d (and, for the _1 types, an fp16
offset m); a weight is d * q (Q4_0: d * (q - 8), Q5_0: d * (q - 16)) or d * q + m:

    Q4_0  d | 16 bytes: byte j = q[j] (low nibble) | q[j + 16] (high nibble)           4.5 bits per weight
    Q4_1  d | m | 16 bytes as Q4_0                                                    5.0
    Q5_0  d | qh (uint32, bit j = 5th bit of q[j]) | 16 bytes of low nibbles as Q4_0  5.5
    Q5_1  d | m | qh | 16 bytes                                                       6.0
    Q8_0  d | 32 int8                                                                 8.5

The studio stores W = (codes - zeros) * scales per group of input columns. A group that is a whole number of
blocks maps onto them: with an integer zero, q = codes - zeros + offset fits Q4_0 / Q5_0 / Q8_0 when it stays
in range (symmetric 2-4 bit in Q4_0, 5 bit in Q5_0, 6-8 bit in Q8_0, asymmetric up to 7 bit in Q8_0), and any
zero fits the _1 types as m = -zeros * scales with q = codes (asymmetric and HQQ's float zeros). The only
change is ggml's fp16 storage of d (and of m): exact when the scales are already fp16 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from studio.core.state import QuantizedWeight

BLOCK = 32


@dataclass(frozen=True)
class Container:
    """A block type and how a code maps onto it: q = codes - zeros + offset (signed for Q8_0), or, with an
    offset term m, q = codes."""

    name: str
    levels: int  # q is in [0, levels) (or [-levels/2, levels/2) when signed)
    offset: int
    signed: bool = False
    with_min: bool = False  # the block stores m = -zeros * scales

    @property
    def bits_per_weight(self) -> float:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.name]]
        return size * 8 / block


CONTAINERS = {
    "Q4_0": Container("Q4_0", 16, 8),
    "Q4_1": Container("Q4_1", 16, 0, with_min=True),
    "Q5_0": Container("Q5_0", 32, 16),
    "Q5_1": Container("Q5_1", 32, 0, with_min=True),
    "Q8_0": Container("Q8_0", 256, 0, signed=True),
}
# Smallest first: "auto" keeps a layer's codes in the first one that holds them.
BY_SIZE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def block_layout_fits(quant: QuantizedWeight) -> bool:
    """Each group covers whole blocks (group size, or the row when 0, a multiple of 32)."""
    in_features = quant.shape[1]
    width = quant.group_size or in_features
    return width % BLOCK == 0 and in_features % BLOCK == 0


def holds_codes(quant: QuantizedWeight, container: str) -> bool:
    """Whether `container` stores these codes and zero points as they are (up to fp16 d and m)."""
    spec = CONTAINERS.get(container)
    if spec is None or not block_layout_fits(quant):
        return False
    if spec.with_min:
        return 2**quant.bits <= spec.levels
    if quant.zeros.is_floating_point() and not bool((quant.zeros == quant.zeros.round()).all()):
        return False  # a fractional zero point needs the m term
    lowest, highest = code_range(quant)
    low, high = (-spec.levels // 2, spec.levels // 2 - 1) if spec.signed else (0, spec.levels - 1)
    return low <= lowest + spec.offset and highest + spec.offset <= high


def code_range(quant: QuantizedWeight) -> tuple[int, int]:
    """Bounds of codes - zeros over the layer (from the code width, so no pass over the codes)."""
    zeros = quant.zeros.float()
    return int(-zeros.max().ceil()), int(2**quant.bits - 1 - zeros.min().floor())


def smallest_container(quant: QuantizedWeight) -> str | None:
    return next((name for name in BY_SIZE if holds_codes(quant, name)), None)


def codes_to_blocks(quant: QuantizedWeight, container: str, row_order=None) -> np.ndarray:
    """The (out, in / 32 * block bytes) uint8 rows of `container` blocks holding `quant`'s codes; `row_order`
    reorders the output rows (llama.cpp's q/k head layout)."""
    spec = CONTAINERS[container]
    codes, scales, zeros = quant.codes.cpu(), quant.scales.cpu(), quant.zeros.cpu()
    if row_order is not None:
        codes, scales, zeros = codes[row_order], scales[row_order], zeros[row_order]
    out_features, in_features = codes.shape
    blocks_per_group = (quant.group_size or in_features) // BLOCK
    d = np.repeat(scales.float().numpy(), blocks_per_group, axis=1).reshape(-1)
    z = np.repeat(zeros.float().numpy(), blocks_per_group, axis=1).reshape(-1)
    q = codes.numpy().astype(np.int16).reshape(-1, BLOCK)
    if spec.with_min:
        # m from the fp16 d the block stores, so d * q + m stays (codes - zeros) * d up to m's own rounding
        packed = PACKERS[container](q.astype(np.uint8), d, -z * d.astype(np.float16).astype(np.float32))
    else:
        packed = PACKERS[container]((q - z.astype(np.int16)[:, None] + spec.offset), d)
    return packed.reshape(out_features, -1)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """16 bytes per block: the low nibbles of q[0:16] in the low half, of q[16:32] in the high half."""
    q = q.astype(np.uint8) & np.uint8(0x0F)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _high_bits(q: np.ndarray) -> np.ndarray:
    """4 bytes per block: bit j of a little-endian uint32 is bit 4 of q[j]."""
    return np.packbits((q.astype(np.uint8) >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little")


def pack_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), _nibbles(q)], axis=1)


def pack_q4_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(q)], axis=1)


def pack_q5_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), _high_bits(q), _nibbles(q)], axis=1)


def pack_q5_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _high_bits(q), _nibbles(q)], axis=1)


def pack_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([_fp16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


PACKERS = {"Q4_0": pack_q4_0, "Q4_1": pack_q4_1, "Q5_0": pack_q5_0, "Q5_1": pack_q5_1, "Q8_0": pack_q8_0}
