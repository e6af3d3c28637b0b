import math
import tempfile

import pytest
import torch
import torch.nn.functional as F

import studio.methods.distillation  # noqa: F401  (registers "distill")
from conftest import VOCAB, calibration_tokens, tiny_model
from studio.core.calibration import CalibrationData
from studio.core.clone import clone_sharing_weights
from studio.core.context import StepContext
from studio.core.errors import Cancelled, RecipeError
from studio.core.events import CancelToken, Metric, Warning
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.runner import prepare, run_recipe
from studio.core.state import compression_state
from studio.core.registry import LayerReport
from studio.core.structure import TargetSpec, iter_layers, target_layers, weight_matrix
from studio.methods.distillation import (
    DistillParams,
    TeacherTargets,
    cut_windows,
    divergence,
    generalized_jsd,
    kd_loss,
    matched_blocks,
    split_holdout,
)
from studio.methods.lora import LoraAdapter
from studio.methods.magnitude import layer_mask
from studio.methods.teacher_logits import TopKTeacherCache


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a shared, loaded CPU their synchronization costs 10-100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits_pair(tokens=40, vocab=50, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * scale, \
        torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * scale


# --- losses ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "gkd"])
def test_every_loss_is_zero_when_student_equals_teacher_and_positive_otherwise(loss):
    student, teacher = logits_pair()
    same = kd_loss(teacher, TeacherTargets(logits=teacher), loss, 0.5, 2.0)
    different = kd_loss(student, TeacherTargets(logits=teacher), loss, 0.5, 2.0)
    assert abs(same.item()) < 1e-6
    assert different.item() > 0.01


def test_forward_kl_is_hintons_softened_kl_times_t_squared():
    student, teacher = logits_pair()
    t = 2.5
    p = torch.softmax(teacher / t, -1)
    q = torch.softmax(student / t, -1)
    manual = (p * (p.log() - q.log())).sum(-1).mean() * t**2
    assert torch.allclose(kd_loss(student, TeacherTargets(logits=teacher), "forward_kl", 0.5, t).double(), manual)


def test_reverse_kl_swaps_the_roles():
    student, teacher = logits_pair()
    forward_swapped = kd_loss(teacher, TeacherTargets(logits=student), "forward_kl", 0.5, 1.0)
    assert torch.allclose(kd_loss(student, TeacherTargets(logits=teacher), "reverse_kl", 0.5, 1.0), forward_swapped)


def test_generalized_jsd_tends_to_forward_kl_and_reverse_kl_at_the_ends():
    student, teacher = (F.log_softmax(x, -1) for x in logits_pair(scale=1.0))  # ratios p_T/p_S stay moderate
    forward = divergence(student, teacher, "forward_kl", 0.5)
    reverse = divergence(student, teacher, "reverse_kl", 0.5)
    small, large = 1e-8, 1 - 1e-8
    assert torch.allclose(generalized_jsd(student, teacher, small) / small, forward, rtol=1e-3)
    assert torch.allclose(generalized_jsd(student, teacher, large) / (1 - large), reverse, rtol=1e-3)


def test_generalized_jsd_at_one_half_is_the_symmetric_jensen_shannon_divergence():
    student, teacher = (F.log_softmax(x, -1) for x in logits_pair())
    jsd = generalized_jsd(student, teacher, 0.5)
    assert torch.allclose(jsd, generalized_jsd(teacher, student, 0.5))
    assert torch.all(jsd <= math.log(2) + 1e-9)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "gkd"])
def test_top_k_over_the_whole_vocabulary_equals_the_full_loss(loss):
    student, teacher = logits_pair()
    top = teacher.topk(teacher.shape[-1], dim=-1)
    full = kd_loss(student, TeacherTargets(logits=teacher), loss, 0.3, 1.5)
    sparse = kd_loss(student, TeacherTargets(topk=top.values, indices=top.indices), loss, 0.3, 1.5)
    assert torch.allclose(full, sparse)


def test_top_k_forward_kl_is_nonnegative_and_zero_only_for_the_teacher():
    student, teacher = logits_pair()
    top = teacher.topk(5, dim=-1)
    targets = TeacherTargets(topk=top.values, indices=top.indices)
    assert kd_loss(student, targets, "forward_kl", 0.5, 1.0).item() > 0
    # a student that puts the teacher's top-5 logits on the same tokens and nothing elsewhere matches exactly
    peaked = torch.full_like(teacher, -1e4).scatter(-1, top.indices, top.values)
    assert abs(kd_loss(peaked, targets, "forward_kl", 0.5, 1.0).item()) < 1e-6


