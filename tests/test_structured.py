"""Structured pruning (FLAP-style channels and heads) and layer dropping (ShortGPT): the model really shrinks,
the config describes it, and a saved export reloads with plain transformers to the same logits."""

import pytest
import torch

import studio.methods.layer_drop  # noqa: F401  (registers the method; structured registers on the import below)
from conftest import ARCHS, calibration_tokens, tiny_model
from studio.core.errors import RecipeError
from studio.core.events import CancelToken, Progress, Warning
from studio.core.evaluation.size import size_report
from studio.core.export import export_hf_folder
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.runner import prepare, run_recipe
from studio.core.state import compression_state
from studio.core.structure import find_decoder_blocks, weight_matrix
from studio.methods.structured import (
    ChannelStatistics,
    StructuredParams,
    StructuredPruning,
    compensated_bias,
    fluctuation_scores,
    lowest,
)

HEADS_EXPRESSIBLE = {"llama": 0.5, "qwen2": 0.5, "opt": 0.0, "gpt2": 0.0}  # GPT-2/OPT derive head_dim from hidden


def recipe(text_file, *steps):
    return parse_recipe({
        "schema_version": 2,
        "calibration": {"text_file": str(text_file), "samples": 4, "seq_len": 16, "batch_size": 2},
        "steps": [{"method": method, "params": params} for method, params in steps],
    })


def run(model, tokenizer, text_file, *steps, events=None, cancel=None):
    return run_recipe(recipe(text_file, *steps), LoadedModel(model, tokenizer, {}),
                      events=events or (lambda e: None), cancel=cancel)


def finished(model, tokenizer, text_file, *steps, events=None):
    result = run(model, tokenizer, text_file, *steps, events=events)
    assert result.status == "finished", result.error
    return result


def logits(model, tokens=None):
    tokens = calibration_tokens(2, 20, seed=7) if tokens is None else tokens
    with torch.no_grad():
        return model(input_ids=tokens).logits


def snapshot(model):
    return model.config.to_dict(), {n: t.clone() for n, t in model.state_dict().items()}


def assert_unchanged(model, before):
    config, tensors = before
    assert model.config.to_dict() == config
    now = model.state_dict()
    assert now.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(now[name], t), name


def parameter_count(model):
    return sum(p.numel() for p in set(model.parameters()))


