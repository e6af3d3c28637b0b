"""The studio window: docks for the model, the pipeline, the recipe search, live charts, the comparison, the run
history and the log; menus, toolbar and status bar; model loading, runs, searches and exports in worker threads.
Errors are shown in a dialog and the log, and the window stays usable."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QStyle,
    QWidget,
)

from studio import __version__
from studio.gui.charts import LiveCharts
from studio.gui.compare_view import CompareView
from studio.gui.export_dialog import ExportDialog, confirm_replace
from studio.gui.history_view import HistoryView, open_history
from studio.gui.log_panel import LogPanel
from studio.gui.model_panel import ModelPanel
from studio.gui.pipeline_editor import PipelineEditor
from studio.gui.recent_files import RecentFiles
from studio.gui.run_controller import RunController
from studio.gui.run_progress import RunProgress
from studio.gui.search_results import BUDGET_SUFFIX
from studio.gui.search_view import SearchView
from studio.gui.tasks import ExportTask, LoadModelTask, Task
from studio.gui.theme import THEMES, apply_theme

if TYPE_CHECKING:  # torch loads on first use, so the window opens fast
    from studio.core.evaluation.perplexity import PerplexityConfig

log = logging.getLogger("studio.gui")
ORGANIZATION, APPLICATION = "CompressionStudio", "Compression Studio"
STATE_VERSION = 1
QUICK_EVAL_TOKENS = 2048
QUICK_EVAL_WINDOW = 1024
MODEL_FILTER = "Models (*.gguf *.safetensors);;All files (*)"


def open_settings(settings: QSettings | str | os.PathLike | None = None) -> QSettings:
    """The app's QSettings, or an INI file at the given path (tests, portable installs)."""
    if isinstance(settings, QSettings):
        return settings
    if settings is not None:
        return QSettings(str(settings), QSettings.Format.IniFormat)
    return QSettings(ORGANIZATION, APPLICATION)


