"""Progress bars for long work (tqdm on stderr; silent when disabled or not a terminal in CI)."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")

__all__ = ["progress"]


def progress(it: Iterable[T], desc: str = "", total: int | None = None, enable: bool = True) -> Iterable[T]:
    if not enable or os.environ.get("BITSEARCH_NO_PROGRESS"):
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
