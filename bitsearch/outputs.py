"""The output contract, in one place, for everything bitsearch writes.

Before any computation, an output path is checked: its parent can be created and written, it is
of the right kind (a file or a folder), it is not (and does not contain) an input of the same
command, and an existing file or non-empty folder is replaced only when ``overwrite`` is asked
for. Writes are atomic (a temporary sibling renamed over the target, see ``atomic.py``) and get
the permissions the user's umask gives new files, not the 0600 / 0700 of temporary ones.
"""

from __future__ import annotations

import contextvars
import os
import tempfile

from .errors import BitsearchError

__all__ = ["check_output", "apply_umask", "same_or_inside", "keep_on_interrupt", "kept_on_interrupt"]

#: what an interrupted run keeps and how to go on from it (optuna's journal, QAT's checkpoint)
_KEPT: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("bitsearch_kept", default=None)


def keep_on_interrupt(message: str, path: str | None = None) -> None:
    """Say what the running stage keeps on disk if it is interrupted, and how to resume it
    (``path``: the message holds only once that file exists)."""
    _KEPT.set((message, path))


def kept_on_interrupt() -> str | None:
    """What the interrupted stage keeps on disk and how to resume it (None: nothing was written)."""
    kept = _KEPT.get()
    if kept is None or (kept[1] is not None and not os.path.exists(kept[1])):
        return None
    return kept[0]


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def same_or_inside(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (symlinks resolved)."""
    p, f = _real(path), _real(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_output(
    out: str | None, kind: str, *, inputs: tuple = (), overwrite: bool = False, what: str = "output"
) -> None:
    """Refuse, with one line, an output path that cannot or must not be written.

    ``kind``: "file" or "folder"; ``inputs``: paths the same command reads (models, plans, texts,
    tables), never replaced, even with ``overwrite``."""
    if out is None:
        return
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).strip():
        raise BitsearchError(f"{what} path is empty")
    out = os.fspath(out)
    for src in inputs:
        if (
            isinstance(src, (str, os.PathLike))
            and os.path.exists(os.fspath(src))
            and same_or_inside(os.fspath(src), out)
        ):
            raise BitsearchError(
                f"{what} '{out}' is (or holds) '{src}', an input of this command: choose another output path"
            )
    if same_or_inside(os.getcwd(), out):
        raise BitsearchError(f"{what} '{out}' is the current folder or one above it: choose a new folder")
    if os.path.lexists(out):
        is_dir = os.path.isdir(out)
        if kind == "file" and is_dir:
            raise BitsearchError(f"{what} '{out}' is a folder; give a file path")
        if kind == "folder" and not is_dir:
            raise BitsearchError(f"{what} '{out}' exists and is not a folder")
        if not overwrite and (not is_dir or os.listdir(out)):
            raise BitsearchError(
                f"{what} '{out}' exists{' and is not empty' if is_dir else ''}: pass `overwrite` to replace it"
            )
    parent = os.path.dirname(_real(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise BitsearchError(f"cannot write {what} '{out}': '{parent}' is a file, not a folder")
    try:  # a real probe: permission bits say nothing for root or on a read-only mount
        fd, probe = tempfile.mkstemp(prefix=".bitsearch-probe-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise BitsearchError(f"cannot write {what} '{out}' in '{parent}': {exc.strerror}") from None


def apply_umask(path: str, folder: bool = False) -> None:
    """Give ``path`` (a finished temporary file or folder) the mode a new one would get."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)
