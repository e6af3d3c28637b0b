"""Low-rank factorization (truncated SVD, ASVD, SVD-LLM) and grouped-query attention conversion: the properties
the papers promise, parameters that really fall, and the two saved forms (factored for the studio, dense for
everyone else)."""

import pytest
import torch

from conftest import ARCHS, calibration_tokens, tiny_model
from studio.core.events import CancelToken, Progress
from studio.core.export import export_hf_folder, export_model
from studio.core.factored import FACTORED_FILE, LowRankLinear, low_rank_layers
from studio.core.loading import LoadedModel, load_model
from studio.core.recipe import parse_recipe
from studio.core.runner import prepare, run_recipe
from studio.core.state import compression_state
from studio.core.structure import find_decoder_blocks, iter_layers, target_layers, TargetSpec, weight_matrix
from studio.methods.gqa import pooled_heads
from studio.methods.low_rank import LowRankParams, budget_rank, energy_rank, truncate
from studio.methods.svd_llm import whitening_factor


def recipe(text_file, *steps):
    return parse_recipe({
        "schema_version": 2,
        "calibration": {"text_file": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2},
        "steps": [{"method": method, "params": params} for method, params in steps],
    })


def finished(model, tokenizer, text_file, *steps, events=None, cancel=None):
    result = run_recipe(recipe(text_file, *steps), LoadedModel(model, tokenizer, {}),
                        events=events or (lambda e: None), cancel=cancel)
    assert result.status == "finished", result.error
    return result


def logits(model, tokens=None):
    tokens = calibration_tokens(2, 20, seed=7) if tokens is None else tokens
    with torch.no_grad():
        return model(input_ids=tokens).logits


def parameter_count(model):
    return sum(p.numel() for p in set(model.parameters()))


