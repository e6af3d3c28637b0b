import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import studio.methods.hqq  # noqa: F401  (registers the methods)
import studio.methods.kv_cache  # noqa: F401
from conftest import ARCHS, tiny_model
from studio.core import events as ev
from studio.core.errors import RecipeError
from studio.core.export import export_hf_folder
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.registry import get_method
from studio.core.runner import prepare, run_recipe
from studio.core.state import compression_state
from studio.core.structure import weight_matrix
from studio.methods.grid import quantize_rtn
from studio.methods.hqq import HQQParams, error_and_shrink, hqq_packed_size, lp_error, quantize_hqq, shrink_lp
from studio.methods.kv_cache import (
    IMPLEMENTATION_PREFIX,
    CacheGeometry,
    KVQuantSettings,
    layer_cache_bytes,
    quantize_per_channel,
    quantize_per_token,
    register_implementation,
)

KV_ARCHS = ARCHS + ["gemma3"]


def recipe(method, **params):
    return parse_recipe({"schema_version": 1, "steps": [{"method": method, "params": params}]})


def heavy_tailed(rows=128, cols=512, seed=0):
    """Student-t (3 degrees of freedom) weights: a few large outliers per group, like LLM weights."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def token_ids(length=48, batch=2, seed=0):
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- HQQ -------------------------------------------------------------------------------------------------------


def test_shrink_lp_is_the_generalized_soft_threshold():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    shrunk = shrink_lp(x, beta=10.0, p=0.7)
    # |x| > beta^(-1/(2-p)) ~ 0.17 survives, shrunk towards zero; smaller values become exactly zero
    assert torch.equal(shrunk[1:4], torch.zeros(3))
    assert torch.allclose(shrunk[[0, 4]], torch.tensor([-1.0, 1.0]) * (2 - 2**-0.3 / 10))
    assert torch.allclose(shrink_lp(x, beta=4.0, p=1.0), torch.sign(x) * torch.relu(x.abs() - 0.25))


def test_the_fused_iteration_step_equals_the_lp_error_and_the_shrinkage():
    x = torch.randn(8, 3, 64) * 0.3
    x[0, 0, :7] = 0.0  # |x|^(p-1) is infinite there: the error term must still be 0
    error, shrunk = error_and_shrink(x, beta=10.0, p=0.7)
    assert torch.allclose(error, lp_error(x, 0.7)) and torch.isfinite(error).all()
    assert torch.equal(shrunk, shrink_lp(x, beta=10.0, p=0.7))


@pytest.mark.parametrize("bits", [3, 4])
def test_hqq_error_is_below_rtn_asymmetric_on_heavy_tailed_weights(bits):
    w = heavy_tailed()
    params = HQQParams(bits=bits, group_size=64)
    hqq = quantize_hqq(w, params).dequantize() - w
    rtn = quantize_rtn(w, bits, 64, symmetric=False).dequantize() - w
    assert lp_error(hqq.flatten(), 0.7) < 0.98 * lp_error(rtn.flatten(), 0.7)
    assert hqq.norm() < 0.98 * rtn.norm()
    # no group ends worse than its first iterate, the RTN grid (HQQ keeps each group's best iterate)
    per_group = lambda e: lp_error(e.reshape(128, -1, 64), 0.7)  # noqa: E731
    assert torch.all(per_group(hqq) <= per_group(rtn) * (1 + 1e-5))


def test_integer_zero_points_lose_what_hqq_gained():
    """What rounding HQQ's float zero to the studio's integer zero costs: nearly all of the gain over RTN."""
    w = heavy_tailed()
    params = HQQParams(bits=4, group_size=64)
    errors = {mode: (quantize_hqq(w, params, mode).dequantize() - w).norm() for mode in ("float", "integer")}
    rtn = (quantize_rtn(w, 4, 64, symmetric=False).dequantize() - w).norm()
    assert errors["float"] < errors["integer"]
    assert abs(errors["integer"] - rtn) < 0.25 * (rtn - errors["float"])


@given(bits=st.integers(2, 8), group=st.sampled_from([0, 16, 32]), zero_point=st.sampled_from(["float", "integer"]))
@settings(max_examples=20, deadline=None)
def test_hqq_codes_stay_on_the_grid(bits, group, zero_point):
    w = torch.randn(8, 64) * torch.logspace(-2, 0, 64)
    q = quantize_hqq(w, HQQParams(bits=bits, group_size=group, iterations=5, zero_point=zero_point))
    groups = 64 // (group or 64)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.shape == q.zeros.shape == (8, groups) and not q.symmetric
    assert q.zeros.dtype == (torch.float16 if zero_point == "float" else torch.uint8)
    assert len(torch.unique(q.codes)) <= 2**bits
    # the codes are the nearest grid points for the stored zero (or clamped at the ends of the grid)
    scaled = w.reshape(8, groups, -1) / q.scales[..., None].float() + q.zeros[..., None].float()
    assert torch.all((q.codes.reshape(8, groups, -1).float() - scaled.clamp(0, 2**bits - 1)).abs() <= 0.5 + 1e-4)


def test_packed_size_counts_16_bit_zero_points_when_float():
    layer = nn.Linear(256, 32, bias=False)
    method = get_method("hqq")
    codes = 32 * 256 * 4 // 8
    groups = 32 * 4
    assert method.stored_bytes(layer, HQQParams(bits=4, group_size=64)) == codes + groups * (2 + 2)
    assert method.stored_bytes(layer, HQQParams(bits=4, group_size=64, zero_point="integer")) == \
        codes + groups * 2 + groups // 2
    assert hqq_packed_size(32, 256, HQQParams(bits=3, group_size=0)) == 32 * 256 * 3 // 8 + 32 * 4


@pytest.mark.parametrize("arch", ARCHS)
def test_hqq_step_records_codes_and_leaves_the_original(arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_recipe(recipe("hqq", bits=3, group_size=32, iterations=5), LoadedModel(model, None, {}))
    assert result.status == "finished", result.error
    state = compression_state(result.model)
    layers = dict(result.model.named_modules())
    assert len(state) == len(result.report["steps"][0]["layers"]) > 0
    for name, record in state.items():
        assert torch.allclose(record.quant.dequantize(), weight_matrix(layers[name]), atol=1e-6)
        assert record.quant.bits == 3 and record.quant.group_size == 32
    summary = result.report["steps"][0]["summary"]
    assert summary["relative_error"] < summary["relative_error_rtn"]
    assert not compression_state(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hqq_cancel_after_the_first_block_leaves_the_original_untouched():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    token = ev.CancelToken()

    def on_event(event):
        if isinstance(event, ev.Progress) and event.unit == "block" and event.done == 1:
            token.cancel()

    result = run_recipe(recipe("hqq"), LoadedModel(model, None, {}), events=on_event, cancel=token)
    assert result.status == "cancelled"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hqq_group_size_is_checked_against_the_layers():
    result = run_recipe(recipe("hqq", group_size=48), LoadedModel(tiny_model("llama"), None, {}))
    assert result.status == "failed" and result.bad_input
    assert "group_size" in result.error and "model.layers.0.self_attn.q_proj" in result.error


# --- KV cache: the fake quantization ---------------------------------------------------------------------------


@given(bits=st.sampled_from([2, 4, 8]), symmetric=st.booleans(), group=st.sampled_from([0, 4, 8]))
@settings(max_examples=24, deadline=None)
def test_per_token_fake_quantization_has_at_most_2_to_the_b_levels_per_group(bits, symmetric, group):
    x = torch.randn(2, 3, 10, 16) * torch.logspace(-1, 1, 16)  # channels of very different ranges
    q = quantize_per_token(x, bits, group, symmetric)
    assert q.shape == x.shape and q.dtype == x.dtype
    width = group or 16
    grouped_q, grouped_x = q.reshape(-1, width), x.reshape(-1, width)
    for row_q, row_x in zip(grouped_q, grouped_x):
        assert len(torch.unique(row_q)) <= 2**bits
        step = (row_x.abs().max() / (2 ** (bits - 1) - 1)) if symmetric else (row_x.max() - row_x.min()) / (2**bits - 1)
        assert torch.all((row_q - row_x).abs() <= step / 2 + 1e-5)


def test_per_channel_keys_group_tokens_and_keep_the_residual_in_full_precision():
    x = torch.randn(1, 2, 21, 8) + torch.arange(8.0) * 5  # channels with offsets, KIVI's key outliers
    q = quantize_per_channel(x, 4, 8, symmetric=False)
    assert torch.equal(q[..., 16:, :], x[..., 16:, :])  # 21 tokens: two groups of 8, then 5 residual tokens
    for start in (0, 8):
        block = q[..., start:start + 8, :]
        for head in range(2):
            for channel in range(8):
                assert len(torch.unique(block[0, head, :, channel])) <= 16
    # per channel the offsets cost nothing; per token they swamp the grid
    per_token = quantize_per_token(x[..., :16, :], 4, 0, symmetric=False)
    assert (q[..., :16, :] - x[..., :16, :]).norm() < 0.2 * (per_token - x[..., :16, :]).norm()


# --- KV cache: memory -----------------------------------------------------------------------------------------


def test_cache_bytes_for_a_smollm2_sized_layer():
    geometry = CacheGeometry(kv_heads=3, head_dim=64, max_tokens=None)  # SmolLM2-135M: 30 such layers
    fp16 = layer_cache_bytes(geometry, 4096, None)
    assert fp16 == 2 * 3 * 64 * 4096 * 2
    eight = layer_cache_bytes(geometry, 4096, KVQuantSettings(8, "per_token", 0, False))
    assert eight == 2 * (3 * 64 * 4096 + 3 * 4096 * (2 + 2))  # codes, then a scale and a zero per token and head
    four_sym = layer_cache_bytes(geometry, 4096, KVQuantSettings(4, "per_token", 32, True))
    assert four_sym == 2 * (3 * 64 * 4096 // 2 + 3 * 4096 * 2 * 2)  # two groups of 32 channels, scale only
    kivi = layer_cache_bytes(geometry, 4100, KVQuantSettings(2, "per_head", 128, False))
    keys = 3 * 64 * 4096 // 4 + 3 * 64 * 32 * 4 + 3 * 64 * 4 * 2  # 32 token groups per channel, 4 residual tokens
    values = 3 * 64 * 4100 // 4 + 3 * 4100 * 4
    assert kivi == keys + values


def test_step_summary_reports_the_cache_memory_of_the_model():
    result = run_recipe(recipe("kv_cache", bits=4, context_length=1000), LoadedModel(tiny_model("gemma3"), None, {}))
    summary = result.report["steps"][0]["summary"]
    # gemma3 tiny: 3 layers of 2 kv heads x 16; layers 0 and 1 slide over 8 tokens, layer 2 sees all 1000
    tokens = 8 + 8 + 1000
    assert summary["kv_cache_fp16_bytes"] == 2 * 2 * 16 * tokens * 2
    assert summary["kv_cache_bytes"] == 2 * (2 * 16 * tokens // 2 + 2 * tokens * 4)
    assert summary["kv_cache_saved_bytes"] == summary["kv_cache_fp16_bytes"] - summary["kv_cache_bytes"]
    assert summary["attention_layers"] == 3 and result.report["steps"][0]["layers"] == []
    assert result.report["size_after"]["compressed_bytes"] == result.report["size_before"]["compressed_bytes"]


# --- KV cache: in the model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", KV_ARCHS)
@pytest.mark.parametrize("inner", ["sdpa", "eager"])
def test_switched_attention_without_quantization_is_exactly_the_original(arch, inner):
    """The dispatch and the mask of the wrapping implementation: unmarked modules attend exactly as before."""
    model = tiny_model(arch)
    model.config._attn_implementation = inner
    ids = token_ids()
    reference = logits(model, ids)
    model.config._attn_implementation = register_implementation(inner)
    try:
        assert torch.equal(logits(model, ids), reference)
        padded = torch.ones_like(ids)
        padded[0, :5] = 0  # left padding exercises the mask function
        model.config._attn_implementation = inner
        expected = model(ids, attention_mask=padded).logits
        model.config._attn_implementation = IMPLEMENTATION_PREFIX + inner
        assert torch.equal(model(ids, attention_mask=padded).logits, expected)
    finally:
        model.config._attn_implementation = inner


@pytest.mark.parametrize("arch", KV_ARCHS)
def test_kv_cache_run_end_to_end_quantizes_only_the_working_copy(arch):
    model = tiny_model(arch)
    ids = token_ids()
    reference = logits(model, ids)
    implementation = model.config._attn_implementation
    result = run_recipe(recipe("kv_cache", bits=4), LoadedModel(model, None, {}))
    assert result.status == "finished", result.error
    assert result.model.config is not model.config
    assert result.model.config._attn_implementation == IMPLEMENTATION_PREFIX + implementation
    assert model.config._attn_implementation == implementation
    assert not torch.equal(logits(result.model, ids), reference)
    assert torch.equal(logits(model, ids), reference)  # the original still attends in full precision
    # no weight changed: the copy still shares every tensor with the original
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(model.parameters(), result.model.parameters()))


def test_8_bit_cache_changes_the_predictions_much_less_than_4_bit():
    model = tiny_model("llama")
    ids = token_ids(length=64)
    reference = torch.log_softmax(logits(model, ids), dim=-1)
    kl = {}
    for bits in (8, 4):
        quantized = run_recipe(recipe("kv_cache", bits=bits), LoadedModel(model, None, {})).model
        log_p = torch.log_softmax(logits(quantized, ids), dim=-1)
        kl[bits] = float((reference.exp() * (reference - log_p)).sum(-1).mean())
    assert 0 < kl[8] < kl[4] / 20


@pytest.mark.parametrize("granularity", ["per_token", "per_head"])
def test_decoding_with_the_cache_matches_the_full_forward(granularity):
    """The quantization applies to what the cache holds, so token-by-token decoding sees the same keys."""
    params = {"bits": 4, "granularity": granularity, "group_size": 8 if granularity == "per_head" else 0}
    model = run_recipe(recipe("kv_cache", **params), LoadedModel(tiny_model("llama"), None, {})).model
    ids = token_ids(length=20, batch=1)
    full = logits(model, ids)[0, -1]
    with torch.no_grad():
        prefix = model(ids[:, :-1], use_cache=True)
        last = model(ids[:, -1:], cache=prefix.past_key_values).logits[0, -1]
    assert torch.allclose(last, full, atol=1e-4)


def test_only_the_targeted_blocks_are_quantized():
    model = tiny_model("llama")
    steps = [{"method": "kv_cache", "params": {"bits": 2}, "targets": {"include": ["model.layers.2.*"]}}]
    result = run_recipe(parse_recipe({"schema_version": 1, "steps": steps}), LoadedModel(model, None, {}))
    assert result.status == "finished", result.error
    marked = [name for name, m in result.model.named_modules() if getattr(m, "studio_kv_quant", None)]
    assert marked == ["model.layers.2.self_attn"]
    summary = result.report["steps"][0]["summary"]
    layer = 2 * 2 * 16 * 4096 * 2
    assert summary["kv_cache_fp16_bytes"] == 3 * layer and summary["kv_cache_bytes"] == 2 * layer + layer // 4


def test_group_size_that_does_not_divide_the_head_is_caught_at_validation_naming_the_layer():
    with pytest.raises(RecipeError) as info:
        prepare(recipe("kv_cache", group_size=5), tiny_model("llama"), "r.yaml")
    message = str(info.value)
    assert "step 1 (kv_cache)" in message and "group_size" in message
    assert "head dimension 16" in message and "model.layers.0.self_attn" in message


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.softmax(self.attn(x) @ x.transpose(-1, -2), -1) @ x


class ToyModel(nn.Module):
    """Attention written by hand, not dispatched through transformers."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", _attn_implementation="eager")
        self.layers = nn.ModuleList([ToyBlock(), ToyBlock()])


def test_attention_not_dispatched_by_transformers_is_a_clear_error():
    model = ToyModel()
    with pytest.raises(RecipeError, match=r"ALL_ATTENTION_FUNCTIONS; ToyModel \(toy\) does not"):
        prepare(recipe("kv_cache"), model, "r.yaml")
    result = run_recipe(recipe("kv_cache"), LoadedModel(model, None, {}))
    assert result.status == "failed" and result.bad_input and "layers.0" in result.error
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_writes_plain_dense_transformers(tmp_path, tokenizer, arch):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    result = run_recipe(recipe("kv_cache", bits=4), LoadedModel(model, tokenizer, {}))
    out = export_hf_folder(result.model, tokenizer, tmp_path / "out", report=result.report)
    config = (out / "config.json").read_text()
    assert "studio_kv_quant" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = token_ids()
    assert reloaded.config._attn_implementation == model.config._attn_implementation
    assert torch.allclose(logits(reloaded, ids), logits(model, ids), atol=1e-5)  # the dense weights, unchanged
    assert json.loads((out / "report.json").read_text())["steps"][0]["method"] == "kv_cache"
