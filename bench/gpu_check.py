"""GPU check (not a test): the small pipeline's pretrain and SFT for a few hundred steps on one GPU,
and with two GPUs pretrain on 2 ranks (DDP) and SFT with FSDP2; tokens/s, MFU and peak memory.

    python bench/gpu_check.py --out $OUT                       # ~8 min on one H100/H200 incl. data
    python bench/gpu_check.py --out /tmp/gpu --pretrain-steps 100 --sft-steps 50   # quicker

Prepared so a lent GPU machine is used in one call (the tool library's `device`): it builds the
small data and tokenizer stages (CPU), then runs `configs/pretrain/small.yaml` (~117M parameters,
bf16, torch.compile) and `configs/sft/small.yaml` (full fine-tune) with fewer steps, each as the
stage CLI a user runs. Measured from the stages' own metrics.jsonl, skipping the first 20% of
logged steps (compilation, warm-up): median tokens/s, MFU (pretrain logs it; for SFT it is computed
here the same way: (6N + 12*L*H*T) FLOPs per token over the GPU's bf16 peak, alignline.training
`flops_per_token` / `peak_flops`) and peak allocated memory. Writes `<out>/gpu_check.md` (a
BENCHMARKS.md section with the command and the machine) and `<out>/gpu_check.json`; `--write`
also replaces the "GPU check" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(cmd: list[str], log: Path) -> float:
    """Run a stage command, its output into `log`; seconds taken. A failure prints the log's tail."""
    t0 = time.monotonic()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
    if rc != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}")
    return time.monotonic() - t0


