"""SIGTERM or SIGINT (Ctrl-C) to `alignline pipeline` ends the whole process tree (issue 15, part 6).

    .venv/bin/pytest tests/test_flow_signals.py

The pipeline runs the fake stages (tests/prefect_fixtures.py) in a subprocess in its own
session, with pretrain as a slow stage subprocess. Once pretrain is running we send SIGTERM and
check with /proc (what `ps` reads) that no process of that tree is left: the stage subprocess
(its own session), Prefect's temporary API server, anything in the pipeline's session. A rerun
then resumes pretrain from its saved state.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignline.launch import _proc_table, descendants
from tests.prefect_fixtures import fake_pipeline_overrides, make_fake_stages

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


# The pipeline command as its own process (what `alignline pipeline` runs).
ENTRY = {"alignline": ["-m", "alignline_cli", "pipeline"]}


def _pipeline(tmp_path: Path, run_dir: Path, *extra: str, sleep: str, entry: str = "alignline") -> subprocess.Popen:
    pkg = make_fake_stages(tmp_path / "src")
    (tmp_path / "pipeline.yaml").write_text("{}\n")
    sets = fake_pipeline_overrides(pkg, run_dir) + ["pretrain.steps=400", "stages.pretrain.launcher=subprocess",
                                                    *extra]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'src'}{os.pathsep}{REPO}", FAKE_STEP_SLEEP=sleep,
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, *ENTRY[entry], "--config", str(tmp_path / "pipeline.yaml"), "--to", "pretrain"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_stage(proc: subprocess.Popen, run_dir: Path) -> None:
    """Until pretrain runs as a subprocess and has saved some state."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        stage_running = any("fakestages.pretrain" in _cmdline(p) for p in descendants(proc.pid))
        if stage_running and (run_dir / "pretrain" / "state" / "latest").exists():
            return
        time.sleep(0.2)


def _left_running(tree: list[int], cmdlines: dict[int, str], started: dict[int, str | None], sid: int | None
                  ) -> list[str]:
    """Processes of the old tree still alive (same pid and start time) or left in its session.
    (A zombie is dead: it only waits for PID 1 to reap it.)"""
    table = _proc_table()
    left = [f"{p} {cmdlines[p]}" for p in tree
            if p in table and table[p][2] != "Z" and _start_time(p) == started[p]]
    left += [f"{p} {_cmdline(p)} (in the session)" for p, (_pp, _pg, state) in table.items()
             if state != "Z" and _session(p) == sid]
    return left


def _signal(proc, sig):
    """Record the running pipeline's process tree (a fake pretrain must be in it), send `sig`, wait:
    (tree pids, cmdlines, start times, session id, exit code, seconds to stop, output)."""
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    tree = list(descendants(proc.pid))
    cmdlines = {p: _cmdline(p) for p in tree}
    assert any("fakestages.pretrain" in c for c in cmdlines.values()), cmdlines
    started = {p: _start_time(p) for p in tree}
    sid = _session(proc.pid)
    t0 = time.monotonic()
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=30)
    return tree, cmdlines, started, sid, proc.returncode, time.monotonic() - t0, out


def test_sigint_ends_the_process_tree(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) ends the pipeline's whole tree like SIGTERM does."""
    run_dir = tmp_path / "run"
    proc = _pipeline(tmp_path, run_dir, sleep="0.3")
    try:
        _wait_for_stage(proc, run_dir)
        tree, cmdlines, started, sid, code, elapsed, out = _signal(proc, signal.SIGINT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 128 + signal.SIGINT, (code, out[-3000:])
    assert elapsed < 15, f"took {elapsed:.1f}s to stop"
    time.sleep(0.5)
    left = _left_running(tree, cmdlines, started, sid)
    assert not left, "left running after SIGINT:\n" + "\n".join(left)


def test_sigterm_ends_the_process_tree_and_rerun_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _pipeline(tmp_path, run_dir, sleep="0.3")
    try:
        # Wait until pretrain runs as a subprocess and has saved some state.
        deadline = time.monotonic() + 180
        tree: dict[int, int] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            tree = descendants(proc.pid)
            stage_running = any("fakestages.pretrain" in _cmdline(p) for p in tree)
            if stage_running and (run_dir / "pretrain" / "state" / "latest").exists():
                break
            time.sleep(0.2)
        tree, cmdlines, started, sid, code, elapsed, out = _signal(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code in (-signal.SIGTERM, 128 + signal.SIGTERM), code
    assert elapsed < 15, f"took {elapsed:.1f}s to stop"
    time.sleep(0.5)
    # Nothing of the old tree is alive (same pid and start time), nothing is left in its session.
    # (A zombie is dead: it only waits for PID 1 to reap it.)
    table = _proc_table()
    left = [f"{p} {cmdlines[p]}" for p in tree
            if p in table and table[p][2] != "Z" and _start_time(p) == started[p]]
    assert not left, f"left running after SIGTERM (exit {code}, {elapsed:.1f}s):\n" + "\n".join(left) + "\n" + out[-3000:]
    in_session = [p for p, (_pp, _pg, state) in _proc_table().items() if state != "Z" and _session(p) == sid]
    assert not in_session, [_cmdline(p) for p in in_session]

    # A rerun resumes pretrain from the state it had saved.
    calls_before = (run_dir / "pretrain.calls").read_text().split()
    rerun = _pipeline(tmp_path, run_dir, sleep="0")
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, out
    calls = (run_dir / "pretrain.calls").read_text().split()
    assert len(calls) == len(calls_before) + 1 and int(calls[-1]) > 0, calls
