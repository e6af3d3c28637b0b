import threading

import pytest
import torch

from conftest import tiny_model
from studio.core import events as ev
from studio.core.loading import LoadedModel
from studio.core.recipe import parse_recipe
from studio.core.runner import estimate, prepare, run_recipe
from studio.core.state import compression_state

TWO_STEPS = {"schema_version": 1, "steps": [
    {"method": "magnitude", "params": {"pattern": "2:4"}},
    {"method": "rtn", "params": {"bits": 4, "group_size": 32}},
]}


def fingerprint(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, prints):
    return all(torch.equal(v, prints[k]) for k, v in model.state_dict().items())


def test_events_in_order_with_block_progress_and_reports(tiny_loaded, text_file):
    from studio.core.evaluation import PerplexityConfig

    seen = []
    result = run_recipe(parse_recipe(TWO_STEPS), tiny_loaded, events=seen.append,
                        eval_config=PerplexityConfig(str(text_file), window=64, stride=32))
    assert result.status == "finished"
    kinds = [type(e).__name__ for e in seen]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert kinds.count("StepStarted") == kinds.count("StepFinished") == 2
    progress = [e for e in seen if isinstance(e, ev.Progress) and e.index == 0 and e.unit == "block"]
    assert [(p.done, p.total) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    windows = [e for e in seen if isinstance(e, ev.Progress) and e.unit == "window"]
    assert windows and {e.index for e in windows} == {-1, 0, 1} and windows[-1].done == windows[-1].total
    assert [e.ordinal for e in seen if isinstance(e, ev.StepStarted)] == [0, 1]
    assert any(isinstance(e, ev.Metric) and e.name == "layer_error" and e.layer for e in seen)
    ppl = [e for e in seen if isinstance(e, ev.Metric) and e.name == "perplexity"]
    assert [e.index for e in ppl] == [None, 0, 1]
    report = result.report
    for step in report["steps"]:
        assert step["seconds"] > 0 and step["peak_rss_bytes"] > 0 and step["evaluation"]["kl"] >= 0
    assert report["baseline"]["perplexity"] > 0 and report["final"] == report["steps"][-1]["evaluation"]
    # 2:4 then 4-bit: the quantized layers keep both their codes and their mask
    record = next(iter(compression_state(result.model).values()))
    assert record.quant is not None and record.mask is not None


def test_cancel_at_a_block_leaves_the_original_untouched():
    model = tiny_model("llama")
    prints = fingerprint(model)
    token = ev.CancelToken()
    seen = []

    def on_event(event):
        seen.append(event)
        if isinstance(event, ev.Progress) and event.index == 1 and event.done == 1:
            token.cancel()  # in the second step, after its first block

    result = run_recipe(parse_recipe(TWO_STEPS), LoadedModel(model, None, {}), events=on_event, cancel=token)
    assert result.status == "cancelled" and result.model is None
    assert isinstance(seen[-1], ev.RunCancelled) and seen[-1].index == 1
    progress_after_cancel = [e for e in seen if isinstance(e, ev.Progress) and e.index == 1 and e.unit == "block"]
    assert len(progress_after_cancel) == 1  # stopped at the next block
    assert same(model, prints) and not compression_state(model)


def test_cancel_from_another_thread():
    model = tiny_model("qwen2")
    token = ev.CancelToken()
    threading.Timer(0, token.cancel).start()
    threading.Event().wait(0.05)
    result = run_recipe(parse_recipe(TWO_STEPS), LoadedModel(model, None, {}), cancel=token)
    assert result.status == "cancelled"


def test_a_failing_step_is_reported_and_leaves_the_original_untouched(monkeypatch):
    from studio.methods import rtn

    model = tiny_model("opt")
    prints = fingerprint(model)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(rtn, "quantize_rtn_dense", boom)
    seen = []
    result = run_recipe(parse_recipe(TWO_STEPS), LoadedModel(model, None, {}), events=seen.append)
    assert result.status == "failed" and "step 2" in result.error and "simulated failure" in result.error
    assert isinstance(seen[-1], ev.RunFailed) and not result.bad_input
    assert same(model, prints)


CALIBRATED = {"schema_version": 2, "steps": [
    {"method": "smoothquant", "params": {"alpha": 0.5}},
    {"method": "gptq", "params": {"bits": 4, "group_size": 32}},
]}


def test_an_in_place_run_writes_into_the_loaded_weights_and_gives_the_same_model(text_file, tokenizer):
    recipe = parse_recipe({**CALIBRATED, "calibration": {"text_file": str(text_file), "samples": 4, "seq_len": 32}})
    copy_run = run_recipe(recipe, LoadedModel(tiny_model("llama"), tokenizer, {}))
    model = tiny_model("llama")
    addresses = {n: p.data_ptr() for n, p in model.named_parameters()}
    in_place = run_recipe(recipe, LoadedModel(model, tokenizer, {}), in_place=True)
    assert in_place.status == copy_run.status == "finished" and in_place.model is model
    # the same weights, written into the tensors the model was loaded with (no second set of weights)
    assert same(model, fingerprint(copy_run.model))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == addresses
    assert compression_state(model).keys() == compression_state(copy_run.model).keys()


def test_the_size_report_before_an_in_place_sweep_keeps_the_pages_of_the_weights_the_sweep_overwrites(
        monkeypatch, text_file, tokenizer):
    from studio.core import runner
    from studio.core.registry import all_methods

    kept = []
    real = runner.size_report
    monkeypatch.setattr(runner, "size_report", lambda model, **k: kept.append(k.get("about_to_overwrite")) or
                        real(model, **k))
    model = tiny_model("llama")
    assert run_recipe(parse_recipe(TWO_STEPS), LoadedModel(model, tokenizer, {}), in_place=True).status == "finished"
    linear_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not
                      model.get_output_embeddings().weight]
    assert [id(w) for w in kept[0]] == [id(w) for w in linear_weights]  # magnitude first: each weight rewritten
    assert kept[1] is None  # the report after a step keeps nothing
    kept.clear()
    run_recipe(parse_recipe(TWO_STEPS), LoadedModel(tiny_model("llama"), tokenizer, {}))
    assert not kept[0]  # a run on a copy writes nothing into the loaded weights
    kept.clear()
    calibrated = parse_recipe({**CALIBRATED, "calibration": {"text_file": str(text_file), "samples": 2, "seq_len": 16}})
    run_recipe(calibrated, LoadedModel(tiny_model("llama"), tokenizer, {}), in_place=True)
    assert not kept[0]  # calibration holds the weights read for minutes: their pages go back meanwhile
    assert not any(m.sweeps_weights_once and m.needs_calibration for m in all_methods())


