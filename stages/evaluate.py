"""Stage `evaluate`: every causal-LM checkpoint of a run on the same held-out prompts, side by side.

    python -m stages.evaluate --config configs/evaluate/tiny.yaml --run-dir runs/tiny
    alignline stage evaluate --run-dir runs/tiny --set num_prompts=32

For each of the run's `pretrain`, `sft`, `rlhf` and `distill` stage outputs that exists (complete), it greedily
answers the first `num_prompts` prompts of `prompts/<split>.jsonl` (data stage) and reports
gold accuracy (the prompts' scorer against their answer, with n and a 95% interval; only where the
prompts have a verifier, else `verifier: "none"` and no gold numbers) and the mean score of the
response under the reward model (`reward` stage, when present). `rm_score` is normalised with the reward
stage's statistics, the same meaning (and scale) as the rlhf stage's `rm_score`; `rm_score_raw` is
the RM's raw output (alignline.evaluation). Outputs (stage contract): eval.json (per stage:
gold_accuracy, per_task, rm_score, rm_score_raw, checkpoint; the normalisation used), samples.jsonl
(one row per prompt: responses, gold scores and normalised RM scores of every stage), and a headline
with `<stage>_gold_accuracy` / `<stage>_rm_score` for the report card.

Standard benchmarks (`lm_eval: {tasks: [...], limit, num_fewshot, batch_size, chat_template}`, off by
default; chat_template auto asks sft/rlhf through their chat template, pretrain in plain text): the
lm-evaluation-harness tasks run on each evaluated stage's model (alignline/benchmarks.py); scores in
eval.json `stages.<stage>.lm_eval` ({task: {metric: value, metric_stderr, n, version}}), one headline
number per stage and task, `<stage>_<task>_<metric>`, and a table in the report card. Our offline
tasks (alignline_gold, alignline_pref) read this run's data stage; the harness's need the Hub.

The rlhf input is one algorithm's output, `rlhf-<algorithm>/`: in the pipeline the one its rlhf
config selects; by hand `--rlhf DIR`, else the only `rlhf-*` dir of the run, else the most recently
finished (logged). eval.json names it per stage (`dir`, `variant`); other algorithms' outputs in
the run dir are listed by the report card from their own eval.json/headline, not evaluated here.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignline.artifacts import StageRun
from alignline.benchmarks import check_tasks, evaluate_model, missing_fields, primary_metric
from alignline.config import StrictModel
from alignline.stage_cli import InputSpec, stage_main

log = logging.getLogger("stages.evaluate")

MODEL_STAGES = ("pretrain", "sft", "rlhf", "distill")
INPUTS = [
    InputSpec("data", default="data", kinds=("data",), help="data stage directory (prompts/<split>.jsonl)"),
    InputSpec("reward", default="reward", kinds=("reward",), required=False, help="reward stage (RM scores); optional"),
    *[InputSpec(s, default=s, required=False, help=f"{s} stage to evaluate; optional", variants=s == "rlhf")
      for s in MODEL_STAGES],
]


class LmEvalConfig(StrictModel):
    """Standard benchmarks through lm-evaluation-harness on every evaluated stage (alignline/benchmarks.py)."""

    tasks: list[str] = Field(default_factory=list, description=(
        "lm-eval task names; empty = off. Ours run offline on this run's data stage (alignline_gold: "
        "greedy exact match, alignline_pref: chosen vs rejected by log-likelihood); the harness's own "
        "(hellaswag, arc_easy, gsm8k, ...) download their data from the Hugging Face Hub"))
    limit: int | None = Field(None, gt=0, description="first N documents of each task; null = all")
    num_fewshot: int | None = Field(None, ge=0, description="examples in context; null = each task's default (0 for ours)")
    batch_size: int = Field(16, gt=0, description="requests per forward/generation batch")
    chat_template: Literal["auto", "on", "off"] = Field("auto", description=(
        "ask each prompt as a user turn through the checkpoint's chat template (on), as plain text (off), "
        "or auto: chat for the chat-trained stages (sft, rlhf, distill), plain text for pretrain"))


class Config(StrictModel):
    """Config of the evaluate stage."""

    split: Literal["val", "test"] = Field("test", description="prompts/<split>.jsonl of the data stage")
    num_prompts: int = Field(64, gt=0, description="first N prompts of the split (the same for every stage)")
    max_new_tokens: int = Field(16, gt=0, description="greedy answer length cap in tokens")
    batch_size: int = Field(32, gt=0, description="prompts per generation and RM scoring batch")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when there is one")
    seed: int = Field(0, description="RNG seed set before evaluating (decoding is greedy)")
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig,
                                  description="lm-evaluation-harness tasks run on every evaluated stage")


def run(config: Config, inputs: dict[str, Path], run_dir: str | Path) -> Path:
    import torch

    from alignline.degeneration import output_stats
    from alignline.distributed import pick_device
    from alignline.evaluation import estimate, gold_eval, load_prompts, reward_normalisation, score_responses
    from alignline.models import load_causal_lm, load_chat_tokenizer, load_classifier
    from alignline.training import seed_everything

    stage_inputs = {k: v for k, v in inputs.items() if v is not None}
    device = pick_device(config.device)  # before the stage dir exists: device: cuda without one is a user error
    lm_tasks, lm_skipped = list(config.lm_eval.tasks), {}
    if lm_tasks:  # task names and data files checked before any work (UserError)
        check_tasks(lm_tasks, stage_inputs.get("data"), missing_fields_ok=True)
        # As gold accuracy is not measured on prompts without a verifier, our tasks are not run on data that lacks
        # what they read (answers, preference pairs): logged and recorded in eval.json, never scored 0.
        lm_skipped = missing_fields(lm_tasks, stage_inputs["data"]) if stage_inputs.get("data") else {}
        lm_tasks = [t for t in lm_tasks if t not in lm_skipped]
        for task, why in lm_skipped.items():
            log.warning("evaluate: lm-eval task %s skipped: %s", task, why)
    run = StageRun(run_dir, "evaluate", config, inputs=stage_inputs, source=__file__)
    seed_everything(config.seed)
    rows = load_prompts(run.input("data").path, config.split, limit=config.num_prompts)
    conversations = [r["prompt"] for r in rows]
    models = [s for s in MODEL_STAGES if s in stage_inputs]
    if not models:
        raise ValueError(f"evaluate: no model stage to evaluate; give at least one of {', '.join(MODEL_STAGES)} "
                         f"(found none complete under {run_dir})")

    rm = rm_tok = None
    rm_mean, rm_std = 0.0, 1.0
    if "reward" in stage_inputs:
        rm_mean, rm_std = reward_normalisation(run.input("reward"))
        ckpt = run.input("reward").checkpoint
        rm = load_classifier(ckpt, device=device)
        rm_tok = load_chat_tokenizer(ckpt)

    results: dict[str, dict] = {}
    responses: dict[str, list[str]] = {}
    golds: dict[str, list[float]] = {}
    estimates: dict[str, dict] = {}  # held-out proportions with n and a 95% interval
    rms: dict[str, list[float]] = {}
    lm_eval_meta: dict = {}
    for i, stage in enumerate(models):
        src = run.input(stage)
        ckpt = src.checkpoint
        log.info("evaluate: %s (%s, %d/%d) from %s on %d prompts", stage, src.path.name, i + 1, len(models), ckpt,
                 len(rows))
        model = load_causal_lm(ckpt, device=device)
        tok = load_chat_tokenizer(ckpt)
        gold = gold_eval(model, tok, rows, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
        responses[stage] = [s["response"] for s in gold.samples]
        results[stage] = {"checkpoint": str(ckpt), "dir": src.path.name,
                          **({"variant": src.manifest["variant"]} if src.manifest.get("variant") else {}),
                          "outputs": output_stats(responses[stage])}  # degeneration detectors
        if gold.accuracy is not None:  # the prompts have a verifier
            golds[stage] = [s["score"] for s in gold.samples]
            results[stage].update(gold_accuracy=gold.accuracy, per_task=gold.per_task)
            estimates[f"{stage}_gold_accuracy"] = estimate(sum(golds[stage]), len(rows))
        if rm is not None:
            raw = score_responses(rm, rm_tok, conversations, responses[stage], gold.finished, config.batch_size)
            rms[stage] = [(x - rm_mean) / rm_std for x in raw]
            results[stage]["rm_score"] = sum(rms[stage]) / len(rms[stage])
            results[stage]["rm_score_raw"] = sum(raw) / len(raw)
        if lm_tasks:  # the harness on the model already loaded (no second load)
            t0 = time.perf_counter()
            chat = {"on": True, "off": False}.get(config.lm_eval.chat_template, stage != "pretrain")
            bench = evaluate_model(model, tok, lm_tasks, data_dir=run.input("data").path,
                                   limit=config.lm_eval.limit, num_fewshot=config.lm_eval.num_fewshot,
                                   batch_size=config.lm_eval.batch_size, seed=config.seed, chat_template=chat)
            results[stage]["lm_eval"] = bench["tasks"]
            results[stage]["lm_eval_chat_template"] = chat
            lm_eval_meta = {k: bench[k] for k in ("lm_eval", "limit", "num_fewshot")}
            log.info("evaluate: %s lm-eval %s in %.1f s", stage, ", ".join(lm_tasks),
                     time.perf_counter() - t0)
        if gold.accuracy is not None:
            run.metrics.log(i, **{f"{stage}_gold_accuracy": gold.accuracy})
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    samples = []
    for j, row in enumerate(rows):
        samples.append({
            "prompt": row["prompt"][-1]["content"],
            **({"answer": row["answer"]} if golds else {}),
            "task": row.get("task"),
            "responses": {s: responses[s][j] for s in models},
            **({"gold": {s: golds[s][j] for s in models}} if golds else {}),
            **({"rm_score": {s: rms[s][j] for s in models}} if rms else {}),
        })
    headline: dict[str, float] = {}
    for s in models:
        for key in ("gold_accuracy", "rm_score"):
            if key in results[s]:
                headline[f"{s}_{key}"] = results[s][key]
        # One number per lm-eval task and stage (its primary metric); the rest is in eval.json.
        for task, row in results[s].get("lm_eval", {}).items():
            metric = primary_metric(task, row)
            if metric is not None and row[metric] is not None:
                headline[f"{s}_{task}_{metric}"] = row[metric]
    # The best stage by gold accuracy where there is a verifier, else by the reward model's score.
    rank_by = "gold_accuracy" if golds else ("rm_score" if rms else None)
    best = (max(models, key=lambda s: -1.0 if math.isnan(results[s][rank_by]) else results[s][rank_by])
            if rank_by else None)
    evaluation = {"split": config.split, "num_prompts": len(rows), "stages": results, "best_stage": best,
                  "best_by": rank_by, "verifier": "gold" if golds else "none", "estimates": estimates,
                  "reward_model": str(run.input("reward").checkpoint) if rm is not None else None,
                  **({"rm_normalisation": {"reward_mean": rm_mean, "reward_std": rm_std}} if rm is not None else {}),
                  **({"lm_eval": {"tasks": lm_tasks, **lm_eval_meta}} if lm_eval_meta else {}),
                  **({"lm_eval_skipped": lm_skipped} if lm_skipped else {})}
    return run.finalize(eval=evaluation, headline=headline, samples=samples)


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main("evaluate", Config, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