def test_top_k_cache_keeps_the_largest_logits_and_deletes_its_folder():
    logits = torch.randn(3, 7, 30)
    with TopKTeacherCache(count=3, seq_len=7, k=4) as cache:
        cache.fill(torch.zeros(3, 7, dtype=torch.long), lambda ids: logits[: len(ids)] if len(ids) == 3 else None,
                   batch_size=3, check_cancel=lambda: None)
        values, indices = cache.read([2, 0], torch.device("cpu"))
        folder = cache.folder
        assert folder.exists()
    expected = logits[[2, 0]].topk(4, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    assert not folder.exists()


# --- windows and matching -------------------------------------------------------------------------------------


def test_windows_restart_with_bos_and_whole_samples_are_held_out():
    samples = torch.cat([torch.ones(4, 1, dtype=torch.long), torch.arange(4 * 20).view(4, 20) + 10], dim=1)
    windows = cut_windows(samples, 8, bos_id=1)
    assert windows.tokens.shape == (4 * 2, 8)  # 20 text tokens: two windows of BOS + 7
    assert torch.all(windows.tokens[:, 0] == 1)
    assert torch.equal(windows.tokens[1, 1:], samples[0, 8:15])
    train, held = split_holdout(windows, samples=4, fraction=0.25)
    assert {windows.sample[i] for i in held} == {3} and {windows.sample[i] for i in train} == {0, 1, 2}


def test_blocks_of_a_shallower_student_are_matched_evenly():
    assert matched_blocks(3, 3) == [0, 1, 2]
    assert matched_blocks(2, 4) == [1, 3]
    assert matched_blocks(4, 6) == [1, 2, 4, 5]


# --- LoRA -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_merged_lora_weight_computes_what_the_adapted_layer_computed(sparse):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 12)
    mask = torch.rand(12, 16) > 0.5 if sparse else None
    if sparse:
        layer.weight.data *= mask
    adapter = LoraAdapter(layer, rank=4, alpha=8.0, mask=mask)
    torch.nn.init.normal_(adapter.b)
    x = torch.randn(5, 16)
    with torch.no_grad():
        adapted = layer(x)
        merged = adapter.merged_weight(layer)
        adapter.remove()
        plain = layer(x)
    assert not torch.allclose(adapted, plain)
    assert torch.allclose(F.linear(x, merged, layer.bias), adapted, atol=1e-5)
    if sparse:
        assert torch.all(merged[~mask] == 0)


def test_lora_starts_as_the_identity_update():
    layer = torch.nn.Linear(8, 8)
    adapter = LoraAdapter(layer, rank=2, alpha=4.0)
    assert torch.equal(adapter.merged_weight(layer), layer.weight.data)
    adapter.remove()


# --- distillation on tiny models ------------------------------------------------------------------------------


def kl_to(teacher, student, tokens):
    with torch.no_grad():
        return kd_loss(student(input_ids=tokens).logits, TeacherTargets(logits=teacher(input_ids=tokens).logits),
                       "forward_kl", 0.5, 1.0).item()


def pruned(teacher, sparsity=0.5):
    """A working copy of `teacher` with magnitude-pruned linears and their mask records."""
    student = clone_sharing_weights(teacher)
    ctx = StepContext(student, target_layers(student, TargetSpec()), 0, lambda e: None, CancelToken())
    for name, module in iter_layers(ctx.layers):
        w = weight_matrix(module)
        mask = layer_mask(w, sparsity)
        ctx.replace_weight(name, module, w * mask, LayerReport(name), mask=mask, sparsity_pattern="unstructured")
    return student


def distill(student, teacher, tokens, events=None, cancel=None, **params):
    emitted = []
    ctx = StepContext(student, target_layers(student, TargetSpec()), 1, events or emitted.append,
                      cancel or CancelToken(), calibration=CalibrationData(tokens, 4), teacher=teacher)
    outcome = studio.methods.distillation.Distillation().apply(ctx, DistillParams(**params))
    return outcome, emitted


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, saved):
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def sharpened(kind="llama"):
    """A tiny model with larger weights than the default init, so its next-token distributions are far from
    uniform and a perturbation changes them measurably."""
    model = tiny_model(kind)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    return model


FAST = dict(steps=40, batch_size=8, seq_len=32, learning_rate=3e-3, eval_every=10, patience=0)
RATE = {"all": 3e-3, "lora": 1e-2, "norms_biases": 1e-2}