def test_an_in_place_run_has_no_teacher_and_cannot_evaluate(text_file, tokenizer):
    from studio.core.evaluation import PerplexityConfig

    distill = parse_recipe({"schema_version": 2, "steps": [{"method": "distill", "params": {}}],
                            "calibration": {"text_file": str(text_file), "samples": 2, "seq_len": 16}})
    result = run_recipe(distill, LoadedModel(tiny_model(), tokenizer, {}), in_place=True)
    assert result.status == "failed" and "needs the original model as its teacher" in result.error
    with pytest.raises(ValueError, match="cannot evaluate"):
        run_recipe(parse_recipe(TWO_STEPS), LoadedModel(tiny_model(), None, {}), in_place=True,
                   eval_config=PerplexityConfig(str(text_file)))


def test_invalid_recipe_fails_before_any_work():
    bad = parse_recipe({"schema_version": 1, "steps": [{"method": "rtn", "params": {"group_size": 48}}]})
    seen = []
    result = run_recipe(bad, LoadedModel(tiny_model(), None, {}), events=seen.append, where="bad.yaml")
    assert result.status == "failed" and result.bad_input and "bad.yaml, step 1 (rtn)" in result.error
    assert [type(e).__name__ for e in seen] == ["RunFailed"]


def test_estimates_before_running():
    model = tiny_model("llama")
    steps = prepare(parse_recipe(TWO_STEPS), model)
    estimates = estimate(steps, model)
    linear_weights = sum(m.weight.numel() for n, m in model.named_modules() if n.startswith("model.layers") and hasattr(m, "weight") and m.weight.dim() == 2)
    assert all(e.extra_bytes >= linear_weights * 4 and e.seconds > 0 for e in estimates)


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("0", "0")])
def test_importing_the_studio_asks_torch_for_huge_pages_unless_the_user_chose(preset, expected):
    """A fresh interpreter: the variable only counts before the first tensor allocation."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    script = "import os, studio; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
