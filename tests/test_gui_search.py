"""The Search dock: a tiny search through the view (threads), its live scatter and table against the engine's
result, "open as recipe", cancel, engine errors, and spec validation naming the field."""

from __future__ import annotations

import pytest

pytest.importorskip("pytestqt")

import yaml  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402

from conftest import search_spec_data as spec_data  # noqa: E402


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch, errors):
    """A window with its own settings and its own (empty) run history."""
    from studio.gui.main_window import MainWindow

    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    win = MainWindow(tmp_path / "settings" / "studio.ini")
    qtbot.addWidget(win)
    win.show()
    return win


@pytest.fixture
def loaded_window(qtbot, window, tiny_folder):
    window.load(str(tiny_folder))
    qtbot.waitUntil(lambda: window._load_task is None and window.loaded is not None, timeout=60_000)
    window.show_search()
    return window


def _row_of(results, trial: int) -> int:
    table = results.table
    return next(r for r in range(table.rowCount()) if table.item(r, 0).data(Qt.ItemDataRole.UserRole) == trial)


def test_a_search_plots_every_candidate_as_it_ends_marks_the_engines_front_and_opens_a_recipe(
        qtbot, loaded_window, text_file, errors):
    from studio.core.search import parse_search_spec, run_search
    from studio.core.search.result import front_of

    window = loaded_window
    view = window.search_view
    results = view.results
    assert "Search" in [d.windowTitle() for d in window.docks] and window.search_dock.isVisible()
    view.set_spec_data(spec_data(text_file, trials=5))
    view.form.field("trials").editor.setValue(6)  # typed into the form
    assert view.start_action.isEnabled(), view.start_action.toolTip()

    seen = []  # (candidates ended, points on the scatter) right after each candidate's event

    def after_each(event) -> None:
        results.redraw()
        finished = sum(c.status == "finished" for c in results.candidates.values())
        seen.append((event.done, finished, len(results.plotted_trials())))

    view.controller.candidate_finished.connect(after_each)
    with qtbot.waitSignal(view.controller.finished, timeout=60_000):
        view.start_action.trigger()
        assert view.running and not view.start_action.isEnabled() and view.cancel_action.isEnabled()
        assert not window.run_action.isEnabled() and "search is going" in window.run_blocker()

    result = view.result
    assert result.status == "finished" and not errors
    assert [done for done, _, _ in seen] == list(range(1, 7))
    assert all(points == finished for _, finished, points in seen)  # a point the moment its candidate ended
    finished = [c.trial for c in result.candidates if c.status == "finished"]
    assert finished and sorted(results.plotted_trials()) == finished
    assert results.front_trials() == result.front and result.front
    xs, ys = results.front_points.data["x"].tolist(), results.front_points.data["y"].tolist()
    assert xs == [result.candidate(t).measure for t in result.front]
    assert ys == [result.candidate(t).quality("kl") for t in result.front]
    assert results.budget_line.isVisible() and results.budget_line.value() == 4.0
    assert results.plot.getAxis("bottom").labelText == "bits per weight"

    # the same spec and seed on the engine alone: the same front
    alone = run_search(parse_search_spec(spec_data(text_file)), window.loaded, executor="threads", history=False)
    assert alone.front == result.front

    # the table: a row per candidate, the front's rows starred
    assert results.table.rowCount() == len(result.candidates) == 6
    for c in result.candidates:
        assert results.table.item(_row_of(results, c.trial), 0).text().endswith("★") == (c.trial in result.front)

    # a click on a point selects its row; selecting a row rings its point
    front_spot = results.front_points.points()[0]
    results.front_points.sigClicked.emit(results.front_points, [front_spot], None)
    chosen = result.candidate(int(front_spot.data()))
    assert results.selected_trial() == chosen.trial
    other = next(t for t in finished if t != chosen.trial) if len(finished) > 1 else chosen.trial
    results.table.selectRow(_row_of(results, other))
    ring = results.selected_point.data
    assert (ring["x"][0], ring["y"][0]) == (result.candidate(other).measure, result.candidate(other).quality("kl"))

    # "open as recipe": that candidate's recipe in the pipeline editor, ready to run
    results.select_trial(chosen.trial)
    assert view.open_action.isEnabled()
    view.open_action.trigger()
    assert window.editor.recipe().steps == chosen.recipe.steps
    assert window.editor.recipe_name() == chosen.recipe.name and window.editor.current_path is None
    assert window.editor.calibration_text() == str(text_file)
    assert window.run_action.isEnabled(), window.run_action.toolTip()

    # every candidate that ran is in the window's run history under the search's id
    records = window.history_view.history.list(search_id=result.search_id)
    assert sorted(r.id for r in records) == sorted(c.run_id for c in result.candidates if c.run_id is not None)
    assert window.history_view.table.rowCount() == len(records) > 0

    # the quality axis switched to perplexity: the engine's front for perplexity
    results.quality_combo.setCurrentIndex(results.quality_combo.findData("perplexity"))
    results.redraw()
    assert results.front_trials() == front_of(result.candidates, "perplexity")
    assert results.plot.getAxis("left").labelText == "perplexity"