def reload(model, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = export_hf_folder(model, tokenizer, tmp_path / "export")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# --- FLAP's pieces on one layer ------------------------------------------------------------------------------


def test_channel_statistics_match_the_whole_sample_over_batches():
    x = torch.randn(300, 8) * torch.linspace(0.1, 5, 8) + torch.linspace(-3, 3, 8)
    stats = ChannelStatistics()
    for part in x.split([7, 100, 193]):
        stats.add(part)
    torch.testing.assert_close(stats.mean.float(), x.mean(0))
    torch.testing.assert_close(stats.variance.float(), x.var(0))


def structured_inputs(tokens=2048, width=64, seed=0):
    """Inputs with non-zero means: some channels large and almost constant, others small and fluctuating."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(width, generator=g) * 3
    spread = torch.rand(width, generator=g) ** 3 * 2 + 0.01
    return torch.randn(tokens, width, generator=g) * spread + means


def output_error(w, x, kept, bias):
    pruned = x[:, kept] @ w[:, kept].T + (0 if bias is None else bias.float())
    return ((x @ w.T) - pruned).norm() / (x @ w.T).norm()


def test_fluctuation_with_bias_compensation_has_the_lowest_output_error():
    x, w = structured_inputs(), torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    stats = ChannelStatistics()
    stats.add(x)
    kept, removed = lowest(fluctuation_scores(w, stats), 24)
    flap = output_error(w, x, kept, compensated_bias(w, None, removed, stats.mean))
    same_channels_plain = output_error(w, x, kept, None)
    magnitude_kept, _ = lowest(w.pow(2).sum(0), 24)
    magnitude_plain = output_error(w, x, magnitude_kept, None)
    assert flap < 0.5 * same_channels_plain
    assert flap < 0.5 * magnitude_plain


def test_a_constant_channel_goes_first_and_compensation_makes_its_removal_exact():
    x, w = torch.randn(500, 16), torch.randn(8, 16)
    x[:, 5] = 4.0  # never fluctuates, however large
    w[:, 5] *= 100
    stats = ChannelStatistics()
    stats.add(x)
    kept, removed = lowest(fluctuation_scores(w, stats), 1)
    assert removed.tolist() == [5]
    assert output_error(w, x, kept, compensated_bias(w, None, removed, stats.mean)) < 1e-6


# --- the whole model -------------------------------------------------------------------------------------


def block_linears(model):
    return {n: m for n, m in find_decoder_blocks(model).blocks[0].named_modules() if hasattr(m, "weight")
            and m.weight.dim() == 2}


@pytest.mark.parametrize("compensate", [False, True])
def test_llama_loses_exactly_the_removed_rows_and_columns(tokenizer, text_file, compensate):
    model = tiny_model("llama")  # hidden 64, MLP 128, 4 heads of 16 sharing 2 key/value heads, 3 blocks
    before = parameter_count(model)
    result = finished(model, tokenizer, text_file,
                      ("structured", {"mlp_ratio": 0.25, "head_ratio": 0.5, "bias_compensation": compensate}))
    hidden, channels_removed, head_dim = 64, 32, 16
    mlp = 3 * hidden * channels_removed  # gate and up rows, down columns
    attention = hidden * (2 * head_dim + head_dim + head_dim + 2 * head_dim)  # q, k, v rows; o columns
    expected = before - 3 * (mlp + attention)
    if compensate:  # mlp_bias and attention_bias give every kept row a bias
        expected += 3 * (2 * 96 + hidden + 2 * head_dim + 2 * head_dim + hidden)
    pruned = result.model
    assert parameter_count(pruned) == expected == result.report["steps"][0]["summary"]["parameters_after"]
    assert result.report["size_after"]["parameters"] == expected
    config = pruned.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        96, 2, 1, 16)
    assert config.mlp_bias is compensate and config.attention_bias is compensate
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in block_linears(pruned).items()}
    assert shapes == {"self_attn.q_proj": (32, 64), "self_attn.k_proj": (16, 64), "self_attn.v_proj": (16, 64),
                      "self_attn.o_proj": (64, 32), "mlp.gate_proj": (96, 64), "mlp.up_proj": (96, 64),
                      "mlp.down_proj": (64, 96)}
    layers = result.report["steps"][0]["layers"]
    down = next(r for r in layers if r["name"] == "model.layers.0.mlp.down_proj")
    assert down["parameters"] == 64 * 96 and down["sparsity"] == pytest.approx(0.25)


@pytest.mark.parametrize("kind", ARCHS)
def test_structured_export_reloads_with_plain_transformers_to_the_same_logits(kind, tokenizer, text_file, tmp_path):
    model = tiny_model(kind)
    result = finished(model, tokenizer, text_file,
                      ("structured", {"mlp_ratio": 0.25, "head_ratio": HEADS_EXPRESSIBLE[kind]}))
    pruned = result.model
    assert parameter_count(pruned) < parameter_count(model)
    reloaded = reload(pruned, tokenizer, tmp_path)
    assert parameter_count(reloaded) == parameter_count(pruned) == size_report(pruned)["parameters"]
    torch.testing.assert_close(logits(reloaded), logits(pruned), rtol=0, atol=1e-5)
    export_size = size_report(pruned, tmp_path / "export")
    assert export_size["memory_bytes"] < size_report(model)["memory_bytes"]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])  # gemma3: per-layer sliding-window types
def test_layer_drop_export_reloads_and_generates_with_its_cache(kind, tokenizer, text_file, tmp_path):
    model = tiny_model(kind)
    result = finished(model, tokenizer, text_file, ("layer_drop", {"blocks": 1}))
    pruned = result.model
    assert len(find_decoder_blocks(pruned).blocks) == pruned.config.num_hidden_layers == 2
    reloaded = reload(pruned, tokenizer, tmp_path)
    assert parameter_count(reloaded) == parameter_count(pruned) == result.report["size_after"]["parameters"]
    torch.testing.assert_close(logits(reloaded), logits(pruned), rtol=0, atol=1e-5)
    prompt = calibration_tokens(1, 6, seed=3)
    generated = pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(generated, reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True))
    assert torch.equal(generated, pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


def test_zero_ratios_change_nothing(tokenizer, text_file):
    model = tiny_model("llama")
    result = finished(model, tokenizer, text_file, ("structured", {"mlp_ratio": 0.0, "head_ratio": 0.0}))
    assert result.model.config.to_dict() == model.config.to_dict()
    assert [p.data_ptr() for p in result.model.parameters()] == [p.data_ptr() for p in model.parameters()]
    torch.testing.assert_close(logits(result.model), logits(model), rtol=0, atol=0)
    assert result.report["steps"][0]["summary"]["parameters_removed"] == 0


def test_bias_compensation_lowers_the_model_error_on_relu_inputs(tokenizer, text_file):
    model = tiny_model("opt")  # fc2 reads ReLU outputs: non-negative, so far from zero-mean
    reference = logits(model)
    errors = {}
    for compensate in (False, True):
        result = finished(model, tokenizer, text_file,
                          ("structured", {"mlp_ratio": 0.5, "bias_compensation": compensate}))
        errors[compensate] = (logits(result.model) - reference).norm().item()
    assert errors[True] < errors[False]


def test_head_ratio_that_splits_a_key_value_group_is_refused_naming_the_possible_ratios(tokenizer, text_file):
    model = tiny_model("llama")  # 4 heads in 2 groups: 0.5 is possible, 0.25 is not
    problems = StructuredPruning().check_model(model, StructuredParams(head_ratio=0.25))
    assert len(problems) == 1 and "Possible head ratios: 0.5" in problems[0]
    result = run(model, tokenizer, text_file, ("structured", {"head_ratio": 0.25}))
    assert result.status == "failed" and result.bad_input and "Possible head ratios: 0.5" in result.error


def test_heads_of_an_architecture_whose_config_cannot_describe_them_are_refused():
    problems = StructuredPruning().check_model(tiny_model("gpt2"), StructuredParams(head_ratio=0.5))
    assert len(problems) == 1 and "use field 'head_ratio' 0" in problems[0]
    assert StructuredPruning().check_model(tiny_model("gpt2"), StructuredParams(head_ratio=0.0)) == []


def test_compensation_a_config_cannot_save_is_skipped_with_a_warning(tokenizer, text_file):
    events = []
    result = finished(tiny_model("qwen2"), tokenizer, text_file, ("structured", {"mlp_ratio": 0.25}),
                      events=events.append)
    warnings = [e.message for e in events if isinstance(e, Warning)]
    assert any("bias compensation skipped for the mlp" in w and "Qwen2Config" in w for w in warnings)
    assert find_decoder_blocks(result.model).blocks[0].mlp.down_proj.bias is None


def test_earlier_masks_are_cut_like_the_weights(tokenizer, text_file):
    result = finished(tiny_model("llama"), tokenizer, text_file, ("magnitude", {"sparsity": 0.5}),
                      ("structured", {"mlp_ratio": 0.25, "head_ratio": 0.5}))
    layers = dict(result.model.named_modules())
    state = compression_state(result.model)
    assert len(state) == 3 * 7
    for name, record in state.items():
        w = weight_matrix(layers[name])
        assert record.mask.shape == w.shape
        assert torch.all(w[~record.mask] == 0)


def test_earlier_quantization_codes_stay_valid_or_are_dropped(tokenizer, text_file):
    events = []
    result = finished(tiny_model("llama"), tokenizer, text_file, ("rtn", {"bits": 4, "group_size": 32}),
                      ("structured", {"mlp_ratio": 0.25}), events=events.append)
    layers = dict(result.model.named_modules())
    state = compression_state(result.model)
    for name, record in state.items():
        if name.endswith("down_proj"):  # its input groups of 32 are split by the removed channels
            assert record.quant is None
        else:  # whole rows removed (gate, up) or nothing (attention): codes still describe the weight
            torch.testing.assert_close(record.quant.dequantize(), weight_matrix(layers[name]))
    assert sum("codes were dropped" in e.message for e in events if isinstance(e, Warning)) == 3


def test_cancelling_mid_way_leaves_the_original_unchanged(tokenizer, text_file):
    model = tiny_model("llama")
    before = snapshot(model)
    cancel = CancelToken()

    def events(event):
        if isinstance(event, Progress) and event.index == 0 and event.done == 1:
            cancel.cancel()

    result = run(model, tokenizer, text_file, ("structured", {"mlp_ratio": 0.5, "head_ratio": 0.5}),
                 events=events, cancel=cancel)
    assert result.status == "cancelled"
    assert_unchanged(model, before)


@pytest.mark.parametrize("step", [("structured", {"mlp_ratio": 0.5, "head_ratio": 0.5}),
                                  ("layer_drop", {"blocks": 2})])
def test_the_runs_input_keeps_its_architecture(step, tokenizer, text_file):
    model = tiny_model("llama")
    before = snapshot(model)
    result = finished(model, tokenizer, text_file, step)
    assert parameter_count(result.model) < parameter_count(model)
    assert_unchanged(model, before)


# --- layer dropping ------------------------------------------------------------------------------------------


def with_identity_block(index, kind="llama"):
    """A model whose block `index` adds nothing to the residual stream: its output projections are zero."""
    model = tiny_model(kind)
    block = find_decoder_blocks(model).blocks[index]
    for layer in (block.self_attn.o_proj, block.mlp.down_proj):
        layer.weight.data = torch.zeros_like(layer.weight)
    return model


def test_the_identity_block_has_zero_influence_and_is_the_one_removed(tokenizer, text_file):
    model = with_identity_block(1)
    result = finished(model, tokenizer, text_file, ("layer_drop", {"blocks": 1}))
    summary = result.report["steps"][0]["summary"]
    assert summary["removed"] == [1]
    influence = summary["block_influence"]
    assert influence[1] == pytest.approx(0, abs=1e-6) and min(influence[0], influence[2]) > 0.01
    torch.testing.assert_close(logits(result.model), logits(model), rtol=0, atol=1e-5)  # it did nothing
    assert [b.self_attn.layer_idx for b in find_decoder_blocks(result.model).blocks] == [0, 1]


def test_records_of_later_blocks_follow_them_to_their_new_number(tokenizer, text_file):
    model = with_identity_block(1)
    result = finished(model, tokenizer, text_file, ("magnitude", {"sparsity": 0.5}), ("layer_drop", {"blocks": 1}))
    summary = result.report["steps"][1]["summary"]
    assert (summary["records_renamed"], summary["records_dropped"]) == (7, 7)
    state = compression_state(result.model)
    assert {name.split(".")[2] for name in state} == {"0", "1"}
    original = dict(model.named_modules())
    layers = dict(result.model.named_modules())
    for name, record in state.items():
        w = weight_matrix(layers[name])
        assert torch.all(w[~record.mask] == 0) and torch.all(w[record.mask] != 0)
    moved = weight_matrix(layers["model.layers.1.mlp.up_proj"])
    source = weight_matrix(original["model.layers.2.mlp.up_proj"])
    assert torch.equal(moved, source * state["model.layers.1.mlp.up_proj"].mask)


def test_removing_every_targeted_block_is_refused():
    model = tiny_model("llama")
    bad = parse_recipe({"schema_version": 2, "calibration": {"text_file": "x.txt"},
                        "steps": [{"method": "layer_drop", "params": {"blocks": 3}}]})
    with pytest.raises(RecipeError, match="at most 2 can be removed"):
        prepare(bad, model)
    ok = parse_recipe({"schema_version": 2, "calibration": {"text_file": "x.txt"},
                       "steps": [{"method": "layer_drop", "params": {"blocks": 2}}]})
    prepare(ok, model)


def test_layer_drop_cancelled_leaves_the_original_unchanged(tokenizer, text_file):
    model = tiny_model("qwen2")
    before = snapshot(model)
    cancel = CancelToken()

    def events(event):
        if isinstance(event, Progress) and event.index == 0 and event.done == 2:
            cancel.cancel()

    result = run(model, tokenizer, text_file, ("layer_drop", {"blocks": 1}), events=events, cancel=cancel)
    assert result.status == "cancelled"
    assert_unchanged(model, before)
