"""`studio --self-test`: prove that this installation of the app works, the way a user would use it.

It opens the real window, builds a tiny Llama from a config (with a tokenizer trained on a few sentences), loads it
through the window's worker, runs a one-step pipeline (RTN 4-bit) in the run worker with evaluation, checks that
memory samples and an accuracy point reached the charts, exports the result to a temporary folder and loads it back
with plain transformers, and writes a JSON report. Exit 0 when every check passed, 1 with the failed check's reason.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QEvent, QObject, QSettings
from PySide6.QtWidgets import QApplication

TEXT = ("The quick brown fox jumps over the lazy dog. Compression makes models smaller and faster.\n"
        "A language model predicts the next token from the ones before it.\n") * 12
TIMEOUT_S = 120


class SelfTestFailed(Exception):
    pass


class _FirstPaint(QObject):
    """Seconds to the window's first paint event: since the self-test started, and since the process was launched
    (which includes the interpreter's start, the built app's unpacking and every import)."""

    def __init__(self, started: float):
        super().__init__()
        self.started, self.seconds, self.since_launch = started, None, None

    def eventFilter(self, watched, event) -> bool:
        if event.type() == QEvent.Type.Paint and self.seconds is None:
            from studio.gui.app import seconds_since_process_start

            self.seconds = time.perf_counter() - self.started
            self.since_launch = seconds_since_process_start()
        return False


def _wait(app: QApplication, done: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SelfTestFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        app.processEvents()
        time.sleep(0.01)


def write_tiny_model(folder: Path, blocks: int = 2, width: int = 64, vocab: int = 320, text: str = TEXT) -> Path:
    """A random Llama built from a config, with a byte-level BPE tokenizer trained on `text`, saved as a Hugging
    Face folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=blocks,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def installation() -> dict[str, Any]:
    """Which Python runs the studio: a built app (PyInstaller's `sys.frozen`) must use only what it brought, so for
    it list the imported modules and (on Linux) the Python libraries mapped from outside its own folder."""
    app_folder = getattr(sys, "_MEIPASS", None)
    about: dict[str, Any] = {"frozen": bool(getattr(sys, "frozen", False)), "executable": sys.executable,
                             "python": sys.version.split()[0], "app_folder": app_folder}
    if app_folder:
        inside = str(Path(app_folder).resolve())
        files = {getattr(module, "__file__", None) for module in list(sys.modules.values())}
        # frozen modules without a file of their own carry relative names (pyimod01_archive.py, struct.py)
        about["modules_outside_app"] = sorted(f for f in files if f and Path(f).is_absolute()
                                              and not str(Path(f).resolve()).startswith(inside))
        maps = Path("/proc/self/maps")
        if maps.exists():
            mapped = {line.split()[-1] for line in maps.read_text().splitlines() if line.split()[-1].startswith("/")}
            about["python_libraries_outside_app"] = sorted(
                path for path in mapped if "python" in Path(path).name.lower() and not path.startswith(inside))
    return about


def run_self_test(report_path: str | None = None) -> int:
    from studio.gui.app import studio_application

    started = time.perf_counter()
    app = studio_application()
    report: dict[str, Any] = {"checks": {}, "platform": app.platformName()}
    work = Path(tempfile.mkdtemp(prefix="studio-self-test-"))
    try:
        _checks(app, started, work, report)
        report["status"] = "passed"
    except Exception as exc:  # the report says what failed; the exit code says that something did
        report["status"] = "failed"
        report["reason"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["installation"] = installation()
    text = json.dumps(report, indent=2, default=str)
    if report_path:
        Path(report_path).write_text(text, encoding="utf-8")
    print(text if report["status"] == "failed" else f"self-test passed in {report['seconds']} s", flush=True)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0 if report["status"] == "passed" else 1


def _checks(app: QApplication, started: float, work: Path, report: dict[str, Any]) -> None:
    from studio.gui.main_window import MainWindow

    checks = report["checks"]
    window = MainWindow(QSettings(str(work / "settings.ini"), QSettings.Format.IniFormat))
    paint = _FirstPaint(started)
    window.installEventFilter(paint)
    window.show()
    try:
        _exercise(app, window, paint, work, checks)
    finally:
        window.close()


def _exercise(app: QApplication, window, paint: _FirstPaint, work: Path, checks: dict[str, Any]) -> None:
    _wait(app, lambda: paint.seconds is not None, "the window's first paint")
    checks["first_paint_seconds"] = round(paint.seconds, 3)
    checks["first_paint_since_launch_seconds"] = round(paint.since_launch, 3)
    if app.windowIcon().isNull():
        raise SelfTestFailed("the window has no icon: resources/icons is missing from this installation")
    from studio.core.paths import PRESETS_DIR

    presets = sorted(PRESETS_DIR.glob("*.yaml"))
    if not presets:
        raise SelfTestFailed("no recipe presets were found: resources/presets is missing from this installation")
    checks["presets"] = len(presets)

    folder = work / "tiny-llama"
    write_tiny_model(folder)
    text_file = work / "eval.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    window.load(str(folder))
    _wait(app, lambda: window._load_task is None and window.loaded is not None, "the model to load")
    checks["model_loaded"] = window.loaded.name

    window.editor.add_method("rtn")
    window.editor.set_param(0, "group_size", 32)
    window.editor.set_eval_text(str(text_file))
    finished: list = []
    window.controller.finished.connect(finished.append)
    window.controller.failed.connect(lambda message, *_: finished.append(SelfTestFailed(f"the run failed: {message}")))
    window.run_action.trigger()
    _wait(app, lambda: bool(finished), "the run to finish")
    if isinstance(finished[0], Exception):
        raise finished[0]
    result = finished[0]
    if result.status != "finished":
        raise SelfTestFailed(f"the run ended {result.status}: {result.error}")
    _wait(app, lambda: window.charts.memory_samples() >= 1, "a memory sample", 10)
    accuracy = window.charts.accuracy_points()
    if not any(name == "perplexity" for _, name, _ in accuracy):
        raise SelfTestFailed("no accuracy point reached the charts")
    checks["memory_samples"] = window.charts.memory_samples()
    checks["accuracy_points"] = len(accuracy)
    checks["perplexity"] = result.report["final"]["perplexity"]

    import torch
    from transformers import AutoModelForCausalLM

    from studio.core.export import export_hf_folder

    exported = export_hf_folder(result.model, window.loaded.tokenizer, work / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ids = window.loaded.tokenizer(TEXT[:200], return_tensors="pt").input_ids
    with torch.no_grad():
        difference = (reloaded(ids).logits - result.model(ids).logits).abs().max().item()
    if difference > 1e-4:
        raise SelfTestFailed(f"the exported model's logits differ by {difference:g} after reloading")
    checks["export_reload_max_logit_difference"] = difference
