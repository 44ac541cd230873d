"""Count the reads of given files by any code, through an audit hook (no change to the code measured).

    with count_reads(task_path, global_path) as counts:
        legacy.deploy(...)
    counts[task_path].reads, counts[task_path].bytes

A read is an ``open`` of the exact path for reading (``open(path)``, ``open(path, "rb")``, ``os.open`` read-only);
its bytes are the file's size at that moment (every registry read reads the whole file).  The hook is installed once
per process and does nothing outside a ``count_reads`` block; audit hooks cannot be removed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Reads:
    reads: int = 0
    bytes: int = 0


_watching: dict[Path, Reads] | None = None
_installed = False


def _is_read(mode: Any, flags: Any) -> bool:
    if isinstance(mode, str):
        return "r" in mode and "+" not in mode
    return isinstance(flags, int) and flags & os.O_ACCMODE == os.O_RDONLY


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _watching is None or event != "open":
        return
    path, mode, flags = args
    if isinstance(path, int):
        return
    key = Path(os.fsdecode(path)).absolute()
    reads = _watching.get(key)
    if reads is not None and _is_read(mode, flags):
        reads.reads += 1
        with contextlib.suppress(OSError):
            reads.bytes += key.stat().st_size


@contextlib.contextmanager
def count_reads(*paths: Path) -> Iterator[dict[Path, Reads]]:
    """Count reads of *paths* made inside the block, in this process."""
    global _watching, _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
    counts = {Path(p): Reads() for p in paths}
    _watching = {p.absolute(): r for p, r in counts.items()}
    try:
        yield counts
    finally:
        _watching = None
