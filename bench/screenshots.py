"""Screenshots of the real main window: a tiny random Llama, a two-step pipeline (2:4 magnitude pruning, then
RTN W4 g32) with a quick evaluation, run; then PNGs of the window with its charts and of the compare view,
at 1280×800 and 1920×1080, in the light theme (and the dark one at 1280×800), and of the export dialog (GGUF:
its advice, then the export loaded back and compared); then a small recipe search in the Search dock (threads) with
a point of its Pareto front selected, at both sizes in the light theme and 1280×800 in the dark one.
`--search-only` takes only the search's.

    xvfb-run -s "-screen 0 1920x1080x24" env QT_QPA_PLATFORM=xcb python bench/screenshots.py [--out DIR]

Default DIR: /tmp/studio-screenshots. Evaluation text: ../shared/data/text/wikitext-2-raw-test.txt (or
$STUDIO_SHARED_DIR), else a few generated sentences.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED_DIR") or REPO.parent / "shared")
SIZES = ((1280, 800), (1920, 1080))
TEXT = ("The quick brown fox jumps over the lazy dog. Compression makes models smaller and faster.\n"
        "A language model predicts the next token from the ones before it.\n") * 40


def tiny_model_folder(folder: Path) -> Path:
    """A random Llama (4 blocks, width 128) with a byte-level BPE tokenizer, saved as a Hugging Face folder."""
    from studio.gui.self_test import write_tiny_model

    return write_tiny_model(folder, blocks=4, width=128, vocab=512, text=TEXT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/studio-screenshots"))
    parser.add_argument("--search-only", action="store_true", help="only the recipe search's screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="studio-shots-"))
    os.environ.setdefault("STUDIO_DATA_DIR", str(work / "data"))  # keep the user's run history clean

    from PySide6.QtWidgets import QApplication, QMessageBox

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    from studio.gui.main_window import MainWindow

    errors = []
    QMessageBox.critical = staticmethod(lambda parent, title, text, *a: errors.append((title, text)))
    text = SHARED / "data" / "text" / "wikitext-2-raw-test.txt"
    if not text.is_file():
        text = work / "text.txt"
        text.write_text(TEXT, encoding="utf-8")
    window = MainWindow(work / "studio.ini")
    window.set_theme("light")
    window.resize(*SIZES[0])
    window.show()

    def wait(condition, timeout_s: float = 300) -> None:
        end = time.monotonic() + timeout_s
        while not condition():
            if errors:
                raise SystemExit(f"error shown: {errors}")
            if time.monotonic() > end:
                raise SystemExit("timed out")
            app.processEvents()
            time.sleep(0.01)

    def settle(seconds: float = 0.4) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    window.load(str(tiny_model_folder(work / "tiny-llama")))
    wait(lambda: window.loaded is not None and window._load_task is None)
    saved = [] if args.search_only else run_screenshots(window, text, work, args.out, wait, settle)
    saved += search_screenshots(window, text, args.out, wait, settle)
    window.set_theme("system")
    window.close()
    for path in saved:
        print(path)
    return 0


def run_screenshots(window, text: Path, work: Path, out: Path, wait, settle) -> list[Path]:
    """The run (during and after), the compare view's tabs and the export dialog."""
    window.editor.add_method("magnitude")
    window.editor.set_param(0, "pattern", "2:4")
    window.editor.add_method("rtn")
    window.editor.set_param(1, "bits", 4)
    window.editor.set_param(1, "group_size", 32)
    window.editor.set_eval_text(str(text))
    wait(lambda: window.run_action.isEnabled(), 30)
    finished, during = [], out / f"run-during-{SIZES[0][0]}x{SIZES[0][1]}-light.png"

    def grab_during_the_run(index, done, total, message) -> None:
        if index == 1 and done == 1 and not during.exists():  # the second step, its first block done
            window.grab().save(str(during))

    window.controller.progress.connect(grab_during_the_run)
    window.controller.finished.connect(finished.append)
    window.run_action.trigger()
    wait(lambda: finished)
    wait(lambda: not window.compare.is_busy())
    window.compare.generation.generate_button.click()
    wait(lambda: not window.compare.is_busy())
    window.compare.measure_speed()
    wait(lambda: not window.compare.is_busy())

    saved = [during]
    for theme, sizes in (("light", SIZES), ("dark", SIZES[:1])):
        window.set_theme(theme)
        for width, height in sizes:
            window.resize(width, height)
            window.charts_dock.raise_()
            settle()
            for view, raise_dock in (("run", window.charts_dock.raise_), ("compare", window.compare_dock.raise_)):
                raise_dock()
                for tab in ((0,) if view == "run" else (0, 1, 2, 3)):
                    window.compare.tabs.setCurrentIndex(tab)
                    settle()
                    suffix = "" if view == "run" else f"-{window.compare.tabs.tabText(tab).lower()}"
                    path = out / f"{view}{suffix}-{width}x{height}-{theme}.png"
                    window.grab().save(str(path))
                    saved.append(path)
    window.set_theme("light")
    dialog = window.open_export_dialog()  # GGUF: the advice, then the export loaded back and compared
    dialog.format_list.setCurrentRow(2)
    dialog.path_edit.setText(str(work / "export" / "model.gguf"))
    settle()
    path = out / "export-dialog-advice-light.png"
    dialog.grab().save(str(path))
    saved.append(path)
    exported = []
    dialog.exported.connect(exported.append)
    dialog.export_button.click()
    wait(lambda: exported)
    settle()
    path = out / "export-dialog-done-light.png"
    dialog.grab().save(str(path))
    saved.append(path)
    dialog.close()
    return saved


def search_screenshots(window, text: Path, out: Path, wait, settle) -> list[Path]:
    """A small search (8 candidates, threads) under 4 bits per weight, KL as quality, a front point selected."""
    from PySide6.QtCore import Qt

    view = window.search_view
    window.set_theme("light")
    window.resize(*SIZES[0])
    window.show_search()
    view.set_spec_data({
        "name": "tiny Llama within 4 bits per weight",
        "budget": {"kind": "bits_per_weight", "value": 4.0},
        "objective": "kl", "trials": 8, "batch_size": 2, "seed": 3,
        "space": {"quantization": {"group_sizes": [32, 64], "symmetric": [True, False], "min_bits": [2, 3],
                                   "budget_fraction": [0.6, 1.0]}},
        "calibration": {"text_file": str(text), "samples": 8, "seq_len": 64},
        "evaluation": {"text_file": str(text), "tokens": 1024, "window": 128, "stride": 128},
    })
    ended = []
    view.search_ended.connect(ended.append)
    view.start_action.trigger()
    wait(lambda: ended)
    if ended[0] is None:
        raise SystemExit(f"the search failed: {view.error_label.text()}")
    view.results.select_trial(ended[0].front[len(ended[0].front) // 2])
    saved = []
    for theme, (width, height) in (("light", SIZES[0]), ("light", SIZES[1]), ("dark", SIZES[0])):
        window.set_theme(theme)
        window.resize(width, height)
        window.charts_dock.raise_()
        window.show_search()
        # room for the form, the scatter and the table, whatever the docks' sizes the shots before left
        across, down = Qt.Orientation.Horizontal, Qt.Orientation.Vertical
        window.resizeDocks([window.model_dock, window.search_dock], [width // 4, width * 3 // 4], across)
        window.resizeDocks([window.search_dock, window.charts_dock], [height // 2, height // 3], down)
        settle()
        path = out / f"search-{width}x{height}-{theme}.png"
        window.grab().save(str(path))
        saved.append(path)
    return saved


if __name__ == "__main__":
    raise SystemExit(main())
