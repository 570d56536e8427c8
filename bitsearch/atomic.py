"""Atomic writes: write to a temporary file or folder in the same folder, then rename over.

An interrupted run never leaves a half-written plan, table, checkpoint or config behind. What
appears has the permissions the user's umask gives new files (``outputs.apply_umask``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from .errors import BitsearchError
from .outputs import apply_umask

__all__ = ["atomic_path", "atomic_dir", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(out: str) -> Iterator[str]:
    """Yield a new temporary folder next to ``out``; on success it becomes ``out`` (an existing
    ``out`` is replaced only then: ``outputs.check_output`` decides beforehand whether it may be)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out.rstrip("/")) + ".", dir=parent)
    try:
        yield tmp
        apply_umask(tmp, folder=True)
        if os.path.exists(out):
            if not os.path.isdir(out):
                raise BitsearchError(f"output '{out}' exists and is not a folder")
            old = tmp + ".old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
