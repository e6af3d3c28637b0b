"""The run controller, live charts and compare view on a tiny model: signals in order, cancel, failure,
and an event loop that keeps ticking while the run goes."""

import threading
import time

import pytest
import torch

pytest.importorskip("pytestqt")

from studio.core.evaluation import PerplexityConfig  # noqa: E402
from studio.core.recipe import parse_recipe  # noqa: E402

TWO_STEPS = {"schema_version": 1, "steps": [
    {"method": "magnitude", "params": {"pattern": "2:4"}},
    {"method": "rtn", "params": {"bits": 4, "group_size": 32}},
]}
SIGNALS = ("running_changed", "started", "step_started", "progress", "metric", "warning", "step_finished",
           "finished", "failed", "cancelled")
WAIT_MS = 30_000


def small_eval(text_file):
    return PerplexityConfig(str(text_file), max_tokens=200, window=64, stride=32)


def fingerprint(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, prints):
    return all(torch.equal(v, prints[k]) for k, v in model.state_dict().items())


def record_signals(controller):
    seen = []
    for name in SIGNALS:
        getattr(controller, name).connect(lambda *args, name=name: seen.append((name, args)))
    return seen


@pytest.fixture
def controller(qtbot):
    from studio.gui.run_controller import RunController

    ctrl = RunController()
    yield ctrl
    ctrl.cancel()
    assert ctrl.wait(WAIT_MS)


@pytest.fixture
def slow_rtn(monkeypatch):
    """RTN that takes a while per layer, so a cancel from the GUI side lands mid-run on a tiny model."""
    from studio.methods import rtn

    quantize = rtn.quantize_rtn_dense

    def slow(*args, **kwargs):
        time.sleep(0.03)
        return quantize(*args, **kwargs)

    monkeypatch.setattr(rtn, "quantize_rtn_dense", slow)


def test_a_run_reports_its_signals_in_order_and_feeds_the_charts(qtbot, controller, tiny_loaded, text_file):
    from studio.gui.charts import LiveCharts

    charts = LiveCharts()
    qtbot.addWidget(charts)
    charts.attach(controller)
    seen = record_signals(controller)
    prints = fingerprint(tiny_loaded.model)

    with qtbot.waitSignal(controller.finished, timeout=WAIT_MS) as blocker:
        controller.start(parse_recipe(TWO_STEPS), tiny_loaded, small_eval(text_file))
        assert controller.running
    result = blocker.args[0]
    assert result.status == "finished" and not controller.running
    assert unchanged(tiny_loaded.model, prints)

    names = [name for name, _ in seen if name not in ("metric", "warning")]
    assert names[:3] == ["running_changed", "started", "step_started"]
    assert names[-2:] == ["running_changed", "finished"]
    assert [args for name, args in seen if name == "running_changed"] == [(True,), (False,)]
    assert [args for name, args in seen if name == "started"] == [(2,)]
    assert [args for name, args in seen if name == "step_started"] == [(0, "magnitude", 2), (1, "rtn", 2)]
    first_step = names[names.index("step_started"): names.index("step_finished") + 1]
    assert first_step == ["step_started", "progress", "progress", "progress", "step_finished"]
    progress = [args[:3] for name, args in seen if name == "progress"]
    assert progress == [(0, 1, 3), (0, 2, 3), (0, 3, 3), (1, 1, 3), (1, 2, 3), (1, 3, 3)]
    finished_steps = [args for name, args in seen if name == "step_finished"]
    assert [i for i, _ in finished_steps] == [0, 1] and "layers" in finished_steps[1][1]

    metrics = [args[0] for name, args in seen if name == "metric"]
    assert [(m.name, m.index) for m in metrics if m.name == "perplexity"] == [
        ("perplexity", None), ("perplexity", 0), ("perplexity", 1)]

    qtbot.waitUntil(lambda: charts.memory_samples() >= 1, timeout=5_000)
    assert charts.memory_samples() >= 1 and charts.latest_rss_mib() > 0
    assert [(i, name) for i, name, _ in charts.accuracy_points()] == [
        (None, "perplexity"), (0, "perplexity"), (0, "kl"), (1, "perplexity"), (1, "kl")]
    assert [x for x, _ in charts.size_points()] == [0.0, 1.0, 2.0]  # the original, then after each step
    assert [(i, m) for i, m, _ in charts.step_marks()] == [(0, "magnitude"), (1, "rtn")]
    errors = charts.layer_errors()  # the chart shows the last step's layers only
    assert len(errors) == len(result.report["steps"][1]["layers"]) and all(e > 0 for _, e in errors)
    charts.redraw()
    # sampling stops with the run
    count = charts.memory_samples()
    qtbot.wait(600)
    assert charts.memory_samples() == count


