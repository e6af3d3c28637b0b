"""The layer-wise calibration engine: captured inputs, block-by-block propagation, sampling, recipe wiring."""

import pytest
import torch

from conftest import ARCHS, calibration_tokens, tiny_model
from studio.core.calibration import CalibrationData, CalibrationSettings, layerwise, load_calibration_tokens
from studio.core.errors import Cancelled, RecipeError
from studio.core.events import CancelToken, Progress
from studio.core.recipe import parse_recipe
from studio.core.runner import prepare
from studio.core.structure import target_layers, TargetSpec


@pytest.mark.parametrize("kind", ARCHS + ["gemma3"])
def test_each_block_sees_the_hidden_states_the_whole_model_gives_it(kind):
    model = tiny_model(kind)
    tokens = calibration_tokens(samples=5)
    with torch.no_grad():
        expected = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
    data = CalibrationData(tokens, batch_size=2)  # 5 samples: batches of 2, 2 and 1
    seen = 0
    for block in layerwise(model, data, target_layers(model, TargetSpec()), all_blocks=True):
        torch.testing.assert_close(torch.cat(block.inputs), expected[block.index], rtol=1e-4, atol=1e-5)
        seen += 1
    assert seen == len(expected) - 1


def test_hooks_see_each_targeted_layer_input_and_a_changed_block_is_run_again():
    model = tiny_model("llama")
    tokens = calibration_tokens(samples=4, length=16)
    layers = target_layers(model, TargetSpec(("*.mlp.down_proj",)))
    inputs_of_block_1 = None
    for block in layerwise(model, CalibrationData(tokens, 2), layers):
        rows = {}
        block.forward(lambda name, x, y: rows.__setitem__(name, rows.get(name, 0) + x.shape[0]))
        assert rows == {name: 4 * 16 for name in block.layers}
        if block.index == 0:
            (name, module), = block.layers.items()
            module.weight.data = torch.zeros_like(module.weight)  # the method "compresses" block 0
        if block.index == 1:
            inputs_of_block_1 = torch.cat(block.inputs)
    with torch.no_grad():
        expected = model(input_ids=tokens, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(inputs_of_block_1, expected)  # computed with block 0's new weights


@pytest.mark.parametrize("kind", ARCHS)
def test_observing_inputs_sees_what_the_full_pass_sees_and_skips_the_rest_of_the_block(kind):
    model = tiny_model(kind)
    layers = target_layers(model, TargetSpec())
    walk = layerwise(model, CalibrationData(calibration_tokens(samples=3, length=16), 2), layers)
    block = next(walk)
    full, observed = {}, {}
    block.forward(lambda name, x, _y: full.setdefault(name, []).append(x.clone()))
    last = list(full)[-1]  # the last targeted layer the block runs
    calls = []
    handle = block.layers[last].register_forward_hook(lambda *a: calls.append(1))
    block.observe_inputs(lambda name, x: observed.setdefault(name, []).append(x.clone()))
    handle.remove()
    assert list(observed) == list(full)
    for name in full:
        torch.testing.assert_close(torch.cat(observed[name]), torch.cat(full[name]))
    assert calls == []  # each batch stopped before the last layer ran


def test_progress_per_block_and_cancellation_between_batches():
    model = tiny_model("llama")
    events, cancel = [], CancelToken()
    layers = target_layers(model, TargetSpec())
    walk = layerwise(model, CalibrationData(calibration_tokens(), 2), layers, cancel=cancel, emit=events.append)
    next(walk)
    cancel.cancel()
    with pytest.raises(Cancelled):
        next(walk)
    assert [e.done for e in events if isinstance(e, Progress)] == [0]


def test_samples_are_windows_of_the_text_chosen_by_the_seed(tokenizer, text_file):
    settings = CalibrationSettings(text_file=str(text_file), samples=4, seq_len=12, seed=3)
    a, b = load_calibration_tokens(tokenizer, settings), load_calibration_tokens(tokenizer, settings)
    assert a.shape == (4, 12) and torch.equal(a, b)
    other = load_calibration_tokens(tokenizer, settings.model_copy(update={"seed": 4}))
    assert not torch.equal(a, other)
    stream = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    joined = ",".join(map(str, stream))
    assert (a[:, 0] == tokenizer.bos_token_id).all()  # like evaluation windows, each sample starts with BOS
    assert all(",".join(map(str, row.tolist())) in joined for row in a[:, 1:])
    plain = load_calibration_tokens(tokenizer, settings.model_copy(update={"bos": "never"}))
    assert plain.shape == (4, 12) and all(",".join(map(str, row.tolist())) in joined for row in plain)


def test_bad_calibration_text_is_named(tokenizer, tmp_path):
    with pytest.raises(RecipeError, match="missing.txt"):
        load_calibration_tokens(tokenizer, CalibrationSettings(text_file=str(tmp_path / "missing.txt")))
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(RecipeError, match="fewer than one sample"):
        load_calibration_tokens(tokenizer, CalibrationSettings(text_file=str(short), seq_len=512))


def test_recipe_calibration_section_round_trips_and_is_checked():
    recipe = parse_recipe({"schema_version": 2, "calibration": {"text_file": "c4.txt", "samples": 8},
                           "steps": [{"method": "rtn"}]})
    assert recipe.calibration.samples == 8
    assert parse_recipe(recipe.to_dict()).calibration == recipe.calibration
    with pytest.raises(RecipeError, match="calibration.samples"):
        parse_recipe({"schema_version": 2, "calibration": {"samples": 0}, "steps": [{"method": "rtn"}]})
    with pytest.raises(RecipeError, match="calibration.sampels"):
        parse_recipe({"schema_version": 2, "calibration": {"sampels": 4}, "steps": [{"method": "rtn"}]})
    old = parse_recipe({"schema_version": 1, "steps": [{"method": "rtn"}]})  # version 1 migrates
    assert old.calibration is None
