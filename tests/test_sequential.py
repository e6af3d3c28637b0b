"""Stage-by-stage compression in one pass (studio.core.sequential): the stages, what each sees, clean ends."""

import copy
import gc

import pytest
import torch
from greenlet import greenlet
from torch import nn

from conftest import ARCHS, calibration_tokens, tiny_model
from studio.core.calibration import BlockPass, CalibrationData, block_output, _BlockCall, layerwise
from studio.core.errors import Cancelled
from studio.core.events import CancelToken
from studio.core import sequential
from studio.core.sequential import choose_stage_runner, learn_stages, paused_bytes
from studio.core.structure import TargetSpec, target_layers


def first_block(kind, samples=5, cancel=None):
    model = tiny_model(kind)
    walk = layerwise(model, CalibrationData(calibration_tokens(samples=samples), 2),
                     target_layers(model, TargetSpec()), cancel=cancel)
    return model, next(walk)


def short(stages):
    return [tuple(name.rsplit(".", 1)[-1] for name in stage) for stage in stages]


def test_a_llama_block_has_the_four_stages_of_the_gptq_reference():
    _, block = first_block("llama")
    assert short(learn_stages(block, {})) == [("q_proj", "k_proj", "v_proj"), ("o_proj",),
                                              ("gate_proj", "up_proj"), ("down_proj",)]


@pytest.mark.parametrize("kind", ARCHS + ["gemma3"])
def test_stages_cover_every_layer_once_in_the_order_the_block_calls_them(kind):
    _, block = first_block(kind)
    stages = learn_stages(block, {})
    order = []
    block.forward(lambda name, x, y: order.append(name) if name not in order else None)
    assert [name for stage in stages for name in stage] == order


def paused_batches():
    gc.collect()
    return [g for g in gc.get_objects() if type(g) is greenlet and g.parent is not None and g and not g.dead]


def halve(block_pass, stage):
    for name in stage:
        block_pass.layers[name].weight.data = block_pass.layers[name].weight.data * 0.5


@pytest.mark.parametrize("runner", ["one_pass", "rerun"])
@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_each_stage_sees_the_inputs_the_compressed_stages_before_it_give(kind, runner, monkeypatch):
    monkeypatch.setattr(sequential, "choose_stage_runner", lambda *args: runner)
    model, block = first_block(kind)
    reference = copy.deepcopy(block.block)
    reference_layers = dict(zip(block.layers, [dict(reference.named_modules())[n.split(f".{block.index}.", 1)[1]]
                                               for n in block.layers]))
    inputs = [h.clone() for h in block.inputs]
    seen = {}
    block.compress_in_stages(lambda stage, x: seen.setdefault(stage, []).append(x.clone()),
                             lambda stage: halve(block, stage))
    for stage, observed in seen.items():
        expected = []
        handle = reference_layers[stage[0]].register_forward_pre_hook(
            lambda m, args: expected.append(args[0].reshape(-1, args[0].shape[-1]).clone()))
        with torch.no_grad():
            for b, h in enumerate(inputs):
                reference(h, *block._call.args[b], **block._call.kwargs[b])
        handle.remove()
        torch.testing.assert_close(torch.cat(observed), torch.cat(expected))
        for name in stage:  # the reference catches up: this stage compressed before the next is checked
            reference_layers[name].weight.data = reference_layers[name].weight.data * 0.5
    staged = block._outputs
    with torch.no_grad():
        again = [block_output(block.block(h, *block._call.args[b], **block._call.kwargs[b]))
                 for b, h in enumerate(inputs)]
    torch.testing.assert_close(torch.cat(staged), torch.cat(again))  # the pass gave the compressed block's outputs
    assert block.outputs() is staged  # and they are reused, not computed again


