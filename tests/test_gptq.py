"""GPTQ: the layer error the paper promises (below RTN on the same weights and inputs), its options, the
Hessian's dampening recovery, and the method end to end through recipes."""

import pytest
import torch

from conftest import ARCHS, calibration_tokens, tiny_model
from studio.core.calibration import CalibrationData, CalibrationSettings, layerwise, load_calibration_tokens
from studio.core.clone import clone_sharing_weights
from studio.core.errors import RecipeError
from studio.core.events import CancelToken, Progress, Warning
from studio.core.loading import LoadedModel
from studio.core.recipe import Recipe, Step
from studio.core.runner import run_recipe
from studio.core.state import compression_state
from studio.methods.gptq import GPTQParams, gptq_quantize
from studio.methods.grid import quantize_rtn
from studio.core.structure import TargetSpec, target_layers, weight_matrix
from studio.methods.hessian import HessianAccumulator, collect_hessians, inverse_hessian_cholesky


def structured_inputs(tokens=2048, width=128, seed=0):
    """Correlated columns (a low-rank signal plus noise) and a few outlier channels, as in real activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, width, generator=g)
    x += 0.2 * torch.randn(tokens, width, generator=g)
    x[:, :3] *= 15
    return x


def output_error(x, w, w_hat):
    return float((x @ (w - w_hat).T).norm() / (x @ w.T).norm())


def hessian_of(x):
    acc = HessianAccumulator(x.shape[1])
    for chunk in x.split(500):
        acc.add(chunk)
    return acc.hessian


@pytest.mark.parametrize("width", [48, 400, 800])  # one, two and four row blocks of the symmetric product
def test_the_running_hessian_is_2xxt_over_n(width):
    x = structured_inputs(tokens=1234, width=width)
    torch.testing.assert_close(hessian_of(x), 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 32), (3, 0), (2, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_layer_output_error_is_below_rtn_on_the_same_weights_and_inputs(bits, group_size, act_order):
    x = structured_inputs()
    w = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(1)) * 0.05
    params = GPTQParams(bits=bits, group_size=group_size, symmetric=False, act_order=act_order)
    result = gptq_quantize(w, hessian_of(x), params)
    rtn = quantize_rtn(w, bits, group_size, False).dequantize()
    assert output_error(x, w, result.weight) < 0.5 * output_error(x, w, rtn)
    # the codes are on the grid and describe the weight exactly
    assert int(result.quant.codes.max()) <= 2**bits - 1
    torch.testing.assert_close(result.quant.dequantize(), result.weight)


def test_activation_order_with_groups_keeps_groups_of_consecutive_columns():
    x = structured_inputs()
    w = torch.randn(32, x.shape[1]) * 0.05
    result = gptq_quantize(w, hessian_of(x), GPTQParams(bits=4, group_size=32, act_order=True))
    assert result.quant.scales.shape == (32, x.shape[1] // 32)
    torch.testing.assert_close(result.quant.dequantize(), result.weight)


def test_the_inverse_factor_is_upper_triangular_with_utu_the_dampened_inverse():
    h = hessian_of(structured_inputs(width=96)).double()
    inverse = inverse_hessian_cholesky(h, damp=0.01)
    u = inverse.upper
    assert not inverse.raised and torch.equal(u, torch.triu(u)) and bool((u.diagonal() > 0).all())
    dampened = h + 0.01 * h.diagonal().mean() * torch.eye(96, dtype=h.dtype)
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(dampened))


def test_a_singular_hessian_gets_more_dampening_and_says_so():
    x = torch.randn(8, 64)  # 8 tokens: rank 8 of 64
    x[:, 5] = 0  # a dead input column
    h = hessian_of(x)
    h -= 1e-4 * h.diagonal().mean() * torch.eye(64)  # rank 8 of 64, shifted down: slightly indefinite
    h[5, 5] = 0
    inverse = inverse_hessian_cholesky(h, damp=1e-6)
    assert inverse.raised and inverse.damp > 1e-6 and inverse.dead == [5]
    result = gptq_quantize(torch.randn(16, 64), h, GPTQParams(bits=4, group_size=0, damp=1e-6))
    assert result.damp_raised and torch.isfinite(result.weight).all()
    assert torch.all(result.weight[:, 5] == 0)


def recipe_for(text_file, **params):
    return Recipe(
        [Step("gptq", {"bits": 4, "group_size": 32, **params})],
        calibration=CalibrationSettings(text_file=str(text_file), samples=8, seq_len=32, batch_size=4),
    )


@pytest.mark.parametrize("kind", ARCHS + ["gemma3"])
def test_gptq_runs_from_a_recipe_and_beats_rtn_on_the_model_outputs(kind, tokenizer, text_file):
    model = tiny_model(kind)
    loaded = LoadedModel(model, tokenizer, {"kind": "test"})
    before = {n: p.clone() for n, p in model.named_parameters()}
    events = []
    result = run_recipe(recipe_for(text_file), loaded, events=events.append)
    assert result.status == "finished", result.error
    state = compression_state(result.model)
    assert state and all(r.quant is not None and r.quant.bits == 4 for r in state.values())
    assert any(isinstance(e, Progress) and e.message == "capturing calibration inputs" for e in events)
    rtn = run_recipe(Recipe([Step("rtn", {"bits": 4, "group_size": 32})]), loaded)
    # on the calibration text itself: a few hundred tokens of a tiny text, which held-out text would not resemble
    tokens = load_calibration_tokens(tokenizer, recipe_for(text_file).calibration)
    with torch.no_grad():
        reference = model(tokens).logits
        gptq_error = (result.model(tokens).logits - reference).norm()
        rtn_error = (rtn.model(tokens).logits - reference).norm()
    assert gptq_error < rtn_error
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the original is untouched


def test_on_held_out_tokens_gptq_beats_rtn_once_calibration_outnumbers_the_layer_widths():
    model = tiny_model("llama")
    quantized = {}
    for kind in ("gptq", "rtn"):
        copy = clone_sharing_weights(model)
        data = CalibrationData(calibration_tokens(samples=64, length=32), batch_size=16)
        for block in layerwise(copy, data, target_layers(copy, TargetSpec())):
            hessians = collect_hessians(block)
            for name, module in block.layers.items():
                w = weight_matrix(module)
                if kind == "gptq":
                    module.weight.data = gptq_quantize(w, hessians[name].hessian, GPTQParams(bits=4, group_size=32)).weight
                else:
                    module.weight.data = quantize_rtn(w, 4, 32, True).dequantize()
        quantized[kind] = copy
    held_out = calibration_tokens(samples=8, length=32, seed=9)
    with torch.no_grad():
        reference = model(held_out).logits
        error = {k: float((m(held_out).logits - reference).norm()) for k, m in quantized.items()}
    assert error["gptq"] < 0.85 * error["rtn"]


def test_without_calibration_text_the_recipe_is_refused_before_anything_runs(tiny_loaded):
    result = run_recipe(Recipe([Step("gptq", {"bits": 4, "group_size": 32})]), tiny_loaded)
    assert result.status == "failed" and result.bad_input
    assert "needs calibration text" in result.error and "calibration:" in result.error


def test_cancelling_mid_way_leaves_the_original_unchanged(tiny_loaded, text_file):
    before = {n: p.clone() for n, p in tiny_loaded.model.named_parameters()}
    cancel = CancelToken()

    def on_event(event):
        if isinstance(event, Progress) and event.index == 0 and event.unit == "block" and event.done == 1:
            cancel.cancel()

    result = run_recipe(recipe_for(text_file), tiny_loaded, events=on_event, cancel=cancel)
    assert result.status == "cancelled" and result.model is None
    assert all(torch.equal(p, before[n]) for n, p in tiny_loaded.model.named_parameters())


def test_a_missing_calibration_file_is_named(tiny_loaded, tmp_path):
    result = run_recipe(recipe_for(tmp_path / "nope.txt"), tiny_loaded)
    assert result.status == "failed" and result.bad_input and "nope.txt" in result.error
