"""The window and its pipeline editor, offscreen with pytest-qt, on tiny random models."""

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QByteArray, QMimeData, QModelIndex, QSize, Qt  # noqa: E402
from PySide6.QtWidgets import QMessageBox  # noqa: E402

from studio.core.recipe import Recipe, Step, load_recipe  # noqa: E402
from studio.core.structure import TargetSpec  # noqa: E402


@pytest.fixture
def editor(qtbot, errors):
    from studio.gui.pipeline_editor import PipelineEditor

    widget = PipelineEditor()
    qtbot.addWidget(widget)
    widget.resize(1200, 600)
    widget.show()
    return widget


def _load(qtbot, window, folder):
    window.load(str(folder))
    assert window.loaded is None or window._load_task is not None  # it returns at once: the load is a worker's
    qtbot.waitUntil(lambda: window._load_task is None and window.loaded is not None, timeout=60_000)


def _double_click_method(qtbot, editor, method_id):
    palette = editor.palette
    item = palette.item_for(method_id)
    pos = palette.tree.visualItemRect(item).center()
    qtbot.mouseClick(palette.tree.viewport(), Qt.MouseButton.LeftButton, pos=pos)  # a real double click
    qtbot.mouseDClick(palette.tree.viewport(), Qt.MouseButton.LeftButton, pos=pos)  # starts with a click


# --- the window -------------------------------------------------------------------------------------------


def test_window_opens_a_model_folder_in_a_worker_and_shows_its_layers(qtbot, window, tiny_folder):
    _load(qtbot, window, tiny_folder)
    tree = window.model_panel.tree
    blocks = [tree.topLevelItem(i) for i in range(tree.topLevelItemCount())]
    assert [b.text(0) for b in blocks[:3]] == ["block 0", "block 1", "block 2"]
    layers = {blocks[0].child(j).text(0): blocks[0].child(j) for j in range(blocks[0].childCount())}
    assert set(layers) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert layers["mlp.up_proj"].text(2) == "64 → 128"
    assert layers["mlp.up_proj"].text(3) == f"{64 * 128:,}"
    assert "lm_head" in blocks[-1].child(0).text(0)  # outside the blocks, not targeted by default
    assert "LlamaForCausalLM" in window.model_panel.title.text() or "tiny-llama" in window.model_panel.title.text()
    assert "parameters" in window.statusBar().currentMessage()
    assert "Model" in window.editor.footer.text()
    assert str(tiny_folder) in window.recent_models.items()


def test_a_failed_load_is_shown_and_the_window_stays_usable(qtbot, window, errors, tmp_path, tiny_folder):
    window.load(str(tmp_path / "missing"))
    qtbot.waitUntil(lambda: bool(errors), timeout=30_000)
    assert "does not exist" in errors[0][1]
    assert window.isEnabled() and window.loaded is None
    assert "does not exist" in window.log_panel.plain_text()
    _load(qtbot, window, tiny_folder)  # and the next load works
    assert window.model_panel.tree.topLevelItemCount() >= 3


def test_run_is_enabled_only_with_a_model_and_a_valid_pipeline(qtbot, window, tiny_folder, tmp_path):
    run = window.run_action
    assert not run.isEnabled() and "Open a model" in run.toolTip()
    _load(qtbot, window, tiny_folder)
    assert not run.isEnabled() and "empty" in run.toolTip()
    window.editor.add_method("rtn")
    assert "group_size" in run.toolTip()  # 128 does not divide the tiny model's width of 64
    window.editor.set_param(0, "group_size", 32)
    assert run.isEnabled(), run.toolTip()
    window.editor.set_param(0, "bits", 9)
    assert not run.isEnabled() and "bits" in run.toolTip()
    window.editor.undo_stack.undo()
    assert run.isEnabled()
    window.editor.set_eval_text(str(tmp_path / "nowhere.txt"))
    assert not run.isEnabled() and "Evaluation text" in run.toolTip()
    window.editor.set_eval_text("")
    assert run.isEnabled()


