"""The write path, which dominates every reference operation: one write of the 20 KB sample task registry.

* ``store``: ``JsonFile.write_bytes``: temp file, fsync, rename, fsync of the directory, then the ``.bak`` copy of
  the new bytes (temp file + rename, not fsynced).
* ``store-no-bak``: the same without the ``.bak`` copy (what-if: :class:`benchmarks.workloads.NoBackupJsonFile`).
* ``store-link-bak``: the ``.bak`` as a hard link to the committed file (what-if:
  :class:`benchmarks.workloads.LinkBackupJsonFile`).
* ``durable-replace``: temp file, fsync, rename, fsync of the directory, nothing else (the floor of a durable write).
* ``legacy-in-place``: ``open(path, "w")`` + ``json.dump(indent=2)``, no fsync: what the legacy code does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry.store import JsonFile, dumps

from . import knobs
from .conftest import median_s
from .workloads import LinkBackupJsonFile, NoBackupJsonFile
from .workspace import sample_task


def _writers(path: Path) -> dict[str, Callable[[], None]]:
    doc = sample_task()
    data = dumps(doc)
    path.write_bytes(data)
    file = JsonFile(path)
    no_bak = NoBackupJsonFile(path)
    link_bak = LinkBackupJsonFile(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    tmp = path.with_name(path.name + ".tmp")

    def store() -> None:
        file.write_bytes(data)

    def store_no_bak() -> None:
        no_bak.write_bytes(data)

    def store_link_bak() -> None:
        link_bak.write_bytes(data)

    def durable_replace() -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        os.fsync(dir_fd)

    def legacy_in_place() -> None:
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=2)

    return {"store": store, "store-no-bak": store_no_bak, "store-link-bak": store_link_bak,
            "durable-replace": durable_replace, "legacy-in-place": legacy_in_place}


@pytest.mark.parametrize("how", ["store", "store-no-bak", "store-link-bak", "durable-replace", "legacy-in-place"])
def test_write(benchmark: Any, record: Any, tmp_path: Path, how: str) -> None:
    benchmark.group = "one write of the 20 KB sample task registry"
    write = _writers(tmp_path / "AGENT_REGISTRY.json")[how]

    def run() -> None:
        write()
        knobs.delay()

    benchmark.pedantic(run, rounds=200, iterations=1, warmup_rounds=5)
    record(bench="write", how=how, median_us=round(median_s(benchmark) * 1e6, 1))
