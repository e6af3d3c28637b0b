"""The run history: every run that ends (finished, failed or cancelled) stored in SQLite in the user's data
folder (`studio.core.paths.data_dir()`), with its recipe, model identity, metrics, timings, full report and
export paths, so runs can be listed, compared and re-opened.

Each call opens its own short-lived connection, so one `RunHistory` is safe from a worker thread and the GUI
thread at once (WAL lets readers and the writer overlap). A file that is not a readable database is renamed
aside (`history.sqlite.corrupt-<time>`) and a fresh one started, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from studio.core.errors import StudioError
from studio.core.paths import data_dir
from studio.core.recipe import Recipe, parse_recipe

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
FILE_NAME = "history.sqlite"
STATUSES = ("finished", "failed", "cancelled")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,              -- seconds since the epoch
    finished_at REAL NOT NULL,
    status TEXT NOT NULL,                  -- finished, failed or cancelled
    error TEXT,
    recipe_name TEXT NOT NULL DEFAULT '',
    recipe_yaml TEXT NOT NULL DEFAULT '',
    model_name TEXT NOT NULL DEFAULT '',
    model_identity TEXT NOT NULL DEFAULT '',  -- the path or hub id the weights came from
    model_source TEXT NOT NULL DEFAULT '{}',  -- JSON: the loader's description of the model
    baseline_perplexity REAL,
    final_perplexity REAL,
    kl REAL,
    size_before INTEGER,                   -- compressed bytes
    size_after INTEGER,
    seconds REAL,
    report TEXT NOT NULL DEFAULT '{}',     -- JSON: the runner's full report
    export_paths TEXT NOT NULL DEFAULT '[]'  -- JSON list, oldest first
);
CREATE INDEX IF NOT EXISTS runs_finished_at ON runs (finished_at);
"""

# version -> SQL turning a database of that version into the next version (a new file starts at version 1
# and is migrated like an old one)
MIGRATIONS: dict[int, str] = {
    1: "ALTER TABLE runs ADD COLUMN search_id TEXT NOT NULL DEFAULT '';\n"  # the search a candidate run belongs to
       "CREATE INDEX IF NOT EXISTS runs_search_id ON runs (search_id);",
}

LIST_COLUMNS = (
    "id, started_at, finished_at, status, error, recipe_name, recipe_yaml, model_name, model_identity, "
    "model_source, baseline_perplexity, final_perplexity, kl, size_before, size_after, seconds, export_paths, search_id"
)


class HistoryError(StudioError):
    pass


