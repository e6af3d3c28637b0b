"""The compare view's measurements, the export dialog, bad input in the window, and a window that opens
without torch: offscreen with pytest-qt, on tiny random models."""

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("pytestqt")

from PySide6.QtWidgets import QFileDialog, QMessageBox  # noqa: E402

from conftest import tiny_model  # noqa: E402


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tiny_task.jsonl"
    items = [{"query": "The quick brown fox jumps over the", "choices": ["lazy dog.", "model."], "gold": 0},
             {"query": "A language model predicts the next", "choices": ["token", "fox"], "gold": 0}]
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n", encoding="utf-8")
    return path


def _load(qtbot, window, folder):
    window.load(str(folder))
    qtbot.waitUntil(lambda: window._load_task is None and window.loaded is not None, timeout=60_000)


def _run(qtbot, window, folder, text_file=None):
    _load(qtbot, window, folder)
    window.editor.add_method("rtn")
    window.editor.set_param(0, "group_size", 32)
    if text_file is not None:
        window.editor.set_eval_text(str(text_file))
    with qtbot.waitSignal(window.controller.finished, timeout=60_000):
        window.run_action.trigger()


def _idle(qtbot, compare):
    qtbot.waitUntil(lambda: not compare.is_busy(), timeout=60_000)


# --- engine ---------------------------------------------------------------------------------------------


def test_weight_histogram_shares_edges_and_counts_every_weight():
    import torch

    from studio.core.evaluation.weights import weight_histogram
    from studio.methods.grid import quantize_rtn

    layer = tiny_model("llama").model.layers[0].mlp.up_proj
    quantized = torch.nn.Linear(64, 128, bias=False)
    quantized.weight.data = quantize_rtn(layer.weight.data, 3, 32, True).dequantize()
    h = weight_histogram(layer, quantized, bins=50)
    assert len(h["edges"]) == 51 and len(h["before"]) == len(h["after"]) == 50
    assert sum(h["before"]) == sum(h["after"]) == layer.weight.numel()
    assert h["distinct_after"] <= 8 * (64 // 32) * 128 < h["distinct_before"]


def test_export_formats_and_a_destination_under_a_file_is_a_clear_error(tmp_path):
    from studio.core.errors import ExportError
    from studio.core.export import EXPORT_FORMATS, check_destination

    assert [f.id for f in EXPORT_FORMATS] == ["hf-safetensors", "compressed-tensors", "gguf"]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        check_destination(blocker / "sub" / "out", force=False)


def test_the_window_opens_without_torch_or_transformers(tmp_path):
    code = (
        "import sys\n"
        "from PySide6.QtWidgets import QApplication\n"
        "app = QApplication([])\n"
        "from studio.gui.main_window import MainWindow\n"
        f"w = MainWindow({str(tmp_path / 's.ini')!r}); w.show(); app.processEvents()\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --- the compare view -------------------------------------------------------------------------------------


def test_compare_view_histograms_generations_speed_and_accuracy(qtbot, window, tiny_folder, text_file, task_file,
                                                                errors):
    _run(qtbot, window, tiny_folder, text_file)
    compare = window.compare
    assert compare.has_models()
    combo = compare.weights.layer_combo
    assert combo.count() == 3 * 7 and combo.currentText() == "model.layers.0.self_attn.q_proj"
    qtbot.waitUntil(lambda: compare.weights.histogram is not None, timeout=60_000)
    combo.setCurrentIndex(5)
    qtbot.waitUntil(lambda: compare.weights.histogram["layer"] == combo.itemText(5), timeout=60_000)
    assert compare.weights.histogram["distinct_after"] < compare.weights.histogram["distinct_before"]

    compare.generation.prompt_edit.setText("The quick brown")
    compare.generation.generate_button.click()
    qtbot.waitUntil(lambda: bool(compare.generation.after_text.toPlainText()), timeout=60_000)
    assert compare.generation.before_text.toPlainText().startswith("The quick brown")

    _idle(qtbot, compare)
    compare.speed_button.click()
    assert compare.is_busy() and not compare.speed_button.isEnabled()  # a worker does it
    _idle(qtbot, compare)
    labels = [compare.summary_table.item(r, 0).text() for r in range(compare.summary_table.rowCount())]
    assert "Prefill tokens/s" in labels and "Decode tokens/s" in labels
    assert window.result.report["speed"]["after"]["decode_tokens_per_s"] > 0  # the export records it

    compare.measure_accuracy([str(task_file)])
    _idle(qtbot, compare)
    labels = [compare.summary_table.item(r, 0).text() for r in range(compare.summary_table.rowCount())]
    assert "tiny_task acc" in labels and "tiny_task acc_norm" in labels
    assert not errors


def test_a_failing_measurement_is_shown_and_the_view_stays_usable(qtbot, window, tiny_folder, tmp_path, errors):
    _run(qtbot, window, tiny_folder)
    window.compare.measure_accuracy([str(tmp_path / "missing.jsonl")])
    qtbot.waitUntil(lambda: bool(errors), timeout=60_000)
    assert "does not exist" in errors[-1][1]
    _idle(qtbot, window.compare)
    assert window.compare.speed_button.isEnabled()
    assert "does not exist" in window.log_panel.plain_text()


# --- the export dialog ------------------------------------------------------------------------------------


def test_export_dialog_writes_in_a_worker_and_shows_what_it_wrote(qtbot, window, tiny_folder, tmp_path,
                                                                  monkeypatch, errors):
    _run(qtbot, window, tiny_folder)
    dialog = window.open_export_dialog()
    assert dialog.format_id() == "hf-safetensors" and dialog.format_list.count() == 3
    assert "4-bit" in dialog.advice.text() and dialog.export_button.isEnabled()

    out = tmp_path / "exported"
    dialog.path_edit.setText(str(out))
    with qtbot.waitSignal(dialog.exported, timeout=60_000) as signal:
        dialog.export_button.click()
        assert dialog.is_busy() and dialog.progress.isVisible()
    summary = signal.args[0]
    assert summary["path"] == str(out) and summary["disk_bytes"] > 0
    assert {"config.json", "model.safetensors", "recipe.yaml", "report.json"} <= {n for n, _ in summary["files"]}
    assert dialog.files.topLevelItemCount() == len(summary["files"]) and "on disk" in dialog.status.text()

    # an existing non-empty folder: replaced only when the user agrees
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a) or QMessageBox.StandardButton.No)
    dialog.export_button.click()
    assert asked and not dialog.is_busy()
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    with qtbot.waitSignal(dialog.exported, timeout=60_000):
        dialog.export_button.click()
    assert not errors and "Exported" in window.statusBar().currentMessage()


