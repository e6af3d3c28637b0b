"""SparseGPT and Wanda: exact sparsity patterns, the papers' error ordering on a layer with structured inputs,
and the calibrated recipe path (architectures, missing calibration, cancellation)."""

import pytest
import torch

import studio.methods.sparsegpt  # noqa: F401  (registers the methods)
import studio.methods.wanda  # noqa: F401
from conftest import ARCHS, tiny_model
from studio.core.errors import RecipeError
from studio.core.events import CancelToken, Progress, Warning
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.runner import prepare, run_recipe
from studio.core.state import compression_state
from studio.core.structure import weight_matrix
from studio.methods.hessian import HessianAccumulator, inverse_hessian_cholesky
from studio.methods.magnitude import layer_mask, nm_mask
from studio.methods.sparsegpt import SparseGPT, sparsegpt_prune
from studio.methods.wanda import wanda_mask

METHODS = ["sparsegpt", "wanda"]


def recipe(method, text_file=None, **params):
    data = {"schema_version": 2, "steps": [{"method": method, "params": params}]}
    if text_file is not None:
        data["calibration"] = {"text_file": str(text_file), "samples": 4, "seq_len": 32, "batch_size": 2}
    return parse_recipe(data)


def prune(kind, method, tokenizer, text_file, events=None, cancel=None, **params):
    model = tiny_model(kind)
    loaded = LoadedModel(model, tokenizer, {})
    return model, run_recipe(recipe(method, text_file, **params), loaded, events=events or (lambda e: None),
                             cancel=cancel)


def pruned_weights(result):
    layers = dict(result.model.named_modules())
    return {name: (weight_matrix(layers[name]), record) for name, record in compression_state(result.model).items()}


