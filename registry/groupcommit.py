"""Group commit: whoever holds a registry's lock applies every queued request in one durable write.

A durable replace costs about as much as everything else in an update together (an fsync of the file and one of its
directory), and it happens under the lock, so writers that each do their own replace queue up behind each other's
fsyncs: ten processes did no more than one.  Here a writer that finds the lock taken leaves its request in the
queue directory beside the file (``<dir>/.<name>.queue/``) and waits on a FIFO of its own (``<token>.fifo``),
trying the lock again every POLL seconds and whenever it is woken.  The holder of the lock applies its own request
and every queued one to the document it read, writes the document once, and writes each waiter its outcome down its
FIFO (or to ``<token>.res`` when it does not fit one atomic pipe write); it leads a few more batches while requests
keep coming, and when it lets go of the lock it wakes the waiters still queued, one of which leads next.  A writer
that gets the lock at once queues nothing, so a lone process pays a ``listdir`` or two for all this.

Every request is applied exactly once, or not at all, whoever dies when:

* A request is *claimed* (renamed ``.req`` -> ``.claimed``) by the leader before it is applied.  A waiter that gives
  up (LockTimeout) withdraws its request by unlinking the ``.req``: if that fails the request was claimed, and the
  waiter says its outcome is unknown instead of "not applied".
* Before the durable write the leader saves the batch's outcomes together with the SHA-256 of the bytes it is about
  to write (``batch``), and after the write it delivers them and removes the claims and ``batch``.
* If the leader dies part way, the lock goes with it, and the next holder of the lock (any writer of the file:
  :meth:`registry.store.JsonFile.locked` runs :func:`recover`) looks at the file before anything else can change it.
  If it holds the bytes ``batch`` promised, the batch committed and its outcomes are delivered; otherwise nothing of
  it reached the file, and its claimed requests go back to the queue.

A request whose process has died before it was claimed is dropped (its caller never saw an outcome, so not applying
it is a legal outcome); so are the leftovers of dead processes.  All queue files are small JSON, written to a temp
name and renamed, never fsynced: they matter only while their processes live, and the registry itself is durable.
A request from another process is data, never code: the operation checks it again before applying it.

The queue directory is never followed through a symlink.  When something else is where it belongs (a symlink, a
stray regular file), group commit stands aside: a writer that finds the lock taken waits for the lock itself, as
it would without group commit, and nothing is queued, claimed or recovered there; ``orch-registry check`` reports
the stray.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import select
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import errors
from .errors import LockTimeout, RegistryError

if TYPE_CHECKING:
    from .store import JsonFile

__all__ = ["Batch", "Request", "queue_dir", "recover", "stale_queue_files", "submit"]

BATCH = "batch"
#: Seconds a waiter sleeps at most between looks at its outcome and the lock, when no leader wakes it.
POLL = 0.005
#: Batches a leader runs after its own, while requests keep arriving, before it lets go of the lock.
MORE_BATCHES = 4


def queue_dir(path: Path) -> Path:
    """The queue directory of the registry file *path*."""
    return path.with_name(f".{path.name}.queue")


@dataclass
class Request:
    """One queued operation: its token (``<pid>.<hex>``) and what the operation needs (JSON)."""

    token: str
    payload: dict[str, Any]


@dataclass
class Batch:
    """The requests a leader applies together, its own first, and their outcomes as it records them."""

    requests: list[Request]
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The errors themselves, so that the leader raises its own with its traceback.
    errors: dict[str, RegistryError] = field(default_factory=dict)

    def succeed(self, request: Request, value: Any) -> None:
        self.outcomes[request.token] = {"ok": value}
        self.errors.pop(request.token, None)

    def fail(self, request: Request, error: RegistryError) -> None:
        self.outcomes[request.token] = {"error": _encode_error(error)}
        self.errors[request.token] = error


Lead = Callable[[Batch, Callable[[bytes], None]], None]


def submit(file: JsonFile, payload: dict[str, Any], lead: Lead, timeout: float | None = None) -> Any:
    """Apply one request to *file* under its lock, batched with whatever else is queued; return its outcome.

    ``lead(batch, promise)`` runs with the lock held: it reads the file, applies each request of *batch* to the
    document recording an outcome for each (``batch.succeed`` / ``batch.fail``), calls ``promise(data)`` with the
    bytes it is about to write, and writes them.  It may raise: the error is then every request's outcome.  What
    ``submit`` returns or raises is this request's outcome.  *timeout* bounds the wait for the lock (None: the
    file's own, < 0: forever); LockTimeout when it passes.
    """
    mine = Request(f"{os.getpid()}.{secrets.token_hex(6)}", payload)
    queue = queue_dir(file.path)
    timeout = file.lock_timeout if timeout is None else timeout  # checked on every call, not only when contended
    try:
        with contextlib.ExitStack() as stack:
            outcome = None if _try_lock(file, stack) else _wait(file, queue, mine, stack, timeout)
            if outcome is None:
                return _lead(queue, mine, lead)
    finally:
        _ring_waiting(queue)  # the lock is free now: wake whoever queued after the last batch was claimed
    return _unwrap(outcome)


def usable(queue: Path) -> bool:
    """Whether *queue* is a real directory, or missing (then it is created when needed)."""
    try:
        return stat.S_ISDIR(os.lstat(queue).st_mode)
    except FileNotFoundError:
        return True


def _names(queue: Path) -> list[str]:
    """The entries of the queue directory; none when it is missing, or not a real directory."""
    try:
        fd = os.open(queue, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # missing (ENOENT), a stray file (ENOTDIR), a symlink (ELOOP): nothing queued here
        return []
    try:
        return os.listdir(fd)  # noqa: PTH208 (by descriptor: the directory opened without following a link)
    finally:
        os.close(fd)


def _try_lock(file: JsonFile, stack: contextlib.ExitStack) -> bool:
    try:
        stack.enter_context(file.locked(0))
    except LockTimeout:
        return False
    return True


def _wait(file: JsonFile, queue: Path, mine: Request, stack: contextlib.ExitStack,
          timeout: float | None) -> dict[str, Any] | None:
    """Queue *mine* and wait until a leader delivers its outcome (returned), or the lock is had (None: lead)."""
    if not usable(queue):  # a stray where the queue belongs: wait for the lock itself
        stack.enter_context(file.locked(timeout))
        return None
    wait = file.lock_timeout if timeout is None else timeout
    deadline = time.monotonic() + wait
    with _Mailbox(queue, mine.token) as mailbox:
        _put(queue, mine)
        delivered = None
        while True:
            delivered = delivered or _take(queue, mine.token)
            if delivered is not None:
                return delivered
            if _try_lock(file, stack):
                delivered = mailbox.wait(0) or _take(queue, mine.token)  # delivered just before the lock came free
                if delivered is not None:
                    return delivered
                with contextlib.suppress(FileNotFoundError):
                    (queue / f"{mine.token}.req").unlink()
                return None
            remaining = deadline - time.monotonic()
            if wait >= 0 and remaining <= 0:
                return _withdraw(queue, mine, file.timed_out(wait), mailbox)
            delivered = mailbox.wait(POLL if wait < 0 else min(POLL, remaining))


def _lead(queue: Path, mine: Request, lead: Lead) -> Any:
    """Lead a batch of *mine* and everything queued, then up to MORE_BATCHES batches of what queued meanwhile.

    Returns this request's result or raises its error.
    """
    batch = _batch(queue, [mine], lead)
    for _ in range(MORE_BATCHES):
        try:
            if not _batch(queue, [], lead).requests:
                break
        except RegistryError:  # delivered to that batch's requests; this request's outcome is in hand
            break
    if mine.token in batch.errors:
        raise batch.errors[mine.token]
    return batch.outcomes[mine.token]["ok"]


def _batch(queue: Path, mine: list[Request], lead: Lead) -> Batch:
    """Apply *mine* and every claimable request in one call of *lead*; deliver the others' outcomes."""
    others = _claim(queue)
    batch = Batch([*mine, *others])
    if not batch.requests:
        return batch
    promised = False

    def promise(data: bytes) -> None:
        nonlocal promised
        if others:
            _write(queue / BATCH, orjson.dumps({"sha256": _sha(data), "outcomes": {
                r.token: batch.outcomes[r.token] for r in others}}))
            promised = True

    try:
        lead(batch, promise)
    except RegistryError as exc:
        for request in others:
            batch.fail(request, exc)
        _deliver(queue, others, batch.outcomes, promised)
        raise
    except BaseException:
        if not promised:  # nothing written: back to the queue for the next holder of the lock
            _unclaim(queue, others)
        raise  # else recover() decides from the file, once this process has let go of the lock
    _deliver(queue, others, batch.outcomes, promised)
    return batch