def test_a_run_reaches_the_compare_view_and_exports_in_a_worker(qtbot, window, tiny_folder, text_file, tmp_path):
    _load(qtbot, window, tiny_folder)
    window.editor.add_method("rtn")
    window.editor.set_param(0, "group_size", 32)
    window.editor.set_eval_text(str(text_file))
    assert window.run_action.isEnabled(), window.run_action.toolTip()
    with qtbot.waitSignal(window.controller.finished, timeout=60_000):
        window.run_action.trigger()
        assert window.cancel_action.isEnabled() and not window.run_action.isEnabled()
    assert window.result.status == "finished"
    assert window.charts.accuracy_points()  # metrics reached the charts
    assert window.run_action.isEnabled() and window.export_action.isEnabled()
    out = tmp_path / "exported"
    window.export_hf_folder(str(out))
    qtbot.waitUntil(lambda: "Exported" in window.statusBar().currentMessage(), timeout=60_000)
    assert (out / "config.json").is_file() and (out / "recipe.yaml").is_file()


def test_progress_bar_shows_step_block_and_evaluation(qtbot):
    from studio.gui.run_progress import RunProgress

    progress = RunProgress(lambda: 42.0)
    qtbot.addWidget(progress)
    progress.begin()
    progress.run_started(2, evaluating=True)
    assert progress.format() == "Evaluating the original…"
    progress.progress(-1, 2, 4, "evaluating")
    assert progress.format() == "Evaluating the original · window 2/4"
    progress.step_started("magnitude", 2)
    progress.progress(0, 1, 3, "block 0")
    assert progress.format() == "Step 1/2 (magnitude) · block 1/3" and progress.value() == 1000 // 6
    progress.step_started("rtn", 2)
    progress.progress(1, 3, 3, "block 2")
    assert progress.value() == 1000
    progress._show_time_left()
    assert progress.time_label.text() == "42 s left"
    progress.end()
    assert progress.isHidden()


def test_settings_restore_geometry_and_docks_across_windows(qtbot, settings_file):
    from studio.gui.main_window import MainWindow

    first = MainWindow(settings_file)
    qtbot.addWidget(first)
    first.show()
    target = first.minimumSizeHint() + QSize(12, 18)  # small: the offscreen screen is about 800 pixels
    first.resize(target)
    first.log_dock.hide()
    first.set_theme("dark")
    qtbot.waitUntil(lambda: first.size() == target)
    expected = (target.width(), target.height())
    first.close()
    assert settings_file.is_file()

    second = MainWindow(settings_file)
    qtbot.addWidget(second)
    second.show()
    assert (second.width(), second.height()) == expected
    assert second.log_dock.isHidden() and not second.pipeline_dock.isHidden()
    assert [a.data() for a in second.theme_group.actions() if a.isChecked()] == ["dark"]
    second.set_theme("system")


def test_edit_menu_undoes_pipeline_edits(qtbot, window):
    window.editor.add_method("magnitude")
    assert window.undo_action.isEnabled() and "magnitude" in window.undo_action.text().lower()
    window.undo_action.trigger()
    assert window.editor.recipe().steps == []
    window.redo_action.trigger()
    assert [s.method for s in window.editor.recipe().steps] == ["magnitude"]


# --- the pipeline editor ------------------------------------------------------------------------------------


def test_palette_groups_methods_by_family(editor):
    tree = editor.palette.tree
    heads = [tree.topLevelItem(i).text(0) for i in range(tree.topLevelItemCount())]
    assert heads == ["Quantization", "Pruning", "Knowledge distillation", "Compact architecture / low-rank",
                     "Dynamic networks"]  # every family has methods, none is greyed as coming
    assert all(tree.topLevelItem(i).childCount() for i in range(len(heads)))
    editor.palette.search.setText("prun")
    assert tree.topLevelItem(0).isHidden() and not tree.topLevelItem(1).isHidden()


