"""Gold accuracy by greedy decoding and the fixed-prompt sample generations of every stage.

    rows = load_prompts(data_stage_dir, "test", limit=64)     # prompts/test.jsonl of the data stage
    result = gold_eval(model, tokenizer, rows, max_new_tokens=16)
    result.accuracy, result.per_task, result.samples          # samples -> samples.jsonl

Prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`), decoded
greedily until `<|eos|>`, decoded with special tokens skipped, and scored with
`alignline.data.tasks.gold_score(response, answer, match)`. The same first-N test prompts are
used by every causal-LM stage, so their samples and accuracies are comparable.

Metric names mean one thing in every eval.json: `rm_score` is the reward model's score normalised
with the reward stage's statistics, (raw - reward_mean) / reward_std (`reward_normalisation`), the
scale PPO trains on; `rm_score_raw` is the RM's raw output. `gold_accuracy` is the share of exact
gold answers under greedy decoding.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignline.generation import decoding_config, generate_exactly


def reward_normalisation(reward_dir) -> tuple[float, float]:
    """(reward_mean, reward_std) of a reward stage (an `alignline.artifacts.StageDir`): the mean and std
    of its scores on held-out chosen answers, from its eval.json. `rm_score` = (raw - mean) / std."""
    from alignline.artifacts import StageError

    ev = reward_dir.eval
    where = reward_dir.path / "eval.json"
    if "reward_mean" not in ev or "reward_std" not in ev:
        raise StageError(
            f"{where} has no reward_mean/reward_std (keys: {sorted(ev)}); the reward stage must record the "
            "mean and std of its scores on held-out responses so scores can be normalised; re-run it"
        )
    mean, std = float(ev["reward_mean"]), float(ev["reward_std"])
    if not (math.isfinite(std) and std > 0):
        raise StageError(f"{where}: reward_std={std} must be a positive number; re-run the reward stage")
    return mean, std


@dataclass
class GoldResult:
    accuracy: float
    per_task: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)


def load_prompts(data_dir: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """The first `limit` rows of `<data_dir>/prompts/<split>.jsonl` (`prompt`, `answer`, `task`, `match`)."""
    from alignline.files import read_jsonl

    return read_jsonl(Path(data_dir) / "prompts" / f"{split}.jsonl", limit)


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> list[str]:
    """Greedy responses (special tokens skipped) for chat prompts, batched with left padding."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end flush
    out: list[str] = []
    # Plain greedy: a checkpoint's repetition penalty, n-gram ban, min length... must not change the scores.
    gen_cfg = decoding_config(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[i:i + batch_size]]
            # The template already writes <|bos|>; don't let the tokenizer add another.
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = generate_exactly(model, gen_cfg, **enc)
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out


def gold_eval(model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 32) -> GoldResult:
    """Greedy-decode each prompt row and score it against its gold answer."""
    from alignline.data.tasks import gold_score

    responses = greedy_generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    by_task: dict[str, list[float]] = defaultdict(list)
    samples = []
    for row, resp in zip(rows, responses, strict=True):
        score = float(gold_score(resp, row["answer"], row.get("match", "exact")))
        by_task[row.get("task", "all")].append(score)
        samples.append({"prompt": row["prompt"][-1]["content"], "response": resp, "answer": row["answer"],
                        "task": row.get("task"), "score": score})
    total = [s for v in by_task.values() for s in v]
    acc = sum(total) / len(total) if total else math.nan
    return GoldResult(accuracy=acc, per_task={k: sum(v) / len(v) for k, v in sorted(by_task.items())},
                      samples=samples)