def quick_eval_config(text_file: str, model) -> PerplexityConfig:
    """Few tokens for live feedback; windows never longer than the model's context."""
    from studio.core.evaluation.perplexity import PerplexityConfig

    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    window = min(QUICK_EVAL_WINDOW, context or QUICK_EVAL_WINDOW)
    return PerplexityConfig(text_file, max_tokens=QUICK_EVAL_TOKENS, window=window, stride=max(window // 2, 1))


class MainWindow(QMainWindow):
    def __init__(self, settings: QSettings | str | os.PathLike | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.settings = open_settings(settings)
        self.loaded = None
        self.summary = None
        self.result = None  # the last finished RunResult
        self._tasks: set[Task] = set()  # workers alive until they report
        self._load_task: LoadModelTask | None = None
        self.setWindowTitle(APPLICATION)
        self.setAcceptDrops(True)
        self.setDockNestingEnabled(True)

        self.model_panel = ModelPanel()
        self.editor = PipelineEditor()
        self.charts = LiveCharts()
        self.compare = CompareView()
        self.history_view = HistoryView(open_history())
        self.search_view = SearchView(self.history_view.history)  # candidates land in the same run history
        self._run_context = None  # (recipe, model source, start time) of the run going, for the history
        self._result_run_id: int | None = None  # the history id of self.result
        self.log_panel = LogPanel()
        self.log_panel.capture("studio")
        self.controller = RunController(self)
        self._build_docks()
        self._build_actions()
        self._build_menus()
        self._build_toolbar()
        self._build_status_bar()
        self._connect()
        self._restore_settings()
        self._update_actions()
        self.log_panel.info(f"Compression Studio {__version__}. Open a model to begin (File ▸ Open model).")

    # --- construction -----------------------------------------------------------------------------------
    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _build_docks(self) -> None:
        left, right, bottom = (Qt.DockWidgetArea.LeftDockWidgetArea, Qt.DockWidgetArea.RightDockWidgetArea,
                               Qt.DockWidgetArea.BottomDockWidgetArea)
        self.model_dock = self._dock("Model", "modelDock", self.model_panel, left)
        self.pipeline_dock = self._dock("Pipeline", "pipelineDock", self.editor, right)
        self.search_dock = self._dock("Search", "searchDock", self.search_view, right)
        self.tabifyDockWidget(self.pipeline_dock, self.search_dock)  # a search ends in a recipe for the pipeline
        self.pipeline_dock.raise_()
        self.charts_dock = self._dock("Charts", "chartsDock", self.charts, bottom)
        self.log_dock = self._dock("Log", "logDock", self.log_panel, bottom)
        self.splitDockWidget(self.charts_dock, self.log_dock, Qt.Orientation.Horizontal)
        self.compare_dock = self._dock("Compare", "compareDock", self.compare, bottom)
        self.tabifyDockWidget(self.charts_dock, self.compare_dock)
        self.history_dock = self._dock("History", "historyDock", self.history_view, bottom)
        self.tabifyDockWidget(self.compare_dock, self.history_dock)
        self.charts_dock.raise_()
        self.resizeDocks([self.model_dock, self.pipeline_dock], [440, 1100], Qt.Orientation.Horizontal)
        self.resizeDocks([self.charts_dock, self.log_dock], [1100, 440], Qt.Orientation.Horizontal)
        self.resizeDocks([self.pipeline_dock, self.charts_dock], [500, 420], Qt.Orientation.Vertical)
        self.docks = [self.model_dock, self.pipeline_dock, self.search_dock, self.charts_dock, self.compare_dock,
                      self.history_dock, self.log_dock]

    def _action(self, text: str, slot, shortcut=None, tip: str = "", icon=None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcuts(shortcut if isinstance(shortcut, list) else [QKeySequence(shortcut)])
        if tip:
            action.setToolTip(tip)
            action.setStatusTip(tip)
        if icon is not None:
            action.setIcon(self.style().standardIcon(icon))
        action.triggered.connect(slot)
        return action

    def _build_actions(self) -> None:
        Key, Icon = QKeySequence.StandardKey, QStyle.StandardPixmap
        self.open_file_action = self._action("&Open model file…", self.open_model_file, Key.Open,
                                             "Open a .gguf or .safetensors model file", Icon.SP_DialogOpenButton)
        self.open_folder_action = self._action("Open model &folder…", self.open_model_folder, "Ctrl+Shift+O",
                                               "Open a Hugging Face model folder", Icon.SP_DirOpenIcon)
        self.open_spec_action = self._action("Open &hub id or sample…", self.open_model_spec, None,
                                             "Open a model by hub id (owner/name) or the bundled sample")
        self.open_recipe_action = self._action("Open &recipe…", self.editor.open_recipe_dialog, "Ctrl+Alt+O",
                                               "Open a recipe YAML file into the pipeline")
        self.save_recipe_action = self._action("&Save recipe", self.editor.save, Key.Save,
                                               "Save the pipeline as a recipe YAML file")
        self.save_recipe_as_action = self._action("Save recipe &as…", self.editor.save_recipe_dialog, Key.SaveAs)
        self.export_action = self._action("&Export…", self.open_export_dialog, "Ctrl+E",
                                          "Write the compressed model in a format other tools load")
        self.quit_action = self._action("&Quit", self.close, Key.Quit)
        self.run_action = self._action("&Run", self.run, ["Ctrl+R", "F5"], icon=Icon.SP_MediaPlay)
        self.cancel_action = self._action("&Cancel", self.cancel, "Ctrl+.", "Stop the run at its next block",
                                          Icon.SP_MediaStop)
        self.undo_action = self.editor.undo_stack.createUndoAction(self, "&Undo")
        self.undo_action.setShortcuts(Key.Undo)
        self.redo_action = self.editor.undo_stack.createRedoAction(self, "&Redo")
        self.redo_action.setShortcuts(Key.Redo)
        self.search_action = self._action("&Search for a recipe…", self.show_search, "Ctrl+Shift+F",
                                          "Search recipes under a budget (size, memory or bits per weight)")
        self.reset_layout_action = self._action("Reset &layout", self.reset_layout)

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file = bar.addMenu("&File")
        file.addActions([self.open_file_action, self.open_folder_action, self.open_spec_action])
        self.recent_models = RecentFiles(self.settings, "recent/models", file.addMenu("Recent &models"), self.load)
        file.addSeparator()
        file.addActions([self.open_recipe_action, self.save_recipe_action, self.save_recipe_as_action])
        self.recent_recipes = RecentFiles(self.settings, "recent/recipes", file.addMenu("Recent re&cipes"),
                                          self.editor.open_recipe)
        file.addSeparator()
        file.addAction(self.export_action)
        file.addSeparator()
        file.addAction(self.quit_action)

        edit = bar.addMenu("&Edit")
        edit.addActions([self.undo_action, self.redo_action])

        view = bar.addMenu("&View")
        for dock in self.docks:
            view.addAction(dock.toggleViewAction())
        view.addSeparator()
        theme_menu = view.addMenu("&Theme")
        self.theme_group = QActionGroup(self)
        for name in THEMES:
            action = theme_menu.addAction(name.capitalize())
            action.setCheckable(True)
            action.setData(name)
            self.theme_group.addAction(action)
        self.theme_group.triggered.connect(self._theme_chosen)
        view.addAction(self.reset_layout_action)

        run = bar.addMenu("&Run")
        run.addActions([self.run_action, self.cancel_action])
        run.addSeparator()
        run.addAction(self.search_action)
        bar.addMenu("&Help").addAction("&About", self._about)

    def _build_toolbar(self) -> None:
        toolbar = self.addToolBar("Main")
        toolbar.setObjectName("mainToolBar")
        toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.open_file_action.setIconText("Open")
        toolbar.addActions([self.open_file_action, self.open_folder_action])
        toolbar.addSeparator()
        toolbar.addActions([self.run_action, self.cancel_action])
        self.toolbar = toolbar

    def _build_status_bar(self) -> None:
        self.run_hint = QLabel()
        self.run_hint.setEnabled(False)  # greyed: a hint
        self.progress = RunProgress(self.controller.time_left)
        status = self.statusBar()
        status.addPermanentWidget(self.run_hint)
        status.addPermanentWidget(self.progress)
        status.showMessage("Ready")

    def _connect(self) -> None:
        e, c = self.editor, self.controller
        e.validity_changed.connect(self._validity_changed)
        e.changed.connect(self._update_title)
        e.undo_stack.cleanChanged.connect(self._update_title)
        e.recipe_file_used.connect(self._recipe_file_used)
        e.eval_text_changed.connect(self._eval_text_changed)
        e.calibration_text_changed.connect(lambda text: self.settings.setValue("pipeline/calibText", text))
        c.started.connect(self._run_started)
        c.step_started.connect(self._step_started)
        c.progress.connect(self.progress.progress)
        c.metric.connect(self.charts.on_metric)
        c.metric.connect(self._metric)
        c.warning.connect(self._run_warning)
        c.step_finished.connect(self._step_finished)
        c.finished.connect(self._run_finished)
        c.failed.connect(self._run_failed)
        c.cancelled.connect(self._run_cancelled)
        c.ended.connect(self._run_ended)
        self.history_view.open_recipe.connect(self._open_history_recipe)
        self.search_view.open_recipe.connect(self._open_search_recipe)
        self.search_view.controller.running_changed.connect(self._search_running_changed)
        self.search_view.search_ended.connect(self._search_ended)
        self.search_view.error.connect(lambda message: self.log_panel.error(f"Search: {message}"))
        self.history_view.compare.connect(self._show_comparison)
        c.running_changed.connect(self._running_changed)
        self.compare.error.connect(self._show_error)

    def _validity_changed(self, _valid: bool, _reason: str) -> None:
        self._update_actions()

    def _recipe_file_used(self, path: str) -> None:
        self.recent_recipes.add(path)

    def _eval_text_changed(self, text: str) -> None:
        self.settings.setValue("pipeline/evalText", text)

    # --- settings ---------------------------------------------------------------------------------------
    def _restore_settings(self) -> None:
        s = self.settings
        if not self.restoreGeometry(s.value("window/geometry") or b""):
            self.resize(1440, 920)
        self._default_state = self.saveState(STATE_VERSION)
        state = s.value("window/state")
        if state is not None:
            self.restoreState(state, STATE_VERSION)
        splitter = s.value("pipeline/splitter")
        if splitter is not None:
            self.editor.splitter.restoreState(splitter)
        self.editor.set_eval_text(str(s.value("pipeline/evalText") or ""))
        self.editor.set_calibration_text(str(s.value("pipeline/calibText") or ""))
        self.search_view.suggest_text_files(self.editor.eval_text(), self.editor.calibration_text())
        self.set_theme(str(s.value("view/theme") or "system"))

    def save_settings(self) -> None:
        s = self.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState(STATE_VERSION))
        s.setValue("pipeline/splitter", self.editor.splitter.saveState())
        s.setValue("pipeline/evalText", self.editor.eval_text())
        s.setValue("pipeline/calibText", self.editor.calibration_text())
        s.sync()

    def set_theme(self, name: str) -> None:
        name = name if name in THEMES else "system"
        for action in self.theme_group.actions():
            action.setChecked(action.data() == name)
        apply_theme(name)
        # told explicitly: palette-change events also reach half-destroyed widgets of closed windows
        self.charts.follow_palette()
        self.compare.follow_palette()
        self.search_view.follow_palette()
        self.settings.setValue("view/theme", name)

    def _theme_chosen(self, action: QAction) -> None:
        self.set_theme(action.data())

    def reset_layout(self) -> None:
        self.restoreState(self._default_state, STATE_VERSION)
        for dock in self.docks:
            dock.show()

    def closeEvent(self, event) -> None:
        if self.controller.running:
            answer = QMessageBox.question(self, "A run is going", "Cancel the run and quit?")
            if answer != QMessageBox.StandardButton.Yes:
                event.ignore()
                return
            self.controller.cancel()
            self.controller.wait(30_000)
        if self.search_view.running:
            answer = QMessageBox.question(self, "A search is going", "Cancel the search and quit?")
            if answer != QMessageBox.StandardButton.Yes:
                event.ignore()
                return
            self.search_view.cancel()
            self.search_view.controller.wait(60_000)
        self.save_settings()
        self.charts.set_sampling(False)
        self.log_panel.release()
        super().closeEvent(event)

    # --- models -----------------------------------------------------------------------------------------
    def open_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open model", self._last_dir(), MODEL_FILTER)
        if path:
            self.load(path)

    def open_model_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open Hugging Face model folder", self._last_dir())
        if path:
            self.load(path)

    def open_model_spec(self) -> None:
        spec, ok = QInputDialog.getText(self, "Open model", "Hub id (owner/name) or 'sample':", text="sample")
        if ok and spec.strip():
            self.load(spec.strip())

    def _last_dir(self) -> str:
        recent = self.recent_models.items()
        return str(Path(recent[0]).parent) if recent and Path(recent[0]).exists() else str(Path.home())

    def load(self, spec: str) -> None:
        """Open `spec` (path, hub id or 'sample') in a worker; the window shows it when it arrives."""
        self.statusBar().showMessage(f"Loading {spec} …")
        self.log_panel.note(f"Loading model {spec}")
        self.progress.busy("Loading model…")
        task = self._load_task = LoadModelTask(spec)
        task.signals.done.connect(self._model_loaded)
        task.signals.failed.connect(self._model_failed)
        self._start(task)
        self._update_actions()

    def _start(self, task: Task) -> None:
        self._tasks.add(task)
        task.start()

    def _finish_task(self) -> Task | None:
        """The task whose signal is being handled, forgotten now that it has reported."""
        sender = self.sender()
        for task in list(self._tasks):
            if task.signals is sender:
                self._tasks.discard(task)
                return task
        return None

    def _model_loaded(self, payload) -> None:
        task = self._finish_task()
        if task is not self._load_task:
            return  # an older load finished after a newer one began
        self._load_task = None
        self.loaded, self.summary = payload
        self.result = None
        self.model_panel.show_model(self.loaded, self.summary)
        self.editor.set_model(self.loaded)
        self.search_view.set_model(self.loaded)
        self.search_view.suggest_text_files(self.editor.eval_text(), self.editor.calibration_text())
        self.compare.clear()
        if not self.controller.running:
            self.progress.hide()
        self.recent_models.add(task.spec)
        message = f"Loaded {self.loaded.name}: {self.summary.parameters:,} parameters"
        self.statusBar().showMessage(message)
        self.log_panel.note(message)
        self._update_actions()
        self._update_title()

    def _model_failed(self, message: str) -> None:
        task = self._finish_task()
        if task is not self._load_task:
            return
        self._load_task = None
        if not self.controller.running:
            self.progress.hide()
        self._update_actions()
        self.statusBar().showMessage("Loading failed")
        self._show_error("Could not open the model", message)

    # --- running ----------------------------------------------------------------------------------------
    def run_blocker(self) -> str:
        """Why Run is disabled, or '' when it is not."""
        if self.controller.running:
            return "A run is going: wait for it or cancel it."
        if self.search_view.running:
            return "A search is going: wait for it or cancel it (Search dock)."
        if self._load_task is not None:
            return "A model is loading."
        if self.loaded is None:
            return "Open a model first (File ▸ Open model)."
        if not self.editor.is_valid:
            return self.editor.invalid_reason
        return ""

    def _update_actions(self) -> None:
        blocker = self.run_blocker()
        running = self.controller.running
        self.run_action.setEnabled(not blocker)
        tip = f"Can't run: {blocker}" if blocker else "Run the pipeline on the model (Ctrl+R)"
        self.run_action.setToolTip(tip)
        self.run_action.setStatusTip(tip)
        self.run_hint.setText("" if running or not blocker else self._short(blocker))
        self.run_hint.setToolTip(blocker)
        self.cancel_action.setEnabled(running)
        for action in (self.open_file_action, self.open_folder_action, self.open_spec_action):
            action.setEnabled(not running and not self.search_view.running)
        self.search_view.set_blocker("A run is going: wait for it or cancel it." if running else
                                     "A model is loading." if self._load_task is not None else "")
        exportable = self.result is not None and self.result.model is not None and not running
        self.export_action.setEnabled(exportable)
        self.export_action.setToolTip(
            "Write the compressed model as a Hugging Face folder (safetensors)" if exportable
            else "Run a pipeline first: the export writes its result."
        )

    @staticmethod
    def _short(text: str, limit: int = 90) -> str:
        line = text.splitlines()[0] if text else ""
        return line if len(line) <= limit else line[: limit - 1] + "…"

    def run(self) -> None:
        blocker = self.run_blocker()
        if blocker:
            self.statusBar().showMessage(f"Can't run: {blocker}")
            return
        text = self.editor.eval_text()
        config = quick_eval_config(text, self.loaded.model) if text else None
        recipe = self.editor.recipe()
        self.charts.reset()
        self.compare.clear()
        self.result = None
        self.log_panel.note(
            f"Run: {recipe.name or 'untitled recipe'} on {self.loaded.name}"
            + (f", evaluating on {Path(text).name}" if config else ", no evaluation text")
        )
        try:
            self._run_context = (recipe, dict(self.loaded.source), time.time())
            self.controller.start(recipe, self.loaded, config)
        except Exception as exc:  # e.g. a run already going
            self._show_error("Could not start the run", str(exc))

    def cancel(self) -> None:
        if self.controller.running:
            self.controller.cancel()
            self.statusBar().showMessage("Cancelling at the next block…")
            self.log_panel.note("Cancel requested")

    def _running_changed(self, running: bool) -> None:
        self.charts.set_sampling(running)
        if running:
            self.progress.begin()
        else:
            self.progress.end()
        self._update_actions()

    def _run_started(self, steps: int) -> None:
        self.progress.run_started(steps, evaluating=bool(self.editor.eval_text()))
        self.statusBar().showMessage(f"Running {steps} step{'s' * (steps != 1)}…")

    def _step_started(self, index: int, method: str, total: int) -> None:
        self.charts.mark_step(index, method)
        self.log_panel.note(f"Step {index + 1} ({method}) started")
        self.progress.step_started(method, total)

    def _metric(self, metric) -> None:
        if metric.name in ("perplexity", "kl"):
            where = "original" if metric.index is None else f"after step {metric.index + 1}"
            self.log_panel.note(f"{metric.name} {where}: {metric.value:.4g}")

    def _run_warning(self, message: str) -> None:
        self.log_panel.warning(message)

    def _step_finished(self, index: int, report: dict) -> None:
        seconds = report.get("seconds")
        took = f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        self.log_panel.note(f"Step {index + 1} ({report.get('method', '?')}) finished{took}")
        self.progress.step_finished(evaluating=bool(self.editor.eval_text()))

    def _run_finished(self, result) -> None:
        self.result = result
        self.compare.show_report(result.report)
        if result.model is not None and self.loaded is not None:  # histograms, generations, speed, accuracy
            self.compare.set_models(self.loaded.model, result.model, self.loaded.tokenizer)
        self.compare_dock.raise_()
        seconds = result.report.get("seconds")
        message = "Run finished" + (f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else "")
        self.statusBar().showMessage(message + ". Export it with File ▸ Export.")
        self.log_panel.note(message)
        self._update_actions()

    def _run_failed(self, message: str) -> None:
        self.statusBar().showMessage("The run failed")
        self._show_error("The run failed", message)

    def _run_ended(self, result) -> None:
        recipe, source, started_at = self._run_context or (None, None, None)
        self._run_context = None
        self._result_run_id = self.history_view.record_run(result, recipe, source, started_at)

    def _open_history_recipe(self, recipe) -> None:
        self.open_recipe_from(recipe, "the history")

    def _open_search_recipe(self, recipe) -> None:
        self.open_recipe_from(recipe, "the search")

    def open_recipe_from(self, recipe, where: str) -> None:
        """Put a recipe object (a past run's, a search candidate's) in the pipeline editor, ready to run or save."""
        self.editor.set_recipe(recipe, f"Open recipe from {where}")
        self.editor.current_path = None  # Save asks for a file rather than overwriting the one open before
        self.pipeline_dock.raise_()
        self.statusBar().showMessage(f"Opened the recipe {recipe.name or '(untitled)'} from {where}")

    # --- the recipe search --------------------------------------------------------------------------------
    def show_search(self) -> None:
        self.search_dock.show()
        self.search_dock.raise_()

    def _search_running_changed(self, running: bool) -> None:
        spec = self.search_view.searching
        if running and spec is not None:
            executor = self.search_view.executor_combo.currentText()
            self.log_panel.note(f"Search started: {spec.name or 'untitled'}, {spec.trials} candidates under "
                                f"{spec.budget.value:g}{BUDGET_SUFFIX[spec.budget.kind]}, on {executor.lower()}")
            self.statusBar().showMessage("Searching recipes…")
        self._update_actions()

    def _search_ended(self, result) -> None:
        self.history_view.refresh()  # its candidates were recorded as runs
        if result is None:
            self.statusBar().showMessage("The search failed")
            return
        message = (f"Search {result.search_id} {result.status}: {len(result.candidates)} candidate(s), "
                   f"{len(result.front)} on the Pareto front")
        self.statusBar().showMessage(message)
        self.log_panel.note(message)

    def _show_comparison(self, report: dict) -> None:
        self.compare.show_report(report)
        self.compare_dock.show()
        self.compare_dock.raise_()

    def _run_cancelled(self) -> None:
        self.statusBar().showMessage("Run cancelled; the loaded model is untouched")
        self.log_panel.warning("Run cancelled; the loaded model is untouched")

    # --- export -----------------------------------------------------------------------------------------
    def open_export_dialog(self) -> ExportDialog | None:
        """File ▸ Export: the dialog picks format and folder, writes in a worker and shows what it wrote."""
        if self.result is None or self.result.model is None:
            self.statusBar().showMessage("Nothing to export: run a pipeline first.")
            return None
        start = str(Path(self._last_dir()) / f"{self.loaded.name}-compressed")
        text = self.editor.eval_text()
        dialog = ExportDialog(self.result.model, self.loaded.tokenizer if self.loaded else None,
                              self.editor.recipe(), self.result.report, start, self,
                              source=self.loaded.source if self.loaded else None,
                              eval_config=quick_eval_config(text, self.result.model) if text else None)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        run_id = self._result_run_id
        dialog.exported.connect(lambda summary: self._dialog_exported(summary, run_id))
        dialog.failed.connect(lambda message: self.log_panel.error(f"The export failed: {message}"))
        dialog.open()
        return dialog

    def _dialog_exported(self, summary: dict, run_id: int | None) -> None:
        folder = summary["path"]
        self.history_view.record_export(run_id, folder)
        self.statusBar().showMessage(f"Exported to {folder}")
        self.log_panel.note(f"Exported to {folder}")

    def export_hf_folder(self, out: str | None = None) -> None:
        if self.result is None or self.result.model is None:
            self.statusBar().showMessage("Nothing to export: run a pipeline first.")
            return
        if out is None:
            start = str(Path(self._last_dir()) / f"{self.loaded.name}-compressed")
            out, _ = QFileDialog.getSaveFileName(self, "Export Hugging Face folder (a new folder)", start, "Folder (*)",
                                                 options=QFileDialog.Option.DontConfirmOverwrite)
            if not out:
                return
        path = Path(out)
        force = False
        if path.is_dir() and any(path.iterdir()):
            if not confirm_replace(self, path):
                return
            force = True
        task = ExportTask(self.result.model, self.loaded.tokenizer if self.loaded else None, str(path),
                          self.editor.recipe(), self.result.report, force)
        task.history_run_id = self._result_run_id
        task.signals.done.connect(self._exported)
        task.signals.failed.connect(self._export_failed)
        self.export_action.setEnabled(False)
        self.statusBar().showMessage(f"Exporting to {path} …")
        self.log_panel.note(f"Exporting to {path}")
        self._start(task)

    def _exported(self, folder) -> None:
        task = self._finish_task()
        self.history_view.record_export(getattr(task, "history_run_id", None), str(folder))
        self.statusBar().showMessage(f"Exported to {folder}")
        self.log_panel.note(f"Exported to {folder}")
        self._update_actions()

    def _export_failed(self, message: str) -> None:
        self._finish_task()
        self._update_actions()
        self._show_error("The export failed", message)

    # --- odds and ends ----------------------------------------------------------------------------------
    def _show_error(self, title: str, message: str) -> None:
        self.log_panel.error(f"{title}: {message}")
        QMessageBox.critical(self, title, message)

    def _update_title(self, *_args) -> None:
        parts = [APPLICATION]
        if self.loaded is not None:
            parts.append(self.loaded.name)
        recipe = self.editor.recipe_name() or (self.editor.current_path.name if self.editor.current_path else "")
        if recipe:
            parts.append(recipe + ("" if self.editor.undo_stack.isClean() else " *"))
        self.setWindowTitle(" — ".join(parts))

    def _about(self) -> None:
        QMessageBox.about(self, "About Compression Studio",
                          f"Compression Studio {__version__}\nCompress causal language models: quantization, "
                          "pruning and more, with a headless engine (`studio --help`).")

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        urls = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if not urls:
            return
        path = urls[0]
        if path.lower().endswith((".yaml", ".yml")):
            self.editor.open_recipe(path)
        else:
            self.load(path)
        event.acceptProposedAction()
