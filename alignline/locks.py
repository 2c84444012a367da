"""Run-directory and stage-directory locks: two writers never share a run or a stage directory.

    with run_lock(run_dir):                   # a pipeline or stage flow: the whole run dir, exclusively
        ...
    lock = StageLock(run_dir, "pretrain")     # StageRun (rank 0): the run dir shared, its stage dir exclusively
    ...
    lock.release()                            # StageRun.finalize; or when the object is garbage collected

Lock files live in `<run_dir>/.locks/`: `run.lock` and `<stage>.lock`, taken with `fcntl.flock`. The kernel
drops a flock when its holder exits, however it exits (error, kill -9, OOM killer, power-off of the
holder), so a dead holder never leaves a stale lock that blocks forever: the file stays, the lock goes.
An exclusive holder writes its PID, host, start time and command into the file; whoever is refused
gets a `LockHeld` (a `UserError`: one `error:` line, exit code 2) that names the file and the holder.

Rules:
- a pipeline (`flows.pipeline`) or stage flow holds `run.lock` exclusively while it runs, so a second
  pipeline, stage flow or hand-run stage on the same run dir is refused (`--wait` waits instead);
- a stage (`StageRun`, rank 0) holds `run.lock` shared and `<stage>.lock` exclusively: hand-run stages
  may write different stage dirs of one run dir at once, never the same one, and no pipeline starts
  on a run dir while one of them runs;
- the pipeline's own stages are not refused: in-process stages run in the holder's process (locks are
  re-entrant within a process), subprocess and torchrun stages inherit $ALIGNLINE_RUN_LOCK_TOKEN,
  a random token the holder also wrote into `run.lock`.

flock works on local file systems and on NFSv4; on a file system without it, `LockHeld` is never
raised but nothing else changes.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import itertools
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignline.config import UserError

log = logging.getLogger("alignline.locks")

LOCK_DIR = ".locks"
RUN_LOCK = "run"
TOKEN_ENV = "ALIGNLINE_RUN_LOCK_TOKEN"


class LockHeld(UserError):
    """Another process holds the run or stage directory; the message names the lock file and the holder."""

    def __init__(self, message: str, path: Path, holder: dict[str, Any]):
        super().__init__(message)
        self.path = path
        self.holder = holder


@dataclass
class _Held:
    fd: int
    exclusive: bool
    owners: set[int] = field(default_factory=set)
    token: str | None = None  # run locks: the token children inherit


_HELD: dict[str, _Held] = {}  # lock file (real path) -> this process's open, locked descriptor
_MUTEX = threading.Lock()
_IDS = itertools.count(1)


def lock_path(run_dir: str | Path, name: str = RUN_LOCK) -> Path:
    """`<run_dir>/.locks/<name>.lock` (`name`: "run" or a stage name)."""
    return Path(run_dir) / LOCK_DIR / f"{name}.lock"


def _command() -> str:
    try:
        argv = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        cmd = shlex.join(a.decode(errors="replace") for a in argv)
    except OSError:
        cmd = shlex.join([sys.executable, *sys.argv])
    cmd = " ".join(cmd.split())  # one line, for a one-line message
    return cmd if len(cmd) <= 400 else cmd[:397] + "..."


def holder_info(token: str | None = None) -> dict[str, Any]:
    """What an exclusive holder writes into its lock file."""
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": _command()}
    if token:
        info["token"] = token
    return info


def read_holder(path: Path) -> dict[str, Any]:
    """The holder recorded in a lock file ({} when empty, unreadable or not written yet)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def describe(path: Path, holder: dict[str, Any]) -> str:
    """`<path> is held by pid N on HOST since T (command: ...)`, as far as the file tells."""
    if not holder.get("pid"):
        return f"{path} is held by another process (it has not written its details yet)"
    text = f"{path} is held by pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('started', '?')}"
    if holder.get("command"):
        text += f" (command: {holder['command']})"
    return text


def _stale(holder: dict[str, Any]) -> bool:
    """The recorded holder is a process of this host that has exited (killed before it could clear the file)."""
    return bool(holder.get("pid")) and holder.get("host") == socket.gethostname() and not _pid_alive(holder["pid"])


def _flock(fd: int, exclusive: bool, wait_s: float, on_wait: Callable[[], None] | None = None) -> bool:
    """Lock `fd` (polling, so signals and Ctrl-C stay responsive); False when not free within `wait_s`."""
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        try:
            fcntl.flock(fd, op)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= deadline:
            return False
        if not waited and on_wait is not None:
            on_wait()
        waited = True
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def _write_info(fd: int, info: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)


def _stage_holders(lock_dir: Path) -> list[str]:
    """Descriptions of the stage locks in `lock_dir` that some process holds right now."""
    out = []
    for p in sorted(lock_dir.glob("*.lock")):
        if p.name == f"{RUN_LOCK}.lock":
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _flock(fd, False, 0):
                fcntl.flock(fd, fcntl.LOCK_UN)  # free: nobody writes that stage
                continue
        finally:
            os.close(fd)
        out.append(describe(p, read_holder(p)))
    return out