@pytest.mark.parametrize("trainable", ["all", "lora", "norms_biases"])
def test_distillation_after_pruning_lowers_held_out_kl_and_keeps_masks_and_the_teacher(trainable):
    teacher = sharpened()
    saved = snapshot(teacher)
    student = pruned(teacher)
    masks = {n: r.mask.clone() for n, r in compression_state(student).items()}
    held_out = calibration_tokens(8, 32, seed=7)
    before = kl_to(teacher, student, held_out)
    outcome, events = distill(student, teacher, calibration_tokens(96, 32), trainable=trainable,
                              **{**FAST, "learning_rate": RATE[trainable]})
    after = kl_to(teacher, student, held_out)
    assert after < 0.9 * before, (before, after)
    assert_same(teacher, saved)
    layers = dict(student.named_modules())
    for name, record in compression_state(student).items():
        assert torch.equal(record.mask, masks[name])
        assert torch.all(weight_matrix(layers[name])[~record.mask] == 0)
        assert record.sparsity_pattern == "unstructured"
    summary = outcome.summary
    assert summary["steps_run"] == 40 and len(summary["loss_curve"]) == 40
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"]
    assert summary["trainable_parameters"] > 0
    assert not any(p.requires_grad for p in student.parameters())
    assert not student.training
    if trainable == "norms_biases":
        assert outcome.layers == []  # linear weights untouched
    else:
        assert len(outcome.layers) == 21 and all(r.error > 0 for r in outcome.layers)
    assert sum(isinstance(e, Metric) and e.name == "distill_loss" for e in events) == 40


def test_quantized_layers_are_frozen_with_their_codes_intact():
    teacher = sharpened()
    saved = snapshot(teacher)
    recipe = parse_recipe({"schema_version": 1, "steps": [{"method": "rtn", "params": {"bits": 4, "group_size": 32},
                                                            "targets": {"include": ["*mlp*"]}}]})
    student = run_recipe(recipe, LoadedModel(teacher, None, {})).model
    layers = dict(student.named_modules())
    quantized = {n: weight_matrix(layers[n]).clone() for n, r in compression_state(student).items() if r.quant}
    assert len(quantized) == 9
    outcome, events = distill(student, teacher, calibration_tokens(8, 24), trainable="lora", **FAST)
    for name, weight in quantized.items():
        record = compression_state(student)[name]
        assert record.quant is not None and record.quant.describes(weight_matrix(layers[name]))
        assert torch.equal(weight_matrix(layers[name]), weight)
    assert {r.name for r in outcome.layers}.isdisjoint(quantized)
    assert len(outcome.layers) == 12  # the attention layers
    warnings = [e.message for e in events if isinstance(e, Warning)]
    assert len(warnings) == 1 and "9 quantized layers are frozen" in warnings[0]
    assert outcome.summary["frozen_quantized_layers"] == 9
    assert_same(teacher, saved)


def test_only_quantized_targets_and_lora_is_an_error_naming_the_step():
    teacher = tiny_model()
    recipe = parse_recipe({"schema_version": 1, "steps": [{"method": "rtn", "params": {"bits": 4, "group_size": 32}}]})
    student = run_recipe(recipe, LoadedModel(teacher, None, {})).model
    with pytest.raises(RecipeError, match="nothing to train"):
        distill(student, teacher, calibration_tokens(4, 24), trainable="lora", steps=2)
    assert not any(p.requires_grad for p in student.parameters())


