"""Writing an export without ever leaving a half-written one, or touching what the user owns.

Everything is written into a temporary folder next to the destination (same file system, so the final rename
is atomic) and moved into place only when complete. An existing destination is replaced only with `force`,
and then only after the new export is complete; if the move fails the old one is put back."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from studio.core.errors import ExportError


def check_destination(out: str | os.PathLike, force: bool) -> Path:
    """Fail early, before any work, if the export could not be written to `out` (a folder, or a file path for
    single-file formats)."""
    out = Path(out).expanduser()
    if out.exists():
        if out.is_dir():
            if not force and any(out.iterdir()):
                raise ExportError(
                    f"Export destination '{out}' already exists and is not empty. Choose another folder, or pass "
                    "--force to replace it (the old folder is removed only after the new one is complete)."
                )
        elif out.suffix.lower() != ".gguf":
            raise ExportError(f"Export destination '{out}' is an existing file; choose a folder path instead.")
        elif not force:
            raise ExportError(
                f"Export destination '{out}' already exists. Choose another name, or pass --force to replace it "
                "(the old file is replaced only after the new one is complete)."
            )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # the folders export would create
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ExportError(
            f"Cannot write the export to '{out}': '{parent}' is a file, not a folder. Choose another folder."
        )
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ExportError(f"Cannot write into '{parent}': permission denied. Choose another folder.")
    return out


@contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A fresh temporary folder next to `out`, removed on any failure (or cancel) and whatever is left of it
    removed after the caller moved the result into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"Could not create a temporary folder next to '{out}': {exc}") from exc
    try:
        yield tmp
    except OSError as exc:
        raise ExportError(f"Could not write the export to '{out}': {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(new: Path, out: Path) -> None:
    """Rename `new` (a file or folder) to `out`, replacing what is there only once `new` is complete, and
    putting the old one back if the rename fails."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old, out)  # put the user's folder back
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
