"""Issue 4: checking a burst of 8 operations for linearizability costs a fraction of running the burst.

The burst is real: 8 processes of the burst pool update 4 agents of the reference at once (two writers per agent).
The check is the search the state machine uses (:func:`pytest_orch.linearize.linearize`), over a model of the
agents' status and progress.  The ratio is recorded in extra_info, not asserted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_orch.adapter import ReferenceAdapter
from pytest_orch.burst import Op, shared_pool
from pytest_orch.linearize import Applied, Call, Refused, linearize
from pytest_orch.tmux import QUIET_AGENT_COMMAND, private_server

AGENTS = 4
BURST = 8

State = tuple[tuple[str, int], ...]  # (status, progress) of each agent


def _model(agents: list[str]) -> Callable[[State, Call], Applied[State] | Refused]:
    position = {agent: i for i, agent in enumerate(agents)}

    def step(state: State, call: Call) -> Applied[State] | Refused:
        op: Op = call.op
        i = position[op.agent_id]
        if state[i][0] not in ("running", "working", "blocked"):
            return Refused(f"agent {op.agent_id} is {state[i][0]}")
        return Applied((*state[:i], (op.status, op.progress), *state[i + 1:]))

    return step


def test_checking_a_burst_of_8_takes_a_fraction_of_the_time_the_burst_takes(benchmark: Any, tmp_path: Path) -> None:
    os.environ.setdefault("ORCH_AGENT_COMMAND", QUIET_AGENT_COMMAND)
    with private_server(tmp_path / "tmux"):
        workspace = tmp_path / "ws"
        workspace.mkdir()
        registry = ReferenceAdapter(workspace)
        task = registry.create_task("burst", max_agents=AGENTS, max_concurrent=AGENTS, max_depth=2)
        agents = [registry.deploy(task, f"agent{i}") for i in range(AGENTS)]
        ops = [Op("update", task, agents[i % AGENTS], status=("working", "blocked")[i // AGENTS], progress=10 * i)
               for i in range(BURST)]
        pool = shared_pool(BURST)
        pool.run("reference", workspace, ops)  # the first burst starts the pool's processes: not what is timed
        before = {a["id"]: (a["status"], a["progress"]) for a in registry.read_task(task)["agents"]}
        started = time.perf_counter()
        records = pool.run("reference", workspace, ops)
        burst_s = time.perf_counter() - started
        final = {a["id"]: (a["status"], a["progress"]) for a in registry.read_task(task)["agents"]}

    calls = [Call(r.index, r.op, r.invoke, r.complete, r.outcome, r.result) for r in records]
    initial: State = tuple(before[a] for a in agents)
    want = tuple(final[a] for a in agents)
    search = benchmark(linearize, calls, initial, _model(agents), lambda s: s == want)
    assert search.ok, f"the reference's burst was not linearizable: {records}"
    check_s = float(benchmark.stats.stats.median)
    benchmark.extra_info.update(burst_s=round(burst_s, 6), median_s=check_s, states_explored=search.explored,
                                check_fraction_of_burst=round(check_s / burst_s, 5))
