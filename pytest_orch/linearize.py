"""Linearizability search in the style of Wing & Gong: is there an order of the calls that explains what we saw?

The caller gives the calls (each with its real-time interval and its outcome), an initial state, a ``step`` function
that says what one call does to a state, and an ``accept`` test for the final state.  We look for an order that

- respects real time: a call that completed before another was invoked comes first;
- applies every ``ok`` call, and the model applies it too (with the result that was seen);
- leaves out every ``fail`` call, and (when ``strict_fail``) the model refuses it at its place in the order;
- applies each ``info`` call at some point after its invocation, or not at all;

and ends in a state that ``accept`` takes.  States must be hashable: they key the memo that keeps the search
polynomial in practice (the frontier of done calls times the distinct states seen).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

S = TypeVar("S", bound=Hashable)

Outcome = Literal["ok", "fail", "info"]


@dataclass(frozen=True)
class Call:
    """One operation as the history saw it.  ``complete`` is None when it never returned (a dead worker)."""

    id: int
    op: Any
    invoke: int
    complete: int | None
    outcome: Outcome
    result: Any = None


@dataclass(frozen=True)
class Applied(Generic[S]):
    state: S
    result: Any = None


@dataclass(frozen=True)
class Refused:
    reason: str = ""


Step = Callable[[S, Call], "Applied[S] | Refused"]


@dataclass
class Search(Generic[S]):
    """What the search found: ``order`` is a witness (call ids, ``~id`` for an info call left out), or None."""

    order: list[str] | None
    explored: int = 0
    final_states: list[S] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.order is not None


def linearize(calls: Sequence[Call], initial: S, step: Step[S], accept: Callable[[S], bool], *,
              strict_fail: bool = True, results_match: Callable[[Call, Any], bool] | None = None,
              budget: int = 200_000, keep_finals: int = 8) -> Search[S]:
    """Search for a linearization of *calls*; see the module docstring.

    ``results_match(call, model_result)`` compares an ``ok`` call's observed result with the model's (default:
    accept any).  ``budget`` bounds the states explored; a search that runs out reports no witness.
    ``final_states`` collects up to *keep_finals* distinct end states that ``accept`` rejected, for reports.
    """
    calls = list(calls)
    n = len(calls)
    search: Search[S] = Search(order=None)
    seen: set[tuple[int, S]] = set()
    # must_precede[i]: bitmask of calls that completed before call i was invoked.
    must_precede = [0] * n
    for i, c in enumerate(calls):
        for j, d in enumerate(calls):
            if i != j and d.complete is not None and d.complete < c.invoke:
                must_precede[i] |= 1 << j
    full = (1 << n) - 1
    order: list[str] = []

    def dfs(done: int, state: S) -> bool:
        if done == full:
            if accept(state):
                return True
            if state not in search.final_states and len(search.final_states) < keep_finals:
                search.final_states.append(state)
            return False
        key = (done, state)
        if key in seen or search.explored >= budget:
            return False
        seen.add(key)
        search.explored += 1
        for i, c in enumerate(calls):
            bit = 1 << i
            if done & bit or must_precede[i] & ~done:
                continue
            effect = step(state, c)
            if c.outcome == "ok":
                if isinstance(effect, Applied) and (results_match is None or results_match(c, effect.result)):
                    order.append(str(c.id))
                    if dfs(done | bit, effect.state):
                        return True
                    order.pop()
            elif c.outcome == "fail":
                if not strict_fail or isinstance(effect, Refused):
                    order.append(f"!{c.id}")
                    if dfs(done | bit, state):
                        return True
                    order.pop()
            else:  # info: it took effect here, or never
                if isinstance(effect, Applied):
                    order.append(f"?{c.id}")
                    if dfs(done | bit, effect.state):
                        return True
                    order.pop()
                order.append(f"~{c.id}")
                if dfs(done | bit, state):
                    return True
                order.pop()
        return False

    if dfs(0, initial):
        search.order = list(order)
    return search
