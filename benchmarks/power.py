"""The harness's power, measured: a seeded sample of mutants of ``registry/``, each run through the ready-made suite.

    python -m benchmarks.power --mutants 80 --seed 1          # about 40-60 minutes on a 2-core machine
    python -m benchmarks.power --mutants 5 --seed 1 --keep    # a quick look; --keep leaves the mutant copies

Not part of CI.  Each mutant is one AST mutation at a seeded random site of the modules the adapter contract reaches
(``ops``, ``store``, ``groupcommit``, ``model``, ``locking``, ``sessions``; ``cli``, ``health``, ``legacy`` and
``stub_agent`` are not called by :class:`pytest_orch.adapter.ReferenceAdapter`, so their mutants could only survive).
The copy of ``registry/`` with the mutation goes first on ``PYTHONPATH`` and the suite runs from a directory of its own,
so the mutant shadows the editable install in the test process and in every worker (checked before each run).

Why not a mutation tool: mutmut 3 selects the tests of a mutant by the trampoline hits it records in the test process
only, so a function reached only in the suite's worker processes (every update, kill and reconcile of a swarm) has "no
tests" and its mutants are never run (boxed/mutmut#338: the maintainer declines cross-process stats), and its
trampolines add a dispatch to every call, which changes the races being tested.  cosmic-ray does run a command in a
subprocess, but it mutates the files in place (the shared checkout, or a copy it cannot be pointed at per run), has no
seeded sampling of its thousands of jobs, and no statement deletion, lock removal or early return: the mutations a
concurrency harness is about.  So this is a small sampler; its operators are listed in ``OPERATORS``.

Outcomes: ``killed`` (the suite failed: the first failing test and the problem kinds of its report are recorded),
``timeout`` (the suite ran past ``--timeout``; counted as killed, shown apart), ``invalid`` (the mutant does not
import), ``survived`` (run twice, for races).  Survivors are classified in ``VERDICTS``: equivalent through the adapter
contract, or a gap.  The results go to ``benchmarks/report/power.json``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "registry"
#: The modules the adapter contract reaches; the others are not sampled (see the module docstring).
MODULES = ("ops.py", "store.py", "groupcommit.py", "model.py", "locking.py", "sessions.py")
REPORT = ROOT / "benchmarks" / "report" / "power.json"
SUITE_ARGS = ["--pyargs", "pytest_orch.suite", "--orch-impl=reference", "--orch-concurrency=10", "-x", "-q", "-rfE",
              "-p", "no:cacheprovider", "--hypothesis-profile=dev", "-c", "pytest.ini", "--rootdir=."]

_FLIP_CMP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_FLIP_BIN: dict[type[ast.operator], type[ast.operator]] = {ast.Add: ast.Sub, ast.Sub: ast.Add}


@dataclass
class Site:
    module: str
    operator: str
    index: int  # the index-th node of this operator in ast.walk order
    line: int
    before: str
    after: str = ""
    function: str = ""  # the enclosing function, "" at module level
    reached: bool = True  # whether the suite calls that function on the unmutated registry (in any process)


@dataclass
class Result:
    site: Site
    outcome: str  # killed | timeout | invalid | survived
    seconds: float
    test: str = ""
    kinds: list[str] = field(default_factory=list)
    runs: int = 1
    detail: str = ""


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _lock_item(item: ast.withitem) -> bool:
    call = item.context_expr
    if not isinstance(call, ast.Call):
        return False
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
    return "lock" in name.lower() or name == "transaction"


def _candidates(tree: ast.AST, operator: str) -> list[ast.AST]:
    """The nodes *operator* can mutate, in a stable order."""
    nodes = list(ast.walk(tree))
    if operator == "flip_compare":
        return [n for n in nodes if isinstance(n, ast.Compare) and type(n.ops[0]) in _FLIP_CMP]
    if operator == "flip_boolop":
        return [n for n in nodes if isinstance(n, ast.BoolOp)]
    if operator == "flip_bool":
        return [n for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, bool)]
    if operator == "number_plus_one":
        return [n for n in nodes if isinstance(n, ast.Constant) and type(n.value) in (int, float)]
    if operator == "flip_arith":
        return [n for n in nodes if isinstance(n, (ast.BinOp, ast.AugAssign)) and type(n.op) in _FLIP_BIN]
    if operator == "negate_if":
        return [n for n in nodes if isinstance(n, (ast.If, ast.While, ast.IfExp))]
    if operator == "delete_statement":
        out: list[ast.AST] = []
        for n in nodes:
            for name in ("body", "orelse", "finalbody"):
                body = getattr(n, name, None)
                if isinstance(body, list):
                    out += [s for s in body if isinstance(s, ast.stmt) and not _is_docstring(s)
                            and not isinstance(s, (ast.Pass, ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom,
                                                   ast.AsyncFunctionDef))]
        return out
    if operator == "drop_lock":
        return [n for n in nodes if isinstance(n, ast.With) and any(_lock_item(i) for i in n.items)]
    if operator == "return_early":
        return [n for n in nodes if isinstance(n, ast.FunctionDef)]
    raise ValueError(operator)


OPERATORS = ("flip_compare", "flip_boolop", "flip_bool", "number_plus_one", "flip_arith", "negate_if",
             "delete_statement", "drop_lock", "return_early")


def _mutate(node: ast.AST, operator: str, tree: ast.Module) -> None:
    """Apply *operator* to *node* in place."""
    if operator == "flip_compare":
        assert isinstance(node, ast.Compare)
        node.ops[0] = _FLIP_CMP[type(node.ops[0])]()
    elif operator == "flip_boolop":
        assert isinstance(node, ast.BoolOp)
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif operator == "flip_bool":
        assert isinstance(node, ast.Constant)
        node.value = not node.value
    elif operator == "number_plus_one":
        assert isinstance(node, ast.Constant)
        assert isinstance(node.value, int | float)
        node.value = node.value + 1
    elif operator == "flip_arith":
        assert isinstance(node, (ast.BinOp, ast.AugAssign))
        node.op = _FLIP_BIN[type(node.op)]()
    elif operator == "negate_if":
        assert isinstance(node, (ast.If, ast.While, ast.IfExp))
        node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
    elif operator == "delete_statement":
        _replace_stmt(tree, node, [ast.Pass()])
    elif operator == "drop_lock":
        assert isinstance(node, ast.With)
        kept = [i for i in node.items if not _lock_item(i)]
        if kept:
            node.items = kept
        else:
            _replace_stmt(tree, node, node.body)
    elif operator == "return_early":
        assert isinstance(node, ast.FunctionDef)
        at = 1 if node.body and _is_docstring(node.body[0]) else 0
        ret: list[ast.stmt] = [ast.Return(value=None)]
        if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(node)):
            ret = [ast.Return(value=None), ast.Expr(ast.Yield(value=None))]  # still a generator
        node.body[at:at] = ret
    ast.fix_missing_locations(tree)


def _replace_stmt(tree: ast.AST, old: ast.AST, new: list[ast.stmt]) -> None:
    for n in ast.walk(tree):
        for name in ("body", "orelse", "finalbody"):
            body = getattr(n, name, None)
            if isinstance(body, list) and any(s is old for s in body):
                i = next(k for k, s in enumerate(body) if s is old)
                body[i:i + 1] = new
                return
    raise LookupError("statement not found")


def _segment(source: str, node: ast.AST) -> str:
    text = ast.get_source_segment(source, node) or ast.unparse(node)
    first = text.strip().splitlines()[0] if text.strip() else text
    return first[:100]


def all_sites(source_dir: Path = SOURCE) -> list[Site]:
    sites = []
    for module in MODULES:
        source = (source_dir / module).read_text()
        tree = ast.parse(source)
        for operator in OPERATORS:
            for i, node in enumerate(_candidates(tree, operator)):
                sites.append(Site(module, operator, i, getattr(node, "lineno", 0), _segment(source, node)))
    return sites


def apply(site: Site, source_dir: Path, target_dir: Path) -> str:
    """Write the mutant of *site* into *target_dir* (a copy of the registry); return the mutated line."""
    source = (source_dir / site.module).read_text()
    tree = ast.parse(source)
    node = _candidates(tree, site.operator)[site.index]
    before = ast.dump(tree)
    _mutate(node, site.operator, tree)
    if ast.dump(tree) == before:
        raise ValueError("the mutation changed nothing")
    (target_dir / site.module).write_text(ast.unparse(tree) + "\n")
    if site.operator in ("delete_statement",):
        return "pass"
    if site.operator == "drop_lock":
        return "(the body without the lock)"
    if site.operator == "return_early":
        return f"return None at the start of {getattr(node, 'name', '?')}()"
    return ast.unparse(node).splitlines()[0][:100]


#: Put on PYTHONPATH for the reach run: records every function of registry/ first called in any process (test process
#: and workers; written as it is first seen, so a worker that ends with os._exit has already written it).
_REACH_HOOK = """
import os, sys, threading
_out, _root = os.environ.get("ORCH_POWER_REACH"), os.environ.get("ORCH_POWER_ROOT", "") + "/registry/"
if _out:
    _seen = set()
    def _profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(_root):
            code = frame.f_code
            if (code.co_filename, code.co_firstlineno) not in _seen:
                _seen.add((code.co_filename, code.co_firstlineno))
                with open(os.path.join(_out, str(os.getpid())), "a") as fh:
                    fh.write(code.co_filename[len(_root):] + ":" + str(code.co_firstlineno) + "\\n")
    sys.setprofile(_profile)
    threading.setprofile(_profile)
