"""The ready-made suite: what every agent registry must survive under real concurrency.

Run it against your own registry::

    pytest --pyargs pytest_orch.suite --orch-impl=myorch.testing:adapter --orch-concurrency=10

Each test starts N processes on a barrier (``--orch-concurrency``), runs a workload seeded by ``--orch-seed``, then
checks the history and the final documents for lost inserts and updates, count drift, duplicates, broken limits,
corruption, and task/global disagreement.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_orch.history import History
from pytest_orch.options import OrchOptions
from pytest_orch.swarm import Worker

WORKING = ("running", "working", "blocked")


def _made_progress(history: History, at_least: int) -> None:
    """A run in which (almost) nothing succeeded proves nothing: say so instead of passing."""
    ok = history.count("ok")
    assert ok >= at_least, (f"only {ok} of {len(history.calls)} operations succeeded (needed {at_least}); the"
                            " registry refused or lost the rest, so this run checks nothing")


def test_concurrent_deploys_of_distinct_types_are_all_recorded(orch_registry: Any, orch_swarm: Any,
                                                              orch_options: OrchOptions) -> None:
    per = min(orch_options.ops, 8)
    n = orch_options.concurrency
    task = orch_registry.create_task("distinct deploys", max_agents=n * per, max_concurrent=n * per, max_depth=5)

    def work(w: Worker) -> None:
        for i in range(per):
            w.registry.deploy(task, f"p{w.process}-t{i}")

    history = orch_swarm(work, tasks=[task], ops=per)
    orch_swarm.check(history)
    _made_progress(history, n * per // 2)


def test_same_type_deploys_leave_at_most_one_active_agent_per_type(orch_registry: Any, orch_swarm: Any,
                                                                   orch_options: OrchOptions) -> None:
    per = min(orch_options.ops, 12)
    task = orch_registry.create_task("same-type deploys", max_agents=1000, max_concurrent=1000, max_depth=5)

    def work(w: Worker) -> None:
        for _ in range(per):
            agent = w.registry.deploy(task, w.rng.choice(["alpha", "beta"]))
            if agent is not None and w.rng.random() < 0.6:
                w.registry.update(task, agent, "completed", 100)

    history = orch_swarm(work, tasks=[task], ops=per)
    orch_swarm.check(history)
    _made_progress(history, 2)


def test_deploys_against_a_small_max_concurrent_never_exceed_it(orch_registry: Any, orch_swarm: Any,
                                                               orch_options: OrchOptions) -> None:
    per = min(orch_options.ops, 6)
    task = orch_registry.create_task("small max_concurrent", max_agents=1000, max_concurrent=3, max_depth=5)

    def work(w: Worker) -> None:
        for i in range(per):
            w.registry.deploy(task, f"p{w.process}-t{i}")

    history = orch_swarm(work, tasks=[task], ops=per)
    orch_swarm.check(history)
    _made_progress(history, 1)


def test_concurrent_updates_of_distinct_agents_are_never_lost(orch_registry: Any, orch_swarm: Any,
                                                             orch_options: OrchOptions) -> None:
    n = orch_options.concurrency
    task = orch_registry.create_task("distinct updates", max_agents=n, max_concurrent=n, max_depth=5)
    agents = [orch_registry.deploy(task, f"worker{i}") for i in range(n)]

    def work(w: Worker) -> None:
        mine = w.shared["agents"][w.process]
        for k in range(1, w.ops):
            w.registry.update(task, mine, w.rng.choice(WORKING), 1 + k % 99)
        w.registry.update(task, mine, "completed", 100)

    history = orch_swarm(work, tasks=[task], shared={"agents": agents})
    orch_swarm.check(history)
    _made_progress(history, len(history.calls) // 2)


def test_updates_kills_and_reconciles_racing_on_the_same_agents(orch_registry: Any, orch_swarm: Any,
                                                                orch_options: OrchOptions) -> None:
    task = orch_registry.create_task("racing on shared agents", max_agents=50, max_concurrent=50, max_depth=5)
    agents = [orch_registry.deploy(task, f"shared{i}") for i in range(4)]
    sessions = {a["id"]: a.get("tmux_session") or f"agent_{a['id']}" for a in orch_registry.read_task(task)["agents"]}
    per = min(orch_options.ops, 12)

    def work(w: Worker) -> None:
        for _ in range(per):
            agent = w.rng.choice(w.shared["agents"])
            roll = w.rng.random()
            if roll < 0.6:
                status = w.rng.choice(WORKING) if w.rng.random() < 0.85 else w.rng.choice(["completed", "failed"])
                w.registry.update(task, agent, status, w.rng.randrange(101))
            elif roll < 0.7:
                w.registry.kill(task, agent)
            elif roll < 0.8:
                w.kill_session(w.shared["sessions"][agent])
                w.registry.reconcile(task)
            else:
                w.registry.reconcile(task)

    history = orch_swarm(work, tasks=[task], ops=per, shared={"agents": agents, "sessions": sessions})
    orch_swarm.check(history)
    _made_progress(history, len(agents))


def test_children_spawned_concurrently_under_deep_parents_respect_max_depth(orch_registry: Any, orch_swarm: Any,
                                                                           orch_options: OrchOptions) -> None:
    task = orch_registry.create_task("deep children", max_agents=1000, max_concurrent=1000, max_depth=3)
    root = orch_registry.deploy(task, "root")
    middle = orch_registry.deploy(task, "middle", root)
    per = min(orch_options.ops, 6)

    def work(w: Worker) -> None:
        parents = [root, middle]
        for i in range(per):
            child = w.registry.deploy(task, f"p{w.process}-c{i}", w.rng.choice(parents))
            if child is not None:
                parents.append(child)

    history = orch_swarm(work, tasks=[task], ops=per)
    orch_swarm.check(history)
    refused = [op for op in history.calls if op.name == "deploy" and op.outcome == "fail"]
    _made_progress(history, 1)
    assert refused or all(op.args["parent"] == root for op in history.calls), \
        "no deploy was refused although some went under agents already at max_depth"


@pytest.mark.parametrize("mix", range(2))
def test_a_seeded_random_mix_of_everything(orch_registry: Any, orch_swarm: Any, orch_options: OrchOptions,
                                           mix: int) -> None:
    task = orch_registry.create_task(f"random mix {mix}", max_agents=40, max_concurrent=8, max_depth=3)
    seeds = [orch_registry.deploy(task, f"seed{i}") for i in range(3)]
    sessions = {a["id"]: a.get("tmux_session") or f"agent_{a['id']}" for a in orch_registry.read_task(task)["agents"]}
    per = min(orch_options.ops, 15)

    def work(w: Worker) -> None:
        known = list(w.shared["agents"])
        for _ in range(per):
            roll = w.rng.random()
            if roll < 0.3:
                parent = w.rng.choice(["orchestrator", *known])
                agent = w.registry.deploy(task, w.rng.choice(["scout", "fixer", "tester", "critic", "planner"]),
                                          parent)
                if agent is not None:
                    known.append(agent)
            elif roll < 0.75:
                status = w.rng.choice([*WORKING, *WORKING, "completed", "error"])
                w.registry.update(task, w.rng.choice(known), status, w.rng.randrange(101))
            elif roll < 0.85:
                w.registry.kill(task, w.rng.choice(known))
            elif roll < 0.92:
                victim = w.rng.choice(w.shared["agents"])
                w.kill_session(w.shared["sessions"][victim])
                w.registry.reconcile(task)
            else:
                w.registry.reconcile(task)

    history = orch_swarm(work, tasks=[task], ops=per, shared={"agents": seeds, "sessions": sessions})
    orch_swarm.check(history)
    _made_progress(history, 3)