def test_a_distillation_step_draws_its_loss_curve_live(qtbot, controller, tiny_loaded, text_file):
    from studio.gui.charts import LiveCharts

    charts = LiveCharts()
    qtbot.addWidget(charts)
    charts.attach(controller)
    recipe = parse_recipe({"schema_version": 2,
                           "calibration": {"text_file": str(text_file), "samples": 6, "seq_len": 16},
                           "steps": [{"method": "magnitude", "params": {"sparsity": 0.5}},
                                     {"method": "distill", "params": {"steps": 4, "batch_size": 2, "seq_len": 8,
                                                                      "eval_every": 2}}]})
    with qtbot.waitSignal(controller.finished, timeout=WAIT_MS) as blocker:
        controller.start(recipe, tiny_loaded, None)
    result = blocker.args[0]
    assert result.status == "finished", result.error
    curve = result.report["steps"][1]["summary"]["loss_curve"]
    assert [loss for _, loss in charts.training_losses()] == pytest.approx(curve)
    charts.redraw()
    assert charts.layer_plot.plotItem.titleLabel.text.startswith("Distillation loss")


def test_cancel_mid_run_leaves_the_original_untouched(qtbot, controller, tiny_loaded, text_file, slow_rtn):
    prints = fingerprint(tiny_loaded.model)
    seen = record_signals(controller)
    time_left = []

    def on_progress(index, done, total, message):
        time_left.append(controller.time_left())
        if index == 1 and done == 1:
            controller.cancel()

    controller.progress.connect(on_progress)
    with qtbot.waitSignal(controller.cancelled, timeout=WAIT_MS):
        controller.start(parse_recipe(TWO_STEPS), tiny_loaded, small_eval(text_file))
    names = [name for name, _ in seen]
    assert "finished" not in names and "failed" not in names
    assert names[-2:] == ["running_changed", "cancelled"] and not controller.running
    assert [args for name, args in seen if name == "step_finished"][0][0] == 0
    assert all(t is not None and t >= 0 for t in time_left)
    assert controller.time_left() is None
    assert unchanged(tiny_loaded.model, prints)

    controller.progress.disconnect(on_progress)
    with qtbot.waitSignal(controller.finished, timeout=WAIT_MS):
        controller.start(parse_recipe(TWO_STEPS), tiny_loaded)
        with pytest.raises(RuntimeError, match="already"):  # one run at a time
            controller.start(parse_recipe(TWO_STEPS), tiny_loaded)


def test_a_failing_run_emits_failed_and_the_controller_starts_again(qtbot, controller, tiny_loaded, monkeypatch):
    from studio.methods import rtn

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rtn, "quantize_rtn_dense", broken)
    with qtbot.waitSignal(controller.failed, timeout=WAIT_MS) as blocker:
        controller.start(parse_recipe(TWO_STEPS), tiny_loaded)
    assert "boom" in blocker.args[0] and "step 2" in blocker.args[0]
    assert not controller.running

    with qtbot.waitSignal(controller.failed, timeout=WAIT_MS) as blocker:  # a crash outside the runner
        controller.start(parse_recipe(TWO_STEPS), None)
    assert "AttributeError" in blocker.args[0]

    monkeypatch.undo()
    with qtbot.waitSignal(controller.finished, timeout=WAIT_MS) as blocker:
        controller.start(parse_recipe(TWO_STEPS), tiny_loaded)
    assert blocker.args[0].status == "finished"


