"""The recipe search: spec validation, the budget, the Pareto front, threads and Ray giving the same front for the
same seed, a cancelled Ray search, the run history, and `studio search` end to end, on tiny random models."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from conftest import search_spec_data as spec_data
from studio.core.events import CancelToken
from studio.core.history import RunHistory
from studio.core.search import (
    CandidateFinished,
    CandidateStarted,
    SearchCancelled,
    SearchFinished,
    SearchStarted,
    SearchSpecError,
    load_search_spec,
    make_executor,
    parse_search_spec,
    run_search,
)
from studio.core.search.space import build_candidate, model_shape


def dominated(point, others) -> bool:
    return any(o[0] <= point[0] and o[1] <= point[1] and (o[0] < point[0] or o[1] < point[1]) for o in others)


@pytest.fixture
def history(tmp_path):
    return RunHistory(tmp_path / "history.sqlite")


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def folder_loaded(tiny_folder):
    from studio.core.loading import load_model

    return load_model(str(tiny_folder))


# --- the spec -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, expect", [
    ({"budget": {"kind": "bits", "value": 3.5}}, "field 'budget.kind'"),
    ({"budget": {"kind": "size_mb", "value": -1}}, "field 'budget.value'"),
    ({"trails": 10}, "field 'trails' is not a field"),
    ({"space": {"quantization": {"group_sizes": [-1]}}}, "field 'space.quantization.group_sizes.0'"),
    ({"space": {"quantization": {"budget_fraction": [0.9, 0.5]}}}, "budget_fraction is [low, high]"),
    ({"space": {"sparsity": {"method": "wanda", "levels": [1.5]}}}, "field 'space.sparsity.levels.0'"),
    ({"evaluation": {"text_file": "x.txt", "window": 64, "stride": 128}}, "stride must not exceed window"),
    ({"calibration": None}, "'calibration' with a text_file"),
    ({"schema_version": 9}, "field 'schema_version'"),
])
def test_a_bad_spec_names_the_file_and_the_field(tmp_path, text_file, change, expect):
    path = tmp_path / "spec.yaml"
    data = {k: v for k, v in spec_data(text_file, **change).items() if v is not None}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SearchSpecError) as info:
        load_search_spec(path)
    assert str(path) in str(info.value) and expect in str(info.value)


def test_relative_text_files_are_read_from_the_spec_folder(tmp_path, text_file):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_data("eval.txt")))
    spec = load_search_spec(path)
    assert spec.evaluation.text_file == str(tmp_path / "eval.txt") == str(text_file)


# --- candidates, budget and front -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, value", [("bits_per_weight", 4.0), ("size_mb", 0.18), ("memory_mb", 0.22)])
def test_a_candidate_is_a_recipe_predicted_within_its_share_of_the_budget(text_file, kind, value, tiny_loaded):
    spec = parse_search_spec(spec_data(text_file, budget={"kind": kind, "value": value, "context_tokens": 64}))
    shape = model_shape(tiny_loaded.model)
    for fraction in (0.7, 1.0):
        params = {"quantizer": "rtn", "group_size": 32, "symmetric": False, "min_bits": 2, "budget_fraction": fraction}
        candidate = build_candidate(spec, shape, 0, params)
        assert candidate.fits and candidate.predicted_measure <= value * fraction
        step = candidate.recipe.steps[-1]
        assert step.method == "mixed_precision" and step.params["target_mb"] * 2**20 + shape.other_bytes \
            == candidate.predicted_bytes
    tight = parse_search_spec(spec_data(text_file, budget={"kind": "bits_per_weight", "value": 2.2}))
    rejected = build_candidate(tight, shape, 0, {"quantizer": "rtn", "group_size": 32, "symmetric": True,
                                                 "min_bits": 2, "budget_fraction": 1.0})
    assert not rejected.fits and rejected.recipe is None and "even 2 bits" in rejected.reason


def test_the_search_offers_only_layouts_that_fit_and_shares_of_the_budget_they_fit_in(text_file, tiny_loaded):
    from studio.core.search.space import layouts

    spec = parse_search_spec(spec_data(text_file, budget={"kind": "bits_per_weight", "value": 3.5}, space={
        "quantization": {"group_sizes": [32, 64], "symmetric": [False], "min_bits": [2, 3],
                         "budget_fraction": [0.5, 1.0]}}))
    shape = model_shape(tiny_loaded.model)
    offered = layouts(spec, shape)
    # g32 asymmetric from 3 bits needs 3 + (16 + 3) / 32 = 3.59 bits per weight: never offered
    assert sorted((o.group_size, o.min_bits) for o in offered) == [(32, 2), (64, 2), (64, 3)]

    def candidate(layout, fraction):
        return build_candidate(spec, shape, 0, {"quantizer": "rtn", "group_size": layout.group_size,
                                                "symmetric": layout.symmetric, "min_bits": layout.min_bits,
                                                "budget_fraction": fraction})

    for layout in offered:
        assert candidate(layout, layout.needed_fraction).fits
        assert not candidate(layout, layout.needed_fraction - 0.001).fits
    tight = parse_search_spec(spec_data(text_file, budget={"kind": "bits_per_weight", "value": 2.2}, trials=2,
                                        space={"quantization": {"group_sizes": [32], "symmetric": [True]}}))
    assert [o.needed_fraction > 1 for o in layouts(tight, shape)] == [True, True]  # 2 and 3 bits: nothing fits
    result = run_search(tight, tiny_loaded, executor="threads", history=False)
    assert [c.status for c in result.candidates] == ["over_budget"] * 2
    assert all("bits per layer would take" in c.error for c in result.candidates)


@pytest.mark.parametrize("extra", [{}, {"low_rank_ratio": 0.3}])
def test_a_candidate_runs_within_its_predicted_size_and_spends_most_of_it(text_file, tiny_loaded, extra):
    from studio.core.search.engine import budget_measure_bits
    from studio.core.search.evaluate import evaluate_candidate
    from studio.core.search.space import factored_shapes
    from studio.core.state import packed_size

    data = spec_data(text_file, budget={"kind": "bits_per_weight", "value": 3.8})
    data["space"]["low_rank"] = {"method": "svd", "ratios": [0.0, 0.3]}
    spec = parse_search_spec(data)
    shape = model_shape(tiny_loaded.model)
    params = {"quantizer": "rtn", "group_size": 32, "symmetric": False, "min_bits": 3, "budget_fraction": 1.0,
              **extra}
    candidate = build_candidate(spec, shape, 0, params)
    assert candidate.fits, candidate.reason
    outcome = evaluate_candidate(tiny_loaded, candidate.recipe.to_dict(), spec.evaluation.config())
    assert outcome["status"] == "finished", outcome["error"]
    measured = outcome["report"]["size_after"]["compressed_bytes"]
    matrices = [m for o, i in shape.layers.values() for m in factored_shapes(o, i, extra.get("low_rank_ratio", 0), 32)]
    largest_step = max(packed_size(o, i, 4, 32, False) - packed_size(o, i, 3, 32, False) for o, i in matrices)
    assert candidate.predicted_bytes - largest_step < measured <= candidate.predicted_bytes
    assert budget_measure_bits(shape, measured) <= 3.8


def test_threads_search_respects_the_budget_returns_a_pareto_front_and_records_every_candidate(
        text_file, folder_loaded, history):
    spec = parse_search_spec(spec_data(text_file, space={"quantization": {
        "group_sizes": [0, 32], "symmetric": [True, False], "budget_fraction": [0.8, 1.0]}},
        budget={"kind": "bits_per_weight", "value": 2.45}, trials=8))
    events = []
    result = run_search(spec, folder_loaded, executor="threads", events=events.append, history=history)
    assert result.status == "finished" and isinstance(events[-1], SearchFinished)
    assert isinstance(events[0], SearchStarted) and events[0].baseline["perplexity"] > 0
    statuses = {c.status for c in result.candidates}
    assert "finished" in statuses and statuses <= {"finished", "over_budget"}
    assert len(result.candidates) == spec.trials
    assert all(c.duplicate_of is None for c in result.candidates)  # a proposal that repeats one is asked again
    ran = [c for c in result.candidates if c.status == "finished" and c.duplicate_of is None]
    for c in ran:
        assert c.bits_per_weight <= spec.budget.value and c.measure <= c.predicted_measure + 1e-9
        assert c.recipe.steps[-1].method == "mixed_precision" and c.kl > 0
    rejected = [c for c in result.candidates if c.status == "over_budget"]
    assert all(c.recipe is None and c.error for c in rejected)  # g32 symmetric: scales alone take 0.5 bit
    points = {c.trial: (c.compressed_bytes, c.quality("kl")) for c in ran}
    assert result.front and all(not dominated(points[t], points.values()) for t in result.front)
    assert all(dominated(points[t], points.values()) for t in points if t not in result.front) or \
        len(set(points.values())) < len(points)
    assert result.best().on_front and [c.trial for c in result.candidates if c.on_front] == sorted(result.front)
    finished = [e for e in events if isinstance(e, CandidateFinished)]
    assert len(finished) == spec.trials and finished[-1].front == tuple(result.front)
    records = history.list(search_id=result.search_id)
    assert sorted(r.id for r in records) == sorted(c.run_id for c in ran)
    assert all(r.status == "finished" and r.recipe().to_dict() == result.candidate(
        json.loads(json.dumps(history.get(r.id).report))["search"]["trial"]).recipe.to_dict() for r in records)


def test_a_recipe_that_already_ran_is_not_run_again_until_the_space_is_exhausted(text_file, tiny_loaded):
    spec = parse_search_spec(spec_data(text_file, trials=3, batch_size=1, space={"quantization": {
        "group_sizes": [32], "symmetric": [False], "min_bits": [2], "budget_fraction": [1.0, 1.0]}}))
    result = run_search(spec, tiny_loaded, executor="threads", history=False)
    first, *repeats = result.candidates
    assert first.status == "finished" and first.duplicate_of is None and len(repeats) == 2
    assert all(c.duplicate_of == first.trial and c.kl == first.kl for c in repeats)
    assert [c.trial for c in repeats] == [7, 8]  # six proposals were told the first one's numbers and asked again


def test_a_search_cancelled_before_it_starts_runs_nothing_and_says_so(text_file, tiny_loaded, history):
    cancel = CancelToken()
    cancel.cancel()
    events = []
    result = run_search(parse_search_spec(spec_data(text_file)), tiny_loaded, executor="threads",
                        events=events.append, cancel=cancel, history=history)
    assert result.status == "cancelled" and not result.candidates and isinstance(events[-1], SearchCancelled)
    assert history.list(search_id=result.search_id) == []


# --- Ray ------------------------------------------------------------------------------------------------------

def test_threads_and_local_ray_give_the_same_front_for_the_same_seed(text_file, folder_loaded, local_ray, tmp_path):
    spec = parse_search_spec(spec_data(text_file))
    threads = run_search(spec, folder_loaded, executor="threads", history=False)
    on_ray = run_search(spec, folder_loaded, executor=make_executor("ray"), history=False)
    assert (threads.executor, on_ray.executor) == ("threads", "ray")
    assert threads.front and threads.front == on_ray.front
    for a, b in zip(threads.candidates, on_ray.candidates, strict=True):
        assert (a.trial, a.params, a.status, a.compressed_bytes) == (b.trial, b.params, b.status, b.compressed_bytes)
        assert a.recipe.to_dict() == b.recipe.to_dict() and a.quality("kl") == b.quality("kl")


def test_a_ray_search_runs_a_cancelled_one_stops_its_tasks_and_the_history_has_both(
        text_file, folder_loaded, local_ray, history):
    spec = parse_search_spec(spec_data(text_file, trials=4))
    first = run_search(spec, folder_loaded, executor=make_executor("ray"), history=history)
    assert first.status == "finished" and first.front

    cancel = CancelToken()
    events = []

    def cancel_once_started(event):
        events.append(event)
        if isinstance(event, CandidateStarted):
            cancel.cancel()

    second = run_search(parse_search_spec(spec_data(text_file, trials=6, seed=11)), folder_loaded,
                        executor=make_executor("ray"), events=cancel_once_started, cancel=cancel, history=history)
    assert second.status == "cancelled" and isinstance(events[-1], SearchCancelled)
    assert len(second.candidates) < 6 and {c.status for c in second.candidates} <= {"cancelled", "finished",
                                                                                    "over_budget"}
    deadline = time.time() + 20  # the cancelled tasks give their CPUs back
    while local_ray.available_resources().get("CPU", 0) < local_ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.2)
    assert local_ray.available_resources().get("CPU", 0) == local_ray.cluster_resources()["CPU"]

    ran_first = history.list(search_id=first.search_id)
    assert len(ran_first) == len([c for c in first.candidates if c.run_id is not None]) > 0
    assert {r.status for r in ran_first} == {"finished"}
    assert all(r.final_perplexity and r.size_after for r in ran_first)
    ran_second = history.list(search_id=second.search_id)
    assert ran_second and "cancelled" in {r.status for r in ran_second}
    assert {r.id for r in ran_first}.isdisjoint(r.id for r in ran_second)


def test_asking_for_ray_without_it_says_how_to_install_it(monkeypatch):
    import builtins

    from studio.core.search import ExecutorError

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ExecutorError, match=r'pip install "compression-studio\[cluster\]"'):
        make_executor("ray")


def test_importing_the_studio_loads_neither_ray_nor_optuna():
    code = ("import sys, studio.core.search, studio.cli.main, studio.core.history\n"
            "print(sorted(m for m in ('ray', 'optuna', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


# --- history and CLI ------------------------------------------------------------------------------------------

def test_a_version_1_history_gains_the_search_id_column(tmp_path):
    from studio.core.history import SCHEMA

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute("INSERT INTO runs (started_at, finished_at, status) VALUES (1, 2, 'finished')")
    history = RunHistory(path)
    assert [r.search_id for r in history.list()] == [""]
    run = history.record("finished", {}, None, {}, search_id="search-x")
    assert [r.id for r in history.list(search_id="search-x")] == [run]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == 2


def test_cli_search_prints_progress_and_the_front_writes_json_and_fills_the_history(
        capsys, tmp_path, tiny_folder, text_file):
    from studio.cli.main import main

    spec = tmp_path / "search.yaml"
    data = spec_data(text_file, trials=4)
    del data["evaluation"]["text_file"], data["calibration"]["text_file"]  # given on the command line
    spec.write_text(yaml.safe_dump(data))
    out = tmp_path / "result.json"
    code = main(["search", str(spec), "--model", str(tiny_folder), "--executor", "threads", "--out", str(out),
                 "--eval-text", str(text_file), "--calib-text", str(text_file)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "[4/4] trial " in printed and "Pareto front of search" in printed
    assert all(f"] trial {n}: " in printed for n in range(4))  # one line per candidate, in the order they ended
    result = json.loads(out.read_text())
    assert result["front"] and len(result["candidates"]) == 4
    front_recipe = result["candidates"][result["front"][0]]["recipe"]
    assert front_recipe["steps"][-1]["method"] == "mixed_precision"
    assert main(["history", "--search", result["search_id"], "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["search_id"] for r in listed} == {result["search_id"]} and len(listed) >= 1

    assert main(["search", str(spec), "--model", str(tiny_folder), "--executor", "threads"]) == 2
    assert "field 'evaluation.text_file' is missing (`studio search` takes --eval-text)" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_data(text_file, budget={"kind": "bits_per_weight", "value": 0})))
    assert main(["search", str(bad), "--model", str(tiny_folder), "--executor", "threads"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "field 'budget.value'" in err
    assert main(["search", str(spec), "--model", str(tiny_folder), "--executor", "threads", "--eval-text",
                 str(text_file), "--calib-text", str(text_file), "--address", "ray://nowhere:10001"]) == 2
    assert "needs the ray executor" in capsys.readouterr().err
