"""GUI benchmark: cold start of `python -m studio` to the first painted window, and the responsiveness of the
real main window (offscreen) while it runs RTN W4 g64 with a quick evaluation on SmolLM2-135M.

    python bench/bench_gui.py [--starts 5] [--model M.gguf] [--text T.txt] [--eval-tokens 1024] [--json FILE]

(a) cold start: each launch runs `python -m studio` with QT_QPA_PLATFORM=offscreen, STUDIO_EXIT_AFTER_PAINT=1
    and STUDIO_LAUNCH_TIME; the app prints the seconds from launch to the window's first paint event and quits.
(b) during a run: a 10 ms PreciseTimer ticks in the GUI thread; a stall is how late a tick comes (the gap
    between ticks minus 10 ms). LiveCharts.redraw is wrapped to record when it runs and how long it takes.
Targets: first paint < 2 s, longest stall during the run < 100 ms. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STUDIO_SHARED_DIR") or REPO.parent / "shared")
START_TARGET_S, STALL_TARGET_MS, TICK_MS = 2.0, 100.0, 10


def contention() -> str:
    try:
        psi = Path("/proc/pressure/cpu").read_text().split()[2].split("=")[1] + "%"
    except (OSError, IndexError):
        psi = "n/a"
    return f"load {os.getloadavg()[0]:.2f}, cpu pressure {psi}"


def cold_starts(n: int) -> dict:
    """Launch the app n times; the app's own first-paint figure and the launcher's wall time to its exit."""
    painted, walls = [], []
    for _ in range(n):
        launched = time.time()
        env = dict(os.environ, QT_QPA_PLATFORM="offscreen", STUDIO_EXIT_AFTER_PAINT="1",
                   STUDIO_LAUNCH_TIME=repr(launched))
        out = subprocess.run([sys.executable, "-m", "studio"], env=env, capture_output=True, text=True, timeout=120,
                             cwd=REPO)
        walls.append(time.time() - launched)
        lines = [line for line in out.stdout.splitlines() if line.startswith("first paint after")]
        if out.returncode != 0 or not lines:
            raise SystemExit(f"the app did not report its first paint:\n{out.stdout}\n{out.stderr}")
        painted.append(float(lines[-1].split()[3]))
    return {"first_paint_s": painted, "process_wall_s": walls}


class StallMeter:
    """Lateness of a 10 ms timer in the GUI thread, recorded while `active`."""

    def __init__(self):
        from PySide6.QtCore import Qt, QTimer

        self.active = False
        self.stalls_ms: list[float] = []
        self._last = None
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.active and self._last is not None:
            self.stalls_ms.append(max((now - self._last) * 1000 - TICK_MS, 0.0))
        self._last = now


def run_in_window(model: Path, text: Path, eval_tokens: int) -> dict:
    from PySide6.QtWidgets import QApplication, QMessageBox

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    import studio.gui.main_window as main_window
    from studio.gui.charts import LiveCharts

    redraws: list[tuple[float, float, bool]] = []  # (start, seconds, something was dirty)
    original_redraw = LiveCharts.redraw

    def timed_redraw(self):
        dirty = bool(self._dirty)
        start = time.perf_counter()
        original_redraw(self)
        redraws.append((start, time.perf_counter() - start, dirty))

    LiveCharts.redraw = timed_redraw  # before the window connects its timer to it
    main_window.QUICK_EVAL_TOKENS = eval_tokens
    errors = []
    QMessageBox.critical = staticmethod(lambda parent, title, text, *a: errors.append((title, text)))
    settings = Path(os.environ.get("TMPDIR", "/tmp")) / "studio-bench-gui.ini"
    settings.unlink(missing_ok=True)
    window = main_window.MainWindow(settings)
    window.resize(1440, 920)
    window.show()
    meter = StallMeter()

    def wait(condition, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > end:
                raise SystemExit(f"timed out; errors: {errors}")
            app.processEvents()
            time.sleep(0.001)

    loading_began = time.perf_counter()
    meter.active = True
    window.load(str(model))
    wait(lambda: window._load_task is None or errors, 600)
    meter.active = False
    load_stalls, meter.stalls_ms = meter.stalls_ms, []
    load_seconds = time.perf_counter() - loading_began
    if errors or window.loaded is None:
        raise SystemExit(f"the model did not load: {errors}")
    window.editor.add_method("rtn")
    window.editor.set_param(0, "bits", 4)
    window.editor.set_param(0, "group_size", 64)
    window.editor.set_eval_text(str(text))
    wait(lambda: window.run_action.isEnabled(), 30)

    finished = []
    window.controller.finished.connect(finished.append)
    window.controller.failed.connect(lambda message: errors.append(("run failed", message)))
    redraws.clear()
    began = time.perf_counter()
    meter.active = True
    window.run_action.trigger()
    wait(lambda: finished or errors, 900)
    meter.active = False
    run_seconds = time.perf_counter() - began
    if errors:
        raise SystemExit(f"the run failed: {errors}")
    starts = [start for start, _, _ in redraws]
    report = finished[0].report
    result = {
        "load_seconds": load_seconds,
        "load_stall_max_ms": max(load_stalls, default=0.0),
        "run_seconds": run_seconds,
        "stall_max_ms": max(meter.stalls_ms, default=0.0),
        "stall_median_ms": statistics.median(meter.stalls_ms) if meter.stalls_ms else 0.0,
        "stall_p99_ms": sorted(meter.stalls_ms)[int(0.99 * (len(meter.stalls_ms) - 1))] if meter.stalls_ms else 0.0,
        "ticks": len(meter.stalls_ms),
        "redraw_interval_median_ms": statistics.median(b - a for a, b in zip(starts, starts[1:])) * 1000
        if len(starts) > 1 else None,
        "redraws": len(redraws),
        "redraws_with_data": sum(1 for r in redraws if r[2]),
        "redraw_cost_median_ms": statistics.median(r[1] for r in redraws) * 1000 if redraws else None,
        "redraw_cost_max_ms": max((r[1] for r in redraws), default=0.0) * 1000,
        "baseline_ppl": (report.get("baseline") or {}).get("perplexity"),
        "final_ppl": (report.get("final") or {}).get("perplexity"),
    }
    window.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--text", type=Path, default=SHARED / "data" / "text" / "wikitext-2-raw-test.txt")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, before: {contention()}")

    starts = cold_starts(args.starts)
    run = run_in_window(args.model, args.text, args.eval_tokens)
    import torch

    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, after: {contention()}")
    paint = statistics.median(starts["first_paint_s"])
    rows = [
        ("cold start: launch to first paint (median of "
         f"{args.starts})", f"{paint:.2f} s", f"< {START_TARGET_S:.0f} s",
         "ok" if paint < START_TARGET_S else "MISSED"),
        ("cold start: launch to process exit (median)", f"{statistics.median(starts['process_wall_s']):.2f} s", "", ""),
        ("load SmolLM2 in a worker: seconds / longest stall",
         f"{run['load_seconds']:.1f} s / {run['load_stall_max_ms']:.0f} ms", "", ""),
        ("run rtn w4 g64 + eval 1024 tokens: seconds", f"{run['run_seconds']:.1f} s", "", ""),
        ("run: longest GUI stall (10 ms timer lateness)", f"{run['stall_max_ms']:.1f} ms", f"< {STALL_TARGET_MS:.0f} ms",
         "ok" if run["stall_max_ms"] < STALL_TARGET_MS else "MISSED"),
        ("run: median stall / 99th percentile",
         f"{run['stall_median_ms']:.2f} / {run['stall_p99_ms']:.1f} ms", "", ""),
        ("run: median chart refresh interval (LiveCharts.redraw)",
         f"{run['redraw_interval_median_ms']:.1f} ms", "~66 ms (15 Hz)", ""),
        ("run: redraw cost median / max", f"{run['redraw_cost_median_ms']:.2f} / {run['redraw_cost_max_ms']:.1f} ms",
         "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{width}} | value | target | |")
    print(f"| {'-' * width} | --- | --- | --- |")
    for what, value, target, verdict in rows:
        print(f"| {what:<{width}} | {value} | {target} | {verdict} |")
    print(f"# first paint runs: {', '.join(f'{s:.2f}' for s in starts['first_paint_s'])} s; "
          f"{run['ticks']} ticks; {run['redraws']} redraws ({run['redraws_with_data']} with new data); "
          f"perplexity {run['baseline_ppl']:.3f} -> {run['final_ppl']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"starts": starts, "run": run}, indent=2))
    return 0 if paint < START_TARGET_S and run["stall_max_ms"] < STALL_TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
