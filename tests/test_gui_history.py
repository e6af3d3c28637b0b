"""The History dock: a run through the window is recorded, listed, plotted, re-opened, compared and deleted."""

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtWidgets import QMessageBox  # noqa: E402

from studio.core.recipe import Recipe, Step  # noqa: E402

MIB = 2**20


@pytest.fixture
def window(qtbot, tmp_path, monkeypatch):
    """A window with its own settings file and its own (empty) run history."""
    from studio.gui.main_window import MainWindow

    monkeypatch.setenv("STUDIO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(QMessageBox, "critical", lambda *args: pytest.fail(f"error dialog: {args[1:]}"))
    win = MainWindow(tmp_path / "settings" / "studio.ini")
    qtbot.addWidget(win)
    win.show()
    return win


def _column(view, title):
    from studio.gui.history_view import COLUMNS

    return COLUMNS.index(title)


def test_a_run_is_recorded_plotted_reopened_compared_and_deleted(qtbot, window, tiny_folder, text_file, tmp_path):
    view = window.history_view
    assert view.table.rowCount() == 0 and "History" in [d.windowTitle() for d in window.docks]
    view_menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&View")
    assert window.history_dock.toggleViewAction() in view_menu.actions()

    window.load(str(tiny_folder))
    qtbot.waitUntil(lambda: window._load_task is None and window.loaded is not None, timeout=60_000)
    recipe = Recipe([Step("rtn", {"bits": 4, "group_size": 32, "symmetric": True})], name="History RTN")
    window.editor.set_recipe(recipe)
    window.editor.set_eval_text(str(text_file))
    assert window.run_action.isEnabled(), window.run_action.toolTip()
    with qtbot.waitSignal(window.controller.finished, timeout=60_000):
        window.run_action.trigger()

    # the run is in the table and on the scatter, on the Pareto front (it is the only one)
    assert view.table.rowCount() == 1
    run_id = view.table.item(0, 0).data(0x0100)  # Qt.UserRole
    assert view.table.item(0, _column(view, "Status")).text() == "finished"
    assert view.table.item(0, _column(view, "Recipe")).text() == "History RTN"
    assert view.table.item(0, _column(view, "Model")).text() == "tiny-llama"
    assert float(view.table.item(0, _column(view, "Perplexity after")).text().replace(",", "")) > 0
    assert view.plotted_ids() == [run_id] and view.front == [run_id]
    assert len(view.front_points.data) == 1

    # the export is recorded against the run
    out = tmp_path / "exported"
    window.export_hf_folder(str(out))
    qtbot.waitUntil(lambda: "Exported" in window.statusBar().currentMessage(), timeout=60_000)
    assert view.table.item(0, _column(view, "Export")).text() == str(out)

    # "Open recipe" puts the run's recipe back in the pipeline editor
    window.editor.set_recipe(Recipe([Step("magnitude", {})], name="Something else"))
    view.select_ids([run_id])
    assert view.open_recipe_action.isEnabled() and not view.compare_action.isEnabled()
    view.open_recipe_action.trigger()
    assert window.editor.recipe() == recipe and window.editor.current_path is None

    # a second (hand-recorded) run: two rows, sortable by number, comparable
    other = view.history.record("finished", {
        "final": {"perplexity": 1e6, "kl": 9.0, "top1_agreement": 0.1},
        "size_before": {"compressed_bytes": 64 * MIB}, "size_after": {"compressed_bytes": 32 * MIB},
        "steps": [], "seconds": 1.0,
    }, Recipe([Step("rtn", {"bits": 8})], name="Big"), {"name": "tiny-llama"})
    view.refresh()
    assert view.table.rowCount() == 2 and sorted(view.plotted_ids()) == [run_id, other]
    assert view.front == [run_id]  # smaller and better: the hand-made run is dominated
    size_column = _column(view, "Size after (MiB)")
    view.table.sortItems(size_column)
    assert view.table.item(0, 0).data(0x0100) == run_id  # numeric order (a few KiB before 32 MiB)

    view.select_ids([run_id, other])
    assert view.compare_action.isEnabled()
    view.compare_action.trigger()
    assert f"run {run_id}" in window.compare.title.text() and f"run {other}" in window.compare.title.text()
    rows = {window.compare.summary_table.item(r, 0).text(): r for r in range(window.compare.summary_table.rowCount())}
    kl_row = rows["KL to original (nats)"]
    assert window.compare.summary_table.item(kl_row, 2).text() == "9.00000"
    assert window.compare.summary_table.item(kl_row, 1).text() != "0.00000"  # run A's own KL, not the original's

    # filter, then delete
    view.filter_edit.setText("Big")
    assert view.table.rowCount() == 1
    view.status_combo.setCurrentText("failed")
    assert view.table.rowCount() == 0
    view.status_combo.setCurrentText("All runs")
    view.filter_edit.clear()
    view.select_ids([other])
    view.delete_selected(confirm=False)
    assert view.table.rowCount() == 1 and view.plotted_ids() == [run_id]


def test_a_failed_run_is_recorded(qtbot, window, tiny_folder, monkeypatch):
    from studio.methods import rtn

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rtn, "quantize_rtn_dense", boom)
    shown = []
    monkeypatch.setattr(QMessageBox, "critical", lambda parent, title, text, *a: shown.append(text))
    window.load(str(tiny_folder))
    qtbot.waitUntil(lambda: window._load_task is None and window.loaded is not None, timeout=60_000)
    window.editor.set_recipe(Recipe([Step("rtn", {"bits": 4, "group_size": 32})], name="Doomed"))
    with qtbot.waitSignal(window.controller.failed, timeout=60_000):
        window.run_action.trigger()
    view = window.history_view
    assert view.table.rowCount() == 1 and view.plotted_ids() == []
    assert view.table.item(0, _column(view, "Status")).text() == "failed"
    assert "boom" in view.table.item(0, _column(view, "Status")).toolTip()
    assert shown and "boom" in shown[0]
