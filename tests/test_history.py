"""The run history store: record, list, filter, get, delete, Pareto front, corrupt-file recovery, and the CLI."""

import json
import logging
import sqlite3
import threading

import pytest

from studio.core.history import (
    SCHEMA_VERSION,
    HistoryError,
    RunHistory,
    RunRecord,
    comparison_report,
    pareto_front,
)
from studio.core.recipe import Recipe, Step

MIB = 2**20


def report(size_after_mib: float, final_ppl: float | None, kl: float = 0.01, seconds: float = 2.0) -> dict:
    """A hand-made report in the runner's shape."""
    data = {
        "recipe": {"schema_version": 1, "name": "hand-made", "steps": [{"method": "rtn", "params": {}}]},
        "model": {"kind": "folder", "path": "/models/tiny", "name": "tiny"},
        "steps": [{"index": 0, "method": "rtn", "layers": []}],
        "size_before": {"compressed_bytes": 8 * MIB, "parameters": 100},
        "size_after": {"compressed_bytes": int(size_after_mib * MIB), "parameters": 100},
        "baseline": {"perplexity": 10.0, "kl": None},
        "seconds": seconds,
    }
    if final_ppl is not None:
        data["final"] = {"perplexity": final_ppl, "kl": kl, "top1_agreement": 0.9}
    return data


def rtn(bits: int, name: str = "") -> Recipe:
    return Recipe([Step("rtn", {"bits": bits, "group_size": 32})], name=name or f"RTN W{bits}")


SOURCE = {"kind": "folder", "path": "/models/tiny-llama", "name": "tiny-llama"}


@pytest.fixture
def history(tmp_path):
    return RunHistory(tmp_path / "history.sqlite")


def test_record_get_and_list_store_what_a_run_was(history):
    run_id = history.record("finished", report(2, 11.5, kl=0.05, seconds=3.5), rtn(4), SOURCE, "/out/a")
    record = history.get(run_id)
    assert record.status == "finished" and record.model_name == "tiny-llama"
    assert record.model_identity == "/models/tiny-llama" and record.model_source == SOURCE
    assert record.recipe_name == "RTN W4" and record.recipe() == rtn(4)
    assert (record.baseline_perplexity, record.final_perplexity, record.kl) == (10.0, 11.5, 0.05)
    assert (record.size_before, record.size_after) == (8 * MIB, 2 * MIB)
    assert record.seconds == 3.5 and record.finished_at - record.started_at == pytest.approx(3.5)
    assert record.export_paths == ["/out/a"] and record.report["final"]["perplexity"] == 11.5

    listed = history.list()
    assert [r.id for r in listed] == [run_id] and listed[0].report is None  # the list leaves reports out
    with pytest.raises(HistoryError, match="no run 999"):
        history.get(999)


def test_failed_and_cancelled_runs_are_recorded_with_what_they_have(history):
    failed = history.record("failed", {"size_before": {"compressed_bytes": 100}}, rtn(3), SOURCE,
                            error="The run failed in step 1: boom", started_at=1000.0)
    cancelled = history.record("cancelled", {}, None, SOURCE)
    record = history.get(failed)
    assert record.error.endswith("boom") and record.size_before == 100 and record.final_perplexity is None
    assert record.started_at == 1000.0 and record.seconds > 0
    assert history.get(cancelled).recipe_yaml == ""
    with pytest.raises(ValueError):
        history.record("exploded", {}, None, SOURCE)


def test_list_filters_by_text_and_status_newest_first(history):
    a = history.record("finished", report(2, 12), rtn(4, "Alpha 50%"), SOURCE)
    b = history.record("failed", {}, rtn(3, "Beta"), {"name": "other", "repo_id": "org/other"}, error="oops")
    c = history.record("finished", report(3, 11), rtn(8, "Gamma"), SOURCE, "/exports/gamma_dir")
    assert [r.id for r in history.list()] == [c, b, a]
    assert [r.id for r in history.list(status="finished")] == [c, a]
    assert [r.id for r in history.list("ALPHA")] == [a]
    assert [r.id for r in history.list("org/other")] == [b]
    assert [r.id for r in history.list("gamma_")] == [c]  # export path; '_' is not a wildcard
    assert [r.id for r in history.list("50%")] == [a]  # nor is '%'
    assert history.list("tiny", status="failed") == []
    assert [r.id for r in history.list("  ")] == [c, b, a]


def test_set_export_and_delete(history):
    run_id = history.record("finished", report(2, 12), rtn(4), SOURCE)
    history.set_export(run_id, "/out/one")
    history.set_export(run_id, "/out/two")
    history.set_export(run_id, "/out/one")  # exported again: moves to the end, once
    assert history.get(run_id).export_paths == ["/out/two", "/out/one"]
    assert history.get(run_id).export_path == "/out/one"
    with pytest.raises(HistoryError):
        history.set_export(12345, "/out")
    history.delete(run_id)
    assert history.list() == []