def test_cached_top_k_over_the_vocabulary_trains_like_the_teacher_on_the_fly(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    teacher = sharpened()
    curves = {}
    for mode in ["on_the_fly", "cached_topk"]:
        student = pruned(teacher)
        outcome, _ = distill(student, teacher, calibration_tokens(8, 24), trainable="lora", teacher_logits=mode,
                             top_k=VOCAB, **{**FAST, "steps": 6})
        curves[mode] = outcome.summary["loss_curve"]
    assert curves["on_the_fly"] == pytest.approx(curves["cached_topk"], rel=1e-4)
    assert list(tmp_path.iterdir()) == []  # the cache folder is gone


def test_hidden_state_loss_runs_and_is_part_of_the_training_loss():
    teacher = sharpened()
    plain, _ = distill(pruned(teacher), teacher, calibration_tokens(8, 24), **{**FAST, "steps": 1})
    hidden, _ = distill(pruned(teacher), teacher, calibration_tokens(8, 24), hidden_weight=1.0, **{**FAST, "steps": 1})
    assert hidden.summary["loss_curve"][0] > plain.summary["loss_curve"][0]
    assert hidden.summary["held_out_loss_before"] == pytest.approx(plain.summary["held_out_loss_before"])


def test_early_stopping_keeps_the_best_weights_and_says_why():
    teacher = sharpened()
    outcome, _ = distill(pruned(teacher), teacher, calibration_tokens(8, 24), trainable="all",
                         **{**FAST, "learning_rate": 0.5, "eval_every": 1, "patience": 2, "steps": 40})
    summary = outcome.summary
    assert summary["steps_run"] < 40
    assert "did not improve for 2 evaluations" in summary["stop_reason"]
    assert summary["held_out_loss_after"] == min(v for _, v in summary["held_out_curve"])


def test_cancel_mid_way_leaves_the_original_untouched_and_no_cache(monkeypatch, tmp_path, tokenizer, text_file):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    teacher = sharpened()
    saved = snapshot(teacher)
    token = CancelToken()
    seen = []

    def events(event):
        if isinstance(event, Metric) and event.name == "distill_loss":
            seen.append(event.value)
            if len(seen) == 2:
                token.cancel()

    recipe = parse_recipe({"schema_version": 2, "calibration": {"text_file": str(text_file), "samples": 8,
                                                                  "seq_len": 32},
                           "steps": [{"method": "magnitude", "params": {"sparsity": 0.5}},
                                     {"method": "distill", "params": {"trainable": "all", "steps": 20,
                                                                      "teacher_logits": "cached_topk", "top_k": 16,
                                                                      "seq_len": 16}}]})
    result = run_recipe(recipe, LoadedModel(teacher, tokenizer, {}), events=events, cancel=token)
    assert result.status == "cancelled" and len(seen) == 2
    assert_same(teacher, saved)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert list(scratch.iterdir()) == []


def test_cancel_inside_apply_raises_and_restores_the_flags():
    teacher = sharpened()
    token = CancelToken()
    student = pruned(teacher)

    def events(event):
        if isinstance(event, Metric) and event.name == "distill_loss":
            token.cancel()

    with pytest.raises(Cancelled):
        distill(student, teacher, calibration_tokens(8, 24), events=events, cancel=token, trainable="lora", steps=5)
    assert not any(p.requires_grad for p in student.parameters())
    assert all(not m._forward_hooks for m in student.modules())
    assert all(not m._forward_hooks for m in teacher.modules())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_prune_then_distill_through_run_recipe(kind, trainable, tokenizer, text_file):
    teacher = tiny_model(kind)
    saved = snapshot(teacher)
    recipe = parse_recipe({"schema_version": 2, "calibration": {"text_file": str(text_file), "samples": 8,
                                                                  "seq_len": 32},
                           "steps": [{"method": "magnitude", "params": {"sparsity": 0.5}},
                                     {"method": "distill", "params": {"trainable": trainable, "steps": 4,
                                                                      "seq_len": 16, "holdout": 0.0}}]})
    result = run_recipe(recipe, LoadedModel(teacher, tokenizer, {}))
    assert result.status == "finished", result.error
    step = result.report["steps"][1]
    assert step["summary"]["steps_run"] == 4 and step["summary"]["window_tokens"] == 16
    assert step["layers"] and all(layer["error"] > 0 for layer in step["layers"])
    layers = dict(result.model.named_modules())
    for name, record in compression_state(result.model).items():
        assert torch.all(weight_matrix(layers[name])[~record.mask] == 0)
    assert abs(result.report["steps"][1]["size"]["parameters"] - result.report["steps"][0]["size"]["parameters"]) == 0
    assert_same(teacher, saved)


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="on_the_fly"):
        DistillParams(hidden_weight=1.0, teacher_logits="cached_topk")
    recipe = parse_recipe({"schema_version": 2, "calibration": {"text_file": "any.txt", "samples": 4, "seq_len": 16},
                           "steps": [{"method": "distill", "params": {"teacher_logits": "cached_topk",
                                                                      "top_k": VOCAB + 1}}]})
    with pytest.raises(RecipeError, match="larger than the vocabulary"):
        prepare(recipe, tiny_model())


def test_estimate_grows_with_the_trainable_parameters():
    model = tiny_model()
    layers = target_layers(model, TargetSpec())
    method = studio.methods.distillation.Distillation()
    lora = method.estimate(layers, DistillParams(trainable="lora"))
    full = method.estimate(layers, DistillParams(trainable="all"))
    assert full.extra_bytes > lora.extra_bytes > 0 and full.seconds > lora.seconds > 0