def test_compare_view_fills_its_tables_from_a_real_report(qtbot, controller, tiny_loaded, text_file):
    from studio.gui.compare_view import CompareView

    with qtbot.waitSignal(controller.finished, timeout=WAIT_MS) as blocker:
        controller.start(parse_recipe(TWO_STEPS), tiny_loaded, small_eval(text_file))
    report = dict(blocker.args[0].report)
    report["speed"] = {"before": {"prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0},
                       "after": {"prefill_tokens_per_s": 120.0, "decode_tokens_per_s": 12.0}}
    report["accuracy"] = {"before": {"arc": {"acc": 0.5, "acc_norm": 0.6}},
                          "after": {"arc": {"acc": 0.4, "acc_norm": 0.5}}}

    view = CompareView()
    qtbot.addWidget(view)
    view.show_report(report)
    table = view.summary_table
    rows = {table.item(r, 0).text(): (table.item(r, 1).text(), table.item(r, 2).text())
            for r in range(table.rowCount())}
    for label in ("Parameters", "Memory (MiB)", "Compressed (MiB)", "Perplexity", "KL to original (nats)",
                  "Top-1 agreement", "Prefill tokens/s", "Decode tokens/s", "arc acc", "arc acc_norm"):
        assert rows[label][1], label
    assert float(rows["Compressed (MiB)"][1]) < float(rows["Compressed (MiB)"][0])
    assert rows["Perplexity"][0] == f"{report['baseline']['perplexity']:,.3f}"

    layers = view.layer_table
    assert layers.rowCount() == sum(len(s["layers"]) for s in report["steps"]) == 42
    first, last = 0, layers.rowCount() - 1
    assert [layers.item(first, c).text() for c in (1, 3, 4)] == ["1 magnitude", "50.0 %", ""]
    assert [layers.item(last, c).text() for c in (1, 3, 4, 5)] == ["2 rtn", "", "4", "32"]
    layers.sortItems(2)  # by error, numerically
    errors = [float(layers.item(r, 2).text()) for r in range(layers.rowCount())]
    assert errors == sorted(errors)

    view.clear()
    assert view.summary_table.rowCount() == 0 and view.layer_table.rowCount() == 0
    view.show_report({})  # an empty or failed run's report shows nothing rather than failing


def test_the_event_loop_keeps_ticking_while_a_run_goes(qtbot, controller, tiny_loaded, text_file, slow_rtn):
    from PySide6.QtCore import QTimer

    gaps, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    started = time.perf_counter()
    with qtbot.waitSignal(controller.finished, timeout=WAIT_MS):
        controller.start(parse_recipe(TWO_STEPS), tiny_loaded, small_eval(text_file))
        last[0] = time.perf_counter()
    timer.stop()
    assert time.perf_counter() - started > 0.3  # long enough to measure
    assert len(gaps) > 10 and max(gaps) < 0.5


def test_workers_never_run_the_cycle_collector(qtbot, controller, tiny_loaded):
    """A collection in a worker would destroy Qt objects there (a deadlock seen in CI); the GUI thread collects."""
    import gc

    collected_in = []

    def note_thread(phase, info):
        if phase == "start":
            collected_in.append(threading.current_thread() is threading.main_thread())

    gc.callbacks.append(note_thread)
    try:
        with qtbot.waitSignal(controller.finished, timeout=WAIT_MS):
            controller.start(parse_recipe(TWO_STEPS), tiny_loaded)
            assert not gc.isenabled()
        for _ in range(2 * gc.get_threshold()[0]):  # cycles only the collector frees, past its first threshold
            cycle = [[]]
            cycle[0].append(cycle)
        qtbot.waitUntil(lambda: bool(collected_in), timeout=5_000)
    finally:
        gc.callbacks.remove(note_thread)
    assert collected_in and all(collected_in)


def test_the_gui_thread_makes_a_full_collection_only_once_a_quarter_more_objects_have_grown_old(monkeypatch):
    """CPython's own rule for its oldest generation: a full pass over a loaded model's process took 0.27 s."""
    from studio.gui import collector

    passes = []

    class Collector:  # every generation past its threshold; 1,000 old objects, 150 young survivors each time
        def get_count(self):
            return 701, 11, 11

        def get_threshold(self):
            return 700, 10, 10

        def get_objects(self, generation):
            return [None] * {0: 100, 1: 50, 2: 1_000}[generation]

        def collect(self, generation):
            passes.append(generation)
            return 0

    monkeypatch.setattr(collector, "gc", Collector())
    monkeypatch.setattr(collector._LongLived, "total", None)
    monkeypatch.setattr(collector._LongLived, "pending", 0)
    for _ in range(3):
        collector._collect()
    assert passes == [1, 1, 2]  # 150, then 300 grown old: past a quarter of 1,000 only at the third tick
    assert (collector._LongLived.total, collector._LongLived.pending) == (1_000, 0)
