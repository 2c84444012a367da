"""Launch a (multi-process) command in its own process group, stream its log, kill it cleanly.

Used by the pipeline flow when a stage config asks for `nproc_per_node > 1`:

    cmd = torchrun_command("stages.pretrain", ["--config", "cfg.yaml", "--run-dir", "runs/x"], nproc=2)
    result = launch(cmd, on_line=logger.info, timeout=3600)

Guarantees:
- the child runs in a new session (its own process group), so one `killpg` reaches torchrun and
  every rank it spawned;
- stdout and stderr are merged and handed to `on_line` line by line as they arrive;
- a non-zero exit raises `LaunchError` whose message carries the last lines of the log;
- a timeout, Ctrl-C, or any exception while waiting (e.g. a Prefect cancellation) kills the whole
  group (SIGTERM, then SIGKILL after a grace period), so no rank is left running;
- on Linux the child also gets SIGTERM if the launching thread dies (PR_SET_PDEATHSIG), which
  covers a hard kill of the flow process.

Runs without Prefect (flows.tasks calls it for `launcher: subprocess` and torchrun stages).
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A launched command failed (non-zero exit or timeout); the message has the log tail."""

    def __init__(self, message: str, returncode: int | None, tail: list[str]):
        super().__init__(message)
        self.returncode = returncode
        self.tail = tail


@dataclass
class LaunchResult:
    returncode: int
    wall_s: float
    tail: list[str]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for rendezvous / test servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(
    module: str,
    args: Sequence[str],
    nproc: int,
    *,
    python: str | None = None,
    master_port: int | None = None,
) -> list[str]:
    """`python -m torch.distributed.run` for one node with `nproc` ranks running `-m module args`.

    We call torch.distributed.run through the interpreter rather than a `torchrun` binary so the
    ranks use the same venv as the caller even when the venv's bin/ is not on PATH.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    port = master_port if master_port is not None else free_port()
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        module,
        *args,
    ]


def _set_pdeathsig() -> None:
    # Runs in the child between fork and exec: die with the parent thread (Linux only).
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        return  # not Linux/glibc: the process group kill in launch() still applies


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group of `proc`, then SIGKILL whatever is left after `grace_s`."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) of every process, from /proc (Linux)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue  # exited while we looked
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may contain spaces
        table[int(name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(pid: int) -> dict[int, int]:
    """pid -> pgid of every live (non-zombie) descendant of `pid`."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (ppid, _pgid, _state) in table.items():
        children.setdefault(ppid, []).append(child)
    out, stack = {}, [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if table[child][2] != "Z":
                out[child] = table[child][1]
            stack.append(child)
    return out


def kill_tree(pid: int | None = None, grace_s: float = 3.0) -> None:
    """SIGTERM every descendant of `pid` (default: this process) and the process groups they lead
    or share (torchrun ranks, stage subprocesses in their own session), SIGKILL what is left after
    `grace_s`. Needed because a child whose parent dies is re-parented to PID 1 and keeps running
    (Prefect's temporary API server is such a child)."""
    pid = os.getpid() if pid is None else pid
    own_pgid = os.getpgid(pid)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        procs = descendants(pid)
        if not procs:
            return
        for child in procs:
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                continue
        for pgid in set(procs.values()) - {own_pgid}:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and descendants(pid):
            time.sleep(0.05)


def exit_with_tree_on_signal(signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """On SIGTERM/SIGINT end the whole process tree, then exit 128+signal at once.

    Prefect's flow engine swaps in its own SIGTERM handler while a flow runs, and when it is done
    unwinding re-sends the signal to the handler it found, i.e. this one. Without it the default
    handler kills only this process, and atexit hooks (Prefect's server shutdown) never run.
    """

    def handler(signum: int, _frame) -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        kill_tree()
        os._exit(128 + signum)  # threads (progress reporters, Prefect's loops) end with the process

    for sig in signals:
        signal.signal(sig, handler)


def launch(
    cmd: Sequence[str],
    *,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    tail_lines: int = 80,
    grace_s: float = 10.0,
    log_file: str | Path | None = None,
) -> LaunchResult:
    """Run `cmd` in its own process group; stream lines to `on_line`; see the module docstring."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")  # so rank logs arrive line by line, not at exit
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    start = time.monotonic()
    proc = subprocess.Popen(
        list(cmd),
        cwd=str(cwd) if cwd else None,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
        text=True,
        errors="replace",
        bufsize=1,
    )
    log_fh = open(log_file, "a", encoding="utf-8") if log_file else None  # noqa: SIM115

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            if log_fh is not None:
                log_fh.write(line + "\n")
                log_fh.flush()
            if on_line is not None:
                try:
                    on_line(line)
                except Exception as exc:  # a broken logger must not hang the child on a full pipe
                    tail.append(f"[launch] on_line callback failed: {exc!r}")

    reader = threading.Thread(target=pump, name="launch-log-pump", daemon=True)
    reader.start()
    try:
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc, grace_s)
            reader.join(timeout=5)
            raise LaunchError(
                f"command timed out after {timeout:.0f}s and its process group was killed: "
                f"{' '.join(cmd)}\n--- last {len(tail)} log lines ---\n" + "\n".join(tail),
                None,
                list(tail),
            ) from None
        except BaseException:
            # Cancellation / Ctrl-C / any error while waiting: leave no rank running.
            kill_group(proc, grace_s)
            raise
        # The leader exited; reap any rank that outlived it (e.g. torchrun killed by a signal).
        if _group_alive(proc.pid):
            kill_group(proc, grace_s)
        reader.join(timeout=10)
    finally:
        if log_fh is not None:
            log_fh.close()
    wall = time.monotonic() - start
    if returncode != 0:
        raise LaunchError(
            f"command exited with status {returncode} after {wall:.1f}s: {' '.join(cmd)}\n"
            f"--- last {len(tail)} log lines ---\n" + "\n".join(tail),
            returncode,
            list(tail),
        )
    return LaunchResult(returncode=returncode, wall_s=wall, tail=list(tail))