def test_pareto_front_keeps_the_runs_nothing_beats_on_size_and_perplexity():
    def rec(run_id, size, ppl, status="finished"):
        return RunRecord(run_id, 0.0, 0.0, status, size_after=size, final_perplexity=ppl)

    records = [
        rec(1, 100, 10.0),  # front: smallest perplexity
        rec(2, 50, 12.0),  # front
        rec(3, 60, 13.0),  # beaten by 2
        rec(4, 20, 20.0),  # front: smallest size
        rec(5, 50, 12.0),  # equal to 2: not beaten
        rec(6, 100, 11.0),  # beaten by 1 (same size, worse perplexity)
        rec(7, 10, 5.0, status="failed"),  # not a finished run
        rec(8, None, 1.0),  # no size
    ]
    assert pareto_front(records) == [4, 2, 5, 1]
    assert RunHistory.pareto_front(records) == [4, 2, 5, 1]
    assert pareto_front([]) == []


def test_pareto_front_over_stored_runs(history):
    small = history.record("finished", report(1, 20), rtn(2), SOURCE)
    history.record("finished", report(3, 25), rtn(3), SOURCE)  # bigger and worse than `small`
    good = history.record("finished", report(4, 11), rtn(8), SOURCE)
    history.record("failed", report(0.5, 1.0), rtn(4), SOURCE)
    assert history.pareto_front(history.list()) == [small, good]


def test_a_corrupt_file_is_set_aside_and_a_fresh_history_started(tmp_path, caplog):
    path = tmp_path / "history.sqlite"
    first = RunHistory(path)
    first.record("finished", report(2, 12), rtn(4), SOURCE)
    path.write_bytes(b"this is not a database " * 200)
    for side in tmp_path.glob("history.sqlite-*"):
        side.unlink()
    with caplog.at_level(logging.WARNING, logger="studio.core.history"):
        second = RunHistory(path)
    assert second.list() == []
    aside = list(tmp_path.glob("history.sqlite.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    assert "moved to" in caplog.text
    run_id = second.record("finished", report(2, 12), rtn(4), SOURCE)
    assert [r.id for r in second.list()] == [run_id]

    path.write_bytes(b"broken again " * 200)  # corrupted under an open store: its next call recovers too
    assert first.list() == []
    assert len(list(tmp_path.glob("history.sqlite.corrupt-*"))) == 2


def test_schema_version_and_a_newer_history_is_refused(tmp_path):
    path = tmp_path / "history.sqlite"
    RunHistory(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(HistoryError, match="newer Compression Studio"):
        RunHistory(path)


def test_writes_from_several_threads(history):
    errors = []

    def writer(n):
        try:
            for i in range(5):
                history.record("finished", report(1 + n, 10 + i), rtn(4), SOURCE)
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(history.list()) == 20


def test_default_path_is_in_the_data_dir(monkeypatch, tmp_path):
    from studio.core.paths import data_dir

    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    assert RunHistory().path == tmp_path / "data" / "history.sqlite"
    monkeypatch.delenv("STUDIO_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "compression-studio"


def test_comparison_report_puts_the_first_run_before_the_second():
    first, second = report(2, 12.0, kl=0.1), report(1, 15.0, kl=0.3)
    compared = comparison_report(first, second, "run 1", "run 2")
    assert compared["baseline"]["perplexity"] == 12.0 and compared["final"]["perplexity"] == 15.0
    assert compared["size_before"]["compressed_bytes"] == 2 * MIB and compared["size_after"]["compressed_bytes"] == MIB
    assert compared["model"]["name"] == "run 1" and compared["recipe"]["name"] == "run 2"


# --- the command line ----------------------------------------------------------------------------------------


def test_cli_records_runs_and_lists_them(capsys, monkeypatch, tmp_path, tiny_folder, text_file):
    from studio.cli.main import main

    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text(rtn(4, "CLI RTN").to_yaml())
    out = tmp_path / "out"
    code = main(["run", str(recipe), "--model", str(tiny_folder), "--out", str(out), "--eval-text", str(text_file),
                 "--tokens", "200", "--window", "64", "--stride", "32"])
    assert code == 0
    capsys.readouterr()

    assert main(["history", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 1
    run = runs[0]
    assert run["status"] == "finished" and run["recipe_name"] == "CLI RTN" and run["model_name"] == "tiny-llama"
    assert run["export_paths"] == [str(out)] and run["final_perplexity"] > 0 and run["kl"] >= 0
    assert run["size_after"] < run["size_before"] and "report" not in run

    assert main(["history"]) == 0
    text = capsys.readouterr().out
    assert "CLI RTN" in text and "finished" in text and str(out) in text
    assert main(["history", "--filter", "no such thing", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_cli_records_a_failed_run(capsys, monkeypatch, tmp_path, tiny_folder):
    from studio.cli.main import EXIT_RUN_FAILED, main
    from studio.methods import rtn as rtn_module

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rtn_module, "quantize_rtn_dense", boom)
    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text(rtn(4).to_yaml())
    code = main(["run", str(recipe), "--model", str(tiny_folder), "--out", str(tmp_path / "out")])
    assert code == EXIT_RUN_FAILED
    capsys.readouterr()
    assert main(["history", "--json", "--status", "failed"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 1 and "boom" in runs[0]["error"] and runs[0]["export_paths"] == []
