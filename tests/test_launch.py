"""The torchrun launcher (alignline/launch.py): 2 gloo ranks on CPU, failure tail, group kill.

    .venv/bin/pytest tests/test_launch.py
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alignline.launch import LaunchError, launch, torchrun_command

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import torch.distributed as dist

    mode = sys.argv[1]
    pid_dir = sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    open(os.path.join(pid_dir, f"rank{rank}.pid"), "w").write(str(os.getpid()))
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)  # sum over ranks: 1 + 2 = 3 with two ranks
    sys.stdout.write(f"rank {rank}/{world} sum={t.item():g}\\n"); sys.stdout.flush()
    if mode == "fail" and rank == 1:
        raise SystemExit("rank 1 exploded on purpose")
    if mode == "hang":
        time.sleep(600)
    dist.destroy_process_group()
    """
)


@pytest.fixture()
def script_dir(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ranks.py").write_text(RANK_SCRIPT)
    return tmp_path


def _env(script_dir: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(script_dir), "OMP_NUM_THREADS": "1"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_two_gloo_ranks_all_reduce_and_stream_lines(script_dir: Path) -> None:
    lines: list[str] = []
    cmd = torchrun_command("pkg.ranks", ["ok", str(script_dir)], nproc=2)
    result = launch(cmd, on_line=lines.append, timeout=180, env=_env(script_dir))
    assert result.returncode == 0
    ours = sorted(line for line in lines if "sum=" in line)
    # Both ranks ran in one process group and the all-reduce summed 1 + 2.
    assert len(ours) == 2, lines
    assert all(line.endswith("sum=3") for line in ours)
    assert any("rank 0/2" in line for line in ours) and any("rank 1/2" in line for line in ours)


def test_failing_rank_raises_with_log_tail(script_dir: Path) -> None:
    cmd = torchrun_command("pkg.ranks", ["fail", str(script_dir)], nproc=2)
    with pytest.raises(LaunchError) as info:
        launch(cmd, timeout=180, env=_env(script_dir))
    assert info.value.returncode not in (0, None)
    assert "rank 1 exploded on purpose" in str(info.value)
    for pid_file in script_dir.glob("rank*.pid"):
        assert not _alive(int(pid_file.read_text()))


def test_timeout_kills_every_rank(script_dir: Path) -> None:
    cmd = torchrun_command("pkg.ranks", ["hang", str(script_dir)], nproc=2)
    lines: list[str] = []
    start = time.monotonic()
    with pytest.raises(LaunchError, match="timed out"):
        # Long enough for both ranks to start and write their pids on 2 busy cores.
        launch(cmd, on_line=lines.append, timeout=18, env=_env(script_dir), grace_s=3)
    assert time.monotonic() - start < 60
    pids = [int(p.read_text()) for p in script_dir.glob("rank*.pid")]
    assert len(pids) == 2, lines
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a rank survived the group kill"


def test_plain_command_nonzero_exit_and_missing_output() -> None:
    with pytest.raises(LaunchError) as info:
        launch([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], timeout=30)
    assert info.value.returncode == 3
    assert info.value.tail == ["hello"]