@dataclass
class RunRecord:
    id: int
    started_at: float
    finished_at: float
    status: str
    error: str | None = None
    recipe_name: str = ""
    recipe_yaml: str = ""
    model_name: str = ""
    model_identity: str = ""
    model_source: dict[str, Any] = field(default_factory=dict)
    baseline_perplexity: float | None = None
    final_perplexity: float | None = None
    kl: float | None = None
    size_before: int | None = None
    size_after: int | None = None
    seconds: float | None = None
    export_paths: list[str] = field(default_factory=list)
    search_id: str = ""  # the recipe search this run was a candidate of ('' for other runs)
    report: dict[str, Any] | None = None  # only from RunHistory.get: list() leaves the (large) report out

    @property
    def export_path(self) -> str | None:
        """The latest export, if any."""
        return self.export_paths[-1] if self.export_paths else None

    def recipe(self) -> Recipe:
        """The recipe as it was run (raises RecipeError if the stored YAML no longer parses)."""
        return parse_recipe(yaml.safe_load(self.recipe_yaml), where=f"recipe of run {self.id}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["report"] is None:
            del data["report"]
        return data


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _nested(report: dict[str, Any], section: str, key: str) -> Any:
    part = report.get(section)
    return part.get(key) if isinstance(part, dict) else None


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """A damaged file ("file is not a database", "database disk image is malformed"), not a busy or full disk."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def model_identity(source: dict[str, Any]) -> str:
    """What names the weights: their path, hub id, or failing those the model's name."""
    return str(source.get("path") or source.get("repo_id") or source.get("name") or "")


def pareto_points(points: list[tuple[T, float, float]]) -> list[T]:
    """Keys of the (key, size, loss) points no other point beats on both (lower is better on both; equal on both
    is not beaten), smallest size first, then lowest loss, then key."""
    front = [
        p for p in points
        if not any(o[1] <= p[1] and o[2] <= p[2] and (o[1] < p[1] or o[2] < p[2]) for o in points)
    ]
    front.sort(key=lambda p: (p[1], p[2], p[0]))
    return [p[0] for p in front]


def pareto_front(records: list[RunRecord]) -> list[int]:
    """Ids of the finished runs no other run beats on both compressed size and final perplexity, smallest size
    first. Runs missing either number are left out."""
    return pareto_points([
        (r.id, r.size_after, r.final_perplexity) for r in records
        if r.status == "finished" and r.size_after is not None and r.final_perplexity is not None
    ])


class RunHistory:
    """The SQLite store of runs. `path` defaults to `data_dir()/history.sqlite`."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else data_dir() / FILE_NAME
        self._write_lock = threading.Lock()  # one writer at a time within the process
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HistoryError(f"Cannot create the run history folder '{self.path.parent}': {exc}") from None
        self._use(self._initialize)

    # --- connection, schema and recovery --------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=10)
        except sqlite3.Error as exc:
            raise HistoryError(f"Cannot open the run history '{self.path}': {exc}") from None
        conn.row_factory = sqlite3.Row
        return conn

    def _initialize(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode=WAL")
        with conn:
            conn.executescript(SCHEMA)
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:  # SCHEMA is version 1's
                conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            version = row[0] if row is not None else 1
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"The run history '{self.path}' was written by a newer Compression Studio (schema {version}, this "
                f"one reads up to {SCHEMA_VERSION}); upgrade the studio or set $STUDIO_DATA_DIR to another folder."
            )
        while version < SCHEMA_VERSION:
            with conn:
                conn.executescript(MIGRATIONS[version])
                version += 1
                conn.execute("UPDATE schema_version SET version = ?", (version,))

    def _use(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on a fresh connection; a corrupt file is set aside and `work` retried on a fresh one."""
        try:
            with closing(self._connect()) as conn:
                return work(conn)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):  # locked, disk full, unreadable: the file itself may be fine
                raise HistoryError(f"The run history '{self.path}' could not be used: {exc}") from None
            self._set_aside(exc)
        with closing(self._connect()) as conn:
            self._initialize(conn)
            return work(conn)

    def _set_aside(self, reason: Exception) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{self.path}{suffix}")
            if part.exists():
                os.replace(part, f"{aside}{suffix}")
        log.warning("The run history '%s' was unreadable (%s); it was moved to '%s' and a new one started.",
                    self.path, reason, aside)

    # --- writing --------------------------------------------------------------------------------------------
    def record(
        self,
        result_status: str,
        report: dict[str, Any] | None,
        recipe: Recipe | None,
        model_source: dict[str, Any] | None,
        export_path: str | os.PathLike | None = None,
        *,
        error: str | None = None,
        started_at: float | None = None,
        search_id: str = "",
    ) -> int:
        """Store one ended run; returns its id. Missing pieces (a failed run has no final metrics) stay empty.
        `search_id` marks a candidate of a recipe search (`list(search_id=...)` lists a search's candidates)."""
        if result_status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {result_status!r}")
        report = dict(report or {})
        source = dict(model_source if model_source is not None else report.get("model") or {})
        recipe_yaml = recipe.to_yaml() if recipe is not None else ""
        if recipe is None and isinstance(report.get("recipe"), dict):
            recipe_yaml = yaml.safe_dump(report["recipe"], sort_keys=False, allow_unicode=True)
        recipe_name = recipe.name if recipe is not None else str((report.get("recipe") or {}).get("name", ""))
        finished_at = time.time()
        seconds = _number(report.get("seconds"))
        if started_at is None:
            started_at = finished_at - (seconds or 0.0)
        if seconds is None:
            seconds = max(finished_at - started_at, 0.0)
        exports = [str(export_path)] if export_path is not None else []
        row = (
            started_at, finished_at, result_status, error, recipe_name, recipe_yaml,
            str(source.get("name", "")), model_identity(source), json.dumps(source, default=str),
            _number(_nested(report, "baseline", "perplexity")), _number(_nested(report, "final", "perplexity")),
            _number(_nested(report, "final", "kl")),
            _nested(report, "size_before", "compressed_bytes"), _nested(report, "size_after", "compressed_bytes"),
            seconds, json.dumps(report, default=str), json.dumps(exports), search_id,
        )

        def insert(conn: sqlite3.Connection) -> int:
            with self._write_lock, conn:
                cursor = conn.execute(
                    "INSERT INTO runs (started_at, finished_at, status, error, recipe_name, recipe_yaml, model_name, "
                    "model_identity, model_source, baseline_perplexity, final_perplexity, kl, size_before, "
                    "size_after, seconds, report, export_paths, search_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
                return int(cursor.lastrowid)

        return self._use(insert)

    def set_export(self, run_id: int, path: str | os.PathLike) -> None:
        """Add an export path to a run (a run can be exported more than once)."""

        def update(conn: sqlite3.Connection) -> None:
            with self._write_lock, conn:
                row = conn.execute("SELECT export_paths FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is None:
                    raise HistoryError(f"There is no run {run_id} in the history.")
                paths = [p for p in json.loads(row[0]) if p != str(path)] + [str(path)]
                conn.execute("UPDATE runs SET export_paths = ? WHERE id = ?", (json.dumps(paths), run_id))

        self._use(update)

    def delete(self, run_id: int) -> None:
        def remove(conn: sqlite3.Connection) -> None:
            with self._write_lock, conn:
                conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))

        self._use(remove)

    # --- reading --------------------------------------------------------------------------------------------
    def list(self, filter_text: str | None = None, status: str | None = None,
             search_id: str | None = None) -> list[RunRecord]:
        """Runs, newest first; `filter_text` matches model, recipe, status, error, export path or search id (any
        case); `search_id` keeps only that search's candidates."""
        where, args = [], []
        if search_id is not None:
            where.append("search_id = ?")
            args.append(search_id)
        if status:
            where.append("status = ?")
            args.append(status)
        if filter_text and filter_text.strip():
            pattern = "%" + filter_text.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            fields = ("model_name", "model_identity", "recipe_name", "recipe_yaml", "status", "error", "export_paths",
                      "search_id")
            where.append("(" + " OR ".join(f"{f} LIKE ? ESCAPE '\\'" for f in fields) + ")")
            args += [pattern] * len(fields)
        sql = f"SELECT {LIST_COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY finished_at DESC, id DESC"
        return self._use(lambda conn: [_record(row) for row in conn.execute(sql, args)])

    def get(self, run_id: int) -> RunRecord:
        """One run with its full report; HistoryError if there is none."""
        row = self._use(lambda conn: conn.execute(
            f"SELECT {LIST_COLUMNS}, report FROM runs WHERE id = ?", (run_id,)).fetchone())
        if row is None:
            raise HistoryError(f"There is no run {run_id} in the history.")
        record = _record(row)
        record.report = json.loads(row["report"])
        return record

    pareto_front = staticmethod(pareto_front)


def _record(row: sqlite3.Row) -> RunRecord:
    values = {key: row[key] for key in row.keys() if key != "report"}
    values["model_source"] = json.loads(values["model_source"] or "{}")
    values["export_paths"] = json.loads(values["export_paths"] or "[]")
    return RunRecord(**values)


def comparison_report(first: dict[str, Any], second: dict[str, Any], first_label: str = "run A",
                      second_label: str = "run B") -> dict[str, Any]:
    """A report in the runner's shape that compares two runs' results rather than one run's before and after:
    "before" (baseline, size_before) is the first run's final result and "after" (final, size_after, steps)
    the second's, so the compare view shows run A against run B. KL and top-1 agreement stay each run's own,
    against the original model."""
    return {
        "model": {"name": first_label},
        "recipe": {"name": second_label},
        "baseline": first.get("final") or {},
        "final": second.get("final") or {},
        "size_before": first.get("size_after") or {},
        "size_after": second.get("size_after") or {},
        "steps": second.get("steps") or [],
        "seconds": second.get("seconds"),
    }