def _refusal(path: Path, what: str, hint: str) -> LockHeld:
    holder = read_holder(path)
    if path.name == f"{RUN_LOCK}.lock" and (not holder.get("pid") or _stale(holder)):
        # Shared holders (hand-run stages) do not write run.lock; their stage locks say who they are.
        stages = _stage_holders(path.parent)
        if stages:
            return LockHeld(f"{what} is in use by a stage run: " + "; ".join(stages) + f". {hint}", path, holder)
    return LockHeld(f"{what} is in use: {describe(path, holder)}. {hint}", path, holder)


def _acquire(path: Path, exclusive: bool, owner: int, what: str, hint: str, *, wait_s: float = 0.0,
             run: bool = False, on_wait: Callable[[], None] | None = None) -> _Held:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    with _MUTEX:
        held = _HELD.get(key)
        if held is not None:
            # Re-entrant within this process: a pipeline's in-process stage, a re-run after an in-process
            # failure whose StageRun is not collected yet. Shared -> exclusive converts the same descriptor.
            if exclusive and not held.exclusive:
                if not _flock(held.fd, True, 0):
                    raise _refusal(path, what, hint)
                held.exclusive = True
                _write_info(held.fd, holder_info(held.token))
            if run and held.token is None:
                held.token = secrets.token_hex(16)
                _write_info(held.fd, holder_info(held.token))
            held.owners.add(owner)
            return held
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock(fd, exclusive, wait_s, on_wait):
            raise _refusal(path, what, hint)
        held = _Held(fd=fd, exclusive=exclusive, owners={owner}, token=secrets.token_hex(16) if run else None)
        if exclusive:
            _write_info(fd, holder_info(held.token))
    except BaseException:
        os.close(fd)
        raise
    with _MUTEX:
        _HELD[key] = held
    return held


def _release(key: str, owner: int) -> None:
    with _MUTEX:
        held = _HELD.get(key)
        if held is None or owner not in held.owners:
            return
        held.owners.discard(owner)
        if held.owners:
            return
        del _HELD[key]
    try:
        if held.exclusive:
            os.ftruncate(held.fd, 0)  # no stale holder details once it is free
    except OSError as exc:  # cosmetic: the lock is released by the close below either way
        log.debug("could not clear the holder details of %s: %s", key, exc)
    os.close(held.fd)  # closing the descriptor releases the flock
    if held.token is not None and os.environ.get(TOKEN_ENV) == held.token:
        del os.environ[TOKEN_ENV]


def holds(path: Path) -> bool:
    """True when this process holds the lock file `path`."""
    with _MUTEX:
        return os.path.realpath(path) in _HELD


@contextmanager
def run_lock(run_dir: str | Path, *, wait: bool = False, wait_s: float | None = None,
             on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold `<run_dir>/.locks/run.lock` exclusively; LockHeld when another process has the run dir.

    `wait=True` waits until it is free (`wait_s` caps the wait), calling `on_wait(message)` once with who
    holds it. Re-entrant within a process. While held, child processes get $ALIGNLINE_RUN_LOCK_TOKEN.
    """
    run_dir = Path(run_dir).resolve()
    path = lock_path(run_dir)
    owner = next(_IDS)
    what = f"run directory {run_dir}"
    hint = "Wait for it to finish (or pass --wait to wait for it), stop it, or use another --run-dir"

    def waiting() -> None:
        if on_wait is not None:
            on_wait(str(_refusal(path, what, "Waiting until it is free.")))

    limit = (float("inf") if wait_s is None else wait_s) if wait else 0.0
    held = _acquire(path, True, owner, what, hint, wait_s=limit, run=True, on_wait=waiting)
    before = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = held.token or ""
    try:
        yield path
    finally:
        if before is not None:
            os.environ[TOKEN_ENV] = before
        _release(os.path.realpath(path), owner)


class StageLock:
    """What a stage holds while it writes `<run_dir>/<stage>/`: `run.lock` shared (skipped in a child of
    the run lock's holder) and `<stage>.lock` exclusively. LockHeld when either is taken."""

    def __init__(self, run_dir: str | Path, stage: str):
        run_dir = Path(run_dir).resolve()
        self.owner = next(_IDS)
        self.paths: list[str] = []
        self._finalizer = weakref.finalize(self, _release_all, self.paths, self.owner)
        run = lock_path(run_dir)
        try:
            try:
                _acquire(run, False, self.owner, f"run directory {run_dir}",
                         "Wait for it to finish or stop it: a stage must not write into a run directory that a "
                         "pipeline is running in")
                self.paths.append(os.path.realpath(run))
            except LockHeld:
                token = os.environ.get(TOKEN_ENV)
                if not token or read_holder(run).get("token") != token:
                    raise
                # A stage launched by the holder of the run lock (subprocess / torchrun): it is that run.
            _acquire(lock_path(run_dir, stage), True, self.owner, f"stage directory {run_dir / stage}",
                     "Wait for it to finish or stop it: two processes must not write one stage directory")
            self.paths.append(os.path.realpath(lock_path(run_dir, stage)))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        self._finalizer()


def _release_all(paths: list[str], owner: int) -> None:
    for key in reversed(paths):
        _release(key, owner)
