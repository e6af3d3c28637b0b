"""The engine and the methods never import Qt: checked in the source and in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

QT = ("PySide6", "PySide2", "PyQt5", "PyQt6", "pyqtgraph", "qtpy", "superqt")
STUDIO = Path(__file__).resolve().parents[1] / "studio"


def test_no_qt_import_in_core_or_methods_source():
    offenders = []
    for layer in ("core", "methods"):
        for path in (STUDIO / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in QT]
    assert not offenders


def test_engine_imports_without_loading_qt():
    code = (
        "import sys, pkgutil, importlib, studio.core, studio.methods\n"
        "for pkg in (studio.core, studio.methods):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {QT!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_qt_bindings_do_not_leak_references_to_none():
    """PySide6 6.12.0 on Python 3.11 drops a reference to None on every void call and aborts the app within
    seconds of drawing charts; pyproject excludes it, and this catches such a release coming back."""
    code = (
        "import sys\nfrom PySide6.QtCore import QObject\nobj = QObject()\nbefore = sys.getrefcount(None)\n"
        "for _ in range(1000):\n    obj.setObjectName('x')\nprint(before - sys.getrefcount(None))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and abs(int(out.stdout.strip())) < 50, out.stderr[-500:]