@pytest.mark.parametrize("method_id, field, value", [("svd_llm", "rank_rule", "parameter_ratio"), ("gqa", "kv_heads", 1),
                                                      ("distill", "loss", "forward_kl"),
                                                      ("early_exit", "thresholds", None),
                                                      ("self_speculative", "draft_tokens", None)])
def test_the_other_families_build_steps_from_the_palette(qtbot, editor, method_id, field, value):
    _double_click_method(qtbot, editor, method_id)
    assert [s.method for s in editor.recipe().steps] == [method_id]
    form_value = editor.inspector.field(field).value()
    assert form_value is not None and (value is None or form_value == value)


def test_double_click_adds_a_step_and_an_invalid_value_is_marked_then_undone(qtbot, editor):
    _double_click_method(qtbot, editor, "rtn")
    assert [s.method for s in editor.recipe().steps] == ["rtn"]
    assert editor.is_valid and editor.inspector.field("bits").editor.value() == 4

    with qtbot.waitSignal(editor.validity_changed) as signal:
        editor.set_param(0, "bits", 9)  # what a hand-edited recipe file can say; the spin box stops at 8
    valid, reason = signal.args
    assert not valid and "bits" in reason and "8" in reason
    field = editor.inspector.field("bits")
    assert field.invalid and "less than or equal to 8" in field.toolTip()
    assert field.editor.value() == 9  # shown as it is, not clamped
    assert not editor.inspector.field("group_size").invalid

    with qtbot.waitSignal(editor.validity_changed) as signal:
        editor.undo_stack.undo()
    assert signal.args == [True, ""]
    assert editor.recipe().steps[0].params["bits"] == 4 and not editor.inspector.field("bits").invalid
    editor.undo_stack.redo()
    assert editor.recipe().steps[0].params["bits"] == 9 and editor.inspector.field("bits").invalid


def test_inspector_edits_are_commands_and_model_checks_mark_the_field(qtbot, editor, tiny_loaded):
    editor.add_method("rtn")
    editor.set_model(tiny_loaded)
    field = editor.inspector.field("group_size")
    assert field.invalid and "does not divide" in field.problem  # 128 > the tiny model's width 64
    field.editor.setValue(32)
    assert editor.recipe().steps[0].params["group_size"] == 32 and editor.is_valid
    assert not field.invalid and "predicted" in editor.footer.text()
    status = editor.model.status(0)
    assert status.estimate is not None and status.layers == 21
    editor.inspector.field("symmetric").editor.setChecked(False)
    assert editor.recipe().steps[0].params["symmetric"] is False
    include = editor.inspector.field("targets.include").editor
    include.setText("*.mlp.*")
    include.editingFinished.emit()
    assert editor.recipe().steps[0].targets == TargetSpec(("*.mlp.*",), ())
    assert editor.model.status(0).layers == 9
    include.setText("*.nothing")
    include.editingFinished.emit()
    assert editor.inspector.field("targets.include").invalid and not editor.is_valid
    editor.undo_stack.undo()
    assert editor.is_valid and editor.inspector.field("targets.include").editor.text() == "*.mlp.*"
    editor.set_model(None)
    assert "Open a model" in editor.footer.text()


