"""Codes packed at their bit width: exact round trips, the promised size, and records that keep only the
packed form."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from studio.core.packing import pack_codes, packed_length, unpack_codes
from studio.core.state import QuantizedWeight
from studio.methods.grid import quantize_rtn


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 9), columns=st.integers(1, 37), seed=st.integers(0, 2**16))
def test_packing_round_trips_and_takes_bits_per_code(bits, rows, columns, seed):
    codes = torch.randint(0, 2**bits, (rows, columns), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_length(codes.numel(), bits) == -(-codes.numel() // 8) * bits
    assert packed.untyped_storage().nbytes() == packed.numel()  # holds no larger buffer it was cut from
    assert torch.equal(unpack_codes(packed, bits, (rows, columns)), codes)


def test_four_bits_are_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([1, 2, 15, 0, 7, 8, 9, 10], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [0x21, 0x0F, 0x87, 0xA9]


def test_unpacking_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="do not hold"):
        unpack_codes(torch.zeros(5, dtype=torch.uint8), 3, (4, 4))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_a_record_keeps_only_the_packed_codes(bits):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(bits))
    q = quantize_rtn(w, bits, 32, False)
    assert q.packed.numel() == 48 * 64 * bits // 8
    assert q.codes.shape == (48, 64) and int(q.codes.max()) <= 2**bits - 1
    assert q.describes(q.dequantize())


@pytest.mark.parametrize(("start", "stop", "columns"), [(0, 16, 64), (16, 48, 64), (3, 10, 5), (7, 12, 5)])
def test_rows_of_a_stacked_layer_are_its_own_codes(start, stop, columns):
    codes = torch.randint(0, 8, (12 if columns == 5 else 48, columns), dtype=torch.uint8)
    groups = torch.ones(codes.shape[0], 1)
    q = QuantizedWeight.from_codes(codes, groups * 0.5, groups.to(torch.uint8) * 4, 3, 0, False)
    part = q.take_rows(start, stop, torch.float16)
    assert part.shape == (stop - start, columns) and part.scales.dtype == torch.float16
    assert torch.equal(part.codes, codes[start:stop])
