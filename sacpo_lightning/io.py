"""Atomic file and folder writes, fingerprints and small JSON helpers."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike
"""A file or folder path as the public functions accept it."""

COMPLETE_MARKER = ".complete"


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yields a temporary sibling folder that replaces ``target`` only when the block finishes without error.

    A marker file is written last, so readers can tell a finished folder from one left by a crash
    (:func:`is_complete_directory`). An existing ``target`` is moved aside and removed only after the new folder is in
    place, so an interruption at any point leaves either the old or the new folder, never a half-written one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; remove it or pass overwrite=True.")
    # Leftovers of an earlier writer that was killed: one writer per target is the contract, so they are stale.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        _fsync_dir(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete_directory(path: str | os.PathLike) -> bool:
    """True when ``path`` was finished by :func:`atomic_directory`."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def atomic_write_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` on a temporary sibling of ``path``, fsyncs it and renames it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def file_fingerprint(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex, first 16 characters)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def numbered_csv_rows(reader: Iterator[list[str]], path: Any, error: type[Exception] = ValueError,
                      ) -> Iterator[tuple[int, list[str]]]:
    """``(first line number, cells)`` of each non-blank row of a ``csv.reader`` whose header was read; a row that
    spans several lines is numbered by its first. A malformed row raises ``error`` naming ``path`` and the line."""
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise error(f"{path}:{line}: cannot read the CSV row ({err}); fix its quoting.") from None
        start, line = line, reader.line_num + 1
        if any(cell.strip() for cell in cells):
            yield start, cells