def correlated_inputs(columns=96, tokens=2048, seed=0):
    """Inputs with a few outlier channels and correlated columns, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) / columns ** 0.5
    x = torch.randn(tokens, columns, generator=g) @ (torch.eye(columns) + 2 * mixing)
    x[:, :4] *= 20
    return x.double()


def output_error(w, w_new, x):
    return float(((w - w_new) @ x.t()).norm() / (w @ x.t()).norm())


def factors_of(method_id, w, x, ratio):
    from studio.core.registry import get_method
    from studio.methods.asvd import MeanAbsoluteInput
    from studio.methods.hessian import HessianAccumulator

    method = get_method(method_id)
    params = method.Params(ratio=ratio)
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
    layer.weight.data = w.clone()
    if method_id == "asvd":
        statistics = MeanAbsoluteInput()
        statistics.add(x)
    elif method_id == "svd_llm":
        statistics = HessianAccumulator(w.shape[1])
        statistics.add(x)
    else:
        statistics = None
    factors = method.factor(layer, statistics, params)
    return factors.up @ factors.down, factors.rank


# --- one layer: the papers' properties ------------------------------------------------------------------------


def test_truncated_svd_is_the_eckart_young_optimum_and_keeps_the_budget_rank():
    w = torch.randn(80, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    approx, rank = factors_of("svd", w, None, ratio=0.3)
    assert rank == budget_rank(80, 96, 0.3) == int(0.7 * 80 * 96 / (80 + 96))
    s = torch.linalg.svdvals(w)
    assert float((w - approx).norm()) == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-9)
    assert torch.linalg.matrix_rank(approx) == rank


def test_svd_llm_truncation_loss_is_the_dropped_whitened_singular_values():
    """SVD-LLM Theorem 3.2: with S the Cholesky factor of XᵀX, ‖(W − W')X‖ = sqrt(Σ_{i>k} σ_i(WS)²)."""
    x = correlated_inputs()
    w = torch.randn(64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    approx, rank = factors_of("svd_llm", w, x, ratio=0.4)
    s = whitening_factor(x.t() @ x, damp=1e-6)
    sigma = torch.linalg.svdvals(w @ s)
    loss = float(((w - approx) @ x.t()).norm())
    assert loss == pytest.approx(float(sigma[rank:].pow(2).sum().sqrt()), rel=1e-6)


def test_output_error_orders_svd_llm_below_asvd_below_svd_on_activation_like_inputs():
    x = correlated_inputs()
    w = torch.randn(64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    errors = {m: output_error(w, factors_of(m, w, x, ratio=0.4)[0], x) for m in ("svd", "asvd", "svd_llm")}
    assert errors["svd_llm"] < errors["asvd"] < errors["svd"]


def test_whitening_survives_a_dead_channel_by_dampening():
    x = correlated_inputs()
    x[:, 7] = 0
    s = whitening_factor(x.t() @ x, damp=1e-6)
    assert torch.isfinite(s).all() and s.diagonal().gt(0).all()


def test_energy_rule_keeps_the_fewest_values_reaching_the_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])
    total = float(s.pow(2).sum())
    assert energy_rank(s, 9 / total) == 1
    assert energy_rank(s, 13 / total) == 2
    assert energy_rank(s, 13.01 / total) == 3
    assert energy_rank(s, 1.0) == 4
    w = torch.diag(torch.tensor([10.0, 1.0, 0.1] + [0.0] * 61, dtype=torch.float64))
    params = LowRankParams(rank_rule="energy", energy=0.99)
    assert truncate(w, (64, 64), params, lambda r: r).rank == 1


def test_a_rank_that_saves_nothing_leaves_the_layer_dense():
    w = torch.randn(8, 8, dtype=torch.float64)
    params = LowRankParams(rank_rule="energy", energy=1.0)
    assert truncate(w, (8, 8), params, lambda r: r) is None


# --- whole models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, method", [("llama", "svd"), ("llama", "asvd")] + [(k, "svd_llm") for k in ARCHS])
def test_factored_layers_really_hold_fewer_parameters(kind, method, tokenizer, text_file):
    model = tiny_model(kind)
    targeted = sum(weight_matrix(m).numel() for _, m in iter_layers(target_layers(model, TargetSpec())))
    result = finished(model, tokenizer, text_file, (method, {"ratio": 0.25}))
    summary = result.report["steps"][0]["summary"]
    removed = parameter_count(model) - parameter_count(result.model)
    assert summary["parameters_before"] == targeted
    assert removed == targeted - summary["parameters_after"] > 0
    assert summary["parameter_reduction"] == pytest.approx(0.25, abs=0.03)  # per-layer floor of tiny ranks
    assert len(low_rank_layers(result.model)) == summary["layers_factored"] > 0
    assert torch.isfinite(logits(result.model)).all()
    assert parameter_count(model) == parameter_count(tiny_model(kind))  # the original keeps its layers


def test_calibrated_factorizations_lose_less_than_plain_svd_on_a_model(tokenizer, text_file):
    model = tiny_model("llama")
    reference = logits(model)
    error = {}
    for method in ("svd", "svd_llm"):
        result = finished(model, tokenizer, text_file, (method, {"ratio": 0.4}))
        error[method] = float((logits(result.model) - reference).norm())
    assert error["svd_llm"] < error["svd"]


def test_the_factored_run_folder_reloads_in_the_studio_and_the_dense_export_in_transformers(
        tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    result = finished(tiny_model("qwen2"), tokenizer, text_file, ("svd_llm", {"ratio": 0.3}))
    factored = result.model
    folder = export_hf_folder(factored, tokenizer, tmp_path / "run", report=result.report)
    assert (folder / FACTORED_FILE).is_file() and not (folder / "model.safetensors").exists()
    reloaded = load_model(str(folder)).model
    assert parameter_count(reloaded) == parameter_count(factored)
    assert {n: m.rank for n, m in low_rank_layers(reloaded).items()} == \
        {n: m.rank for n, m in low_rank_layers(factored).items()}
    torch.testing.assert_close(logits(reloaded), logits(factored), rtol=0, atol=1e-6)
    with pytest.raises(OSError):  # plain transformers refuses the factored form instead of loading random weights
        AutoModelForCausalLM.from_pretrained(folder)

    dense = export_model(reloaded, tokenizer, tmp_path / "dense", format="hf-safetensors")
    assert "multiplied back" in dense.export["low_rank"]
    plain = AutoModelForCausalLM.from_pretrained(dense.path, dtype=torch.float32).eval()
    assert not low_rank_layers(plain)
    torch.testing.assert_close(logits(plain), logits(factored), rtol=1e-4, atol=1e-4)


def test_quantized_factors_keep_their_codes_through_the_factored_folder(tokenizer, text_file, tmp_path):
    result = finished(tiny_model("llama"), tokenizer, text_file, ("svd_llm", {"ratio": 0.3, "rank_multiple": 16}),
                      ("rtn", {"bits": 4, "group_size": 16}))
    records = compression_state(result.model)
    assert any(name.endswith(".down") for name in records) and any(name.endswith(".up") for name in records)
    folder = export_hf_folder(result.model, tokenizer, tmp_path / "run")
    again = compression_state(load_model(str(folder)).model)
    assert again.keys() == records.keys()
    for name, record in records.items():
        assert torch.equal(again[name].quant.codes, record.quant.codes), name


def test_factoring_drops_the_records_of_the_dense_layer_with_a_warning(tokenizer, text_file):
    from studio.core.events import Warning

    warnings = []
    result = finished(tiny_model("llama"), tokenizer, text_file, ("rtn", {"bits": 8, "group_size": 0}),
                      ("svd", {"ratio": 0.3}), events=lambda e: warnings.append(e) if isinstance(e, Warning) else None)
    factored = set(low_rank_layers(result.model))
    assert factored and not factored & set(compression_state(result.model))
    assert any("low-rank factors" in w.message for w in warnings)


def test_gguf_export_writes_the_factored_model_dense(tokenizer, text_file, tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    result = finished(tiny_model("llama"), tokenizer, text_file, ("svd", {"ratio": 0.3}))
    written = export_model(result.model, tokenizer, tmp_path / "m.gguf", format="gguf", options={"type": "F32"})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=written.path.name, dtype=torch.float32)
    torch.testing.assert_close(logits(plain.eval()), logits(result.model), rtol=1e-4, atol=1e-4)


def test_cancelling_a_factorization_leaves_the_original_unchanged(tokenizer, text_file):
    model = tiny_model("llama")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    cancel = CancelToken()

    def events(event):
        if isinstance(event, Progress) and event.index == 0 and event.done == 1 and event.unit == "block":
            cancel.cancel()

    result = run_recipe(recipe(text_file, ("svd_llm", {"ratio": 0.3})), LoadedModel(model, tokenizer, {}),
                        events=events, cancel=cancel)
    assert result.status == "cancelled"
    assert not low_rank_layers(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_later_step_that_does_not_fit_the_factors_is_refused_naming_the_layer(tokenizer, text_file):
    result = run_recipe(recipe(text_file, ("svd", {"ratio": 0.3}), ("rtn", {"bits": 4, "group_size": 16})),
                        LoadedModel(tiny_model("llama"), tokenizer, {}))
    assert result.status == "failed" and result.bad_input
    assert "after step 1" in result.error and "step 2 (rtn)" in result.error and ".up" in result.error


def test_a_zero_ratio_is_refused_naming_the_field(tokenizer, text_file):
    from studio.core.errors import RecipeError

    with pytest.raises(RecipeError, match="'ratio'"):
        prepare(recipe(text_file, ("svd", {"ratio": 0.0})), tiny_model("llama"))


# --- grouped-query attention --------------------------------------------------------------------------------


def test_pooled_heads_are_the_mean_of_adjacent_heads():
    w = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4 * 3, 2)  # 4 heads of head_dim 3
    pooled = pooled_heads(w, groups=2, head_dim=3)
    torch.testing.assert_close(pooled[:3], (w[0:3] + w[3:6]) / 2)
    torch.testing.assert_close(pooled[3:], (w[6:9] + w[9:12]) / 2)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gqa_equals_the_original_with_each_head_replaced_by_its_group_mean(kind, tokenizer, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(kind)  # 4 query heads, 2 key/value heads of 16
    result = finished(model, tokenizer, text_file, ("gqa", {"kv_heads": 1}))
    converted = result.model
    assert converted.config.num_key_value_heads == 1 and model.config.num_key_value_heads == 2

    expected = tiny_model(kind)  # the same weights, every k/v head set to the mean of both: the same function
    for block in find_decoder_blocks(expected).blocks:
        for proj in (block.self_attn.k_proj, block.self_attn.v_proj):
            mean = proj.weight.data.reshape(2, 16, -1).mean(dim=0)
            proj.weight.data = mean.repeat(2, 1)
            if proj.bias is not None:
                proj.bias.data = proj.bias.data.reshape(2, 16).mean(dim=0).repeat(2)
    torch.testing.assert_close(logits(converted), logits(expected), rtol=1e-5, atol=1e-5)

    summary = result.report["steps"][0]["summary"]
    assert summary["key_value_heads"] == [2, 1]
    before, after = summary["kv_cache_bytes_per_token"]
    assert after * 2 == before == 2 * 3 * 2 * 16 * 2
    assert summary["parameters_before"] - summary["parameters_after"] == 3 * 2 * (16 * 64 + (16 if kind == "qwen2" else 0))

    folder = export_hf_folder(converted, tokenizer, tmp_path / "gqa")
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert plain.config.num_key_value_heads == 1
    torch.testing.assert_close(logits(plain), logits(converted), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # generation with the smaller cache runs
        out = plain.generate(calibration_tokens(1, 8), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 12


@pytest.mark.parametrize("kv_heads, match", [(3, "choose fewer"), (4, "choose fewer")])
def test_gqa_refuses_more_heads_than_the_model_has(kv_heads, match, tokenizer, text_file):
    from studio.core.errors import RecipeError

    with pytest.raises(RecipeError, match=match):
        prepare(recipe(text_file, ("gqa", {"kv_heads": kv_heads})), tiny_model("llama"))


def test_gqa_refuses_architectures_without_separate_key_value_heads(tokenizer, text_file):
    from studio.core.errors import RecipeError

    with pytest.raises(RecipeError, match="kv_heads|k_proj|num_key_value_heads"):
        prepare(recipe(text_file, ("gqa", {"kv_heads": 2})), tiny_model("gpt2"))