def test_the_one_pass_is_taken_only_while_its_paused_batches_are_small_beside_the_model_and_the_free_memory(
        monkeypatch):
    from studio.core import memory

    _, block = first_block("llama", samples=7)
    stages = learn_stages(block, {})
    tokens = sum(h.numel() // h.shape[-1] for h in block.inputs)
    hidden, widest = block.inputs[0].shape[-1], max(m.in_features for m in block.layers.values())
    paused = paused_bytes(block, stages)
    assert paused == tokens * (2 * hidden + widest) * 4
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 4 * paused)
    assert choose_stage_runner(block, stages) == "one_pass"
    assert choose_stage_runner(block, stages, "auto", model_bytes=10 * paused) == "one_pass"
    assert choose_stage_runner(block, stages, "auto", model_bytes=10 * paused - 1) == "rerun"
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 4 * paused - 1)
    assert choose_stage_runner(block, stages, "auto", model_bytes=100 * paused) == "rerun"
    assert choose_stage_runner(block, stages, "one_pass", model_bytes=paused) == "one_pass"  # the recipe decides
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 100 * paused)
    assert choose_stage_runner(block, stages, "rerun") == "rerun"


@pytest.mark.parametrize("stage_pass", ["rerun", "one_pass"])
def test_the_recipe_chooses_the_stage_runner(stage_pass, monkeypatch):
    from studio.core.calibration import CalibrationSettings

    chosen = []
    choose = sequential.choose_stage_runner
    monkeypatch.setattr(sequential, "choose_stage_runner", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    model = tiny_model("llama")
    calibration = CalibrationData(calibration_tokens(samples=3), 2, CalibrationSettings(stage_pass=stage_pass))
    for block in layerwise(model, calibration, target_layers(model, TargetSpec())):
        block.compress_in_stages(lambda stage, x: None, lambda stage, block=block: halve(block, stage))
    assert chosen and set(chosen) == {stage_pass}


@pytest.mark.parametrize("kind", ARCHS)
def test_both_runners_give_every_stage_the_same_inputs_and_the_block_the_same_weights(kind, monkeypatch):
    def compress_all(runner):
        monkeypatch.setattr(sequential, "choose_stage_runner", lambda *args: runner)
        model = tiny_model(kind)
        seen = []
        for block in layerwise(model, CalibrationData(calibration_tokens(samples=5), 2),
                               target_layers(model, TargetSpec())):
            block.compress_in_stages(lambda stage, x: seen.append((stage, x.clone())),
                                     lambda stage, block=block: halve(block, stage))
        return model, seen

    (one, seen_one), (rerun, seen_rerun) = compress_all("one_pass"), compress_all("rerun")
    assert [stage for stage, _ in seen_one] == [stage for stage, _ in seen_rerun]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen_one, seen_rerun))
    assert all(torch.equal(a, b) for a, b in zip(one.parameters(), rerun.parameters()))


def test_a_failing_stage_ends_every_paused_batch_and_removes_the_hooks():
    _, block = first_block("llama", samples=7)  # 4 batches

    def fail(stage):
        if "o_proj" in stage[0]:
            raise RuntimeError("boom")
        halve(block, stage)

    with pytest.raises(RuntimeError, match="boom"):
        block.compress_in_stages(lambda stage, x: None, fail)
    assert paused_batches() == []
    assert all(not m._forward_pre_hooks for m in block.block.modules())


def test_cancelling_between_stages_ends_every_paused_batch():
    cancel = CancelToken()
    _, block = first_block("llama", samples=7, cancel=cancel)
    with pytest.raises(Cancelled):
        block.compress_in_stages(lambda stage, x: None, lambda stage: cancel.cancel())
    assert paused_batches() == []
    assert torch.is_grad_enabled()  # the pass leaves the thread's grad mode as it found it


class CallsOneLayerTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, h):
        return self.b(self.a(self.a(h)))


def test_a_block_that_calls_a_layer_twice_is_observed_whole_then_run_again():
    torch.manual_seed(0)
    module = CallsOneLayerTwice()
    inputs = [torch.randn(2, 3, 8), torch.randn(2, 3, 8)]
    block = BlockPass(0, module, {"a": module.a, "b": module.b}, inputs, _BlockCall([(), ()], [{}, {}]), CancelToken())
    assert learn_stages(block, {}) is None
    rows, compressed = {}, []
    block.compress_in_stages(lambda stage, x: rows.__setitem__(stage, rows.get(stage, 0) + len(x)),
                             lambda stage: (compressed.append(stage), halve(block, stage)))
    assert compressed == [("a",), ("b",)] and rows == {("a",): 2 * 12, ("b",): 12}
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(block.outputs()), torch.cat([module(h) for h in inputs]))
