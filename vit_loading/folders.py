"""Output folders: whether one can be written, the guard against overwriting files, and writing a folder whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def unwritable_folder_reason(folder: Path) -> str | None:
    """Why `folder` cannot be created or written into (a file in the way, no permission), or None when it can."""
    for path in [folder, *folder.parents]:
        if path.is_dir():
            return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
        if path.exists():
            return f"{path} is a file" if path == folder else f"{path} is a file, not a folder"
    return None


def check_output_folder(output_dir: Path, overwrite: bool):
    """Refuse a folder that cannot be written, or that already has files unless `overwrite`.

    Raises:
        OSError: the message names the folder and the fix (`FileExistsError` for a folder with files).
    """
    reason = unwritable_folder_reason(output_dir)
    if reason:
        raise OSError(f"Cannot write the folder {output_dir}: {reason}. Choose another output folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already has files; choose another folder or pass --overwrite_output_dir (overwrite=True in "
            "Python)."
        )


@contextlib.contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """A temporary sibling folder to write into, which replaces `folder` when the block ends without an error.

    A failure, or a process killed while writing, leaves `folder` as it was and nothing half-written in its place.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield staging
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def shorten(items: list, limit: int = 8) -> str:
    """The first `limit` items, comma-separated, with how many more there are."""
    shown = ", ".join(map(str, items[:limit]))
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"