def structured_inputs(tokens=2048, features=128, seed=0):
    """Correlated input features (a low-rank signal plus noise) with a few outlier features of large magnitude,
    like the activations of a language model."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 16, generator=g)
    x = latent @ torch.randn(16, features, generator=g) + 0.3 * torch.randn(tokens, features, generator=g)
    outliers = torch.randperm(features, generator=g)[:4]
    x[:, outliers] *= 20
    return x


def sparsegpt_on(w, x, sparsity=0.5, nm=None, block_size=32):
    hessian = HessianAccumulator(x.shape[1])
    for batch in x.split(512):
        hessian.add(batch)
    return sparsegpt_prune(w, inverse_hessian_cholesky(hessian.hessian, 0.01), sparsity, nm, block_size)


def output_error(w, pruned, x):
    return ((w - pruned) @ x.t()).norm().item()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,pattern,n,m,layers", [("llama", "2:4", 2, 4, 21), ("gpt2", "4:8", 4, 8, 12)])
def test_n_of_every_m_weights_survive(method, kind, pattern, n, m, layers, tokenizer, text_file):
    _, result = prune(kind, method, tokenizer, text_file, pattern=pattern)
    assert result.status == "finished", result.error
    weights = pruned_weights(result)
    assert len(weights) == layers  # every linear layer of the 3 blocks
    for name, (w, record) in weights.items():
        assert torch.all((w != 0).reshape(w.shape[0], -1, m).sum(-1) == n), name
        assert torch.all(record.mask.reshape(w.shape[0], -1, m).sum(-1) == n), name
        assert torch.equal(record.mask, w != 0) and record.sparsity_pattern == pattern


def test_wanda_prunes_the_same_fraction_of_every_row_and_follows_the_score():
    w, x = torch.randn(32, 128), structured_inputs()
    norms = x.norm(dim=0)
    keep = wanda_mask(w, norms, 0.5, "unstructured")
    assert torch.all((~keep).sum(1) == 64)
    scores = w.abs() * norms
    kept_min = torch.where(keep, scores, torch.inf).min(1).values
    dropped_max = torch.where(~keep, scores, -torch.inf).max(1).values
    assert torch.all(kept_min >= dropped_max)
    assert torch.equal(wanda_mask(w, norms, 0.5, "2:4"), nm_mask(scores, 2, 4))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_output_error_sparsegpt_below_wanda_below_magnitude(pattern):
    w, x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)), structured_inputs()
    if pattern == "unstructured":
        nm, magnitude = None, w * layer_mask(w, 0.5)
    else:
        nm, magnitude = (2, 4), w * nm_mask(w, 2, 4)
    wanda = w * wanda_mask(w, x.norm(dim=0), 0.5, pattern)
    sparsegpt, _ = sparsegpt_on(w, x, 0.5, nm)
    errors = [output_error(w, p, x) for p in (sparsegpt, wanda, magnitude)]
    assert errors[0] < errors[1] < errors[2], errors


def test_obs_update_lowers_the_error_of_its_own_mask_and_no_pruning_changes_nothing():
    w, x = torch.randn(64, 128), structured_inputs()
    pruned, keep = sparsegpt_on(w, x, 0.5)
    assert output_error(w, pruned, x) < 0.7 * output_error(w, w * keep, x)
    assert not torch.equal(pruned[keep], w[keep])  # the surviving weights were updated
    unchanged, keep_all = sparsegpt_on(w, x, 0.0)
    assert keep_all.all() and torch.allclose(unchanged, w, atol=1e-5)


def test_raised_dampening_is_reported_with_the_layer():
    x = torch.randn(64, 1) @ torch.randn(1, 32)  # rank 1: singular without enough dampening
    hessian = HessianAccumulator(32)
    hessian.add(x)
    warnings = []

    class Context:
        def warn(self, message):
            warnings.append(message)

    inverse = SparseGPT.inverse_hessian(Context(), "blocks.0.fc", hessian, 1e-9)
    assert inverse.raised and inverse.damp > 1e-9
    assert len(warnings) == 1 and "blocks.0.fc" in warnings[0] and f"{inverse.damp:g}" in warnings[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,sparsity", zip(ARCHS, [0.5, 0.7, 0.5, 0.3]))
def test_recipe_runs_end_to_end_at_the_sparsity_of_every_layer(method, kind, sparsity, tokenizer, text_file):
    model = tiny_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_recipe(recipe(method, text_file, sparsity=sparsity), LoadedModel(model, tokenizer, {}))
    assert result.status == "finished", result.error
    assert result.report["calibration"]["tokens"] == 4 * 32
    step = result.report["steps"][0]
    weights = pruned_weights(result)
    assert len(weights) == len(step["layers"]) > 0
    for name, (w, record) in weights.items():
        assert abs((w == 0).float().mean().item() - sparsity) <= 0.01, name
        assert record.sparsity_pattern == "unstructured"
    for layer in step["layers"]:
        assert abs(layer["sparsity"] - sparsity) <= 0.01 and layer["error"] > 0
    assert abs(step["summary"]["sparsity"] - sparsity) <= 0.01
    assert not compression_state(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    tokens = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(result.model(input_ids=tokens).logits).all()


@pytest.mark.parametrize("method", METHODS)
def test_without_calibration_the_recipe_is_refused(method):
    with pytest.raises(RecipeError, match=rf"step 1 \({method}\) needs calibration text"):
        prepare(recipe(method), tiny_model("llama"))


@pytest.mark.parametrize("method", METHODS)
def test_cancel_after_the_first_block_leaves_the_original_untouched(method, tokenizer, text_file):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cancel = CancelToken()
    seen = []

    def on_event(event):
        seen.append(event)
        if isinstance(event, Progress) and event.index == 0 and event.done == 1:
            cancel.cancel()

    result = run_recipe(recipe(method, text_file), LoadedModel(model, tokenizer, {}), events=on_event, cancel=cancel)
    assert result.status == "cancelled" and result.model is None
    assert max(e.done for e in seen if isinstance(e, Progress)) == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not compression_state(model) and not any(isinstance(e, Warning) for e in seen)


def test_sparsegpt_prunes_o_proj_on_the_inputs_the_pruned_q_k_v_give(tokenizer, text_file, monkeypatch):
    from studio.core.calibration import CalibrationSettings, load_calibration_tokens

    given = {}
    inverse_hessian = SparseGPT.inverse_hessian

    def recording(ctx, name, hessian, damp):
        given[name] = hessian.hessian.clone()
        return inverse_hessian(ctx, name, hessian, damp)

    monkeypatch.setattr(SparseGPT, "inverse_hessian", staticmethod(recording))
    model, result = prune("llama", "sparsegpt", tokenizer, text_file, sparsity=0.5)
    o_proj = "model.layers.0.self_attn.o_proj"
    settings = CalibrationSettings(text_file=str(text_file), samples=4, seq_len=32, batch_size=2)
    tokens = load_calibration_tokens(tokenizer, settings)

    def o_proj_hessian(m):  # block 0 sees the embeddings either way; o_proj sees what q/k/v make of them
        accumulator = HessianAccumulator(m.get_submodule(o_proj).in_features)
        hook = m.get_submodule(o_proj).register_forward_pre_hook(
            lambda _, args: accumulator.add(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            for batch in tokens.split(2):
                m(batch)
        hook.remove()
        return accumulator.hessian

    qkv_pruned = tiny_model("llama")
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = f"model.layers.0.self_attn.{name}"
        qkv_pruned.get_submodule(layer).weight.data = result.model.get_submodule(layer).weight.data.clone()
    assert not torch.allclose(given[o_proj], o_proj_hessian(tiny_model("llama")), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(given[o_proj], o_proj_hessian(qkv_pruned), rtol=1e-4, atol=1e-6)
