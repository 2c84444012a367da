"""Faults and load, measured on tiny runs with real processes: the "Faults and load" rows of BENCHMARKS.md.

    python bench/faults.py                         # every scenario, ~10 min on 2 busy CPU cores
    python bench/faults.py --only lock,disk        # some of them: lock, disk, eval, signal
    python bench/faults.py --work /tmp/faults --keep

Scenarios (each prints one Markdown row: scenario | command to reproduce | what happened | data lost):

- lock:   two `python -m flows.pipeline` on one run dir at once; a stage started by hand in it; a third
          pipeline with --wait. The refused ones must exit 2 with the holder named, before Prefect starts;
          the first must finish with every stage verifying against its manifest.
- disk:   pretrain whose second state save meets a full disk. As root the run dir is on a small tmpfs
          that is really filled just before that save (real ENOSPC from safetensors/torch.save);
          otherwise torch.save raises OSError(ENOSPC) once (injected). Exit 2 with the path named, the
          previous state loadable, no temp files; after "freeing space" a re-run resumes from it.
- eval:   an OOM (torch.OutOfMemoryError, injected) in the evaluation after training, for pretrain and
          rlhf (PPO): a re-run must evaluate without training a single step.
- signal: SIGTERM to `python -m flows.pipeline` while pretrain runs as a subprocess: no process of
          the tree left, exit 143, a re-run resumes pretrain from its state.

The injections run in a child (`python bench/faults.py child ...`) that patches one function and then
runs the stage's normal `main()`, so exit codes and messages are those a user sees.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# Tiny settings: the data suite's tiny preset, a 300-token BPE, a short pretrain.
PIPE_SETS = ["data.size=tiny", "tokenizer.vocab_size=300", "pretrain.logging.progress=false",
             "pretrain.train.max_steps=150", "pretrain.train.save_every=50", "pretrain.train.eval_every=50",
             "pretrain.eval.gold_prompts=16", "retries=0"]
PRETRAIN_SETS = ["train.max_steps=60", "train.save_every=20", "train.eval_every=20", "eval.gold_prompts=16",
                 "logging.progress=false", "logging.report_to=[]"]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "ALIGNLINE_RUN_LOCK_TOKEN"}
    e.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")])), OMP_NUM_THREADS="1",
             PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", PREFECT_SERVER_ANALYTICS_ENABLED="false",
             DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return e


def sets(items: list[str]) -> list[str]:
    out = []
    for s in items:
        out += ["--set", s]
    return out


def pipeline_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [PY, "-m", "alignline_cli", "pipeline", "--config", "configs/pipeline/tiny.yaml", "--run-dir", str(run_dir),
            "--to", "pretrain", *sets(PIPE_SETS), *extra]


def pretrain_cmd(run_dir: Path, inputs: Path, *extra: str) -> list[str]:
    return [PY, "-m", "stages.pretrain", "--config", "configs/pretrain/tiny.yaml", "--run-dir", str(run_dir),
            "--data", str(inputs / "data"), "--tokenizer", str(inputs / "tokenizer"), *sets(PRETRAIN_SETS), *extra]


def run(cmd: list[str], timeout: float = 900) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


def first_error(text: str, limit: int = 400) -> str:
    line = next((x for x in text.splitlines() if x.startswith("error:")), text.strip().splitlines()[-1] if text.strip()
                else "")
    line = re.sub(r"\(command: .*?\)\. ", "(command: ...). ", line)  # the holder's full command line
    return line if len(line) <= limit else line[:limit - 3] + "..."


def short(cmd: list[str]) -> str:
    return " ".join(a if a != PY else "python" for a in cmd)


def verify(run_dir: Path, stages: list[str]) -> str:
    from alignline.artifacts import StageError, load_stage

    bad = []
    for s in stages:
        try:
            load_stage(run_dir / s, expect=s)  # every output file against its manifest sha256
        except StageError as exc:
            bad.append(f"{s}: {exc}")
    return "none: " + ", ".join(stages) + " verified file by file against the manifest" if not bad else "; ".join(bad)


ROWS: list[tuple[str, str, str, str]] = []


def row(scenario: str, command: str, happened: str, lost: str) -> None:
    ROWS.append((scenario, command, happened, lost))
    print(f"| {scenario} | `{command}` | {happened} | {lost} |", flush=True)


def md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


# --------------------------------------------------------------------------- inputs


def inputs(work: Path) -> Path:
    """data (tiny suite) + tokenizer (300 tokens) once, outside the run dirs under test."""
    base = work / "inputs"
    if not (base / "tokenizer" / "manifest.json").exists():
        for cmd in ([PY, "-m", "stages.data", "--config", "configs/data/tiny.yaml", "--run-dir", str(base),
                     "--set", "size=tiny"],
                    [PY, "-m", "stages.tokenizer", "--config", "configs/tokenizer/tiny.yaml", "--run-dir", str(base),
                     "--set", "vocab_size=300"]):
            code, out, err, _ = run(cmd)
            if code:
                sys.exit(f"setup failed: {short(cmd)}\n{err[-2000:]}")
    return base


# --------------------------------------------------------------------------- lock


def lock_scenario(work: Path) -> None:
    from alignline.locks import lock_path, read_holder

    run_dir = work / "lock"
    shutil.rmtree(run_dir, ignore_errors=True)
    lock = lock_path(run_dir)
    first = subprocess.Popen(pipeline_cmd(run_dir), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t_start = time.monotonic()
    procs = [first]
    try:
        while first.poll() is None and read_holder(lock).get("pid") != first.pid:
            time.sleep(0.1)
        # All three start while the first holds the run dir (it is starting Prefect, then training).
        waiter = subprocess.Popen(pipeline_cmd(run_dir, "--wait"), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append(waiter)
        second = subprocess.Popen(pipeline_cmd(run_dir), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        t_second = time.monotonic()
        hand_cmd = [PY, "-m", "stages.data", "--config", "configs/data/tiny.yaml", "--run-dir", str(run_dir),
                    "--set", "size=tiny"]
        code3, out3, err3, wall3 = run(hand_cmd)
        out2, err2 = second.communicate(timeout=600)
        wall2 = time.monotonic() - t_second
        first_alive_after_refusals = first.poll() is None
        t_acq = None
        while waiter.poll() is None:
            if first.poll() is not None and t_acq is None and read_holder(lock).get("pid") == waiter.pid:
                t_acq = time.monotonic()
            time.sleep(0.1)
        out1, _ = first.communicate(timeout=1800)
        out4, _ = waiter.communicate(timeout=900)
        wall4 = time.monotonic() - t_second
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    wall1 = time.monotonic() - t_start
    stages = ["data", "tokenizer", "pretrain"]
    lost = verify(run_dir, stages)
    ran = {s: int(re.search(rf"^\s+{s}\s+ran\b", out1, re.M) is not None) for s in stages}
    row("two pipelines on one run dir at once", short(pipeline_cmd(Path("R"))) + " (twice)",
        md(f"second exits {second.returncode} after {wall2:.1f} s (Prefect started: "
           f"{'Starting temporary server' in out2 + err2}): '{first_error(err2)}'; "
           f"the first was still running ({first_alive_after_refusals}) and exits {first.returncode} after "
           f"{wall1:.0f} s ({sum(ran.values())}/3 stages ran, once each)"), lost)
    row("stage by hand in a run dir a pipeline holds", short(hand_cmd).replace(str(run_dir), "R"),
        md(f"exits {code3} after {wall3:.1f} s: '{first_error(err3)}'; data/ untouched"), lost)
    cached = len(re.findall(r"^\s+\w+\s+cached\b", out4, re.M))
    waited = "Waiting until it is free" in out4
    row("third pipeline with --wait", short(pipeline_cmd(Path("R"), "--wait")),
        md(f"printed who holds the run dir and 'Waiting until it is free' ({waited}); took the lock only after "
           f"the first exited ({t_acq is not None}), exits {waiter.returncode} {wall4:.0f} s after it started, with "
           f"{cached}/3 stages reused (cached)"), lost)
    if first.returncode != 0:
        print(out1[-3000:], file=sys.stderr)
    if waiter.returncode != 0:
        print(out4[-3000:], file=sys.stderr)


# --------------------------------------------------------------------------- disk full


def _mount_tmpfs(path: Path, mib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def disk_scenario(work: Path, base: Path) -> None:
    mnt = work / "small-disk"
    real = _mount_tmpfs(mnt, 48)
    try:
        if real:
            # Nothing left: safetensors (model.safetensors, the first file) fails. 1.2 MiB left: the weights
            # (0.9 MB) fit and torch.save of optimizer.pt (1.8 MB) fails, with no errno in its message.
            _disk_case(mnt, base, "fill", 0, "real ENOSPC on a 48 MiB tmpfs filled just before the 2nd save")
            _disk_case(mnt, base, "fill", 1200, "the same with 1.2 MiB left: torch.save of optimizer.pt fails")
        else:
            _disk_case(mnt, base, "inject", 0, "not root: OSError(ENOSPC) injected into torch.save at the 2nd save")
    finally:
        if real:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def _disk_case(mnt: Path, base: Path, how: str, leave_kib: int, what: str) -> None:
    import torch
    from safetensors.torch import load_file

    run_dir = mnt / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    filler = mnt / "filler"
    child = [PY, str(Path(__file__).resolve()), "child", "--fault", how, "--at-save", "2", "--filler",
             str(filler), "--leave-kib", str(leave_kib), "--", "stages.pretrain",
             *pretrain_cmd(run_dir, base)[3:]]
    code, out, err, wall = run(child)
    state = run_dir / "pretrain" / "state"
    latest = (state / "latest").read_text().strip() if (state / "latest").exists() else None
    loadable = False
    if latest:
        load_file(str(state / latest / "model.safetensors"))
        torch.load(state / latest / "optimizer.pt", weights_only=True)
        loadable = True
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp*")]
    filler.unlink(missing_ok=True)  # free space
    code2, out2, err2, wall2 = run(pretrain_cmd(run_dir, base))
    resumed = re.search(r"pretrain: resumed from step (\d+)", err2 + out2)
    row("full disk during a checkpoint save (pretrain)",
        f"python bench/faults.py --only disk  # {what}",
        md(f"exits {code} after {wall:.0f} s: '{first_error(err)}'; state/latest = {latest} (loadable: "
           f"{loadable}), temp files left: {len(leftovers)}; after freeing space the re-run exits {code2} in "
           f"{wall2:.0f} s, log: 'pretrain: resumed from step {resumed.group(1) if resumed else '?'}'"),
        verify(run_dir, ["pretrain"]) if code2 == 0 else "see output")
    if code2:
        print(err2[-3000:], file=sys.stderr)
    shutil.rmtree(run_dir, ignore_errors=True)


# --------------------------------------------------------------------------- eval OOM


def _train_rows(stage_dir: Path) -> int:
    for p in (stage_dir / "metrics.jsonl", stage_dir / ".staging" / "metrics.jsonl"):
        if p.exists():
            rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
            return sum(1 for r in rows if "loss" in r or "score" in r)  # training steps, not eval-only rows
    return 0


def eval_scenario(work: Path, base: Path) -> None:
    # pretrain
    run_dir = work / "eval"
    shutil.rmtree(run_dir, ignore_errors=True)
    child = [PY, str(Path(__file__).resolve()), "child", "--fault", "oom", "--", "stages.pretrain",
             *pretrain_cmd(run_dir, base)[3:]]
    code, out, err, wall = run(child)
    rows1 = _train_rows(run_dir / "pretrain")
    latest = (run_dir / "pretrain/state/latest").read_text().strip()
    code2, out2, err2, wall2 = run(pretrain_cmd(run_dir, base))
    rows2 = _train_rows(run_dir / "pretrain")
    resumed = re.search(r"pretrain: resumed from step (\d+)", err2 + out2)
    row("OOM in the evaluation after pretraining", "python bench/faults.py --only eval",
        md(f"exits {code} after {wall:.0f} s with the OutOfMemoryError traceback (not a user error); "
           f"state/latest = {latest}; the re-run exits {code2} in {wall2:.0f} s, log 'resumed from step "
           f"{resumed.group(1) if resumed else '?'}', training rows in metrics.jsonl {rows1} -> {rows2} (no step "
           "trained again)"), verify(run_dir, ["pretrain"]) if code2 == 0 else "see output")
    if code2:
        print(err2[-3000:], file=sys.stderr)

    # rlhf: a short sft and reward on that pretrain, then PPO whose evaluation fails once
    for stage, extra in (("sft", ["train.max_steps=10", "eval.gold_prompts=8", "logging.progress=false"]),
                         ("reward", ["train.max_steps=10", "logging.progress=false"])):
        cmd = [PY, "-m", f"stages.{stage}", "--config", f"configs/{stage}/tiny.yaml", "--run-dir", str(run_dir),
               "--data", str(base / "data"), *sets(extra)]
        c, _, e, _ = run(cmd)
        if c:
            sys.exit(f"setup failed: {short(cmd)}\n{e[-3000:]}")
    ppo_args = ["--config", "configs/rlhf/tiny.yaml", "--run-dir", str(run_dir), "--data", str(base / "data"),
                *sets(["steps=6", "save_every=3", "ppo.rollout_batch_size=32", "ppo.forward_batch_size=32",
                       "ppo.mini_batch_size=16", "ppo.ppo_epochs=2", "eval.num_prompts=32",
                       "logging.progress=false", "logging.report_to=[]"])]
    code, out, err, wall = run([PY, str(Path(__file__).resolve()), "child", "--fault", "oom", "--", "stages.rlhf",
                                *ppo_args])
    rows1 = _train_rows(run_dir / "rlhf-ppo")
    latest = (run_dir / "rlhf-ppo/state/latest").read_text().strip() if (run_dir / "rlhf-ppo/state/latest").exists() else None
    code2, out2, err2, wall2 = run([PY, "-m", "stages.rlhf", *ppo_args])
    rows2 = _train_rows(run_dir / "rlhf-ppo")
    resumed = re.search(r"rlhf-ppo: resumed from step (\d+)", err2 + out2)
    ev = json.loads((run_dir / "rlhf-ppo/eval.json").read_text()) if code2 == 0 else {}
    row("OOM in the evaluation after RLHF (PPO)", "python bench/faults.py --only eval",
        md(f"exits {code} after {wall:.0f} s with the OutOfMemoryError traceback; state/latest = {latest}; the re-run exits {code2} "
           f"in {wall2:.0f} s, log 'resumed from step {resumed.group(1) if resumed else '?'}', PPO iterations "
           f"logged {rows1} -> {rows2}; eval.json has the last iteration's statistics (train.final.score "
           f"{(ev.get('train', {}).get('final', {}).get('score') or float('nan')):.3f}, from the state)"),
        verify(run_dir, ["rlhf-ppo"]) if code2 == 0 else "see output")
    if code2:
        print(err2[-3000:], file=sys.stderr)


# --------------------------------------------------------------------------- signal


def signal_scenario(work: Path) -> None:
    from alignline.launch import _proc_table, descendants

    run_dir = work / "signal"
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = ["--set", "stages.pretrain.launcher=subprocess", "--set", "pretrain.train.max_steps=300",
             "--set", "pretrain.train.save_every=25"]  # (later --set wins)
    proc = subprocess.Popen(pipeline_cmd(run_dir, *extra), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        while proc.poll() is None:
            tree = descendants(proc.pid)
            if (run_dir / "pretrain/state/latest").exists() and any(
                    b"stages.pretrain" in Path(f"/proc/{p}/cmdline").read_bytes() for p in tree
                    if Path(f"/proc/{p}/cmdline").exists()):
                break
            time.sleep(0.2)
        tree = descendants(proc.pid)
        step = (run_dir / "pretrain/state/latest").read_text().strip()
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(1)
    table = _proc_table()
    left = [p for p in tree if p in table and table[p][2] != "Z"]
    code2, out2, err2, wall2 = run(pipeline_cmd(run_dir, *extra), timeout=1800)
    resumed = re.search(r"pretrain: resumed from step (\d+)", out2 + err2)
    row("SIGTERM to python -m flows.pipeline during pretrain (subprocess)",
        short(pipeline_cmd(Path("R"), *extra)) + "; kill -TERM <pid>",
        md(f"exits {proc.returncode} ({128 + signal.SIGTERM} = 128+SIGTERM) {stop_s:.1f} s after the signal; "
           f"{len(tree)} processes in its tree, {len(left)} left; state/latest was {step}; the re-run exits "
           f"{code2} in {wall2:.0f} s, log 'pretrain: resumed from step {resumed.group(1) if resumed else '?'}'"),
        verify(run_dir, ["data", "tokenizer", "pretrain"]) if code2 == 0 else "see output")
    if code2:
        print((out2 + err2)[-3000:], file=sys.stderr)


# --------------------------------------------------------------------------- the injecting child


def child(argv: list[str]) -> None:
    """`child --fault fill|inject|oom [--at-save N --filler F] -- MODULE ARGS...`: patch, then run MODULE's main."""
    p = argparse.ArgumentParser(prog="faults.py child")
    p.add_argument("--fault", choices=["fill", "inject", "oom"], required=True)
    p.add_argument("--at-save", type=int, default=2)
    p.add_argument("--filler", type=Path)
    p.add_argument("--leave-kib", type=int, default=0, help="fill: leave this much free")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    module, stage_argv = rest[0], rest[1:]
    import importlib

    import torch

    from alignline.artifacts import StageRun

    if args.fault in ("fill", "inject"):
        real_save_state, real_torch_save = StageRun.save_state, torch.save
        calls = {"n": 0, "armed": False}

        def save_state(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == args.at_save:
                if args.fault == "fill":  # use up every byte left on the file system, for real
                    with open(args.filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush
                        for block in (1 << 20, 4096, 1):
                            try:
                                while fh.write(b"\0" * block):
                                    pass
                            except OSError as exc:
                                if exc.errno != errno.ENOSPC:
                                    raise
                        if args.leave_kib:  # room for the first file(s) of the save, not for all of it
                            fh.truncate(max(0, fh.tell() - args.leave_kib * 1024))
                else:
                    calls["armed"] = True
            return real_save_state(self, *a, **k)

        def torch_save(obj, f, *a, **k):
            if calls["armed"]:
                calls["armed"] = False
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            return real_torch_save(obj, f, *a, **k)

        StageRun.save_state = save_state
        torch.save = torch_save
    else:
        def oom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory (injected by bench/faults.py into the evaluation)")

        import alignline.evaluation
        import stages.rlhf

        alignline.evaluation.gold_eval = oom  # pretrain / sft imports it at call time
        stages.rlhf.evaluate_policies = oom
    importlib.import_module(module).main(stage_argv)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/alignline-faults"), help="scratch directory")
    p.add_argument("--only", default="lock,disk,eval,signal", help="comma-separated scenarios to run")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = p.parse_args()
    only = set(args.only.split(","))
    unknown = only - {"lock", "disk", "eval", "signal"}
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from lock, disk, eval, signal")
    sys.path.insert(0, str(REPO))
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print("| scenario | command | what happened | data lost |\n|---|---|---|---|", flush=True)
    base = inputs(args.work) if only & {"disk", "eval"} else None
    if "lock" in only:
        lock_scenario(args.work)
    if "disk" in only:
        disk_scenario(args.work, base)
    if "eval" in only:
        eval_scenario(args.work, base)
    if "signal" in only:
        signal_scenario(args.work)
    print(f"\n{len(ROWS)} rows in {time.monotonic() - t0:.0f} s; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
