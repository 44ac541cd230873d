"""Fault injection: real SIGKILLs, crashes at the points of the write protocol, tmux sessions killed behind the
registry's back.  Every fault is seeded, recorded in the History as a fault operation, and listed in the report.

``--orch-chaos=sigkill`` (or ``sigkill=N`` for at most N kills per swarm) makes every ``orch_swarm`` run kill
random workers at random moments; the ``orch_chaos`` fixture gives a test the same faults by hand.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from .swarm import SwarmHandle

__all__ = ["Chaos", "ChaosSpec", "parse_chaos", "random_sigkills"]


@dataclass(frozen=True)
class ChaosSpec:
    """What ``--orch-chaos`` asked for."""

    sigkills: int = 0  # at most this many workers SIGKILLed per swarm

    def __str__(self) -> str:
        return f"sigkill={self.sigkills}" if self.sigkills else "off"


def parse_chaos(text: str) -> ChaosSpec:
    """``sigkill`` (at most 3 kills a swarm) or ``sigkill=N``.  ValueError for anything else."""
    kind, _, count = text.strip().partition("=")
    if kind != "sigkill":
        raise ValueError(f"{text!r}: the faults a swarm can be given are 'sigkill' or 'sigkill=N'")
    if not count:
        return ChaosSpec(sigkills=3)
    try:
        kills = int(count)
    except ValueError:
        raise ValueError(f"{text!r}: N in sigkill=N must be a whole number") from None
    if kills < 1:
        raise ValueError(f"{text!r}: N in sigkill=N must be at least 1")
    return ChaosSpec(sigkills=kills)


def random_sigkills(seed: str, kills: int, *, first_after: float = 0.05, spread: float = 0.6,
                    keep_alive: int = 1) -> Callable[[SwarmHandle], None]:
    """A ``during`` callback that SIGKILLs up to *kills* random workers at random moments, seeded by *seed*.

    Kills come *first_after* to *first_after* + *spread* seconds apart; at least *keep_alive* workers are spared so
    the swarm still does work.  Each kill is recorded as a fault operation.
    """
    rng = random.Random(f"chaos:{seed}")

    def inject(handle: SwarmHandle) -> None:
        for _ in range(kills):
            if handle.done.wait(first_after + rng.random() * spread):
                return
            alive = handle.alive()
            if len(alive) <= keep_alive:
                return
            handle.sigkill(rng.choice(alive))
            time.sleep(0)  # let the recorder's lines reach the file in order

    return inject


class Chaos:
    """The ``orch_chaos`` fixture: faults for one test, all seeded from ``--orch-seed`` and the test's id."""

    def __init__(self, seed: str) -> None:
        self.seed = seed
        self._made = 0

    def sigkills(self, kills: int = 3, *, first_after: float = 0.05, spread: float = 0.6,
                 keep_alive: int = 1) -> Callable[[SwarmHandle], None]:
        """A ``during`` callback for ``orch_swarm(..., during=...)`` that SIGKILLs up to *kills* random workers."""
        self._made += 1
        return random_sigkills(f"{self.seed}:{self._made}", kills, first_after=first_after, spread=spread,
                               keep_alive=keep_alive)