"""


def reach(source: Path, pytest_orch: Path, timeout: float) -> set[tuple[str, int]]:
    """(module, first line) of every function of *source* the suite calls, in any process, on the unmutated copy."""
    root = Path(tempfile.mkdtemp(prefix="reach-", dir=source.parent.parent))
    shutil.copytree(source, root / "registry")
    (root / "pytest_orch").symlink_to(pytest_orch)
    (root / "sitecustomize.py").write_text(_REACH_HOOK)
    out = root / "reach"
    out.mkdir()
    outcome, *_ = run_suite(root, timeout, root / "reach.log",
                            {"ORCH_POWER_REACH": str(out), "ORCH_POWER_ROOT": str(root)})
    if outcome != "survived":
        raise RuntimeError(f"the reach run of the unmutated copy ended {outcome}: see {root / 'reach.log'}")
    reached = set()
    for f in out.iterdir():
        for line in f.read_text().split():
            module, _, first = line.rpartition(":")
            reached.add((module, int(first)))
    return reached


def enclosing_function(source: str, line: int) -> tuple[str, int] | None:
    """(name, first line) of the innermost function around *line* (first line: its first decorator's), or None at
    module level."""
    best: tuple[str, int] | None = None
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno <= line <= (node.end_lineno or 0):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if best is None or first >= best[1]:
                best = (node.name, first)
    return best


_KIND = re.compile(r"^(?:E\s+)?\s*\[([a-z_]+)\]", re.MULTILINE)  # a report's line, in pytest's "E   " or not
_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def _kill_tmux(tmp: Path) -> None:
    """End the private tmux servers the suite started under *tmp* (their sockets live there)."""
    for sock in tmp.rglob("*"):
        with contextlib.suppress(OSError):
            if sock.is_socket():
                subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True, timeout=10)


def run_suite(mutant_root: Path, timeout: float, log: Path | None = None,
              extra_env: dict[str, str] | None = None) -> tuple[str, float, str, list[str], str]:
    """Run the suite against the registry under *mutant_root*; (outcome, seconds, test, kinds, detail)."""
    run_dir = mutant_root / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "pytest.ini").write_text("[pytest]\n")
    # A short TMPDIR of its own: the suite's private tmux sockets live under it (a socket path has 107 bytes at most),
    # and the servers a killed run leaves are found there.
    tmp = Path(tempfile.mkdtemp(prefix="opw-", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": str(mutant_root), "TMPDIR": str(tmp), **(extra_env or {})}
    env.pop("ORCH_SEED", None)
    probe = subprocess.run([sys.executable, "-c", "import registry, registry.ops, pytest_orch.plugin;"
                            " print(registry.__file__, pytest_orch.__file__)"],
                           cwd=run_dir, env=env, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return "invalid", 0.0, "", [], (probe.stderr.strip().splitlines() or ["?"])[-1][:200]
    if not all(p.startswith(str(mutant_root)) for p in probe.stdout.split()):
        raise RuntimeError(f"the mutant is not what gets imported: {probe.stdout.strip()}")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *SUITE_ARGS], cwd=run_dir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        _kill_tmux(tmp)
        return "timeout", time.monotonic() - start, "", [], f"ran past {timeout:.0f} s"
    finally:
        _kill_tmux(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - start
    if log is not None:
        log.write_text(out)
    if proc.returncode == 0:
        return "survived", seconds, "", [], ""
    failed = _FAILED.findall(out)
    test = failed[0].split("::", 1)[-1] if failed else f"exit {proc.returncode}"
    kinds = sorted(set(_KIND.findall(out)))
    errors = [ln[1:].strip() for ln in out.splitlines() if ln.startswith("E ") and ln[1:].strip()]
    # The first problem of the report (or the first error line): what killed it, to read.
    first = next((ln for ln in errors if _KIND.match(ln)), errors[0] if errors else out.strip().splitlines()[-1])
    detail = first[:240]
    return "killed", seconds, test, kinds, detail


def _mutant_dir(base: Path, site: Site, source: Path) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"mut-{site.module[:-3]}-{site.operator}-", dir=base))
    shutil.copytree(source, root / "registry", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def sample(n: int, seed: int, only: str | None = None, source: Path = SOURCE) -> list[Site]:
    sites = all_sites(source)
    if only:
        sites = [s for s in sites if only in f"{s.module}:{s.operator}:{s.index}"]
    rng = random.Random(seed)
    return rng.sample(sites, min(n, len(sites)))


#: Survivors argued equivalent through the adapter contract, or named as gaps; keyed by module, function, operator
#: and the original text of the site, so a verdict follows its site when lines move.
VERDICTS: dict[tuple[str, str, str, str], tuple[str, str]] = {
    ("locking.py", "open_lock_file", "delete_statement", "os.close(fd)"):
        ("equivalent", "an fd leaked on the way to UnsafePath when the lock file is not a regular file: the suite"
                       " never plants one (the chaos tests do), and the error raised is the same"),
    ("locking.py", "open_lock_file", "delete_statement", "raise"):
        ("equivalent", "a lock whose directory is missing (an unknown task) raises UnsafePath instead of"
                       " FileNotFoundError: the suite never addresses a task that does not exist"),
    ("groupcommit.py", "_read_json", "return_early", "def _read_json(path: Path) -> Any:"):
        ("equivalent", "performance only: no queued request is readable, so none joins a batch and each waiter"
                       " takes the lock and writes its own update; group commit degenerates to one write per update"),
    ("store.py", "parse", "number_plus_one", "1"):
        ("equivalent", "only a message: the line or column named in the error about an undecodable registry file,"
                       " which the suite never plants"),
    ("locking.py", "", "number_plus_one", "0.005"):
        ("equivalent", "performance only: POLL_MAX, the longest sleep between two tries of a polled lock wait"),
    ("locking.py", "_alarm_is_free", "flip_compare", "signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)"):
        ("equivalent", "performance only: chooses the polling wait over the alarm-bounded blocking flock; both"
                       " take the same exclusive lock within the same timeout"),
    # The run of seed 1 at 7c5335c (80 mutants): every survivor the suite reaches, argued one by one.
    ('groupcommit.py', '_post', 'return_early',     'def _post(queue: Path, token: str, data: bytes) -> bool:'):
        ('equivalent', "performance only: no outcome goes down a waiter's FIFO, so every outcome is written to <token>.res and the "  # noqa: E501 - the site's source, verbatim
                       'waiter finds it at its next poll instead of being woken'),
    ('locking.py', '_wait_with_alarm', 'flip_bool',     'False'):
        ('equivalent', 'unobservable: re-arms the alarm handler for the one statement before the timer is cancelled (the inner '  # noqa: E501 - the site's source, verbatim
                       "finally has already disarmed it); an alarm landing exactly there is beyond any test's aim"),
    ('model.py', 'global_violations', 'delete_statement',     'out.append(Violation("global_count_drift",'):
        ('equivalent', "the reference's own health check: heal-at-open acts only on violations that name a task, and "
                       'global_count_drift names none; only `orch-registry check` prints it'),
    ('store.py', '_replace', 'delete_statement',     'os.fsync(fd)'):
        ('equivalent', 'not reachable through the adapter: the fsync matters only when the machine loses power; the harness kills '  # noqa: E501 - the site's source, verbatim
                       'processes, whose writes the page cache keeps'),
    ('ops.py', '_update_batch', 'delete_statement',
     'for request in changed:  # the task registry holds them; the global registry is healed later'):
        ('equivalent', 'an error path only a failing disk reaches (the task write succeeded and the global write failed); the suite '  # noqa: E501 - the site's source, verbatim
                       'injects no disk faults (tests/test_chaos_disk.py does)'),
    ('locking.py', 'open_lock_file', 'delete_statement',     'if not stat.S_ISDIR(os.lstat(path.parent).st_mode):'):
        ('equivalent', 'a guard against a hostile file (a task directory replaced by a symlink or a file), which the suite never '  # noqa: E501 - the site's source, verbatim
                       'plants (tests/test_hostile.py does)'),
    ('groupcommit.py', '_wait', 'number_plus_one',     '0'):
        ('equivalent', 'timing only: a waiter whose lock timeout is under a second polls at POLL instead of its remaining time, so '  # noqa: E501 - the site's source, verbatim
                       'its LockTimeout may come up to POLL later'),
    ('model.py', 'global_violations', 'delete_statement',
     'if agent_id not in seen and (complete or have.get("task_id") in tasks):'):
        ('equivalent', "the reference's own health check: the global registry never holds an agent its task lacks (the task is "  # noqa: E501 - the site's source, verbatim
                       'written first), so neither heal-at-open nor the suite can meet one'),
    ('model.py', 'task_shape_problems', 'delete_statement',
     'problems.append(f"\'task_id\' is {doc[\'task_id\']!r}, but the file is the registry of task {task_id} (t'):
        ('equivalent', "only a hand-edited file: a task document whose task_id is not its directory's name, which no operation "  # noqa: E501 - the site's source, verbatim
                       'writes'),
    ('ops.py', '__init__', 'flip_compare',     'keep != archive.UNSET'):
        ('equivalent', 'with ORCH_ARCHIVE_AFTER unset every terminal agent is archived at once, as ORCH_ARCHIVE_AFTER=0 does (a '  # noqa: E501 - the site's source, verbatim
                       'setting the reference supports; tests/test_archive.py and the crash-point tests run with it): read_global '  # noqa: E501 - the site's source, verbatim
                       'folds the archive back in, so the documents are the same'),
    ('groupcommit.py', '_claim', 'negate_if',
     'if not isinstance(payload, dict):  # not ours to understand: leave it out of the batch'):
        ('equivalent', 'performance only: every real request is dropped from the batch, so each waiter gets the lock and applies its'  # noqa: E501 - the site's source, verbatim
                       ' own update'),
    ('model.py', 'global_shape_problems', 'delete_statement',     'return problems'):
        ('equivalent', 'only a malformed global registry: the shape check finds nothing, and the suite plants no malformed file (the'  # noqa: E501 - the site's source, verbatim
                       ' chaos and hostile tests do)'),
    ('model.py', '', 'flip_compare',     'v is None'):
        ('equivalent', 'only a malformed global registry: a global view with a null task_id is refused instead of a string one, and '  # noqa: E501 - the site's source, verbatim
                       'operations write only strings'),
    ('ops.py', 'create_task', 'delete_statement',     'if file.path.exists():'):
        ('equivalent', 'the same check runs again under the lock, and the adapter never names a task id'),
    ('sessions.py', 'alive', 'delete_statement',     'time.sleep(0.02)'):
        ('equivalent', 'timing only: the pause before asking an exiting tmux server again'),
    ('store.py', 'crash_point', 'delete_statement',     '_crash_hook(point, path)'):
        ('equivalent', 'the crash-point hook of the chaos tests, never installed in a suite run'),
    ('ops.py', '_read_global', 'flip_bool',     'False'):
        ('equivalent', 'performance only: a writer reads the global registry with its archive folded in and writes it back whole, '  # noqa: E501 - the site's source, verbatim
                       'and the next compaction archives the same agents again; read_global returns the same document (and no suite '  # noqa: E501 - the site's source, verbatim
                       'workspace reaches ORCH_ARCHIVE_AFTER)'),
    ('model.py', 'global_violations', 'flip_arith',
     'f"the global registry has agent {agent_id} with " + ", ".join(diffs)'):
        ('equivalent', 'only a message'),
    ('groupcommit.py', '_claim', 'delete_statement',     'claimed.unlink()'):
        ('equivalent', 'only a foreign file in the queue (a payload that is not an object), which no registry process writes'),  # noqa: E501 - the site's source, verbatim
    ('store.py', '_replace', 'delete_statement',     'raise self._failed(exc, replaced) from exc'):
        ('equivalent', 'an error path only a failing disk reaches (the write or rename failed)'),
    ('model.py', 'is_valid_name', 'delete_statement',
     'return isinstance(value, str) and 0 < len(value) <= MAX_NAME and _SAFE_NAME.fullmatch(value) is not '):
        ('gap', 'task_ids() finds no task, which turns off heal-at-open (and the refusal to start a new global registry over '  # noqa: E501 - the site's source, verbatim
                "existing tasks): only a process killed between a task's two writes, as that task's last write, leaves "
                'anything to heal; the suite does not provoke it even under --orch-chaos=sigkill (2 of 2 runs passed)'),
    ('groupcommit.py', 'promise', 'flip_bool',     'True'):
        ('equivalent', 'without crashes the batch record is left behind and overwritten by the next batch; recovery matches a record'  # noqa: E501 - the site's source, verbatim
                       " by the checksum of the file's bytes, so a stale one is never taken for a current one"),
    ('ops.py', 'kill', 'flip_boolop',     'not killed or exc.applied is not False'):
        ('equivalent', 'an error path only a failing disk reaches (the write of a kill failed)'),
    ('groupcommit.py', '_wait', 'negate_if',
     'if not usable(queue):  # a stray where the queue belongs: wait for the lock itself'):
        ('equivalent', 'performance only: with a usable queue a waiter waits for the lock itself instead of queueing (what a stray '  # noqa: E501 - the site's source, verbatim
                       'queue makes it do)'),
    ('groupcommit.py', 'submit', 'delete_statement',     '_ring_waiting(queue)'):
        ('equivalent', 'performance only: queued waiters are not woken when the lock comes free; they take it at their next poll'),  # noqa: E501 - the site's source, verbatim
    ('store.py', 'write_bytes', 'delete_statement',     'io_stats.writes += 1'):
        ('equivalent', "only the benchmarks' write counter"),
    ('groupcommit.py', '_lead', 'delete_statement',     'break'):
        ('equivalent', 'performance only: the leader tries its MORE_BATCHES extra batches even when the queue is empty'),  # noqa: E501 - the site's source, verbatim
    ('ops.py', 'create_task', 'delete_statement',     '_text("priority", priority)'):
        ('equivalent', 'the adapter never passes a priority (the default is valid)'),
    ('ops.py', '_finish', 'delete_statement',     'agent["completed_at"] = stamp'):
        ('equivalent', 'a field the contract does not define (completed_at); no rule of the spec reads it'),
    ('model.py', '_agent_ok', 'flip_bool',     'False'):
        ('equivalent', 'only a malformed agent record passes the fast shape check; operations write none, and the suite plants none'),  # noqa: E501 - the site's source, verbatim
    ('model.py', '_skip_archived', 'delete_statement',     'return'):
        ('equivalent', "performance only: with no agent archived the archive's ids are read for nothing"),
    ('model.py', '_agent_ok', 'delete_statement',     'return True'):
        ('equivalent', 'performance only: the fast shape check says no and the slow one, which builds the messages, finds nothing'),  # noqa: E501 - the site's source, verbatim
    ('groupcommit.py', '_put', 'delete_statement',
     '_write(queue / f"{request.token}.req", orjson.dumps(request.payload))'):
        ('equivalent', 'performance only: the request is not queued, so the waiter applies it itself once it has the lock'),  # noqa: E501 - the site's source, verbatim
}


def verdict_of(site: Site) -> tuple[str, str]:
    """("equivalent" or "gap", why); a site in a function the suite never calls is equivalent by default."""
    verdict = VERDICTS.get((site.module, site.function, site.operator, site.before))
    if verdict is not None:
        return verdict
    if not site.reached:
        return "equivalent", f"not reached: the suite never calls {site.function}()"
    return "unclassified", ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=80)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per suite run")
    parser.add_argument("--only", help="only sites whose module:operator:index contains this")
    parser.add_argument("--keep", action="store_true", help="keep the mutant copies and logs")
    parser.add_argument("--out", type=Path, default=REPORT)
    parser.add_argument("--render", type=Path, nargs="+",
                        help="merge saved reports (shards) into --out with the current VERDICTS; run nothing")
    parser.add_argument("--shard", help="i/n: run every n-th mutant of the sample from the i-th (1-based), to run n"
                                        " processes side by side, each with its own --out")
    parser.add_argument("--rev", default="HEAD", help="the commit whose registry/ and pytest_orch/ are measured")
    args = parser.parse_args(argv)
    if args.render:
        parts = [json.loads(p.read_text()) for p in args.render]
        merged = [Result(**{**{k: v for k, v in r.items() if k != "verdict"}, "site": Site(**r["site"])})
                  for part in parts for r in part["results"]]
        saved = {**parts[0], "shard": None,
                 "summary": summarize(merged),
                 "results": [{**asdict(r), "verdict": verdict_of(r.site)} for r in merged]}
        print(render(saved["summary"], merged))
        args.out.write_text(json.dumps(saved, indent=2) + "\n")
        return 0

    base = Path(tempfile.mkdtemp(prefix="orch-power-"))
    # One snapshot of registry/ and pytest_orch/ for the whole run, from a commit: others may edit the checkout.
    snap = base / "snapshot"
    snap.mkdir()
    revision = subprocess.run(["git", "rev-parse", "--short", args.rev], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", args.rev, "registry", "pytest_orch"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
    source = snap / "registry"
    sites = sample(args.mutants, args.seed, args.only, source)
    print(f"power: {len(sites)} mutants of {', '.join(MODULES)} of registry/ at {revision} (seed {args.seed});"
          f" copies under {base}", flush=True)
    # The baseline: the unmutated copy must pass, and it records which functions the suite reaches.
    start = time.monotonic()
    try:
        reached = reach(source, snap / "pytest_orch", args.timeout)
    except RuntimeError as exc:
        print(f"the suite fails the unmutated registry, no figure can be measured: {exc}", file=sys.stderr)
        return 2
    print(f"baseline (unmutated copy, profiled): passed in {time.monotonic() - start:.0f} s, reaching"
          f" {len(reached)} functions", flush=True)
    for site in sites:
        fn = enclosing_function((source / site.module).read_text(), site.line)
        site.function = fn[0] if fn else ""
        site.reached = fn is None or (site.module, fn[1]) in reached
    # Reached sites first: if the run is cut short, what is left are mutants of functions the suite never calls.
    sites.sort(key=lambda site: not site.reached)
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        sites = sites[i - 1::n]
    results: list[Result] = []

    def save() -> dict[str, Any]:
        summary = summarize(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seed": args.seed, "mutants": args.mutants, "shard": args.shard,
                                        "registry": revision, "modules": MODULES, "summary": summary,
                                        "results": [{**asdict(r), "verdict": verdict_of(r.site)} for r in results]},
                                       indent=2) + "\n")
        return summary

    for k, site in enumerate(sites, 1):
        root = _mutant_dir(base, site, source)
        (root / "pytest_orch").symlink_to(snap / "pytest_orch")
        try:
            site.after = apply(site, source, root / "registry")
        except Exception as exc:  # a mutation that cannot be written is invalid, not killed
            results.append(Result(site, "invalid", 0.0, detail=f"{type(exc).__name__}: {exc}"))
            continue
        outcome, seconds, test, kinds, detail = run_suite(root, args.timeout, root / "suite.log")
        runs = 1
        if outcome == "survived" and site.reached:  # races: a second chance (none for a function never called)
            outcome, more, test, kinds, detail = run_suite(root, args.timeout, root / "suite2.log")
            seconds += more
            runs = 2
        result = Result(site, outcome, seconds, test, kinds, runs, detail)
        results.append(result)
        print(f"[{k:3}/{len(sites)}] {outcome:8} {seconds:5.0f} s  {site.module}:{site.line}"
              f" {site.function or '<module>'}{'' if site.reached else ' (unreached)'} {site.operator}: "
              f"{site.before!r} -> {site.after!r}  {test} {' '.join(kinds)} {detail}", flush=True)
        save()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    print(render(save(), results))
    print(f"written: {args.out}")
    return 0


def summarize(results: list[Result]) -> dict[str, Any]:
    count = {o: sum(r.outcome == o for r in results) for o in ("killed", "timeout", "invalid", "survived")}
    equivalent = sum(r.outcome == "survived" and verdict_of(r.site)[0] == "equivalent" for r in results)
    changing = count["killed"] + count["timeout"] + count["survived"] - equivalent
    by_test: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for r in results:
        if r.outcome == "killed":
            by_test[r.test] = by_test.get(r.test, 0) + 1
            for kind in r.kinds or _KIND.findall(r.detail) or ["(no problem kind: " + (r.detail.split(":")[0] or "?")
                                                              + ")"]:
                by_kind[kind] = by_kind.get(kind, 0) + 1
    killed = count["killed"] + count["timeout"]
    return {"sampled": len(results), **count, "equivalent": equivalent, "behaviour_changing": changing,
            "kill_rate": round(killed / changing, 4) if changing else None,
            "raw_kill_rate": round(killed / (killed + count["survived"]), 4) if killed + count["survived"] else None,
            "by_test": dict(sorted(by_test.items(), key=lambda kv: -kv[1])),
            "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))}


def render(summary: dict[str, Any], results: list[Result]) -> str:
    lines = ["", "harness power", "-------------",
             f"mutants sampled      {summary['sampled']}",
             f"invalid (no import)  {summary['invalid']}",
             f"killed               {summary['killed']}",
             f"killed by timeout    {summary['timeout']}",
             f"survived             {summary['survived']} ({summary['equivalent']} argued equivalent)",
             f"behaviour-changing   {summary['behaviour_changing']}",
             f"kill rate            {summary['kill_rate']:.1%} of behaviour-changing mutants" if summary['kill_rate']
             is not None else "kill rate            n/a",
             "", "killed by (first failing test):"]
    lines += [f"  {n:3}  {test}" for test, n in summary["by_test"].items()]
    lines += ["", "problem kinds in those reports:"]
    lines += [f"  {n:3}  {kind}" for kind, n in summary["by_kind"].items()]
    survivors = [r for r in results if r.outcome == "survived"]
    lines += ["", f"survivors ({len(survivors)}):",
              "| site | function | mutation | verdict | why |", "| --- | --- | --- | --- | --- |"]
    for r in survivors:
        verdict, why = verdict_of(r.site)
        lines.append(f"| `{r.site.module}:{r.site.line}` | `{r.site.function or '<module>'}` | {r.site.operator}:"
                     f" `{r.site.before}` -> `{r.site.after}` | {verdict} | {why} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
