"""Preference pairs from a policy's own samples, labelled by the built-in gold scorer.

    from alignline.rl.policy_pairs import sample_policy_pairs
    pairs, stats = sample_policy_pairs(sft_model, tok, prompt_rows, samples_per_prompt=4)
    # pairs: TRL preference rows {"prompt", "chosen", "rejected"}; stats: sample accuracy, counts

Why: a reward model trained only on hand-made rejected answers has never seen the mistakes the
policy actually makes, and PPO finds them at once (the tiny SFT model's "v x" for "What is 5+8?"
scored above "13"). InstructGPT's labellers compared samples of the policy being aligned; here
the task suite's gold scorer plays that labeller: for each prompt (rows with `prompt`, `answer`,
`match`, as in prompts/*.jsonl) we sample the policy and pair the gold answer (chosen) with each
distinct wrong sample (rejected). Prompts whose samples are all right give no pair.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from alignline.chat import prompt_ids
from alignline.data.tasks import gold_score
from alignline.rl.rollout import generate, left_pad


@torch.inference_mode()
def sample_responses(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    samples_per_prompt: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int = 64,
    progress: bool = False,
) -> list[list[str]]:
    """`samples_per_prompt` sampled responses per chat prompt, decoded without special tokens."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was = model.training
    model.eval()
    ids = prompt_ids(tokenizer, conversations)
    flat = [p for p in ids for _ in range(samples_per_prompt)]
    eos = tokenizer.eos_token_id
    # Released checkpoints often pad with EOS; only decoding happens here, so that is fine.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts: list[str] = []
    try:
        for i in tqdm(range(0, len(flat), batch_size), desc="sampling policy", disable=not progress):
            q, attn = left_pad(flat[i : i + batch_size], pad, device)
            resp = generate(model, q, attn, max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_id=eos, pad_id=pad)
            for row in resp.tolist():
                row = row[: row.index(eos)] if eos in row else row  # the answer ends at the first EOS
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was)
    return [texts[k * samples_per_prompt : (k + 1) * samples_per_prompt] for k in range(len(conversations))]


def label_pairs(
    rows: list[dict], samples: list[list[str]], max_pairs_per_prompt: int, seed: int = 0
) -> tuple[list[dict], dict[str, Any]]:
    """Pair each prompt's gold answer with up to `max_pairs_per_prompt` distinct wrong samples."""
    rng = random.Random(seed)
    pairs: list[dict] = []
    n_right = n_total = 0
    for row, outs in zip(rows, samples, strict=True):
        match = row.get("match", "exact")
        right = [gold_score(text, row["answer"], match) > 0 for text in outs]
        n_total += len(outs)
        n_right += sum(right)
        # distinct wrong texts, in sampling order
        wrong = list(dict.fromkeys(text.strip() for text, ok in zip(outs, right) if not ok))
        rng.shuffle(wrong)
        for text in wrong[:max_pairs_per_prompt]:
            pairs.append({
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": row["answer"]}],
                "rejected": [{"role": "assistant", "content": text}],
            })
    stats = {"prompts": len(rows), "samples": n_total, "sample_accuracy": n_right / max(n_total, 1),
             "pairs": len(pairs)}
    return pairs, stats


def sample_policy_pairs(
    model,
    tokenizer,
    rows: list[dict],
    *,
    samples_per_prompt: int = 4,
    max_pairs_per_prompt: int = 2,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[dict], dict[str, Any]]:
    """Sample `model` on `rows` (prompts with gold answers) and label the pairs; see the module doc."""
    missing = [i for i, r in enumerate(rows) if "answer" not in r or "prompt" not in r]
    if missing:
        raise ValueError(
            f"on-policy pairs need prompt rows with `prompt` and `answer` (gold); rows {missing[:5]} lack them "
            "(use the data stage's prompts/*.jsonl)"
        )
    samples = sample_responses(model, tokenizer, [r["prompt"] for r in rows], samples_per_prompt=samples_per_prompt,
                               temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress)
    return label_pairs(rows, samples, max_pairs_per_prompt, seed)