def recover(path: Path, current: Callable[[], bytes | None]) -> None:
    """Finish or undo the batch of a leader that died holding the lock on *path*.  The caller holds the lock.

    *current* reads the file's bytes (None if it is missing).  Cheap when there is nothing to do: one failed stat.
    """
    queue = queue_dir(path)
    claimed = [Request(n[:-len(".claimed")], {}) for n in _names(queue) if n.endswith(".claimed")]
    if not claimed:
        return
    record = _read_json(queue / BATCH)
    data = current()
    if record is not None and data is not None and record.get("sha256") == _sha(data):
        outcomes = record.get("outcomes", {})
        done = [r for r in claimed if r.token in outcomes]
        _deliver(queue, done, outcomes, record=False)
        _unclaim(queue, [r for r in claimed if r.token not in outcomes])
    else:
        _unclaim(queue, claimed)
    with contextlib.suppress(FileNotFoundError):
        (queue / BATCH).unlink()


def stale_queue_files(path: Path) -> list[Path]:
    """Queue files of *path* whose process is gone (leftovers of crashes; ``orch-registry repair`` removes them)."""
    queue = queue_dir(path)
    names = _names(queue)
    claims = any(n.endswith(".claimed") for n in names)
    return sorted(queue / n for n in names if (not claims if n == BATCH else not _alive(n)))


