"""Item 4 of issue 6: parse and serialize cost against registry size, for the store's codec and stdlib json.

``store`` is what the reference uses (``registry.store.parse`` / ``registry.store.dumps``: orjson, indented, with a
stdlib fallback); ``json`` is ``json.loads`` / ``json.dumps(indent=2)``, what the legacy code and the flock baseline
use.  Sizes: the 20 KB sample task registry, and generated registries of 10 to 10,000 agents shaped like it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry.store import dumps, parse

from . import knobs
from .conftest import gate, median_s
from .workspace import build_task, sample_task

SIZES: dict[str, int | None] = {"sample": None, "10": 10, "100": 100, "1000": 1_000, "10000": 10_000}
ROUNDS = {"sample": 300, "10": 300, "100": 100, "1000": 15, "10000": 3}
PATH = Path("AGENT_REGISTRY.json")


@functools.cache
def _doc(size: str) -> dict[str, Any]:
    n = SIZES[size]
    return sample_task() if n is None else build_task(n)


def _json_dumps(doc: Any) -> bytes:
    return json.dumps(doc, indent=2).encode()


CODECS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "store": (lambda data: parse(data, PATH), dumps),
    "json": (json.loads, _json_dumps),
}


@pytest.mark.parametrize("size", [pytest.param(s, marks=gate) if s != "10000" else s for s in SIZES])
@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("op", ["parse", "serialize"])
def test_codec(benchmark: Any, record: Any, op: str, codec: str, size: str) -> None:
    benchmark.group = f"{op}, {size} agents" if size != "sample" else f"{op}, the 20 KB sample"
    doc = _doc(size)
    data = dumps(doc)
    loads, serialize = CODECS[codec]

    def run_parse() -> None:
        loads(data)
        knobs.delay()

    def run_serialize() -> None:
        serialize(doc)
        knobs.delay()

    benchmark.pedantic(run_parse if op == "parse" else run_serialize, rounds=ROUNDS[size], iterations=1,
                       warmup_rounds=1)
    median = median_s(benchmark)
    record(bench="codec", op=op, codec=codec, size=size, agents=len(doc["agents"]), bytes=len(data),
           median_us=round(median * 1e6, 2), mb_per_s=round(len(data) / median / 1e6, 1) if median else None)
