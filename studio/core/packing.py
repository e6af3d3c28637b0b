"""Integer codes of `bits` bits each, packed without padding: every 8 codes fill exactly `bits` bytes.

Code i of a run of 8 takes bits [bits·i, bits·(i + 1)) of a little-endian 64-bit word, and the word's first
`bits` bytes are kept. For 4 bits this is the usual two-per-byte layout (low nibble first), for 8 bits the codes
themselves. The work is done on whole 64-bit words, eight codes at a time, so packing a layer costs a few
passes over its bytes rather than one per code."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_CODES_PER_WORD = 8


def packed_length(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take once packed (the last run of 8 padded with zero codes)."""
    return math.ceil(count / _CODES_PER_WORD) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The uint8 `codes` (any shape, each below 2**bits) as a flat uint8 tensor of packed_length bytes. At 8 bits
    that is `codes` itself, flattened, when no padding is needed: pass codes nothing changes afterwards."""
    import torch

    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be packed (1 to 8)")
    flat = codes.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % _CODES_PER_WORD
    flat = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    if bits == 8:
        return flat
    if bits == 4:  # the common case, two codes per 16-bit word: a quarter of the work of the general loop
        pairs = flat.contiguous().view(torch.int16)
        return (pairs & 0x0F).bitwise_or_((pairs >> 4).bitwise_and_(0xF0)).to(torch.uint8)
    words = flat.contiguous().view(torch.int64)  # one code per byte
    mask = (1 << bits) - 1
    packed, code = words & mask, torch.empty_like(words)
    for i in range(1, _CODES_PER_WORD):
        torch.bitwise_right_shift(words, 8 * i, out=code)
        packed.bitwise_or_(code.bitwise_and_(mask).bitwise_left_shift_(bits * i))
    return packed.view(torch.uint8).view(-1, 8)[:, :bits].clone().view(-1)  # a copy, not a view of the words


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The uint8 codes of `shape` that pack_codes packed."""
    import torch

    count = math.prod(shape)
    if packed.numel() != packed_length(count, bits):
        raise ValueError(f"{packed.numel()} packed bytes do not hold {count} codes of {bits} bits")
    if bits == 8:
        return packed[:count].reshape(shape).clone()
    words = packed.new_zeros(packed.numel() // bits, 8)
    words[:, :bits] = packed.view(-1, bits)
    words = words.view(torch.int64).view(-1)
    mask = (1 << bits) - 1
    codes = words & mask
    for i in range(1, _CODES_PER_WORD):
        codes |= ((words >> (bits * i)) & mask) << (8 * i)
    return codes.view(torch.uint8)[:count].reshape(shape)
