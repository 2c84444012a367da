"""How every stage measures a model, once: greedy decoding, gold accuracy, reward-model scores
and their normalisation, and the fixed-prompt sample generations.

    rows = load_prompts(data_stage_dir, "test", limit=64)     # prompts/test.jsonl of the data stage
    result = gold_eval(model, tokenizer, rows, max_new_tokens=16)
    result.accuracy, result.per_task, result.samples          # samples -> samples.jsonl
    raw = score_responses(rm, tokenizer, prompts, responses, result.finished)
    mean, std = reward_normalisation(reward_stage_dir)        # rm_score = (raw - mean) / std

Greedy decoding (`greedy_responses`, `greedy_generate`) and RM scoring (`rm_scores` on token ids,
`score_conversations`, `score_responses`) live only here; the stages call them.

Prompts are rendered with the tokenizer's chat template (`add_generation_prompt=True`), decoded
greedily until `<|eos|>`, decoded with special tokens skipped, and scored with
`alignline.data.tasks.gold_score(response, answer, match)`. The same first-N test prompts are
used by every causal-LM stage, so their samples and accuracies are comparable.

Metric names mean one thing in every eval.json: `rm_score` is the reward model's score normalised
with the reward stage's statistics, (raw - reward_mean) / reward_std (`reward_normalisation`), the
scale PPO trains on; `rm_score_raw` is the RM's raw output. `gold_accuracy` is the share of exact
gold answers under greedy decoding, and exists only where a verifier does: the built-in suite's
prompts, or a prompt file whose rows carry an `answer` and a scorer (`has_verifier`). Elsewhere it
is absent from eval.json, never 0.

Held-out proportions (reward accuracy, win rate, gold accuracy) carry their sample size and a 95%
Wilson interval in eval.json `estimates` (`estimate`), means (the reward margin) a normal one
(`mean_estimate`); the report card shows them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignline.chat import prompt_ids, render
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


def has_verifier(rows: list[dict]) -> bool:
    """Whether gold accuracy exists on these prompt rows: every row has a gold `answer`."""
    return bool(rows) and all(r.get("answer") is not None for r in rows)


def gold_scores(texts: list[str], rows: list[dict]) -> list[float]:
    """The gold scorer on each text against its row's `answer` and `match` (alignline.data.tasks.gold_score)."""
    from alignline.data.tasks import gold_score

    return [gold_score(t, r["answer"], r.get("match", "exact")) for t, r in zip(texts, rows, strict=True)]


def per_task_accuracy(scores: list[float], rows: list[dict]) -> dict[str, float]:
    """{task: mean gold score} over the rows (`task`, default "all"), tasks sorted."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for score, row in zip(scores, rows, strict=True):
        by_task[row.get("task", "all")].append(score)
    return {k: sum(v) / len(v) for k, v in sorted(by_task.items())}


def proportion_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% at z=1.96). It stays inside [0, 1] and is
    honest at small n and at 0 or n successes, where the normal approximation collapses to a point.
    A tie counted as half a success (win rate) enters as a fractional count."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def estimate(successes: float, n: int) -> dict[str, float | int]:
    """{"value", "n", "low", "high"}: a held-out proportion with its sample size and 95% interval."""
    lo, hi = proportion_interval(successes, n)
    return {"value": successes / n if n else math.nan, "n": n, "low": round(lo, 4), "high": round(hi, 4)}


def mean_estimate(values: list[float], z: float = 1.96) -> dict[str, float | int]:
    """{"value", "n", "low", "high"}: a held-out mean (e.g. the reward margin) with its sample size and
    normal 95% interval, mean +- z * sd / sqrt(n) (sd with n - 1; no interval from one value)."""
    n = len(values)
    if n == 0:
        return {"value": math.nan, "n": 0, "low": math.nan, "high": math.nan}
    mean = sum(values) / n
    half = z * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else math.nan
    return {"value": mean, "n": n, "low": round(mean - half, 4), "high": round(mean + half, 4)}


@dataclass
class GoldResult:
    accuracy: float | None  # None: the prompts have no verifier (no gold answers)
    per_task: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)  # per sample: the model emitted eos


def gold_summary(gold: GoldResult | None) -> dict[str, Any]:
    """The eval.json fields of a gold evaluation: `gold_accuracy`, `gold_per_task` and its estimate
    (n, 95% interval) where the prompts have a verifier; `verifier: "none"` and no gold_accuracy where
    they do not; nothing when no prompts were evaluated."""
    if gold is None:
        return {}
    n = len(gold.samples)
    if gold.accuracy is None:
        return {"verifier": "none", "gold_prompts": n}
    return {"gold_accuracy": gold.accuracy, "gold_per_task": gold.per_task, "gold_prompts": n,
            "estimates": {"gold_accuracy": estimate(gold.accuracy * n, n)}}


def load_prompts(data_dir: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """The first `limit` rows of `<data_dir>/prompts/<split>.jsonl` (`prompt`, `answer`, `task`, `match`)."""
    from alignline.files import read_jsonl

    return read_jsonl(Path(data_dir) / "prompts" / f"{split}.jsonl", limit)


def _eos_set(eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))


@torch.inference_mode()
def greedy_responses(
    model,
    prompts: list[list[int]],
    *,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy response token ids for each prompt, cut after the first eos (which is kept), in
    left-padded batches. Plain greedy: nothing of the checkpoint's generation_config.json (repetition
    penalty, n-gram bans, min length) is applied (`alignline.generation.decoding_config`)."""
    from alignline.rl.rollout import left_pad

    eos = _eos_set(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)  # masked out either way
    device = next(model.parameters()).device
    gen_cfg = decoding_config(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
                              pad_token_id=pad)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for i in range(0, len(prompts), batch_size):
            ids, attn = left_pad(prompts[i:i + batch_size], pad, device)
            gen = generate_exactly(model, gen_cfg, input_ids=ids, attention_mask=attn)[:, ids.shape[1]:].tolist()
            for row in gen:
                stop = next((j for j, t in enumerate(row) if t in eos), len(row) - 1)
                out.append(row[: stop + 1])
    finally:
        model.train(was_training)
    return out


