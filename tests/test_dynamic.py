"""Dynamic networks measured at inference: confidence-based early exit (CALM) and self-speculative decoding with
layer skipping (Draft & Verify), on tiny random models."""

import json

import pytest
import torch

import studio.methods.early_exit as early_exit
import studio.methods.self_speculative as self_speculative
from conftest import VOCAB, calibration_tokens, tiny_model
from studio.core import events as ev
from studio.core.calibration import CalibrationData
from studio.core.context import Evaluation, StepContext
from studio.core.errors import RecipeError
from studio.core.evaluation.perplexity import PerplexityConfig, perplexity
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.runner import prepare, run_recipe
from studio.core.structure import find_decoder_blocks
from studio.methods.decoding import find_output_head, greedy_generate

N_BLOCKS = 3  # the tiny models' depth


@pytest.fixture(autouse=True)
def one_thread():
    """Token-by-token decoding of a tiny model is all overhead: on a loaded 2-core machine a second thread makes
    each forward ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context(model, tokenizer=None, evaluation=None, tokens=None):
    tokens = calibration_tokens(4, 40) if tokens is None else tokens
    return StepContext(model, {}, 0, ev.ignore, ev.CancelToken(), calibration=CalibrationData(tokens, 2),
                       tokenizer_or_loader=tokenizer, evaluation=evaluation)


def exit_state(model, threshold, measure="top_probability"):
    state = early_exit.ExitState(find_output_head(model), N_BLOCKS, measure)
    state.threshold = threshold
    return state


def score(model, state, segments):
    with early_exit.exit_hooks(model, state):
        return early_exit.exit_perplexity(model, state, segments, lambda: None)


def blocks_in_forward(model) -> dict:
    return {i: b.__dict__.get("forward") for i, b in enumerate(find_decoder_blocks(model).blocks)}


# --- early exit -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt", "gpt2"])
def test_threshold_one_is_exactly_the_full_model(kind, tokenizer):
    model = tiny_model(kind)
    stream = torch.randint(3, VOCAB, (1, 150), generator=torch.Generator().manual_seed(1))
    config = PerplexityConfig("unused.txt", max_tokens=None, window=48, stride=20)
    ctx = context(model, tokenizer, Evaluation(stream, config))
    result = score(model, exit_state(model, 1.0), early_exit.scoring_segments(ctx, 10_000))
    full = perplexity(model, stream[0], config, tokenizer)
    assert result.perplexity == full.perplexity and result.tokens == full.tokens_scored
    assert result.avg_blocks == N_BLOCKS
    assert not any(blocks_in_forward(model).values())  # the hooks are gone


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt", "gpt2"])
def test_threshold_zero_exits_after_the_first_block(kind):
    model = tiny_model(kind)
    segments = early_exit.scoring_segments(context(model), 10_000)
    state = exit_state(model, 0.0)
    assert score(model, state, segments).avg_blocks == 1.0
    used = []
    with early_exit.exit_hooks(model, state):
        early_exit.early_exit_generate(model, state, calibration_tokens(1, 10)[0], 8, used)
    assert used == [1] * 7


@pytest.mark.parametrize("measure", ["top_probability", "top2_margin"])
def test_blocks_used_grow_with_the_threshold(measure):
    model = tiny_model("qwen2")
    segments = early_exit.scoring_segments(context(model), 10_000)
    averages = [score(model, exit_state(model, t, measure), segments).avg_blocks
                for t in [0.0, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.02, 1.0]]
    assert averages == sorted(averages) and averages[0] == 1 and averages[-1] == N_BLOCKS
    assert any(1 < a < N_BLOCKS for a in averages)  # some thresholds exit part of the tokens


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_generation_with_state_propagation_predicts_as_scoring_does(kind):
    """Decoding token by token, skipped blocks only writing the copied state's keys and values, gives the same
    tokens and exits as scoring the generated text at once with the full model reading the prompt."""
    model = tiny_model(kind)
    prompt = calibration_tokens(1, 12, seed=3)[0]
    state = exit_state(model, 0.005)
    used = []
    with early_exit.exit_hooks(model, state), torch.inference_mode():
        generated = early_exit.early_exit_generate(model, state, prompt, 16, used)
        ids = torch.cat([prompt, torch.tensor(generated[:-1])])
        state.full_prefix, state.active = len(prompt), True
        logits = model(input_ids=ids[None], use_cache=False).logits[0, len(prompt) - 1:]
        state.active = False
    assert min(used) < max(used)  # some tokens exit early, some go through every block
    assert state.blocks_used[0, len(prompt):].tolist() == used
    assert logits.argmax(-1).tolist() == generated


def test_skipped_blocks_do_no_attention_or_mlp_work():
    model = tiny_model("llama")
    calls = []
    last = find_decoder_blocks(model).blocks[-1]
    handles = [last.mlp.register_forward_hook(lambda *a: calls.append("mlp")),
               last.self_attn.o_proj.register_forward_hook(lambda *a: calls.append("attention"))]
    state = exit_state(model, 0.0)
    with early_exit.exit_hooks(model, state):
        early_exit.early_exit_generate(model, state, calibration_tokens(1, 10)[0], 6)
    for handle in handles:
        handle.remove()
    assert calls == ["attention", "mlp"]  # the prompt only; each decoded token only cached its keys and values
    assert greedy_generate(model, calibration_tokens(1, 10)[0], 6) == model.generate(
        calibration_tokens(1, 10), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, 10:].tolist()


def test_thresholds_are_validated_naming_the_field():
    for bad in ["0.5,abc", "0.5,1.5", ""]:
        recipe = parse_recipe({"schema_version": 2, "steps": [{"method": "early_exit", "params": {"thresholds": bad}}]})
        with pytest.raises(RecipeError, match="field 'thresholds'"):
            prepare(recipe, tiny_model("llama"))
    assert early_exit.EarlyExitParams(thresholds="0.9, 0.5,0.9").threshold_values == [0.5, 0.9]


def test_a_model_whose_final_norm_cannot_be_told_is_refused():
    model = tiny_model("llama")
    model.model.extra_norm = torch.nn.LayerNorm(64)
    problems = early_exit.EarlyExit().check_model(model, early_exit.EarlyExitParams())
    assert problems and "cannot tell which norm" in problems[0]
    assert early_exit.EarlyExit().check_model(tiny_model("gpt2"), early_exit.EarlyExitParams()) == []


# --- self-speculative decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt", "gpt2"])
def test_self_speculative_output_is_greedy(kind):
    model = tiny_model(kind)
    prompts = calibration_tokens(3, 10, seed=5)
    greedy = [greedy_generate(model, prompt, 15) for prompt in prompts]
    for skipped in ([], [2], [1, 2]):
        skipper = self_speculative.BlockSkipper(model, skipped)
        for draft_tokens in (1, 3, 6):
            stats = self_speculative.DraftStats()
            with skipper.patch:
                for prompt, expected in zip(prompts, greedy):
                    assert self_speculative.speculative_generate(
                        model, skipper, prompt, 15, draft_tokens, stats) == expected, (skipped, draft_tokens)
            assert stats.drafted > 0
            if not skipped:  # the draft is the full model: every drafted token is accepted
                assert stats.accepted == stats.drafted


def test_a_bad_draft_is_rejected_and_the_cache_still_serves_the_full_model():
    model = tiny_model("qwen2")
    skipper = self_speculative.BlockSkipper(model, [1, 2])
    stats = self_speculative.DraftStats()
    prompt = calibration_tokens(1, 10, seed=2)[0]
    with skipper.patch:
        out = self_speculative.speculative_generate(model, skipper, prompt, 20, 4, stats)
    assert stats.accepted < stats.drafted  # rejections happened, the rolled-back cache still gives greedy
    assert out == greedy_generate(model, prompt, 20)
    assert not any(blocks_in_forward(model).values())


def test_skip_count_is_checked_against_the_model():
    problems = self_speculative.SelfSpeculative().check_model(
        tiny_model("llama"), self_speculative.SelfSpeculativeParams(skip_blocks=3))
    assert problems and "field 'skip_blocks'" in problems[0]


# --- through the runner -------------------------------------------------------------------------------------------


def recipe_of(text_file, method, params):
    return parse_recipe({"schema_version": 2, "calibration": {"text_file": str(text_file), "samples": 4,
                                                              "seq_len": 24},
                         "steps": [{"method": method, "params": params}]})


@pytest.fixture
def loaded(tokenizer):
    def make(kind):
        return LoadedModel(tiny_model(kind), tokenizer, {"kind": "test", "name": f"tiny-{kind}"})

    return make


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_both_methods_run_through_the_runner(kind, loaded, text_file):
    config = PerplexityConfig(str(text_file), max_tokens=64, window=32, stride=16)
    ee = recipe_of(text_file, "early_exit", {"thresholds": "0,0.5,1", "tokens": 64, "prompts": 2,
                                             "prompt_tokens": 8, "max_new_tokens": 6})
    result = run_recipe(ee, loaded(kind), eval_config=config)
    assert result.status == "finished", result.error
    summary = result.report["steps"][0]["summary"]
    rows = summary["rows"]
    assert [r["threshold"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["avg_blocks"] == 1 and rows[-1]["avg_blocks"] == N_BLOCKS
    assert rows[-1]["perplexity"] == pytest.approx(result.report["baseline"]["perplexity"], rel=0, abs=0)
    assert all(r["tokens_per_second"] > 0 and r["speedup"] > 0 for r in rows)
    assert summary["tokens_scored"] == result.report["baseline"]["tokens_scored"]

    ss = recipe_of(text_file, "self_speculative", {"skip_blocks": 1, "draft_tokens": 3, "max_new_tokens": 12,
                                                   "prompts": 3, "prompt_tokens": 8})
    result = run_recipe(ss, loaded(kind))
    assert result.status == "finished", result.error
    summary = result.report["steps"][0]["summary"]
    assert summary["identical_to_greedy"] and summary["mismatches"] == []
    assert len(summary["skipped_blocks"]) == 1 and summary["skipped_blocks"][0] != 0
    assert 0 <= summary["acceptance_rate"] <= 1 and summary["speedup"] > 0
    json.dumps(result.report)


@pytest.mark.parametrize("method, params, unit", [
    ("early_exit", {"thresholds": "0.5,1", "tokens": 64, "prompts": 1, "max_new_tokens": 4}, "pass"),
    ("self_speculative", {"skip_blocks": 1, "prompts": 3, "max_new_tokens": 4}, "prompt"),
])
def test_cancel_mid_measurement(method, params, unit, loaded, text_file):
    recipe = recipe_of(text_file, method, params)
    token = ev.CancelToken()
    seen = []

    def on_event(event):
        seen.append(event)
        if isinstance(event, ev.Progress) and event.unit == unit:
            token.cancel()

    model = loaded("llama")
    result = run_recipe(recipe, model, events=on_event, cancel=token)
    assert result.status == "cancelled"
    assert sum(isinstance(e, ev.Progress) and e.unit == unit for e in seen) == 1
    assert not any(blocks_in_forward(model.model).values())
