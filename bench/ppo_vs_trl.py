"""Benchmark (not a test): our PPO (alignline.rl.ppo) vs TRL 1.12's trl.experimental.ppo.PPOTrainer.

    .venv/bin/python bench/ppo_vs_trl.py --run-dir runs/tiny [--iters 10] [--threads 1] [--write]
    .venv/bin/python bench/ppo_vs_trl.py --run-dir runs/tiny --policy pretrain --max-new-tokens 48  # long answers

Both run on the same tiny SFT policy (or `--policy pretrain`: a base model, which rarely emits EOS,
so every answer runs to --max-new-tokens: the long-response regime where generation dominates), reward model (value model initialised from it), prompts
(prompts/train.jsonl of the run's data stage) and hyperparameters, each in its own process.
Measured: seconds per PPO iteration (median after a warm-up iteration) split into generation,
scoring and training (as NeMo-RL and verl report it), generation tokens/s,
peak memory (max RSS on CPU, max allocated on CUDA) and the reward gain after N iterations,
where the gain is measured identically for both: the mean RM score of sampled answers to a fixed
set of held-out prompts (prompts/test.jsonl), final policy minus initial policy.

TRL 1.12 (the last release with PPOTrainer) goes into its own venv `bench/.venv-trl112`: the
script creates it, installs `trl==1.12.*` there without dependencies, and links this venv's
packages (torch, transformers, accelerate, datasets) in behind it with a .pth file, so the
same torch/transformers versions run both sides. `--write` replaces the "PPO vs TRL" section of
BENCHMARKS.md with the results and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_VENV = REPO / "bench" / ".venv-trl112"
SECTION = "## PPO vs TRL"

# Hyperparameters shared by both implementations (TRL names in comments).
HP = dict(
    # TRL 1.12 steps the optimizer once per `gradient_accumulation_steps` micro-batches, i.e. once per
    # rollout batch (batch_size = per_device_train_batch_size * gradient_accumulation_steps), so the
    # matching setup is one minibatch = the whole rollout, in micro-batches of 16.
    rollout_batch_size=64,     # per_device_train_batch_size * gradient_accumulation_steps, num_mini_batches=1
    mini_batch_size=64,
    micro_batch_size=16,       # per_device_train_batch_size; gradient_accumulation_steps = 64/16
    ppo_epochs=4,              # num_ppo_epochs
    max_new_tokens=12,         # response_length
    temperature=1.0,
    lr=1e-3,
    beta=0.05,                 # kl_coef (fixed)
    clip_range=0.2,            # cliprange
    clip_range_value=0.2,      # cliprange_value
    vf_coef=0.1,
    gamma=1.0,
    lam=0.95,
    missing_eos_penalty=1.0,
    adam_betas=(0.9, 0.999),   # TRL's (transformers') AdamW defaults; eps 1e-8, no weight decay on both sides
)


# --------------------------------------------------------------------------- shared helpers


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_prompts(tok, path: Path, limit: int | None = None) -> list[list[int]]:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = rows[:limit] if limit else rows
    return [
        tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"]
        for r in rows
    ]


def reward_stats(reward_dir: Path) -> tuple[float, float]:
    ev = json.loads((reward_dir / "eval.json").read_text())
    return float(ev["reward_mean"]), float(ev["reward_std"])


POLICY = "sft"  # the stage whose checkpoint is the initial policy and the reference (--policy)


def load_models(run_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes

    sft, rm = run_dir / POLICY / "checkpoint", run_dir / "reward" / "checkpoint"
    tok = AutoTokenizer.from_pretrained(str(sft))
    f32 = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(str(sft), **f32)
    ref = AutoModelForCausalLM.from_pretrained(str(sft), **f32)
    value = AutoModelForSequenceClassification.from_pretrained(str(rm), **f32)
    reward = AutoModelForSequenceClassification.from_pretrained(str(rm), **f32)
    return tok, policy, ref, value, reward


def score_policy(policy_dir: Path, run_dir: Path, n_prompts: int, seed: int) -> float:
    """Mean normalised RM score of sampled answers (temperature 1) to the first test prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes
    from alignline.rl.rollout import generate, left_pad, sequence_scores, truncate_after_eos

    tok = AutoTokenizer.from_pretrained(str(run_dir / POLICY / "checkpoint"))
    policy = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "reward" / "checkpoint"),
                                                            dtype=torch.float32).eval()
    mean, std = reward_stats(run_dir / "reward")
    prompts = load_prompts(tok, run_dir / "data" / "prompts" / "test.jsonl", n_prompts)
    torch.manual_seed(seed)
    scores = []
    with torch.inference_mode():
        for _ in range(4):  # 4 samples per prompt: the estimate's noise stays well below the gains
            ids, attn = left_pad(prompts, tok.pad_token_id)
            resp = generate(policy, ids, attn, max_new_tokens=HP["max_new_tokens"], temperature=HP["temperature"],
                            eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
            resp, mask, has_eos = truncate_after_eos(resp, tok.eos_token_id, tok.pad_token_id)
            qr = torch.cat([ids, resp], 1)
            s = sequence_scores(rm, qr, torch.cat([attn, mask], 1), ids.shape[1], mask)
            scores.append((s - mean) / std - HP["missing_eos_penalty"] * (~has_eos).float())
    return float(torch.cat(scores).mean())


# --------------------------------------------------------------------------- ours


def run_ours(run_dir: Path, iters: int, out: Path, seed: int) -> dict:
    import torch

    from alignline.rl.ppo import KLArgs, PPOArgs, PPOTrainer

    torch.manual_seed(seed)
    tok, policy, ref, value, reward = load_models(run_dir)
    mean, std = reward_stats(run_dir / "reward")
    args = PPOArgs(
        rollout_batch_size=HP["rollout_batch_size"], forward_batch_size=HP["rollout_batch_size"],
        mini_batch_size=HP["mini_batch_size"], grad_accum_steps=HP["mini_batch_size"] // HP["micro_batch_size"],
        ppo_epochs=HP["ppo_epochs"], max_new_tokens=HP["max_new_tokens"],
        temperature=HP["temperature"], gamma=HP["gamma"], lam=HP["lam"], clip_range=HP["clip_range"],
        clip_range_value=HP["clip_range_value"], vf_coef=HP["vf_coef"], kl=KLArgs(beta=HP["beta"]),
        missing_eos_penalty=HP["missing_eos_penalty"], optim={"lr": HP["lr"], "weight_decay": 0.0, "grad_clip": 1.0,
                                                                    "betas": HP["adam_betas"], "eps": 1e-8},
    )
    trainer = PPOTrainer(args, policy, value, reward, ref_policy=ref, eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id, reward_mean=mean, reward_std=std)
    prompts = load_prompts(tok, run_dir / "data" / "prompts" / "train.jsonl")
    g = torch.Generator().manual_seed(seed)
    times, gen_tps, scores = [], [], []
    split = {"generation_s": [], "scoring_s": [], "train_s": []}
    for _ in range(iters):
        idx = torch.randint(len(prompts), (HP["rollout_batch_size"],), generator=g).tolist()
        t0 = time.perf_counter()
        m = trainer.step([prompts[i] for i in idx])
        times.append(time.perf_counter() - t0)
        gen_tps.append(m["generation_tokens_per_s"])
        scores.append(m["score"])
        for k in split:
            split[k].append(m[k])
    policy.save_pretrained(str(out / "policy"))
    return {"times": times, "generation_tokens_per_s": gen_tps, "train_scores": scores,
            "peak_memory_mb": peak_memory_mb(), "vocab_size": len(tok), **split}


# --------------------------------------------------------------------------- TRL 1.12


def run_trl(run_dir: Path, iters: int, out: Path, seed: int) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    if not trl.__version__.startswith("1.12"):
        raise RuntimeError(f"expected TRL 1.12 in {sys.executable}, got {trl.__version__}")
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(seed)
    tok, policy, ref, value, reward = load_models(run_dir)
    mean, std = reward_stats(run_dir / "reward")
    # TRL scores with the raw RM output; normalise inside the score head so both implementations
    # optimise exactly the same reward.
    class Normalised(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, h):
            return (self.head(h) - mean) / std

    reward.score = Normalised(reward.score)
    prompts = load_prompts(tok, run_dir / "data" / "prompts" / "train.jsonl")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(prompts), (HP["rollout_batch_size"] * iters,), generator=g).tolist()
    ds = Dataset.from_dict({"input_ids": [prompts[i] for i in idx]})

    # Split each iteration the way ours reports it: generation (batch_generation), scoring (from the end
    # of generation to the first forward with autograd on) and training (from there to the step's end).
    cur = {"gen_s": 0.0, "tokens": 0, "gen_end": None, "train_start": None}
    real_batch_generation = ppo_mod.batch_generation
    real_forward = ppo_mod.forward

    def timed_batch_generation(model, queries, *a, **k):
        t0 = time.perf_counter()
        qr, logits = real_batch_generation(model, queries, *a, **k)
        resp = ppo_mod.truncate_response(tok.eos_token_id, tok.pad_token_id, qr[:, queries.shape[1]:])
        cur["tokens"] += int((resp != tok.pad_token_id).sum())
        cur["gen_end"] = time.perf_counter()
        cur["gen_s"] += cur["gen_end"] - t0
        return qr, logits

    def timed_forward(*a, **k):
        if torch.is_grad_enabled() and cur["train_start"] is None:
            cur["train_start"] = time.perf_counter()
        return real_forward(*a, **k)

    ppo_mod.batch_generation = timed_batch_generation
    ppo_mod.forward = timed_forward
    stamps: list[float] = []
    tps: list[float] = []
    scores: list[float] = []
    split = {"generation_s": [], "scoring_s": [], "train_s": []}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            stamps.append(now)
            tps.append(cur["tokens"] / max(cur["gen_s"], 1e-9))
            split["generation_s"].append(cur["gen_s"])
            split["scoring_s"].append(cur["train_start"] - cur["gen_end"])
            split["train_s"].append(now - cur["train_start"])
            cur.update(gen_s=0.0, tokens=0, gen_end=None, train_start=None)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                scores.append(logs["objective/scores"])

    n_mini = HP["rollout_batch_size"] // HP["mini_batch_size"]
    accum = HP["rollout_batch_size"] // HP["micro_batch_size"]
    cfg = PPOConfig(
        output_dir=str(out / "trl_out"), report_to=[], seed=seed, learning_rate=HP["lr"],
        per_device_train_batch_size=HP["micro_batch_size"], gradient_accumulation_steps=accum, num_mini_batches=n_mini,
        local_rollout_forward_batch_size=HP["rollout_batch_size"], total_episodes=HP["rollout_batch_size"] * iters,
        num_ppo_epochs=HP["ppo_epochs"], response_length=HP["max_new_tokens"], temperature=HP["temperature"],
        stop_token="eos", missing_eos_penalty=HP["missing_eos_penalty"], kl_coef=HP["beta"], kl_estimator="k1",
        cliprange=HP["clip_range"], cliprange_value=HP["clip_range_value"], vf_coef=HP["vf_coef"],
        gamma=HP["gamma"], lam=HP["lam"], num_sample_generations=0, save_strategy="no", logging_steps=1,
        use_cpu=not torch.cuda.is_available(), bf16=False, lr_scheduler_type="constant", max_grad_norm=1.0,
        gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=ds, value_model=value, callbacks=[Clock()])
    t_start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([t_start, *stamps[:-1]], stamps)]
    trainer.model.policy.save_pretrained(str(out / "policy"))
    return {"times": times, "generation_tokens_per_s": tps, "train_scores": scores, "peak_memory_mb": peak_memory_mb(),
            "vocab_size": len(tok), **split}