def greedy_generate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    chat_template: str | None = None,
    eos_token_id: int | list[int] | None = None,
) -> list[str]:
    """Greedy responses as text (special tokens skipped) for chat prompts. Stops at the tokenizer's
    eos, or at any of `eos_token_id` when given (a released base may end turns with several)."""
    ids = prompt_ids(tokenizer, conversations, chat_template)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    responses = greedy_responses(model, ids, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


@torch.inference_mode()
def rm_scores(reward_model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """Raw reward-model scores [N] (fp32, on the CPU) of whole token sequences (prompt + response),
    read from the score head at each sequence's last token, the way PPO scores its rollouts
    (`alignline.rl.rollout.sequence_scores`). Batches are left-padded with positions counted from the
    first real token, so a padded row scores as it would alone, whatever the pad id. Normalise with
    `reward_normalisation` to get `rm_score`."""
    from alignline.rl.rollout import left_pad, sequence_scores

    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    out = []
    try:
        for i in range(0, len(sequences), batch_size):
            ids, attn = left_pad(sequences[i:i + batch_size], pad_token_id, device)
            last = torch.ones((len(ids), 1), dtype=torch.long, device=device)  # the last column is real
            out.append(sequence_scores(reward_model, ids, attn, ids.shape[1] - 1, last).float().cpu())
    finally:
        reward_model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def score_conversations(reward_model, tokenizer, conversations: list[list[dict]], batch_size: int = 32,
                        max_length: int | None = None) -> list[float]:
    """Raw RM scores of whole conversations (their last turn is the answer being judged), rendered
    with the chat template, which closes the answer with eos; cut to the first `max_length` tokens."""
    seqs = [tokenizer(render(tokenizer, c), add_special_tokens=False)["input_ids"][:max_length] for c in conversations]
    return rm_scores(reward_model, seqs, tokenizer.pad_token_id, batch_size).tolist()


def score_responses(reward_model, tokenizer, prompts: list[list[dict]], responses: list[str], finished: list[bool],
                    batch_size: int = 32) -> list[float]:
    """Raw RM scores of generated answers: the templated prompt, the answer's tokens, and eos only
    where the model emitted one (`finished`). An answer cut at max_new_tokens is scored as cut, as
    PPO scores it, not closed by the template as if finished."""
    eos = tokenizer.eos_token_id
    seqs = [p + tokenizer(r, add_special_tokens=False)["input_ids"] + ([eos] if f else [])
            for p, r, f in zip(prompt_ids(tokenizer, prompts), responses, finished, strict=True)]
    return rm_scores(reward_model, seqs, tokenizer.pad_token_id, batch_size).tolist()


def win_rate(scores: torch.Tensor, baseline: torch.Tensor) -> float:
    """Share of prompts where `scores` beat `baseline` (same prompts, same order); a tie counts half."""
    return float(((scores > baseline).float() + 0.5 * (scores == baseline).float()).mean())


def overoptimised(rm_score_gain: float, gold_accuracy_gain: float) -> bool:
    """Reward hacking signature: the proxy (RM) improved while the true objective (gold) got worse."""
    return bool(rm_score_gain > 0 and gold_accuracy_gain < 0)


@torch.inference_mode()
def kl_to_reference(
    policy,
    reference,
    prompts: list[list[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    temperature: float = 1.0,
    samples: int = 1,
) -> float:
    """Mean over prompts of the exact sum_t KL(pi(.|x,y<t) || ref(.|x,y<t)) along `samples` answers
    per prompt sampled from softmax(policy logits / T). `reference=None` means the policy is a PEFT
    model whose reference is its own base (adapters disabled)."""
    from contextlib import nullcontext

    from alignline.rl.rollout import generate, left_pad, response_logits, truncate_after_eos

    ref, adapters_off = (policy, policy.disable_adapter) if reference is None else (reference, nullcontext)
    device = next(policy.parameters()).device
    total, n = 0.0, 0
    for _ in range(samples):
        for i in range(0, len(prompts), batch_size):
            ids, attn = left_pad(prompts[i:i + batch_size], pad_token_id, device)
            resp = generate(policy, ids, attn, max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_id=eos_token_id, pad_id=pad_token_id)
            resp, mask, _ = truncate_after_eos(resp, eos_token_id, pad_token_id)
            qr, full = torch.cat([ids, resp], 1), torch.cat([attn, mask], 1)
            P = ids.shape[1]
            lp = torch.log_softmax(response_logits(policy, qr, full, P, temperature), -1)
            with adapters_off():
                lq = torch.log_softmax(response_logits(ref, qr, full, P, temperature), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            total += float((kl * mask).sum())
            n += len(ids)
    return total / max(n, 1)


# The built-in suite's pretraining corpus writes its questions as "Q: {prompt} A: {answer}" (data/tasks.py).
QA_PROMPT, QA_NEXT = "Q: {} A:", " Q:"


def gold_eval(model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 32,
              prompt_format: str = "chat") -> GoldResult:
    """Greedy-decode each prompt row and, where the rows have a verifier, score it against its gold
    answer. Without one, `accuracy` is None and the samples carry no score.

    prompt_format "chat": the last user turn through the chat template (chat models). "qa": the corpus's
    own "Q: {prompt} A:" with the answer read up to the next " Q:" (base models, which never saw the chat
    template; the architecture lab compares pretrained variants this way).
    """
    if prompt_format == "qa":
        prompts = [tokenizer(QA_PROMPT.format(r["prompt"][-1]["content"]), add_special_tokens=False)["input_ids"]
                   for r in rows]
    elif prompt_format == "chat":
        prompts = prompt_ids(tokenizer, [r["prompt"] for r in rows])
    else:
        raise ValueError(f"prompt_format={prompt_format!r}: use 'chat' or 'qa'")
    ids = greedy_responses(model, prompts, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
    responses = tokenizer.batch_decode(ids, skip_special_tokens=True)
    if prompt_format == "qa":
        responses = [text.split(QA_NEXT)[0] for text in responses]
    finished = [bool(x) and x[-1] == tokenizer.eos_token_id for x in ids]
    if not has_verifier(rows):
        samples = [{"prompt": r["prompt"][-1]["content"], "response": t, "task": r.get("task")}
                   for r, t in zip(rows, responses, strict=True)]
        return GoldResult(accuracy=None, samples=samples, finished=finished)
    scores = gold_scores(responses, rows)
    samples = [{"prompt": row["prompt"][-1]["content"], "response": resp, "answer": row["answer"],
                "task": row.get("task"), "score": score} for row, resp, score in zip(rows, responses, scores, strict=True)]
    acc = sum(scores) / len(scores) if scores else math.nan
    return GoldResult(accuracy=acc, per_task=per_task_accuracy(scores, rows),
                      samples=samples, finished=finished)


# --------------------------------------------------------------------------- loss by position


def loss_by_position(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token loss at each position of `windows` (N, T+1 token ids): a float64 tensor (T,)
    whose entry p is the mean over the N windows of -log p(w[p+1] | w[:p+1]) (natural log, fp32 logits).

    The length-extrapolation measure of `alignline ablate`: windows longer than the training length
    show how the loss behaves at positions the model never trained on. The model runs in eval mode
    on the device of its parameters; extra outputs (an MoE `aux_loss`) are ignored. A model that
    cannot take T positions raises here (e.g. ValueError from learned position embeddings).
    """
    import torch.nn.functional as F

    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, T+1) token ids with T >= 1; got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    sums = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                b = windows[i:i + batch_size].to(device)
                logits = model(input_ids=b[:, :-1]).logits.float()  # (B, T, V)
                loss = F.cross_entropy(logits.transpose(1, 2), b[:, 1:], reduction="none")  # (B, T)
                sums += loss.sum(0).double().cpu()
    finally:
        model.train(was)
    return sums / len(windows)


def bucket_means(values: torch.Tensor | list[float], width: int) -> list[dict[str, float]]:
    """`values` by position averaged over consecutive buckets of `width` positions (the last may be
    shorter): [{"start", "end" (exclusive), "loss"}], for a readable loss-vs-position plot."""
    if width < 1:
        raise ValueError(f"bucket width must be >= 1; got {width}")
    vals = [float(v) for v in values]
    return [{"start": s, "end": min(s + width, len(vals)), "loss": math.fsum(vals[s:s + width]) / len(vals[s:s + width])}
            for s in range(0, len(vals), width)]