def steady(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    vals = vals[len(vals) // 5:]  # drop compilation and warm-up
    return statistics.median(vals) if vals else None


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_check")))
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--write", action="store_true", help="replace the 'GPU check' section of BENCHMARKS.md")
    args = ap.parse_args()

    import torch

    from alignline.training import flops_per_token, peak_flops

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    out = args.out.resolve()
    run_dir = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    gpus = torch.cuda.device_count()
    results: dict = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__,
                     "python": platform.python_version(), "stages": {}}
    stage = [py, "-m"]
    # CPU stages: the small suite and its 8k tokenizer.
    results["stages"]["data"] = {"wall_s": run([*stage, "stages.data", "--config", "configs/data/small.yaml",
                                                "--run-dir", str(run_dir)], out / "data.log")}
    results["stages"]["tokenizer"] = {"wall_s": run([*stage, "stages.tokenizer", "--config",
                                                     "configs/tokenizer/small.yaml", "--run-dir", str(run_dir)],
                                                    out / "tokenizer.log")}
    quick = ["--set", "logging.progress=false", "--set", "logging.every_steps=5"]
    pre = ["--config", "configs/pretrain/small.yaml", "--set", f"train.max_steps={args.pretrain_steps}",
           "--set", f"train.save_every={args.pretrain_steps}", "--set", f"train.eval_every={args.pretrain_steps}",
           "--set", "schedule.warmup_steps=20", "--set", "eval.gold_prompts=32", *quick]
    wall = run([*stage, "stages.pretrain", *pre, "--run-dir", str(run_dir)], out / "pretrain.log")
    rows = metrics(run_dir / "pretrain")
    results["stages"]["pretrain_1gpu"] = {
        "wall_s": wall, "steps": args.pretrain_steps, "tokens_per_s": steady(rows, "tokens_per_s"),
        "mfu": steady(rows, "mfu"), "peak_mem_gib": max((r.get("peak_mem_gib", 0) for r in rows), default=None)}

    sft = ["--config", "configs/sft/small.yaml", "--set", f"train.max_steps={args.sft_steps}",
           "--set", f"train.save_every={args.sft_steps}", "--set", f"train.eval_every={args.sft_steps}",
           "--set", "eval.gold_prompts=64", *quick]
    wall = run([*stage, "stages.sft", *sft, "--run-dir", str(run_dir)], out / "sft.log")
    rows = metrics(run_dir / "sft")
    cfg = json.loads((run_dir / "sft" / "checkpoint" / "config.json").read_text())
    n_params = json.loads((run_dir / "pretrain" / "eval.json").read_text()).get("n_params")
    tps = steady(rows, "tokens_per_s")
    peak = peak_flops()
    seq = 512  # configs/sft/small.yaml train.max_length; packing off, so rows are shorter: an upper bound
    mfu = (flops_per_token(n_params, cfg["num_hidden_layers"], cfg["hidden_size"], seq) * tps / peak
           if (tps and peak and n_params) else None)
    results["stages"]["sft_1gpu"] = {"wall_s": wall, "steps": args.sft_steps, "tokens_per_s": tps, "mfu": mfu,
                                     "peak_mem_gib": max((r.get("peak_mem_gib", 0) for r in rows), default=None)}

    if gpus >= 2:
        from alignline.launch import torchrun_command

        two = run_dir.parent / "run2"
        for name in ("data", "tokenizer"):
            (two / name).parent.mkdir(parents=True, exist_ok=True)
            if not (two / name).exists():
                (two / name).symlink_to(run_dir / name)
        cmd = torchrun_command("stages.pretrain", [*pre, "--run-dir", str(two)], 2, python=py)
        wall = run(cmd, out / "pretrain_2gpu.log")
        rows = metrics(two / "pretrain")
        results["stages"]["pretrain_2gpu_ddp"] = {
            "wall_s": wall, "steps": args.pretrain_steps, "tokens_per_s": steady(rows, "tokens_per_s"),
            "mfu": steady(rows, "mfu"), "peak_mem_gib": max((r.get("peak_mem_gib", 0) for r in rows), default=None)}
        # SFT through accelerate's FSDP2 on the 2 GPUs (CPU ranks cannot run it; the CI tests only the gather).
        cmd = torchrun_command("stages.sft", [*sft, "--set", "train.parallel=fsdp", "--run-dir", str(two)], 2,
                               python=py)
        wall = run(cmd, out / "sft_2gpu_fsdp.log")
        if "FSDP2" not in (out / "sft_2gpu_fsdp.log").read_text():
            raise SystemExit("sft with train.parallel=fsdp on 2 GPUs did not report FSDP2")
        rows = metrics(two / "sft")
        results["stages"]["sft_2gpu_fsdp"] = {
            "wall_s": wall, "steps": args.sft_steps, "tokens_per_s": steady(rows, "tokens_per_s"), "mfu": None,
            "peak_mem_gib": max((r.get("peak_mem_gib", 0) for r in rows), default=None)}

    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    md = section(results, " ".join([Path(py).name, "bench/gpu_check.py", *sys.argv[1:]]))
    (out / "gpu_check.md").write_text(md)
    print(md)
    if args.write:
        bench = REPO / "BENCHMARKS.md"
        text = bench.read_text()
        pattern = re.compile(r"## GPU check\n.*?(?=\n## |\Z)", re.S)
        text = pattern.sub(md.rstrip("\n"), text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + md
        bench.write_text(text)


def section(results: dict, command: str) -> str:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = ["## GPU check", "",
             f"`{command}` on {results['gpus']} x {results['gpu']} (torch {results['torch']}, "
             f"Python {results['python']}). Medians after the first 20% of logged steps.", "",
             "| stage | steps | wall (s) | tokens/s | MFU | peak memory (GiB) |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results["stages"].items():
        if "steps" not in r:
            continue
        lines.append(f"| {name} | {r['steps']} | {r['wall_s']:.0f} | {f(r['tokens_per_s'], ',.0f')} | "
                     f"{f(r['mfu'], '.1%')} | {f(r['peak_mem_gib'], '.1f')} |")
    cpu = ", ".join(f"{k} {r['wall_s']:.0f} s" for k, r in results["stages"].items() if "steps" not in r)
    lines += ["", f"CPU stages: {cpu}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