# -- the queue directory ----------------------------------------------------------------------------------------------


def _put(queue: Path, request: Request) -> None:
    try:
        _write(queue / f"{request.token}.req", orjson.dumps(request.payload))
    except FileNotFoundError:
        queue.mkdir(exist_ok=True)
        _write(queue / f"{request.token}.req", orjson.dumps(request.payload))


def _claim(queue: Path) -> list[Request]:
    """Claim every request waiting in *queue*, oldest first; drop those of dead processes and other leftovers."""
    found = []
    for name in _names(queue):
        if name == BATCH:
            continue
        path = queue / name
        if not _alive(name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        if not name.endswith(".req"):
            continue
        claimed = path.with_suffix(".claimed")
        try:
            path.rename(claimed)
        except FileNotFoundError:  # withdrawn just now
            continue
        payload = _read_json(claimed)
        if not isinstance(payload, dict):  # not ours to understand: leave it out of the batch
            claimed.unlink()
            continue
        found.append((claimed.stat().st_mtime_ns, Request(name[:-len(".req")], payload)))
    return [request for _, request in sorted(found, key=lambda f: f[0])]


def _unclaim(queue: Path, requests: list[Request]) -> None:
    for request in requests:
        with contextlib.suppress(FileNotFoundError):
            (queue / f"{request.token}.claimed").rename(queue / f"{request.token}.req")


def _deliver(queue: Path, requests: list[Request], outcomes: dict[str, Any], record: bool) -> None:
    """Give each request its outcome and drop its claim; then remove the batch *record* if there is one.

    The outcome goes down the waiter's mailbox when it fits in one atomic pipe write, else (or when no one is
    listening: a waiter that died, or one of the tests' hand-made requests) into ``<token>.res``.
    """
    for request in requests:
        data = orjson.dumps(outcomes[request.token])
        if not (len(data) < select.PIPE_BUF and _post(queue, request.token, data + b"\n")):
            _write(queue / f"{request.token}.res", data)
            _post(queue, request.token, b"\0")
        with contextlib.suppress(FileNotFoundError):
            (queue / f"{request.token}.claimed").unlink()
    if record:
        with contextlib.suppress(FileNotFoundError):
            (queue / BATCH).unlink()


class _Mailbox:
    """A waiter's FIFO, ``<token>.fifo``: a leader writes the outcome to it as one line of JSON, or a NUL byte to
    say "look at the lock, or at ``<token>.res``".

    The waiter holds a write end of its own too, so that the read end never reports end-of-file, only bytes.
    Writes of less than PIPE_BUF bytes are atomic, so a line is never torn, and JSON holds no NUL byte.
    """

    def __init__(self, queue: Path, token: str) -> None:
        self.path = queue / f"{token}.fifo"
        self.received = b""

    def __enter__(self) -> _Mailbox:
        try:
            os.mkfifo(self.path)
        except FileNotFoundError:
            self.path.parent.mkdir(exist_ok=True)
            os.mkfifo(self.path)
        self.read_fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.write_fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        self.poll = select.poll()
        self.poll.register(self.read_fd, select.POLLIN)
        return self

    def wait(self, seconds: float) -> dict[str, Any] | None:
        """Wait up to *seconds* for a word from a leader; return the outcome if that is what came."""
        if self.poll.poll(max(seconds, 0) * 1000):
            with contextlib.suppress(BlockingIOError):
                self.received += os.read(self.read_fd, 65536)
        line, newline, _ = self.received.replace(b"\0", b"").partition(b"\n")
        if not newline:
            return None
        outcome: dict[str, Any] = orjson.loads(line)
        return outcome

    def __exit__(self, *exc: object) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _post(queue: Path, token: str, data: bytes) -> bool:
    """Write *data* to the mailbox of *token* in one write; False if no one is listening there."""
    try:
        fd = os.open(queue / f"{token}.fifo", os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no such waiter (ENOENT), or no one reading (ENXIO)
        return False
    try:
        return os.write(fd, data) == len(data)
    except OSError:  # the pipe is full: a NUL byte to a mailbox full of them changes nothing
        return False
    finally:
        os.close(fd)


def _ring_waiting(queue: Path) -> None:
    """Wake every waiter whose request is still queued, unclaimed."""
    for name in _names(queue):
        if name.endswith(".req"):
            _post(queue, name[:-len(".req")], b"\0")


def _take(queue: Path, token: str) -> dict[str, Any] | None:
    """This request's outcome if a leader delivered it (and remove it), else None."""
    path = queue / f"{token}.res"
    outcome = _read_json(path)
    if outcome is None:
        return None
    path.unlink()
    return outcome  # type: ignore[no-any-return]


def _withdraw(queue: Path, mine: Request, exc: LockTimeout, mailbox: _Mailbox | None = None) -> dict[str, Any]:
    """The lock did not come in time: take the request back, or say that its outcome is unknown.

    Returns the outcome if it was delivered after all.
    """
    try:
        (queue / f"{mine.token}.req").unlink()
    except FileNotFoundError:
        delivered = (mailbox.wait(0) if mailbox is not None else None) or _take(queue, mine.token)
        if delivered is not None:
            return delivered
        raise LockTimeout(f"{exc} The request had already been taken by the process holding the lock, which may"
                          " or may not have applied it.", path=exc.path, timeout=exc.timeout, applied=None) from exc
    raise exc


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    tmp.rename(path)


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return orjson.loads(fh.read())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError:
        return None


def _alive(name: str) -> bool:
    """Whether the process that wrote queue file *name* (``<pid>.<hex>.<kind>``) is alive."""
    try:
        os.kill(int(name.split(".", 1)[0]), 0)
    except ValueError:
        return False
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- outcomes ---------------------------------------------------------------------------------------------------------


def _encode_error(error: RegistryError) -> dict[str, Any]:
    details = {k: v for k, v in error.details.items() if _jsonable(v)}
    return {"type": type(error).__name__, "message": error.message, "details": details}


def _jsonable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


def _unwrap(outcome: dict[str, Any]) -> Any:
    if "error" in outcome:
        raise _decode_error(outcome["error"])
    return outcome.get("ok")


def _decode_error(encoded: dict[str, Any]) -> RegistryError:
    cls = getattr(errors, str(encoded.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, RegistryError)):
        cls = RegistryError
    return cls(str(encoded.get("message")), **dict(encoded.get("details") or {}))