# --------------------------------------------------------------------------- driver


def ensure_trl_venv() -> Path:
    """Create bench/.venv-trl112 with trl==1.12.* shadowing this venv's trl; returns its python."""
    py = TRL_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    probe = subprocess.run([str(py), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.startswith("1.12"):
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "trl==1.12.*"], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # A .pth line appends our site-packages AFTER the bench venv's own, so trl 1.12 wins over 1.16
    # and everything else (torch, transformers, accelerate, datasets, alignline) is shared.
    (Path(site) / "_alignline_main.pth").write_text(f"{ours}\n{REPO}\n")
    return py


def child(impl: str, run_dir: Path, iters: int, out: Path, seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    res = (run_ours if impl == "ours" else run_trl)(run_dir, iters, out, seed)
    res["score_after"] = score_policy(out / "policy", run_dir, 64, seed + 1)
    import transformers
    import trl

    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
    (out / "result.json").write_text(json.dumps(res, indent=2))


def summarise(name: str, res: dict, score_before: float) -> dict:
    def med(key):  # median after the warm-up iteration
        return statistics.median(res[key][1:] or res[key])

    gen, score, train = med("generation_s"), med("scoring_s"), med("train_s")
    return {
        "impl": name,
        "s_per_iter": med("times"),
        "generation_s": gen,
        "scoring_s": score,
        "train_s": train,
        "non_generation_share": (score + train) / (gen + score + train),
        "generation_tokens_per_s": med("generation_tokens_per_s"),
        "vocab_size": res["vocab_size"],
        "peak_memory_mb": res["peak_memory_mb"],
        "reward_before": score_before,
        "reward_after": res["score_after"],
        "reward_gain": res["score_after"] - score_before,
        "versions": res["versions"],
    }


def write_section(rows: list[dict], argv: list[str], env: str, regime: str) -> None:
    """Replace (or add) the `### <regime>` subsection of BENCHMARKS.md's "PPO vs TRL" section; the
    section's own text and the other regimes' subsections stay as they are."""
    path = REPO / "BENCHMARKS.md"
    ours, trl = rows
    speed = trl["s_per_iter"] / ours["s_per_iter"]
    lines = [
        f"### {regime}",
        "",
        f"Command: `{' '.join(argv)}`  ",
        f"Machine: {env}",
        "",
        f"Vocabulary: {ours['vocab_size']} tokens. Times are medians over iterations 2..N; generation = sampling, "
        "scoring = policy/reference log-probs, values, rewards and advantages, training = the PPO epochs.",
        "",
        "| impl | s / PPO iteration | generation s | scoring s | training s | not generation | "
        "generation tokens/s | peak memory (MB) | RM score before | after | gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['s_per_iter']:.3f} | {r['generation_s']:.3f} | {r['scoring_s']:.3f} | "
                     f"{r['train_s']:.3f} | {r['non_generation_share']:.0%} | {r['generation_tokens_per_s']:.0f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['reward_before']:.3f} | {r['reward_after']:.3f} | "
                     f"{r['reward_gain']:+.3f} |")
    lines += [
        "",
        f"Ours is **{speed:.2f}x** faster per iteration (target >= 3x); reward gain ours "
        f"{ours['reward_gain']:+.3f} vs TRL {trl['reward_gain']:+.3f}.",
        f"Versions: ours {ours['versions']}, TRL side {trl['versions']}. Hyperparameters: `{json.dumps(HP)}`.",
        "",
    ]
    block = "\n".join(lines) + "\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if not re.search(rf"^{re.escape(SECTION)}\n", text, re.M):
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n"
    section = re.search(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", text, re.S | re.M)
    body = section.group(0)
    sub = re.compile(rf"^### {re.escape(regime)}\n.*?(?=^### |\Z)", re.S | re.M)
    body = sub.sub(lambda _: block, body) if sub.search(body) else body.rstrip("\n") + "\n\n" + block
    if not body.endswith("\n\n"):
        body = body.rstrip("\n") + "\n\n"
    path.write_text(text[: section.start()] + body + text[section.end() :], encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="run with data/, sft/ and reward/ stage dirs")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--policy", choices=["sft", "pretrain"], default="sft", help="initial policy (and reference)")
    p.add_argument("--max-new-tokens", type=int, default=HP["max_new_tokens"], help="response_length")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "ppo_vs_trl")
    p.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    global POLICY
    POLICY = a.policy
    HP["max_new_tokens"] = a.max_new_tokens
    if a.child:
        return child(a.child, a.run_dir, a.iters, a.out, a.seed, a.threads)
    for stage in ("data", a.policy, "reward"):
        if not (a.run_dir / stage / "manifest.json").is_file():
            raise SystemExit(f"{a.run_dir / stage} is not a finished stage; run "
                             f"`alignline pipeline --config configs/pipeline/tiny.yaml --run-dir {a.run_dir}` first")
    trl_py = ensure_trl_venv()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    results = {}
    for impl, py in (("ours", sys.executable), ("trl", str(trl_py))):
        out = a.out / impl
        out.mkdir(parents=True, exist_ok=True)
        cmd = [py, str(Path(__file__).resolve()), "--child", impl, "--run-dir", str(a.run_dir), "--iters",
               str(a.iters), "--seed", str(a.seed), "--threads", str(a.threads), "--out", str(out),
               "--policy", a.policy, "--max-new-tokens", str(a.max_new_tokens)]
        print(f"[{impl}] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        results[impl] = json.loads((out / "result.json").read_text())
    import torch

    torch.set_num_threads(a.threads)
    before = score_policy(a.run_dir / a.policy / "checkpoint", a.run_dir, 64, a.seed + 1)
    rows = [summarise(k, results[k], before) for k in ("ours", "trl")]
    for r in rows:
        print(json.dumps(r))
    if a.write:
        import platform

        machine = f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), torch threads={a.threads}"
        if torch.cuda.is_available():
            machine = torch.cuda.get_device_name(0)
        regime = (f"Short answers: the SFT policy, max_new_tokens {a.max_new_tokens}" if a.policy == "sft" else
                  f"Long answers: the pretrained base as policy, max_new_tokens {a.max_new_tokens}")
        write_section(rows, ["python", "bench/ppo_vs_trl.py", *(argv or sys.argv[1:])], machine, regime)


if __name__ == "__main__":
    main()
