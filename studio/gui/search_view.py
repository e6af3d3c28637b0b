"""The recipe search view: a budget and search-space form built from the engine's SearchSpec (search_form), Start
and Cancel, and the candidates as they end in a scatter and a table (search_results). "Open as recipe" sends the
selected candidate's recipe to the pipeline editor. The search itself is studio.core.search's, run in a worker by
a SearchController; errors it meets are shown here and the view stays usable."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from PySide6.QtCore import QByteArray, QIODevice, QSaveFile, Qt, Signal, Slot
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QScrollArea,
    QSplitter,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

from studio.core.recipe import read_yaml_file
from studio.core.search import SearchSpecError, parse_search_spec
from studio.gui.search_controller import SearchController
from studio.gui.search_form import ERROR_STYLE, SearchSpecForm
from studio.gui.search_results import BUDGET_SUFFIX, SearchResults

if TYPE_CHECKING:
    from studio.core.search import SearchResult, SearchSpec

log = logging.getLogger(__name__)

SPEC_FILTER = "Search specs (*.yaml *.yml);;All files (*)"
EXECUTORS = (("threads", "Threads on this machine"), ("ray", "Ray (local, or a cluster address)"))


class SearchView(QWidget):
    """The form, Start/Cancel, and the live scatter and table of one search at a time. The window gives it the
    loaded model (`set_model`) and says when it may not start (`set_blocker`)."""

    open_recipe = Signal(object)  # the Recipe of the selected candidate
    search_ended = Signal(object)  # the SearchResult, or None when the search failed
    error = Signal(str)  # the engine's message when a search could not run

    def __init__(self, history=None, parent: QWidget | None = None):
        super().__init__(parent)
        self.history = history  # where candidates are recorded: a RunHistory, or None (not recorded)
        self.controller = SearchController(self)
        self.loaded = None
        self.blocker = ""  # why the window does not let a search start now ('' when it does)
        self.spec_path: Path | None = None  # the spec file open; its folder resolves relative text files
        self.spec: SearchSpec | None = None  # the form's spec when valid
        self.spec_problem = ""
        self.searching: SearchSpec | None = None  # the spec of the last search started
        self.result: SearchResult | None = None  # its result once it ended
        self.running_trials: set[int] = set()
        self._build()
        self._connect()
        self._validate()

    # --- construction -----------------------------------------------------------------------------------
    def _build(self) -> None:
        self.load_action = QAction("Load spec…", self)
        self.load_action.setToolTip("Load a search spec YAML file into the form")
        self.save_action = QAction("Save spec…", self)
        self.save_action.setToolTip("Save the form as a search spec YAML file (`studio search SPEC` runs it)")
        self.start_action = QAction("Start search", self)
        self.cancel_action = QAction("Cancel search", self)
        self.cancel_action.setToolTip("Stop the search: the running candidates stop at their next block")
        self.open_action = QAction("Open as recipe", self)
        self.open_action.setToolTip("Load the selected candidate's recipe into the pipeline editor")
        self.results = SearchResults()
        self.results.table.addAction(self.open_action)
        toolbar = QToolBar()
        toolbar.addActions([self.load_action, self.save_action])
        toolbar.addSeparator()
        toolbar.addActions([self.start_action, self.cancel_action])
        toolbar.addSeparator()
        toolbar.addWidget(QLabel("Quality: "))
        toolbar.addWidget(self.results.quality_combo)
        toolbar.addSeparator()
        toolbar.addAction(self.open_action)

        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.setStyleSheet(ERROR_STYLE)
        self.error_label.hide()

        self.form = SearchSpecForm()
        self.executor_combo = QComboBox()
        for value, text in EXECUTORS:
            self.executor_combo.addItem(text, value)
        self.executor_combo.setToolTip("Threads share the loaded model; Ray tasks load it from its path themselves")
        self.address_edit = QLineEdit(placeholderText="empty: start Ray here (ray.init())")
        self.address_edit.setToolTip("A Ray cluster to join, e.g. ray://host:10001 or auto; its workers need the "
                                     "studio installed and the model and text files at the same paths")
        executor_group = QGroupBox("Where candidates run")
        executor_form = QFormLayout(executor_group)
        executor_form.setContentsMargins(6, 4, 6, 4)
        executor_form.addRow("executor", self.executor_combo)
        executor_form.addRow("Ray address", self.address_edit)
        form_holder = QWidget()
        holder_layout = QVBoxLayout(form_holder)
        holder_layout.setContentsMargins(0, 0, 4, 0)
        holder_layout.addWidget(self.form, 1)
        holder_layout.addWidget(executor_group)
        self.form_scroll = QScrollArea()
        self.form_scroll.setWidget(form_holder)
        self.form_scroll.setWidgetResizable(True)
        self.form_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.form_scroll.setMinimumWidth(250)

        self.status_label = QLabel("Set a budget and the search space, then Start search.")
        self.status_label.setWordWrap(True)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.results, 1)
        right_layout.addWidget(self.status_label)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.form_scroll)
        self.splitter.addWidget(right)
        self.splitter.setStretchFactor(0, 0)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.setSizes([340, 940])

        layout = QVBoxLayout(self)
        layout.addWidget(toolbar)
        layout.addWidget(self.error_label)
        layout.addWidget(self.splitter, 1)
        self.follow_palette()

    def _connect(self) -> None:
        c = self.controller
        self.form.edited.connect(self._validate)
        self.form.field("budget.kind").editor.currentIndexChanged.connect(self._budget_kind_changed)
        self.executor_combo.currentIndexChanged.connect(self._update_actions)
        self.load_action.triggered.connect(self.load_spec_dialog)
        self.save_action.triggered.connect(self.save_spec_dialog)
        self.start_action.triggered.connect(self.start)
        self.cancel_action.triggered.connect(self.cancel)
        self.open_action.triggered.connect(self._request_recipe)
        self.results.selection_changed.connect(self._selection_changed)
        self.results.activated.connect(self._request_recipe)
        c.started.connect(self._search_started)
        c.candidate_started.connect(self._candidate_started)
        c.candidate_finished.connect(self._candidate_finished)
        c.finished.connect(self._search_finished)
        c.cancelled.connect(self._search_cancelled)
        c.failed.connect(self._search_failed)
        c.running_changed.connect(self._running_changed)
        self._budget_kind_changed()

    def follow_palette(self) -> None:
        self.results.follow_palette()

    # --- the spec ---------------------------------------------------------------------------------------
    def _validate(self) -> None:
        """Check the form with the engine's parser (the messages name the field) and that the text files exist."""
        where = str(self.spec_path) if self.spec_path else "search spec"
        base = self.spec_path.resolve().parent if self.spec_path else None
        self.spec, spec, rest = None, None, ""
        try:
            spec = parse_search_spec(self.form.data(), where, base=base)
        except SearchSpecError as exc:
            rest = self.form.show_problems(str(exc))
        else:
            self.form.clear_problems()
            for path, text in (("evaluation.text_file", spec.evaluation.text_file),
                               ("calibration.text_file", spec.calibration.text_file)):
                if text and not Path(text).is_file():
                    self.form.set_problem(path, f"field '{path}': the text file '{text}' does not exist.")
        marked = self.form.problems()
        self.spec = spec if not rest and not marked else None
        self.spec_problem = " ".join([rest, *marked.values()]).strip()
        self._show_error(" ".join([rest, f"Fix the marked field(s): {', '.join(marked)}." if marked else ""]).strip())
        self._update_actions()

    def set_spec_data(self, data: dict[str, Any], path: str | Path | None = None) -> None:
        """Show `data` in the form; `path`: the file it came from (relative text files are read from its folder)."""
        self.spec_path = Path(path) if path is not None else None
        self.form.set_data(data)

    def suggest_text_files(self, evaluation: str, calibration: str) -> None:
        """Fill the text files the form leaves empty (from the pipeline editor's choices)."""
        data = self.form.data()
        changes = {"evaluation.text_file": evaluation, "calibration.text_file": calibration}
        for path, text in changes.items():
            section, name = path.split(".")
            if text and not (data.get(section) or {}).get(name):
                self.form.field(path).set_value(text)
        self._validate()

    def load_spec(self, path: str | Path) -> bool:
        """Show a spec file in the form; a file that does not validate is shown as far as it reads, its errors
        under the fields they name."""
        path = Path(path)
        data = None
        try:
            data = read_yaml_file(path, "search spec", SearchSpecError)
            spec = parse_search_spec(data, str(path), base=path.resolve().parent)
        except SearchSpecError as exc:
            if not isinstance(data, dict):
                self._show_error(str(exc))
                self.error.emit(str(exc))
                return False
            self.set_spec_data(data, path)
            rest = self.form.show_problems(str(exc))  # the file's own errors, keys the form leaves out too
            self._show_error(rest or f"'{path}' does not validate: see the marked fields.")
            return False
        self.set_spec_data(spec.to_dict(), path)
        return True

    def save_spec(self, path: str | Path) -> bool:
        """Write the form's spec as YAML through QSaveFile (a failure never leaves half a file)."""
        if self.spec is None:
            self._show_error(f"Fix the spec before saving it: {self.spec_problem}")
            return False
        file = QSaveFile(str(path))
        ok = file.open(QIODevice.OpenModeFlag.WriteOnly)
        if ok:
            text = yaml.safe_dump(self.spec.to_dict(), sort_keys=False, allow_unicode=True)
            file.write(QByteArray(text.encode("utf-8")))
            ok = file.commit()
        else:
            file.cancelWriting()
        if not ok:
            message = f"Could not write '{path}': {file.errorString()}"
            self._show_error(message)
            self.error.emit(message)
            return False
        self.spec_path = Path(path)
        log.info("Saved search spec %s", path)
        return True

    def load_spec_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load search spec", self._dialog_dir(), SPEC_FILTER)
        if path:
            self.load_spec(path)

    def save_spec_dialog(self) -> None:
        start = str(self.spec_path) if self.spec_path else self._dialog_dir()
        path, _ = QFileDialog.getSaveFileName(self, "Save search spec", start, SPEC_FILTER)
        if path:
            self.save_spec(path if Path(path).suffix else path + ".yaml")

    def _dialog_dir(self) -> str:
        return str(self.spec_path.parent) if self.spec_path else str(Path.home())

    def _budget_kind_changed(self, *_args) -> None:
        kind = self.form.field("budget.kind").value()
        self.form.field("budget.value").editor.setSuffix(BUDGET_SUFFIX.get(kind, ""))
        self.form.field("budget.context_tokens").setEnabled(kind == "memory_mb")

    # --- running ----------------------------------------------------------------------------------------
    def set_model(self, loaded) -> None:
        self.loaded = loaded
        self._update_actions()

    def set_blocker(self, reason: str) -> None:
        """Why the window does not let a search start now (a run going, a model loading), or ''."""
        self.blocker = reason
        self._update_actions()

    @property
    def running(self) -> bool:
        return self.controller.running

    def start_blocker(self) -> str:
        if self.running:
            return "A search is going: wait for it or cancel it."
        if self.blocker:
            return self.blocker
        if self.loaded is None:
            return "Open a model first (File ▸ Open model)."
        if self.spec is None:
            return self.spec_problem or "The spec is not valid."
        return ""

    def _update_actions(self, *_args) -> None:
        blocker = self.start_blocker()
        self.start_action.setEnabled(not blocker)
        self.start_action.setToolTip(f"Can't start: {blocker}" if blocker else
                                     "Search recipes for the loaded model under the budget")
        self.cancel_action.setEnabled(self.running)
        self.load_action.setEnabled(not self.running)
        self.form_scroll.widget().setEnabled(not self.running)
        self.address_edit.setEnabled(self.executor_combo.currentData() == "ray")
        candidate = self.results.selected_candidate()
        self.open_action.setEnabled(candidate is not None and candidate.recipe is not None)

    def start(self) -> bool:
        blocker = self.start_blocker()
        if blocker:
            self._show_error(f"Can't start the search: {blocker}")
            return False
        spec = self.spec
        self.searching, self.result = spec, None
        self.running_trials.clear()
        self.results.begin(spec)
        self.status_label.setText("Evaluating the original model…")
        self._show_error("")
        executor = self.executor_combo.currentData()
        address = self.address_edit.text().strip() if executor == "ray" else None
        self.controller.start(spec, self.loaded, executor, address, self.history if self.history is not None else False)
        return True

    def cancel(self) -> None:
        if self.running:
            self.controller.cancel()
            self.status_label.setText("Cancelling: the running candidates stop at their next block…")

    def _running_changed(self, running: bool) -> None:
        self._update_actions()

    # --- events -----------------------------------------------------------------------------------------
    @Slot(object)
    def _search_started(self, event) -> None:
        self.results.set_baseline(event.baseline)
        self._show_progress()

    @Slot(object)
    def _candidate_started(self, event) -> None:
        self.running_trials.add(event.trial)
        self._show_progress()

    @Slot(object)
    def _candidate_finished(self, event) -> None:
        self.running_trials.discard(event.candidate.trial)
        self.results.add(event.candidate, event.front)
        self._show_progress(event.done, event.total)

    def _end(self, result: SearchResult | None, message: str) -> None:
        if result is not None:
            self.result = result
            self.results.finish(result)
        self.running_trials.clear()
        self.status_label.setText(message)
        self._update_actions()
        self.search_ended.emit(result)

    @Slot(object)
    def _search_finished(self, result: SearchResult) -> None:
        self._end(result, f"Search {result.search_id} finished in {result.seconds:.0f} s: {self._counts()}. "
                          "Select a point or row and Open as recipe.")

    @Slot(object)
    def _search_cancelled(self, result: SearchResult) -> None:
        self._end(result, f"Search {result.search_id} cancelled: {self._counts()}.")

    @Slot(str)
    def _search_failed(self, message: str) -> None:
        self._show_error(f"The search failed: {message}")
        self._end(None, "The search failed (see the message above).")
        self.error.emit(message)

    def _counts(self) -> str:
        counts: dict[str, int] = {}
        for c in self.results.candidates.values():
            counts[c.status] = counts.get(c.status, 0) + 1
        done = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items()) or "no candidates"
        return f"{done}; {len(self.results.front)} on the Pareto front"

    def _show_progress(self, done: int | None = None, total: int | None = None) -> None:
        spec = self.searching
        if spec is None or not self.running:
            return
        done = len(self.results.candidates) if done is None else done
        total = spec.trials if total is None else total
        parts = [f"{done}/{total} candidates ended", f"{len(self.results.front)} on the front"]
        if self.running_trials:
            parts.append("running trial " + ", ".join(str(t) for t in sorted(self.running_trials)))
        baseline = self.results.baseline
        if baseline.get("perplexity") is not None:
            parts.append(f"original perplexity {baseline['perplexity']:.4g}")
        self.status_label.setText("; ".join(parts) + ".")

    def _selection_changed(self) -> None:
        self._update_actions()

    def _request_recipe(self, *_args) -> None:
        candidate = self.results.selected_candidate()
        if candidate is not None and candidate.recipe is not None:
            self.open_recipe.emit(candidate.recipe)

    # --- messages ---------------------------------------------------------------------------------------
    def _show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.setVisible(bool(message))