# --- bad input in the window ------------------------------------------------------------------------------


def test_a_truncated_safetensors_file_is_a_clear_message(qtbot, window, tiny_folder, errors, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    window.load(str(broken))
    qtbot.waitUntil(lambda: bool(errors), timeout=60_000)
    title, message = errors[-1]
    assert title == "Could not open the model" and "Traceback" not in message
    assert "model.safetensors" in message or "safetensors" in message.lower()
    assert window.isEnabled() and window.loaded is None
    _load(qtbot, window, tiny_folder)  # and the window still works
    assert window.model_panel.tree.topLevelItemCount() >= 3


def test_an_invalid_recipe_opened_from_the_menu_is_a_clear_message(qtbot, window, errors, tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nsteps: [{method: rtn, params: {bits: 4}\n")  # unclosed
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(bad), ""))
    window.open_recipe_action.trigger()
    assert errors and errors[-1][0] == "Could not open the recipe"
    assert "bad.yaml" in errors[-1][1] and "Traceback" not in errors[-1][1]
    assert window.editor.model.rowCount() == 0 and window.isEnabled()
    window.editor.add_method("rtn")  # still editable
    assert window.editor.model.rowCount() == 1
    # a well-formed file naming an unknown method opens marked invalid, and Run says why
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("schema_version: 1\nsteps: [{method: quantize-everything}]\n")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(unknown), ""))
    window.open_recipe_action.trigger()
    assert not window.editor.is_valid and "quantize-everything" in window.editor.invalid_reason
    assert not window.run_action.isEnabled()


def test_an_unwritable_export_folder_is_a_clear_message(qtbot, window, tiny_folder, errors, tmp_path):
    _run(qtbot, window, tiny_folder)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    dialog = window.open_export_dialog()
    dialog.path_edit.setText(str(blocker / "export"))
    dialog.export_button.click()
    assert errors and errors[-1][0] == "Cannot export there" and "is a file, not a folder" in errors[-1][1]
    assert not dialog.is_busy() and dialog.export_button.isEnabled()
    assert not (tmp_path / "export").exists()
    # the same for the direct export path (a worker reports it)
    window.export_hf_folder(str(blocker / "export"))
    qtbot.waitUntil(lambda: len(errors) >= 2, timeout=60_000)
    assert "is a file, not a folder" in errors[-1][1] and "Traceback" not in errors[-1][1]
    assert window.export_action.isEnabled() and window.run_action.isEnabled()


def test_export_dialog_gguf_with_advice_verification_and_cancel(qtbot, window, tiny_folder, text_file, tmp_path,
                                                                monkeypatch, errors):
    _run(qtbot, window, tiny_folder, text_file)  # RTN 4-bit g32 symmetric: Q4_0 holds its codes
    dialog = window.open_export_dialog()
    dialog.format_list.setCurrentRow(2)
    assert dialog.format_id() == "gguf" and dialog.gguf_type.isVisible()
    assert "Q4_0" in dialog.advice.text() and dialog.export_button.isEnabled()
    assert dialog.verify.isEnabled() and dialog.verify.isChecked()

    # cancelled mid-write: nothing reaches the destination and the dialog stays usable
    import studio.core.export.gguf_file as gguf_file

    real_writer = gguf_file.write_gguf

    def slow_writer(model, tokenizer, folder, provenance, cancel, **options):
        (folder / "partial.gguf").write_bytes(b"GGUF")
        while not cancel.cancelled:
            time.sleep(0.01)
        cancel.check()

    monkeypatch.setattr(gguf_file, "write_gguf", slow_writer)
    dialog.path_edit.setText(str(tmp_path / "cancelled.gguf"))
    dialog.export_button.click()
    assert dialog.is_busy() and dialog.cancel_button.isVisible()
    dialog.cancel_button.click()
    qtbot.waitUntil(lambda: not dialog.is_busy(), timeout=60_000)
    assert "cancelled" in dialog.status.text() and dialog.export_button.isEnabled()
    assert not [p for p in tmp_path.iterdir() if "cancelled" in p.name or p.name.startswith(".")]
    monkeypatch.setattr(gguf_file, "write_gguf", real_writer)

    out = tmp_path / "model.gguf"
    dialog.path_edit.setText(str(out))
    with qtbot.waitSignal(dialog.exported, timeout=120_000) as signal:
        dialog.export_button.click()
    summary = signal.args[0]
    assert out.is_file() and summary["export"]["gguf_type"] == "Q4_0"
    verification = summary["export"]["verification"]
    assert all(abs(v["relative_difference"]) < 0.005 for v in verification["reloaded"].values())
    assert "Reloaded by transformers" in dialog.status.text() and not errors
