"""Linearizability search in the style of Wing & Gong: is there an order of the calls that explains what we saw?

The caller gives the calls (each with its real-time interval and its outcome), an initial state, a ``step`` function
that says what one call does to a state, and an ``accept`` test for the final state.  We look for an order that

- respects real time: a call that completed before another was invoked comes first;
- applies every ``ok`` call, and the model applies it too (with the result that was seen);
- leaves out every ``fail`` call, and (when ``strict_fail``) the model refuses it at its place in the order;
- applies each ``info`` call at some point after its invocation, or not at all;

and ends in a state that ``accept`` takes.  States must be hashable: they key the memo that keeps the search
polynomial in practice (the frontier of done calls times the distinct states seen).

``step`` may also return several alternatives (a tuple or list of Applied and Refused): a model that does not
determine the outcome (a rule the registry does not promise to enforce) says "either".  An ``ok`` call may take any
Applied alternative, a ``fail`` call is explained by any Refused one, an ``info`` call by any of them or none.

>>> inc = lambda n, call: Applied(n + 1)
>>> calls = [Call(0, "inc", invoke=0, complete=10, outcome="ok"), Call(1, "inc", invoke=5, complete=15, outcome="ok")]
>>> linearize(calls, 0, inc, lambda n: n == 2).ok
True
>>> linearize(calls, 0, inc, lambda n: n == 1).ok    # the lost update
False
>>> lost(calls, 0, inc, lambda n: n == 1)            # explained if either increment never happened
[0, 1]
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable, Iterator, Sequence
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


Effect = Applied[S] | Refused
Step = Callable[[S, Call], "Applied[S] | Refused | Sequence[Applied[S] | Refused]"]


@dataclass
class Search(Generic[S]):
    """What the search found: ``order`` is a witness, or None.

    A witness lists call ids in order: ``3`` an ok call applied, ``!3`` a failed call (refused there), ``?3`` an
    info call that took effect there, ``~3`` an info call that never took effect.  ``explored`` counts the distinct
    (calls done, state) pairs expanded; ``final_states`` are up to ``keep_finals`` distinct end states that ``accept``
    rejected, and ``final_orders[i]`` is the order that reached ``final_states[i]``.  ``final_state`` is the state the
    witness ends in.  ``exhausted`` is True when the budget ran out before the search could answer: then the lack of a
    witness says nothing about the history.
    """

    order: list[str] | None
    explored: int = 0
    final_states: list[S] = field(default_factory=list)
    final_orders: list[list[str]] = field(default_factory=list)
    final_state: S | None = None
    exhausted: bool = False

    @property
    def ok(self) -> bool:
        return self.order is not None


def linearize(calls: Sequence[Call], initial: S, step: Step[S], accept: Callable[[S], bool], *,
              strict_fail: bool = True, results_match: Callable[[Call, Any], bool] | None = None,
              budget: int = 200_000, keep_finals: int = 8, prune: Callable[[S], bool] | None = None) -> Search[S]:
    """Search for a linearization of *calls*; see the module docstring.

    ``results_match(call, model_result)`` compares an ``ok`` call's observed result with the model's (default:
    accept any).  ``budget`` bounds the states explored; a search that runs out reports no witness.
    ``prune(state)`` may say that no continuation from *state* can be accepted (it already contradicts what was
    observed), which cuts the search short; it must never prune a state from which ``accept`` is reachable.
    ``final_states`` collects up to *keep_finals* distinct end states that ``accept`` rejected, for reports.
    Raises whatever *step* or *accept* raise.
    """
    calls = list(calls)
    n = len(calls)
    search: Search[S] = Search(order=None)
    seen: set[tuple[int, S]] = set()
    must_precede = _real_time_order(calls)
    full = (1 << n) - 1
    # Try calls in the order they completed: a registry that serializes its writers (a lock) completes them in about
    # the order it applied them, so the witness of a good history is found on the first path.
    preferred = sorted(range(n), key=lambda i: (calls[i].complete is None, calls[i].complete or 0, calls[i].invoke, i))

    def alternatives(state: S, call: Call) -> list[Applied[S] | Refused]:
        effect = step(state, call)
        return [effect] if isinstance(effect, Applied | Refused) else list(effect)

    by_invoke = sorted(range(n), key=lambda i: (calls[i].invoke, i))
    rank = {i: r for r, i in enumerate(preferred)}

    def candidates(done: int, first: tuple[int, int]) -> list[int]:
        """The calls that may come next, in preferred order.  *first* are the positions of the first call not done
        in ``preferred`` and in ``by_invoke``: a call invoked after the earliest completion of a call not yet done
        must wait for it, so the scan stops there."""
        horizon = calls[preferred[first[0]]].complete
        out = []
        for i in by_invoke[first[1]:]:
            if horizon is not None and calls[i].invoke > horizon:
                break
            if not done & (1 << i) and not must_precede[i] & ~done:
                out.append(i)
        return sorted(out, key=rank.__getitem__)

    def advance(done: int, first: tuple[int, int]) -> tuple[int, int]:
        p, q = first
        while p < n and done & (1 << preferred[p]):
            p += 1
        while q < n and done & (1 << by_invoke[q]):
            q += 1
        return p, q

    def moves(done: int, state: S, first: tuple[int, int]) -> Iterator[tuple[str, int, S, tuple[int, int]]]:
        """Every next step from (done, state): the label it adds to the order, and where it leads."""
        for i in candidates(done, first):
            c = calls[i]
            bit = 1 << i
            effects = alternatives(state, c)
            applied = [e for e in effects if isinstance(e, Applied)]
            if c.outcome == "ok":
                for effect in applied:
                    if results_match is None or results_match(c, effect.result):
                        yield str(c.id), done | bit, effect.state, first
            elif c.outcome == "fail":
                if not strict_fail or len(applied) < len(effects):
                    yield f"!{c.id}", done | bit, state, first
            else:  # info: it took effect here, or never
                for effect in applied:
                    yield f"?{c.id}", done | bit, effect.state, first
                yield f"~{c.id}", done | bit, state, first

    def enter(done: int, state: S, order: list[str],
              first: tuple[int, int]) -> bool | Iterator[tuple[str, int, S, tuple[int, int]]]:
        """True: a witness ends here; False: nothing to explore from here; else the moves to explore."""
        if done == full:
            if accept(state):
                search.final_state = state
                return True
            if state not in search.final_states and len(search.final_states) < keep_finals:
                search.final_states.append(state)
                search.final_orders.append(list(order))
            return False
        key = (done, state)
        if key in seen:
            return False
        if prune is not None and prune(state):
            seen.add(key)
            return False
        if search.explored >= budget:
            search.exhausted = True
            return False
        seen.add(key)
        search.explored += 1
        return moves(done, state, advance(done, first))

    # Depth-first with an explicit stack (a history of thousands of calls is thousands of levels deep):
    # len(order) == len(stack) - 1, the labels of the moves that led to each frame but the first.
    order: list[str] = []
    root = enter(0, initial, order, (0, 0))
    if root is True:
        search.order = []
        return search
    stack = [] if root is False else [root]
    while stack:
        move = next(stack[-1], None)
        if move is None:
            stack.pop()
            if order:
                order.pop()
            continue
        label, done, state, first = move
        order.append(label)
        found = enter(done, state, order, first)
        if found is True:
            search.order = list(order)
            return search
        if found is False:
            order.pop()
        else:
            stack.append(found)
    return search


def _real_time_order(calls: Sequence[Call]) -> list[int]:
    """``[i]``: the bitmask of the calls that completed before call *i* was invoked (they must come first).

    The calls sorted by completion make each mask a prefix of that order, so this is O(n log n) plus the masks.
    """
    by_complete = sorted((c.complete, i) for i, c in enumerate(calls) if c.complete is not None)
    completes = [t for t, _ in by_complete]
    prefix = [0]
    for _, i in by_complete:
        prefix.append(prefix[-1] | (1 << i))
    return [prefix[bisect.bisect_left(completes, c.invoke)] & ~(1 << i) for i, c in enumerate(calls)]


def lost(calls: Sequence[Call], initial: S, step: Step[S], accept: Callable[[S], bool], **options: Any) -> list[Any]:
    """Ids of the ``ok`` calls whose absence explains a history that has no linearization: the lost updates.

    Each ``ok`` call is left out in turn (as if it had never run, its real-time constraints with it) and the search
    repeated; the ids for which an order is then found are returned, in the order of *calls*.  Only worth asking
    when :func:`linearize` found no witness.  *options* are passed on to :func:`linearize`.
    """
    calls = list(calls)
    out = []
    for i, call in enumerate(calls):
        if call.outcome == "ok" and linearize(calls[:i] + calls[i + 1:], initial, step, accept, **options).ok:
            out.append(call.id)
    return out