def test_steps_are_reordered_toggled_removed_and_dropped_with_undo(qtbot, editor):
    editor.add_method("rtn")
    editor.add_method("magnitude")
    methods = lambda: [s.method for s in editor.recipe().steps]  # noqa: E731

    editor.move_step(1, 0)
    assert methods() == ["magnitude", "rtn"] and editor.selected_row() == 0
    editor.undo_stack.undo()
    assert methods() == ["rtn", "magnitude"]
    # a drag inside the list arrives as moveRows (row 0 dropped below the last row)
    editor.model.moveRows(QModelIndex(), 0, 1, QModelIndex(), 2)
    assert methods() == ["magnitude", "rtn"]

    # the check box on a card sets CheckStateRole, which becomes a command
    editor.model.setData(editor.model.index(1), Qt.CheckState.Unchecked, Qt.ItemDataRole.CheckStateRole)
    assert [s.enabled for s in editor.recipe().steps] == [True, False]
    assert editor.undo_stack.undoText() == "Disable step 2"
    editor.undo_stack.undo()
    assert editor.recipe().steps[1].enabled

    # a method dragged from the palette is inserted where it is dropped
    mime = QMimeData()
    mime.setData("application/x-studio-method", QByteArray(b"rtn"))
    assert editor.model.dropMimeData(mime, Qt.DropAction.CopyAction, 1, 0, QModelIndex())
    assert methods() == ["magnitude", "rtn", "rtn"]

    editor.select_row(0)
    editor.view.setFocus()
    qtbot.keyClick(editor.view, Qt.Key.Key_Delete)
    assert methods() == ["rtn", "rtn"]
    editor.undo_stack.undo()
    assert methods() == ["magnitude", "rtn", "rtn"]

    for _ in range(editor.model.rowCount()):
        editor.remove_step(0)
    assert not editor.is_valid and "empty" in editor.invalid_reason


def test_recipe_yaml_round_trips_through_save_and_open(qtbot, editor, tmp_path, errors):
    recipe = Recipe(
        [Step("magnitude", {"sparsity": 0.25, "pattern": "unstructured", "scope": "global"}, enabled=False),
         Step("rtn", {"bits": 3, "group_size": 64, "symmetric": False}, TargetSpec(("*",), ("*.down_proj",)))],
        name="Round trip", description="saved by the editor",
    )
    editor.set_recipe(recipe)
    assert editor.recipe() == recipe and editor.name_edit.text() == "Round trip"
    path = tmp_path / "recipe.yaml"
    assert editor.save_recipe(path) and editor.undo_stack.isClean()
    assert load_recipe(path) == recipe
    assert not list(tmp_path.glob(".*"))  # QSaveFile left no temporary file

    editor.set_recipe(Recipe([Step("rtn", {})]))
    assert editor.open_recipe(path) and editor.recipe() == recipe
    assert editor.model.rowCount() == 2 and not editor.recipe().steps[0].enabled

    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nsteps: [{method: rtn, colour: red}]\n")
    assert not editor.open_recipe(bad)
    assert errors and "colour" in errors[-1][1]
    assert editor.recipe() == recipe  # unchanged


def test_presets_load_and_name_edits_are_undoable(qtbot, editor):
    from studio.core.paths import PRESETS_DIR

    assert editor.load_preset(PRESETS_DIR / "magnitude-2of4-rtn-w8.yaml")
    assert [s.method for s in editor.recipe().steps] == ["magnitude", "rtn"]
    assert editor.current_path is None  # a bundled preset is never overwritten by Save
    editor.name_edit.setText("Mine")
    editor.name_edit.editingFinished.emit()
    assert editor.recipe().name == "Mine"
    editor.undo_stack.undo()
    assert editor.recipe().name == "2:4 sparse + RTN W8"


def test_a_calibrating_step_asks_for_calibration_text_which_the_recipe_then_carries(qtbot, editor, text_file, tmp_path):
    from studio.core.calibration import CalibrationSettings

    editor.add_method("gptq")
    assert not editor.is_valid and "calibration text" in editor.invalid_reason
    editor.set_calibration_text(str(tmp_path / "nowhere.txt"))
    assert not editor.is_valid and "nowhere.txt" in editor.invalid_reason
    editor.set_calibration_text(str(text_file))
    editor.calib_samples.setValue(16)
    assert editor.is_valid
    assert editor.recipe().calibration == CalibrationSettings(text_file=str(text_file), samples=16)
    path = tmp_path / "gptq.yaml"
    assert editor.save_recipe(path) and load_recipe(path).calibration.samples == 16

    editor.set_calibration_text("")
    editor.set_recipe(load_recipe(path))  # a recipe's calibration section fills the fields
    assert editor.calibration_text() == str(text_file) and editor.calib_samples.value() == 16
