"""The ready-made suite: what every agent registry must survive under real concurrency.

Run it against your own registry::

    pytest --pyargs pytest_orch.suite --orch-impl=myorch.testing:adapter --orch-concurrency=10

Each test starts N processes on a barrier (``--orch-concurrency``), runs a workload seeded by ``--orch-seed``, then
checks the history and the final documents for lost inserts and updates, count drift, duplicates, broken limits,
corruption, crashes, leaked sessions and task/global disagreement.  Workloads speak the registry's own statuses
(its declared :class:`~pytest_orch.Rules`) and demand no refusal it does not promise.  Each test names the
operations it exercises: one that never worked makes the test ``inconclusive`` rather than a pass.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_orch.conformance import verdict_for
from pytest_orch.options import OrchOptions
from pytest_orch.spec import ORCHESTRATOR, Spec
from pytest_orch.swarm import Worker


def _working(spec: Spec) -> list[str]:
    """Statuses an update sets that keep an agent active; if there are none, the ones it can move between."""
    r = spec.rules
    active = sorted(r.update_statuses & r.active)
    if active:
        return active
    return sorted(r.update_statuses) if not r.terminal_is_final else []


def _finishing(spec: Spec) -> list[str]:
    """Statuses an update sets that end an agent."""
    return sorted(spec.rules.update_statuses - spec.rules.active)


def _session(spec: Spec, registry: Any, task: str) -> dict[str, str]:
    return {a["id"]: spec.session_of(a) for a in registry.read_task(task).get("agents", [])}


def test_the_registry_does_what_its_rules_say(orch_options: OrchOptions) -> None:
    """The conformance run: every edge the declared rules cover, driven in one process (see pytest_orch.conformance).
    """
    verdict = verdict_for(orch_options.impl)
    assert verdict.ok, verdict.report()


def test_concurrent_deploys_of_distinct_types_are_all_recorded(orch_registry: Any, orch_swarm: Any,
                                                              orch_options: OrchOptions) -> None:
    per = min(orch_options.ops, 8)
    n = orch_options.concurrency
    task = orch_registry.create_task("distinct deploys", max_agents=n * per, max_concurrent=n * per, max_depth=5)

    def work(w: Worker) -> None:
        for i in range(per):
            w.registry.deploy(task, f"p{w.process}-t{i}")

    history = orch_swarm(work, tasks=[task], ops=per)
    orch_swarm.check(history, exercises=["deploy"], at_least=n * per // 2)


def test_same_type_deploys_leave_at_most_one_active_agent_per_type(orch_registry: Any, orch_swarm: Any,
                                                                   orch_options: OrchOptions,
                                                                   orch_spec: Spec) -> None:
    per = min(orch_options.ops, 12)
    task = orch_registry.create_task("same-type deploys", max_agents=1000, max_concurrent=1000, max_depth=5)
    done = _finishing(orch_spec)

    def work(w: Worker) -> None:
        for _ in range(per):
            agent = w.registry.deploy(task, w.rng.choice(["alpha", "beta"]))
            if agent is not None and w.rng.random() < 0.6:
                if done:
                    w.registry.update(task, agent, w.rng.choice(done), 100)
                else:
                    w.registry.kill(task, agent)

    history = orch_swarm(work, tasks=[task], ops=per)
    orch_swarm.check(history, exercises=["deploy"], at_least=2)


def test_deploys_against_a_small_max_concurrent_never_exceed_it(orch_registry: Any, orch_swarm: Any,
                                                               orch_options: OrchOptions) -> None:
    per = min(orch_options.ops, 6)
    task = orch_registry.create_task("small max_concurrent", max_agents=1000, max_concurrent=3, max_depth=5)

    def work(w: Worker) -> None:
        for i in range(per):
            w.registry.deploy(task, f"p{w.process}-t{i}")

    history = orch_swarm(work, tasks=[task], ops=per)
    orch_swarm.check(history, exercises=["deploy"], at_least=1)


def test_deploys_against_a_small_max_agents_never_exceed_it(orch_registry: Any, orch_swarm: Any,
                                                           orch_options: OrchOptions) -> None:
    per = min(orch_options.ops, 4)
    task = orch_registry.create_task("small max_agents", max_agents=3, max_concurrent=1000, max_depth=5)

    def work(w: Worker) -> None:
        for i in range(per):
            w.registry.deploy(task, f"p{w.process}-t{i}")

    history = orch_swarm(work, tasks=[task], ops=per)
    orch_swarm.check(history, exercises=["deploy"], at_least=1)


def test_concurrent_updates_of_distinct_agents_are_never_lost(orch_registry: Any, orch_swarm: Any,
                                                             orch_options: OrchOptions, orch_spec: Spec) -> None:
    n = orch_options.concurrency
    task = orch_registry.create_task("distinct updates", max_agents=n, max_concurrent=n, max_depth=5)
    agents = [orch_registry.deploy(task, f"worker{i}") for i in range(n)]
    working, done = _working(orch_spec), _finishing(orch_spec)

    def work(w: Worker) -> None:
        mine = w.shared["agents"][w.process]
        for k in range(1, w.ops if working else 1):
            w.registry.update(task, mine, w.rng.choice(working), 1 + k % 99)
        if done:
            w.registry.update(task, mine, done[0], 100)

    history = orch_swarm(work, tasks=[task], shared={"agents": agents})
    orch_swarm.check(history, exercises=["update"], at_least=len(history.calls) // 2)


def test_updates_kills_and_reconciles_racing_on_the_same_agents(orch_registry: Any, orch_swarm: Any,
                                                                orch_options: OrchOptions, orch_spec: Spec) -> None:
    n = orch_options.concurrency
    task = orch_registry.create_task("racing on shared agents", max_agents=50 + n, max_concurrent=50 + n,
                                     max_depth=5)
    agents = [orch_registry.deploy(task, f"shared{i}") for i in range(4)]
    # One agent per process that only that process loses and reconciles: what shows that reconcile reaps.
    private = [orch_registry.deploy(task, f"private{i}") for i in range(n)]
    sessions = _session(orch_spec, orch_registry, task)
    per = min(orch_options.ops, 12)
    working, done = _working(orch_spec), _finishing(orch_spec)

    def work(w: Worker) -> None:
        w.kill_session(w.shared["sessions"][w.shared["private"][w.process]])
        w.registry.reconcile(task)
        for _ in range(per):
            agent = w.rng.choice(w.shared["agents"])
            roll = w.rng.random()
            if roll < 0.6:
                status = w.rng.choice(working) if working and w.rng.random() < 0.85 else w.rng.choice(done or working)
                w.registry.update(task, agent, status, w.rng.randrange(101))
            elif roll < 0.7:
                w.registry.kill(task, agent)
            elif roll < 0.8:
                w.kill_session(w.shared["sessions"][agent])
                w.registry.reconcile(task)
            else:
                w.registry.reconcile(task)

    history = orch_swarm(work, tasks=[task], ops=per,
                         shared={"agents": agents, "private": private, "sessions": sessions})
    orch_swarm.check(history, exercises=["update", "reconcile"], at_least=len(agents))


def test_concurrent_kills_and_updates_of_the_same_agents(orch_registry: Any, orch_swarm: Any,
                                                         orch_options: OrchOptions, orch_spec: Spec) -> None:
    """Every process kills and updates the same few agents: a kill read and written in separate lock scopes loses."""
    n = orch_options.concurrency
    task = orch_registry.create_task("kills and updates", max_agents=100, max_concurrent=100, max_depth=5)
    agents = [orch_registry.deploy(task, f"target{i}") for i in range(max(2, n // 2))]
    working = _working(orch_spec)
    per = min(orch_options.ops, 6)

    def work(w: Worker) -> None:
        for i in range(per):
            agent = w.shared["agents"][(w.process + i) % len(w.shared["agents"])]
            if working and w.rng.random() < 0.5:
                w.registry.update(task, agent, w.rng.choice(working), w.rng.randrange(101))
            else:
                w.registry.kill(task, agent)

    history = orch_swarm(work, tasks=[task], ops=per, shared={"agents": agents})
    orch_swarm.check(history, exercises=["kill"], at_least=len(agents))


def test_deploys_racing_with_reconciles_keep_their_new_agents(orch_registry: Any, orch_swarm: Any,
                                                             orch_options: OrchOptions) -> None:
    """A reconcile that lists the live sessions before it takes its lock reaps agents deployed in between."""
    per = min(orch_options.ops, 6)
    n = orch_options.concurrency
    task = orch_registry.create_task("deploys and reconciles", max_agents=n * per + 10,
                                     max_concurrent=n * per + 10, max_depth=5)

    def work(w: Worker) -> None:
        for i in range(per):
            if w.process % 2 == 0:
                w.registry.deploy(task, f"p{w.process}-r{i}")
            else:
                w.registry.reconcile(task)

    history = orch_swarm(work, tasks=[task], ops=per)
    orch_swarm.check(history, exercises=["deploy", "reconcile"], at_least=1)


def test_children_spawned_concurrently_under_deep_parents_respect_max_depth(orch_registry: Any, orch_swarm: Any,
                                                                           orch_options: OrchOptions,
                                                                           orch_spec: Spec) -> None:
    if not orch_spec.rules.hierarchy:
        pytest.skip("the registry declares no hierarchy (Rules(hierarchy=False)): no parent, so no depth to limit")
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
    orch_swarm.check(history, exercises=["deploy"], at_least=1)
    if "max_depth" in orch_spec.promises:
        refused = [op for op in history.calls if op.name == "deploy" and op.outcome == "fail"]
        assert refused or all(op.args["parent"] == root for op in history.calls), \
            "no deploy was refused although some went under agents already at max_depth"


def _mix(w: Worker, spec: Spec, task: str, known: list[str], sessions: dict[str, str], per: int) -> None:
    """Deploys, updates, kills, lost sessions and reconciles at random, in the registry's own statuses."""
    working, done = _working(spec), _finishing(spec)
    statuses = [*working, *working, *done]
    for _ in range(per):
        roll = w.rng.random()
        if roll < 0.3:
            parent = w.rng.choice([ORCHESTRATOR, *known]) if spec.rules.hierarchy else ORCHESTRATOR
            agent = w.registry.deploy(task, w.rng.choice(["scout", "fixer", "tester", "critic", "planner"]), parent)
            if agent is not None:
                known.append(agent)
        elif roll < 0.75 and statuses:
            w.registry.update(task, w.rng.choice(known), w.rng.choice(statuses), w.rng.randrange(101))
        elif roll < 0.85:
            w.registry.kill(task, w.rng.choice(known))
        elif roll < 0.92 and sessions:
            w.kill_session(sessions[w.rng.choice(sorted(sessions))])
            w.registry.reconcile(task)
        else:
            w.registry.reconcile(task)


