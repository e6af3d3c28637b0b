"""The compression records beside the dense weights: codes read back from the layer's float32 weight instead of
kept twice, and sparsity masks at one bit per weight."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import studio.methods  # noqa: F401  (registers the methods)
from conftest import tiny_model
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.packing import pack_codes
from studio.core.runner import run_recipe
from studio.core.state import LayerRecord, PackedMask, QuantizedWeight, compression_state
from studio.core.structure import weight_matrix
from studio.methods.grid import quantize_rtn, quantize_rtn_dense


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([0, 8, 32]), symmetric=st.booleans(),
       magnitude=st.sampled_from([1e-6, 1e-2, 1.0, 1e4]), seed=st.integers(0, 2**16))
def test_codes_read_back_from_the_float32_dequantized_weight_are_the_codes(bits, group, symmetric, magnitude, seed):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(seed)) * magnitude
    quant, dense = quantize_rtn_dense(w, bits, group, symmetric)
    width = group or 64
    rounded = torch.round(w.view(6, -1, width) / quant.scales[..., None]) + quant.zeros[..., None].float()
    expected = rounded.clamp(0, 2**bits - 1).to(torch.uint8).view(6, 64)
    assert quant.packed is None and quant.source is dense  # float32: nothing packed, nothing held twice
    assert torch.equal(quant.codes, expected)
    assert torch.equal(quant.on_weight(dense.clone()).codes, expected)
    assert torch.equal(quantize_rtn(w, bits, group, symmetric).packed, pack_codes(expected, bits))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_float_zero_points_read_back_too(bits, seed):
    """HQQ's zero points are float16 and need not be integers, nor inside the code range."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (5, 32), generator=g, dtype=torch.uint8)
    scales = torch.rand(5, 2, generator=g) * 0.1 + 1e-4
    zeros = ((torch.rand(5, 2, generator=g) * 1.5 - 0.25) * 2**bits).half()
    quant = QuantizedWeight.from_codes(codes, scales, zeros, bits, 16, False)
    assert torch.equal(quant.on_weight(quant.dequantize()).codes, codes)


def test_sixteen_bit_weights_keep_their_packed_codes():
    quant, dense = quantize_rtn_dense(torch.randn(4, 32).bfloat16(), 8, 0, True)
    assert quant.on_weight(dense) is quant


@pytest.mark.parametrize(("method", "params"), [
    ("rtn", {"bits": 4, "group_size": 16}),
    ("rtn", {"bits": 8, "group_size": 0, "symmetric": True}),
    ("gptq", {"bits": 3, "group_size": 16}),
    ("hqq", {"bits": 4, "group_size": 16}),
    ("awq", {"bits": 4, "group_size": 16}),
    ("smoothquant", {}),
    ("mixed_precision", {"target_bits": 5.0}),
])
def test_every_quantizer_keeps_codes_that_read_back_exactly(method, params, tokenizer, text_file, monkeypatch):
    """Each method's own codes against those the record reads back from the layer it wrote: equal, and the
    record keeps no packed copy."""
    checked = []
    on_weight = QuantizedWeight.on_weight

    def checking(self, weight):
        bound = on_weight(self, weight)
        assert bound.packed is None and torch.equal(bound.codes, self.codes)
        checked.append(bound)
        return bound

    monkeypatch.setattr(QuantizedWeight, "on_weight", checking)
    recipe = parse_recipe({"schema_version": 2, "calibration": {"text_file": str(text_file), "samples": 4, "seq_len": 16},
                           "steps": [{"method": method, "params": params}]})
    result = run_recipe(recipe, LoadedModel(tiny_model("llama"), tokenizer, {}))
    assert result.status == "finished", result.error
    state = compression_state(result.model)
    assert checked and all(record.quant is None or record.quant.packed is None for record in state.values())
    modules = dict(result.model.named_modules())
    for name, record in state.items():
        if record.quant is not None:
            assert record.quant.source.data_ptr() == weight_matrix(modules[name]).data_ptr()
            assert record.quant.describes(weight_matrix(modules[name]))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), columns=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_a_mask_is_held_at_one_bit_per_weight(rows, columns, seed):
    mask = torch.rand(rows, columns, generator=torch.Generator().manual_seed(seed)) > 0.5
    record = LayerRecord().with_changes(mask=mask)
    assert isinstance(record.packed_mask, PackedMask)
    assert record.packed_mask.bits.numel() == -(-rows * columns // 8)
    assert record.mask.dtype == torch.bool and torch.equal(record.mask, mask)
    assert record.with_changes(mask=None).mask is None


def test_restored_codes_are_read_back_from_the_weights_they_match(tokenizer, text_file, tmp_path):
    import copy

    from studio.core.state import STATE_ATTR
    from studio.core.state_file import restore_state, save_state

    recipe = parse_recipe({"schema_version": 2, "steps": [{"method": "rtn", "params": {"bits": 3, "group_size": 16}}]})
    model = run_recipe(recipe, LoadedModel(tiny_model("llama"), tokenizer, {})).model
    assert save_state(model, tmp_path)
    saved = compression_state(model)
    reloaded = copy.deepcopy(model)
    object.__delattr__(reloaded, STATE_ATTR)
    assert restore_state(reloaded, tmp_path) == []
    restored = compression_state(reloaded)
    assert restored.keys() == saved.keys()
    for name, record in restored.items():
        assert record.quant.packed is None
        assert torch.equal(record.quant.codes, saved[name].quant.codes)
