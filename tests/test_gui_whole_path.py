"""The whole path a user takes, through the widgets: open a model, build a two-step pipeline from the palette,
edit, undo and redo, save and reopen the recipe, run with live charts, cancel a second run, compare, export,
and find both runs in the history."""

import time

import pytest

pytest.importorskip("pytestqt")

import torch  # noqa: E402
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtWidgets import QMessageBox  # noqa: E402

from studio.core.recipe import Recipe  # noqa: E402


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    from studio.gui.main_window import MainWindow

    errors = []
    monkeypatch.setattr(QMessageBox, "critical", lambda parent, title, text, *a: errors.append(text))
    win = MainWindow(tmp_path / "settings.ini")
    win.errors = errors
    qtbot.addWidget(win)
    win.show()
    return win


def double_click_palette(qtbot, editor, method_id):
    tree = editor.palette.tree
    pos = tree.visualItemRect(editor.palette.item_for(method_id)).center()
    qtbot.mouseClick(tree.viewport(), Qt.MouseButton.LeftButton, pos=pos)
    qtbot.mouseDClick(tree.viewport(), Qt.MouseButton.LeftButton, pos=pos)


def history_rows(view):
    table = view.table
    status = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())].index("Status")
    return [table.item(r, status).text() for r in range(table.rowCount())]


def test_a_user_compresses_a_model_from_start_to_end(qtbot, window, tiny_folder, text_file, tmp_path, monkeypatch):
    # open a model: a worker loads it, the panel shows its blocks
    window.load(str(tiny_folder))
    qtbot.waitUntil(lambda: window.loaded is not None, timeout=60_000)
    assert window.model_panel.tree.topLevelItemCount() >= 3
    original = {k: v.clone() for k, v in window.loaded.model.state_dict().items()}

    # two steps from the palette
    editor = window.editor
    double_click_palette(qtbot, editor, "magnitude")
    double_click_palette(qtbot, editor, "rtn")
    assert [s.method for s in editor.recipe().steps] == ["magnitude", "rtn"]
    assert not window.run_action.isEnabled() and "group_size" in window.run_action.toolTip()

    # change a parameter in the inspector, undo and redo it
    editor.select_row(1)
    editor.inspector.field("group_size").editor.setValue(32)
    assert editor.recipe().steps[1].params["group_size"] == 32 and window.run_action.isEnabled()
    window.undo_action.trigger()
    assert editor.recipe().steps[1].params.get("group_size", 128) == 128 and not window.run_action.isEnabled()
    window.redo_action.trigger()
    assert editor.recipe().steps[1].params["group_size"] == 32 and window.run_action.isEnabled()

    # save the recipe, clear the editor, reopen it
    path = tmp_path / "my-recipe.yaml"
    assert editor.save_recipe(path)
    built = editor.recipe()
    editor.set_recipe(Recipe())
    assert editor.recipe().steps == []
    assert editor.open_recipe(path)
    assert [(s.method, s.params) for s in editor.recipe().steps] == [(s.method, s.params) for s in built.steps]

    # run with the quick evaluation: the charts receive memory samples and accuracy points
    editor.set_eval_text(str(text_file))
    with qtbot.waitSignal(window.controller.finished, timeout=120_000):
        window.run_action.trigger()
    assert window.result.status == "finished"
    qtbot.waitUntil(lambda: window.charts.memory_samples() >= 1, timeout=5_000)
    points = window.charts.accuracy_points()
    assert [name for _, name, _ in points].count("perplexity") == 3  # the original and each step

    # compare: the summary table is filled from the run's report
    assert window.compare.summary_table.rowCount() >= 4

    # export the finished run
    out = tmp_path / "exported"
    window.export_hf_folder(str(out))
    qtbot.waitUntil(lambda: (out / "report.json").is_file() or bool(window.errors), timeout=60_000)
    assert not window.errors, window.errors
    assert (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()

    # a second run, cancelled at its first block: the loaded model is unchanged (a new run replaces the last
    # result, so export comes first)
    def cancel_at_first_block(index, done, total, message):
        window.cancel_action.trigger()

    from studio.methods import rtn

    quantize = rtn.quantize_rtn_dense

    def slow_quantize(*args, **kwargs):  # a tiny model runs faster than the GUI thread sees its first block
        time.sleep(0.03)
        return quantize(*args, **kwargs)

    monkeypatch.setattr(rtn, "quantize_rtn_dense", slow_quantize)

    window.controller.progress.connect(cancel_at_first_block)
    with qtbot.waitSignal(window.controller.cancelled, timeout=120_000):
        window.run_action.trigger()
    window.controller.progress.disconnect(cancel_at_first_block)
    assert all(torch.equal(v, original[k]) for k, v in window.loaded.model.state_dict().items())
    assert window.run_action.isEnabled()

    # both runs are in the history, newest first
    window.history_view.refresh()
    assert history_rows(window.history_view)[:2] == ["cancelled", "finished"]
    table = window.history_view.table
    export_column = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())].index("Export")
    assert str(out) in table.item(1, export_column).text()
    assert not window.errors