@pytest.mark.parametrize("mix", range(2))
def test_a_seeded_random_mix_of_everything(orch_registry: Any, orch_swarm: Any, orch_options: OrchOptions,
                                           orch_spec: Spec, mix: int) -> None:
    task = orch_registry.create_task(f"random mix {mix}", max_agents=40, max_concurrent=8, max_depth=3)
    seeds = [orch_registry.deploy(task, f"seed{i}") for i in range(3)]
    sessions = _session(orch_spec, orch_registry, task)
    per = min(orch_options.ops, 15)

    def work(w: Worker) -> None:
        _mix(w, orch_spec, task, list(w.shared["agents"]), w.shared["sessions"], per)

    history = orch_swarm(work, tasks=[task], ops=per, shared={"agents": seeds, "sessions": sessions})
    orch_swarm.check(history, exercises=["deploy"], at_least=3)


def test_tasks_created_concurrently_are_all_kept(orch_swarm: Any, orch_options: OrchOptions) -> None:
    """Every process creates tasks while the others do, and deploys into its first: each task created must read back
    (with its agent) and, when the registry keeps one, be in the global registry.  Only the first gets a deploy, as a
    deploy that rewrites the global registry could put back a task entry that a racing create had lost."""
    per = min(orch_options.ops, 4)

    def work(w: Worker) -> None:
        for i in range(per):
            task = w.registry.create_task(f"p{w.process} task {i}", max_agents=5, max_concurrent=5, max_depth=3)
            if task is not None and i == 0:
                w.registry.deploy(task, "scout")

    history = orch_swarm(work, tasks=[], ops=per + 1)
    orch_swarm.check(history, exercises=["create_task", "deploy"], at_least=orch_options.concurrency)


