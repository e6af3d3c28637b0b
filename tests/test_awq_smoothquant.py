"""AWQ and SmoothQuant: the folded scales keep the model's function, the searches beat plain rounding on
inputs with outlier channels, the simulated per-token activation quantization, and whole runs."""

import copy

import pytest
import torch

import studio.methods.awq  # noqa: F401  (registers the methods)
import studio.methods.smoothquant  # noqa: F401
from conftest import ARCHS, calibration_tokens, tiny_model
from studio.core import events as ev
from studio.core.calibration import CalibrationData, layerwise
from studio.core.clone import clone_sharing_weights
from studio.core.errors import RecipeError
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.runner import prepare, run_recipe
from studio.core.state import compression_state
from studio.core.structure import TargetSpec, target_layers, weight_matrix
from studio.methods.activation_quant import fake_quantize_per_token, input_quantization, quantize_inputs
from studio.methods.awq import AWQParams, quantize_layer, scaled_output_error, search_scales
from studio.methods.grid import quantize_rtn
from studio.methods.smoothquant import input_groups, smooth_block, smoothing_scales


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: on a busy machine, waking a second thread costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outlier_inputs(tokens: int, width: int, seed: int, boost: float = 30.0) -> torch.Tensor:
    """Activations as LLMs have them: a few input channels far larger than the rest, on every token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g) * (0.5 + torch.rand(width, generator=g))
    x[:, [3, 40, 77, 101]] *= boost
    return x


def random_weight(out_f=96, in_f=128, seed=1):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


def output_error(effective: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    return float(((effective - w) @ x.T).norm() / (w @ x.T).norm())


# --- AWQ on one layer ----------------------------------------------------------------------------------


def test_awq_3bit_beats_rtn_3bit_with_the_same_groups_on_held_out_tokens():
    w = random_weight()
    x_search, x_test = outlier_inputs(512, 128, seed=2), outlier_inputs(512, 128, seed=3)
    params = AWQParams(bits=3, group_size=32, clip=False)
    s, alpha = search_scales([w], x_search, x_search.abs().mean(0), params)
    rtn = quantize_rtn(w, 3, 32, False).dequantize()
    awq = quantize_rtn(w * s, 3, 32, False).dequantize() / s
    assert 0 < alpha < 1
    assert output_error(awq, w, x_test) < 0.8 * output_error(rtn, w, x_test)
    # α = 0 is plain RTN, so on the searched tokens the chosen scale is never worse
    assert scaled_output_error(w, s, x_search, params) <= scaled_output_error(w, torch.ones(128), x_search, params)


def test_clipping_search_lowers_the_output_error_further():
    w = random_weight()
    w[:, 5] *= 6  # a few large weights stretch their groups' ranges
    x_search, x_test = outlier_inputs(512, 128, seed=4), outlier_inputs(512, 128, seed=5)
    params = AWQParams(bits=3, group_size=32)
    s, _ = search_scales([w], x_search, x_search.abs().mean(0), params)
    unclipped = quantize_layer(w * s, x_search / s, params, clip=False)
    clipped = quantize_layer(w * s, x_search / s, params, clip=True)
    assert clipped.bits == 3 and clipped.group_size == 32 and not clipped.symmetric
    assert output_error(clipped.dequantize() / s, w, x_test) < output_error(unclipped.dequantize() / s, w, x_test)


# --- where scales fold, and that folding keeps the function -----------------------------------------------

ABSORBERS = {
    "llama": {"self_attn.q_proj": ("input_layernorm", 0.0), "self_attn.o_proj": None,
              "mlp.gate_proj": ("post_attention_layernorm", 0.0), "mlp.down_proj": ("mlp.up_proj", 0.0)},
    "opt": {"self_attn.q_proj": ("self_attn_layer_norm", 0.0), "self_attn.out_proj": ("self_attn.v_proj", 0.0),
            "fc1": ("final_layer_norm", 0.0), "fc2": ("fc1", 0.0)},  # fc1 → ReLU → fc2 is positively homogeneous
    "gpt2": {"attn.c_attn": ("ln_1", 0.0), "attn.c_proj": None, "mlp.c_fc": ("ln_2", 0.0), "mlp.c_proj": None},
    "gemma3": {"self_attn.q_proj": ("input_layernorm", 1.0), "self_attn.o_proj": None,
               "mlp.gate_proj": ("pre_feedforward_layernorm", 1.0), "mlp.down_proj": ("mlp.up_proj", 0.0)},
}


def block_passes(model, samples=6):
    return layerwise(model, CalibrationData(calibration_tokens(samples), 2), target_layers(model, TargetSpec()))


@pytest.mark.parametrize("kind", sorted(ABSORBERS))
def test_groups_and_the_operations_that_absorb_their_scales(kind):
    bp = next(block_passes(tiny_model(kind)))
    groups = input_groups(bp, {})
    found = {g.layers[0]: (g.absorber.name, g.absorber.offset) if g.absorber else None for g in groups}
    assert found == ABSORBERS[kind]
    if kind in ("llama", "opt", "gemma3"):
        assert groups[0].layers == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def test_a_layer_left_out_of_the_targets_stops_the_fold_into_its_norm():
    model = tiny_model("llama")
    layers = target_layers(model, TargetSpec(exclude=("*k_proj",)))
    bp = next(layerwise(model, CalibrationData(calibration_tokens(), 2), layers))
    groups = {g.layers: g.absorber for g in input_groups(bp, {})}
    assert groups[("self_attn.q_proj", "self_attn.v_proj")] is None  # k_proj would see the scaled input


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "gemma3"])
def test_smoothing_alone_leaves_every_block_output_unchanged(kind):
    model = tiny_model(kind)
    with torch.no_grad():
        expected = model(input_ids=calibration_tokens(), use_cache=False).logits
    known, smoothed = {}, 0
    for bp in block_passes(model):
        before = [y.clone() for y in bp.forward()]
        original = {n: p.data_ptr() for n, p in bp.block.named_parameters()}
        smoothed += len(smooth_block(bp, known, alpha=0.8, after_linear=True))
        for y, y0 in zip(bp.forward(), before):
            torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-5)
        assert any(p.data_ptr() != original[n] for n, p in bp.block.named_parameters())
    assert smoothed == 3 * sum(1 for a in ABSORBERS[kind].values() if a)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calibration_tokens(), use_cache=False).logits, expected,
                                   rtol=1e-4, atol=1e-4)


# --- SmoothQuant and the activation quantization -------------------------------------------------------


def w8a8_error(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> float:
    weight = quantize_rtn(w * s, 8, 0, True).dequantize()
    y = fake_quantize_per_token(x / s, 8) @ weight.T
    return float((y - x @ w.T).norm() / (x @ w.T).norm())


def test_smoothquant_w8a8_beats_naive_w8a8_on_outlier_channels():
    w, x = random_weight(), outlier_inputs(256, 128, seed=6, boost=100.0)
    s = smoothing_scales(x.abs().amax(0), [w], alpha=0.5)
    torch.testing.assert_close(s, (x.abs().amax(0).sqrt() / w.abs().amax(0).sqrt()))
    assert w8a8_error(w, x, s) < 0.5 * w8a8_error(w, x, torch.ones(128))


def test_per_token_activation_quantization_levels():
    x = outlier_inputs(20, 128, seed=7)
    for bits in (8, 4):
        q = fake_quantize_per_token(x, bits)
        for row, original in zip(q, x):
            assert len(torch.unique(row)) <= 2**bits
            torch.testing.assert_close(row.abs().max(), original.abs().max())  # the row's own scale
        step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert torch.all((q - x).abs() <= step / 2 + 1e-6)


def test_input_hook_quantizes_what_the_layer_sees_and_survives_deepcopy():
    layer = torch.nn.Linear(128, 16)
    x = outlier_inputs(2 * 5, 128, seed=8).reshape(2, 5, 128)
    plain = layer(x)
    quantize_inputs(layer, 8)
    quantize_inputs(layer, 8)  # a second call changes settings, it does not round twice
    assert len(layer._forward_pre_hooks) == 1
    seen = []
    layer.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    out = layer(x)
    assert len(torch.unique(seen[0][1, 3])) <= 256 and not torch.equal(seen[0], x)
    torch.testing.assert_close(out, layer.forward(fake_quantize_per_token(x, 8)))
    assert not torch.allclose(out, plain)
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin(x), out)
    assert twin.studio_input_quant == {"bits": 8, "granularity": "per_token", "dynamic": True, "symmetric": True}


# --- whole runs ----------------------------------------------------------------------------------------


def recipe(method, text_file, **params):
    return parse_recipe({"schema_version": 2, "calibration": {"text_file": str(text_file), "samples": 4, "seq_len": 16},
                         "steps": [{"method": method, "params": params}]})


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("kind", ["llama", "opt", "gemma3"])
def test_awq_run_stores_codes_that_describe_each_layer(kind, tokenizer, text_file):
    model = tiny_model(kind)
    tokens = calibration_tokens(2)
    before = logits(model, tokens)
    result = run_recipe(recipe("awq", text_file, bits=4, group_size=32), LoadedModel(model, tokenizer, {}))
    assert result.status == "finished", result.error
    layers = dict(result.model.named_modules())
    state = compression_state(result.model)
    assert len(state) == {"llama": 21, "opt": 18, "gemma3": 21}[kind]
    for name, record in state.items():
        assert record.quant.bits == 4 and record.quant.group_size == 32 and not record.quant.symmetric
        torch.testing.assert_close(record.quant.dequantize(), weight_matrix(layers[name]), rtol=0, atol=1e-6)
    summary = result.report["steps"][0]["summary"]
    assert summary["scaled_groups"] == 3 * sum(1 for a in ABSORBERS[kind].values() if a)
    torch.testing.assert_close(logits(model, tokens), before, rtol=0, atol=0)  # the original is untouched
    assert not compression_state(model)
    quantized = logits(result.model, tokens)
    assert 0 < (quantized - before).norm() / before.norm() < 0.5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_smoothquant_run_quantizes_weights_and_inputs_of_the_copy_only(kind, tokenizer, text_file):
    model = tiny_model(kind)
    tokens = calibration_tokens(2)
    before = logits(model, tokens)
    result = run_recipe(recipe("smoothquant", text_file), LoadedModel(model, tokenizer, {}))
    assert result.status == "finished", result.error
    state = compression_state(result.model)
    marked = input_quantization(result.model)
    assert set(marked) == set(state) and all(spec["bits"] == 8 for spec in marked.values())
    layers = dict(result.model.named_modules())
    for name, record in state.items():
        assert record.quant.bits == 8 and record.quant.group_size == 0 and record.quant.symmetric
        torch.testing.assert_close(record.quant.dequantize(), weight_matrix(layers[name]), rtol=0, atol=1e-6)
    assert result.report["steps"][0]["summary"]["smoothed_layers"] > 0
    assert not input_quantization(model) and not compression_state(model)
    torch.testing.assert_close(logits(model, tokens), before, rtol=0, atol=0)
    quantized = logits(result.model, tokens)
    assert 0 < (quantized - before).norm() / before.norm() < 0.1
    copied = clone_sharing_weights(result.model)  # what the next run or an export starts from
    assert set(input_quantization(copied)) == set(marked)
    torch.testing.assert_close(logits(copied, tokens), quantized)


def test_naive_w8a8_smooths_nothing(tokenizer, text_file):
    result = run_recipe(recipe("smoothquant", text_file, smooth=False), LoadedModel(tiny_model("opt"), tokenizer, {}))
    assert result.status == "finished", result.error
    assert result.report["steps"][0]["summary"]["smoothed_layers"] == 0
    assert len(input_quantization(result.model)) == 18


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_cancel_mid_run_leaves_the_original_unchanged(method, tokenizer, text_file):
    model = tiny_model("llama")
    prints = {k: v.clone() for k, v in model.state_dict().items()}
    token = ev.CancelToken()

    def on_event(event):
        if isinstance(event, ev.Progress) and event.index == 0 and event.unit == "block" and event.done == 2:
            token.cancel()

    params = {"group_size": 32} if method == "awq" else {}
    result = run_recipe(recipe(method, text_file, **params), LoadedModel(model, tokenizer, {}), events=on_event,
                        cancel=token)
    assert result.status == "cancelled" and result.model is None
    assert all(torch.equal(v, prints[k]) for k, v in model.state_dict().items())
    assert not compression_state(model) and not input_quantization(model)


def test_awq_group_size_that_does_not_divide_is_a_validation_error(text_file):
    with pytest.raises(RecipeError, match="group_size.*model.layers.0.self_attn.q_proj"):
        prepare(recipe("awq", text_file, group_size=48), tiny_model("llama"))


def test_awq_runs_on_every_architecture_with_the_engine(tokenizer, text_file):
    for kind in ARCHS:
        result = run_recipe(recipe("awq", text_file, bits=3, group_size=16, grid=4, symmetric=True),
                            LoadedModel(tiny_model(kind), tokenizer, {}))
        assert result.status == "finished", (kind, result.error)