def test_a_cancelled_search_leaves_the_view_usable(qtbot, loaded_window, text_file):
    view = loaded_window.search_view
    view.set_spec_data(spec_data(text_file, trials=40, seed=11))
    view.controller.candidate_started.connect(lambda _event: view.cancel_action.trigger())
    with qtbot.waitSignal(view.controller.cancelled, timeout=60_000):
        view.start_action.trigger()
    assert view.result.status == "cancelled" and len(view.result.candidates) < 40
    assert "cancelled" in view.status_label.text()
    assert not view.running and view.start_action.isEnabled() and not view.cancel_action.isEnabled()
    assert view.form_scroll.widget().isEnabled() and view.load_action.isEnabled()
    assert "search" not in loaded_window.run_blocker()
    assert loaded_window.open_file_action.isEnabled()
    view.form.field("trials").editor.setValue(2)  # the form takes edits again
    assert view.spec.trials == 2


def test_engine_errors_are_shown_in_the_view_and_it_stays_usable(qtbot, loaded_window, text_file, monkeypatch):
    import builtins

    view = loaded_window.search_view
    view.set_spec_data(spec_data(text_file))
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    view.executor_combo.setCurrentIndex(view.executor_combo.findData("ray"))
    assert view.address_edit.isEnabled()
    with qtbot.waitSignal(view.controller.failed, timeout=30_000):
        view.start_action.trigger()
    assert view.error_label.isVisible() and 'pip install "compression-studio[cluster]"' in view.error_label.text()
    assert "Ray" in loaded_window.log_panel.plain_text()
    assert not view.running and view.start_action.isEnabled()


def test_a_bad_value_is_marked_at_the_field_it_names_and_blocks_start(qtbot, loaded_window, text_file):
    view = loaded_window.search_view
    view.set_spec_data(spec_data(text_file))
    assert view.start_action.isEnabled() and not view.form.problems()

    view.form.field("budget.value").editor.setValue(0.0)
    problems = view.form.problems()
    assert list(problems) == ["budget.value"] and "field 'budget.value'" in problems["budget.value"]
    assert not view.form.field("budget.value").problem_label.isHidden()
    assert not view.start_action.isEnabled() and "budget.value" in view.start_action.toolTip()
    view.form.field("budget.value").editor.setValue(3.5)
    assert not view.form.problems() and view.start_action.isEnabled()

    edit = view.form.field("space.quantization.group_sizes").line_edit
    edit.setText("32, -1")
    edit.editingFinished.emit()
    assert "field 'space.quantization.group_sizes.1'" in view.form.problems()["space.quantization.group_sizes"]
    edit.setText("32")
    edit.editingFinished.emit()

    view.form.field("evaluation.window").editor.setValue(32)  # stride 64 > window 32: the section's own rule
    assert "stride must not exceed window" in view.form.problems()["evaluation"]
    view.form.field("evaluation.window").editor.setValue(64)

    view.form.field("evaluation.text_file").set_value(str(text_file.parent / "missing.txt"))
    view.form.edited.emit()
    assert "does not exist" in view.form.problems()["evaluation.text_file"]
    assert not view.start_action.isEnabled()


def test_a_spec_saves_and_loads_and_a_bad_file_names_its_field(qtbot, loaded_window, text_file, tmp_path):
    from studio.core.search import load_search_spec

    view = loaded_window.search_view
    view.set_spec_data(spec_data(text_file, budget={"kind": "size_mb", "value": 0.2}))
    view.form.groups["space.sparsity"].setChecked(True)
    assert view.spec is not None and view.spec.space.sparsity.levels == [0.0, 0.1]
    path = tmp_path / "spec.yaml"
    assert view.save_spec(path)
    assert load_search_spec(path) == view.spec
    assert view.form.field("budget.value").editor.suffix() == " MiB"

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_data("eval.txt", trails=3, budget={"kind": "bits", "value": 3.0})))
    assert not view.load_spec(bad)
    assert "field 'budget.kind'" in view.form.problems()["budget.kind"]
    assert "trails" in view.error_label.text() and str(bad) in view.error_label.text()
    assert view.form.field("evaluation.text_file").value() == "eval.txt"  # relative: read from the file's folder
    assert "evaluation.text_file" not in view.form.problems()
    assert not view.start_action.isEnabled()
    assert view.load_spec(path) and view.start_action.isEnabled()