def test_reconciles_of_many_tasks_at_once_keep_the_global_registry_whole(orch_registry: Any, orch_swarm: Any,
                                                                        orch_options: OrchOptions,
                                                                        orch_spec: Spec) -> None:
    """Sessions die in several tasks at once and each task's processes reconcile it, while the others change
    statuses: every reap and every update must reach the global registry (a reconcile's write of it races with every
    other task's)."""
    n = orch_options.concurrency
    tasks = [orch_registry.create_task(f"task {i}", max_agents=60, max_concurrent=60, max_depth=3)
             for i in range(max(2, min(4, n // 2)))]
    per = min(orch_options.ops, 6)
    agents = {t: [orch_registry.deploy(t, f"a{i}") for i in range(per)] for t in tasks}
    sessions = {t: _session(orch_spec, orch_registry, t) for t in tasks}
    working = _working(orch_spec)

    def work(w: Worker) -> None:
        task = w.shared["tasks"][w.process % len(w.shared["tasks"])]
        mine = w.shared["agents"][task]
        for i in range(per):
            agent = mine[(w.process // len(w.shared["tasks"]) + i) % len(mine)]
            if w.process % 2 or not working:  # half the processes lose sessions and reap them
                w.kill_session(w.shared["sessions"][task][agent])
                w.registry.reconcile(task)
            else:
                w.registry.update(task, agent, w.rng.choice(working), w.rng.randrange(101))

    history = orch_swarm(work, tasks=tasks, ops=2 * per, shared={"tasks": tasks, "agents": agents,
                                                                 "sessions": sessions})
    orch_swarm.check(history, exercises=["reconcile"], at_least=len(tasks))


def test_many_tasks_at_once_keep_the_global_registry_whole(orch_registry: Any, orch_swarm: Any,
                                                          orch_options: OrchOptions, orch_spec: Spec) -> None:
    """The incident's scenario: several tasks, each with its own processes, all writing one global registry."""
    n = orch_options.concurrency
    tasks = [orch_registry.create_task(f"task {i}", max_agents=60, max_concurrent=60, max_depth=3)
             for i in range(max(3, min(5, n // 2)))]
    seeds = {t: [orch_registry.deploy(t, f"seed{i}") for i in range(2)] for t in tasks}
    sessions = {t: _session(orch_spec, orch_registry, t) for t in tasks}
    per = min(orch_options.ops, 10)

    def work(w: Worker) -> None:
        task = w.shared["tasks"][w.process % len(w.shared["tasks"])]
        _mix(w, orch_spec, task, list(w.shared["seeds"][task]), w.shared["sessions"][task], per)

    history = orch_swarm(work, tasks=tasks, ops=per, shared={"tasks": tasks, "seeds": seeds, "sessions": sessions})
    orch_swarm.check(history, exercises=["deploy", "update"], at_least=len(tasks))
