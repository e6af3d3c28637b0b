import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ARCHS, tiny_model
from studio.core.errors import RecipeError
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.runner import prepare, run_recipe
from studio.core.state import compression_state
from studio.core.structure import weight_matrix
from studio.methods.grid import quantize_rtn


def rtn_recipe(**params):
    return parse_recipe({"schema_version": 1, "steps": [{"method": "rtn", "params": params}]})


@given(bits=st.integers(2, 8), group=st.sampled_from([0, 8, 16, 32]), symmetric=st.booleans())
@settings(max_examples=40, deadline=None)
def test_codes_scales_and_zero_points_have_the_promised_shape(bits, group, symmetric):
    w = torch.randn(12, 32)
    q = quantize_rtn(w, bits, group, symmetric)
    groups = 32 // (group or 32)
    assert q.codes.shape == (12, 32) and q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= 2**bits - 1
    assert q.scales.shape == q.zeros.shape == (12, groups)
    assert len(torch.unique(q.codes)) <= 2**bits
    if symmetric:
        assert torch.all(q.zeros == 2 ** (bits - 1))
    # every weight is within half a step of its grid point (the clipped symmetric extreme within one step)
    err = (q.dequantize() - w).abs().reshape(12, groups, -1)
    assert torch.all(err <= q.scales[..., None] * (1.0 if symmetric else 0.5) + 1e-5)


def test_error_falls_as_bits_rise():
    w = torch.randn(64, 256)
    errors = [(quantize_rtn(w, b, 64, False).dequantize() - w).norm().item() for b in range(2, 9)]
    assert errors == sorted(errors, reverse=True)


def test_smaller_groups_give_smaller_error():
    w = torch.randn(64, 256) * torch.logspace(-2, 0, 256)  # columns of very different scales
    errors = [(quantize_rtn(w, 4, g, True).dequantize() - w).norm().item() for g in (0, 128, 32)]
    assert errors[0] > errors[1] > errors[2]


def test_zero_stays_exactly_zero():
    w = torch.randn(8, 32)
    w[:, ::3] = 0
    for symmetric in (True, False):
        assert torch.all(quantize_rtn(w, 3, 16, symmetric).dequantize()[:, ::3] == 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_step_keeps_codes_for_export_and_dense_weights_for_evaluation(arch):
    model = tiny_model(arch)
    result = run_recipe(rtn_recipe(bits=4, group_size=32), LoadedModel(model, None, {}))
    assert result.status == "finished", result.error
    state = compression_state(result.model)
    layers = dict(result.model.named_modules())
    assert len(state) == len(result.report["steps"][0]["layers"]) > 0
    for name, record in state.items():
        assert torch.allclose(record.quant.dequantize(), weight_matrix(layers[name]), atol=1e-6)
        assert record.quant.bits == 4 and record.quant.group_size == 32
    assert not compression_state(model)  # the original has no records and its weights are untouched


def test_group_size_that_does_not_divide_is_caught_at_validation_with_sizes_that_fit():
    model = tiny_model("llama")  # input widths 64 and 128
    with pytest.raises(RecipeError) as info:
        prepare(rtn_recipe(bits=4, group_size=48), model, "r.yaml")
    message = str(info.value)
    assert "step 1 (rtn)" in message and "group_size" in message
    assert "model.layers.0.self_attn.q_proj" in message and "64" in message
    assert "16, 32, 64" in message


def test_more_bits_less_layer_error_in_the_report():
    model = tiny_model("qwen2")
    mean_error = []
    for bits in (2, 4, 8):
        report = run_recipe(rtn_recipe(bits=bits, group_size=32), LoadedModel(model, None, {})).report
        layers = report["steps"][0]["layers"]
        mean_error.append(sum(layer["error"] for layer in layers) / len(layers))
    assert mean_error[0] > mean_error[1] > mean_error[2]
