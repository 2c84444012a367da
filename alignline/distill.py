"""Knowledge distillation on TRL's DistillationTrainer: a student learns a teacher's next-token distribution.

    from alignline.distill import DistillTrainer, trl_beta, distill_examples
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...,
                             beta=trl_beta("forward_kl")), train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, on_policy_fraction=0.0, sft_weight=0.2)

The stage that uses it is stages/distill.py. TRL 1.16's DistillationTrainer is on-policy only: every
batch's completions are sampled from the student, and the loss is TRL's generalised JSD between the
student's and the teacher's softmax(logits / T) over the completion tokens (beta 0 = forward KL(teacher ||
student), 1 = reverse KL(student || teacher), in between the JSD with mixture (1 - beta) student + beta
teacher; no T^2 factor). `DistillTrainer` adds the two things it lacks, and nothing else:

- **Supervised distillation** (teacher-forced on the data's answers, word-level KD): a batch whose
  completions come from the dataset's `completion_ids` instead of the student's samples. Generalised
  Knowledge Distillation's lambda, `on_policy_fraction`, mixes the two per batch: 0 = supervised, 1 = TRL's
  on-policy. The draw is a function of (seed, step), so every rank makes the same one and a resumed run
  the same as an uninterrupted one.
- **The ground-truth SFT loss mixed in**: loss = (1 - w) * divergence + w * cross-entropy on the data's
  answers (`sft_weight`; 1 is plain SFT on the same batches, the baseline a distilled student must beat).
  Both terms are normalised by the global batch's token counts, so gradient accumulation and DDP give the
  update one big batch would.

Every generation, padding, loss, logging and distributed path is TRL's.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Literal

import torch
from trl import DistillationTrainer

from alignline.config import InputError

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def trl_beta(divergence: Divergence, jsd_beta: float = 0.5) -> float:
    """TRL's `beta` for a divergence: forward KL(teacher || student) = 0, reverse KL(student || teacher) = 1,
    the generalised JSD = `jsd_beta` (the teacher's weight in the mixture)."""
    if divergence == "forward_kl":
        return 0.0
    if divergence == "reverse_kl":
        return 1.0
    if divergence == "jsd":
        if not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"jsd_beta={jsd_beta}: the JSD needs 0 < beta < 1 (0 and 1 are the two KLs)")
        return jsd_beta
    raise ValueError(f"divergence={divergence!r}: use forward_kl, reverse_kl or jsd")


# --------------------------------------------------------------------------- tokenizers


def check_shared_tokenizer(teacher_tok, student_tok, teacher_vocab: int, student_vocab: int,
                           teacher_name: str, student_name: str) -> None:
    """InputError unless teacher and student read the same token ids: the divergence compares the two
    next-token distributions id by id, so both tokenizers and both output layers must agree."""
    sizes = (f"teacher {teacher_name}: {len(teacher_tok)} tokens in its tokenizer, vocab_size {teacher_vocab}; "
             f"student {student_name}: {len(student_tok)} tokens, vocab_size {student_vocab}")
    if teacher_vocab != student_vocab or len(teacher_tok) != len(student_tok):
        raise InputError(f"teacher and student must share a tokenizer ({sizes}). Use a student built on the "
                         "teacher's tokenizer (leave --student out for a fresh one), or a teacher of the same family")
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        differ = sorted(set(teacher_tok.get_vocab().items()) ^ set(student_tok.get_vocab().items()))[:3]
        raise InputError(f"teacher and student must share a tokenizer: the sizes agree but the tokens differ "
                         f"({sizes}; e.g. {differ}). Use a student built on the teacher's tokenizer")


# --------------------------------------------------------------------------- data


def distill_examples(tokenizer, conversations: list[list[dict]], max_completion_length: int) -> list[dict]:
    """Training rows from chats or prompts: {"prompt": messages before the last assistant turn,
    "prompt_ids", "completion_ids": that turn's tokens (cut at `max_completion_length`), or none for a
    prompt without an answer}. The ids are the chat template's, as TRL tokenizes the prompt."""
    from alignline.chat import conversation_ids, prompt_ids

    rows = []
    for i, msgs in enumerate(conversations):
        has_answer = bool(msgs) and msgs[-1]["role"] == "assistant"
        prompt = msgs[:-1] if has_answer else msgs
        if not prompt:
            raise InputError(f"example {i}: no prompt turn before the answer; each example needs a user turn")
        p = prompt_ids(tokenizer, [prompt])[0]
        row: dict[str, Any] = {"prompt": prompt, "prompt_ids": p}
        if has_answer:
            full = conversation_ids(tokenizer, [msgs])[0]
            if full[: len(p)] != p:
                raise InputError(f"example {i}: the chat template renders the prompt differently inside the whole "
                                 "chat than on its own (with the generation prompt), so the answer's tokens cannot be "
                                 "cut out; use a prefix-preserving template")
            row["completion_ids"] = full[len(p):][:max_completion_length]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- trainer


class DistillTrainer(DistillationTrainer):
    """TRL's DistillationTrainer plus supervised batches and the SFT loss (see the module docstring)."""

    def __init__(self, *args, on_policy_fraction: float = 1.0, sft_weight: float = 0.0, **kwargs):
        if not 0.0 <= on_policy_fraction <= 1.0 or not 0.0 <= sft_weight <= 1.0:
            raise ValueError(f"on_policy_fraction={on_policy_fraction} and sft_weight={sft_weight} must be in [0, 1]")
        self.on_policy_fraction = on_policy_fraction
        self.sft_weight = sft_weight
        self._data_completions: list[list[int]] | None = None
        self._expected_prompts: list[list[int]] | None = None
        super().__init__(*args, **kwargs)

    def on_policy_now(self) -> bool:
        """Whether this generation batch is sampled by the student (else teacher-forced on the data's
        answers). Seeded by (seed, optimizer step; TRL's own `_step` restarts at 0 on resume): the same on
        every rank and after a resume."""
        f = self.on_policy_fraction
        if f in (0.0, 1.0) or not self.model.training:
            return f == 1.0 and self.model.training  # evaluation always scores the data's answers
        return random.Random(f"{self.args.seed}:{self.state.global_step}").random() < f

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        on_policy = self.on_policy_now()
        if not on_policy:
            if any("completion_ids" not in x for x in inputs):
                raise InputError("supervised distillation (on_policy_fraction < 1) needs answers in the data; these "
                                 "examples are prompts only. Use chats, or set loss.on_policy_fraction=1")
            self._data_completions = [list(x["completion_ids"]) for x in inputs]
            self._expected_prompts = [list(x["prompt_ids"]) for x in inputs]
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._data_completions = self._expected_prompts = None
        if self.sft_weight > 0:
            out.update(self._ground_truth(inputs))
        self._metrics[mode]["on_policy"].append(float(on_policy))
        return out

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self._data_completions is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        if [list(p) for p in prompt_ids] != self._expected_prompts:
            raise RuntimeError("TRL tokenized the prompts differently from alignline.chat.prompt_ids; the data's "
                               "answers would not line up with their prompts")
        return self._data_completions

    def _ground_truth(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The data's prompt + answer, right-padded, with labels on the answer only, and the global batch's
        answer-token count (the SFT term's normaliser, as `num_items_in_batch` is the divergence's)."""
        if any("completion_ids" not in x for x in inputs):
            raise InputError("loss.sft_weight > 0 needs answers in the data; these examples are prompts only")
        device = self.accelerator.device
        seqs = [list(x["prompt_ids"]) + list(x["completion_ids"]) for x in inputs]
        width = max(len(s) for s in seqs)
        pad = self._tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, x) in enumerate(zip(seqs, inputs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            p = len(x["prompt_ids"])
            labels[i, p: len(s)] = torch.tensor(s[p:])
        items = self.accelerator.gather((labels != -100).sum().to(device)).sum()
        return {"gt_ids": ids.to(device), "gt_attention_mask": attn.to(device), "gt_labels": labels.to(device),
                "gt_items": items}

    def _sft_loss(self, student, inputs: dict[str, Any]) -> torch.Tensor:
        logits = student(input_ids=inputs["gt_ids"], attention_mask=inputs["gt_attention_mask"]).logits[:, :-1]
        labels = inputs["gt_labels"][:, 1:]
        total = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                  ignore_index=-100, reduction="sum")
        if self.model.training:  # the global batch's count, per process (DDP averages the gradients)
            return total / (inputs["gt_items"].clamp(min=1) / self.accelerator.num_processes)
        return total / (labels != -100).sum().clamp(min=1)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        w = self.sft_weight
        mode = "train" if self.model.training else "eval"
        if w < 1.0:
            kd, entropy, n = super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        else:  # plain SFT: the teacher is not consulted
            kd = None
            entropy = torch.zeros((), device=self.accelerator.device)
            n = inputs["completion_mask"].sum()
        if w == 0.0:
            return kd, entropy, n
        ce = self._sft_loss(unwrapped_student, inputs)
        self._metrics[mode]["sft_loss"].append(ce.item())
        if kd is None:
            return ce, entropy, n
        self._metrics[mode]["kd_loss"].append(kd.item())
        return (1.0 - w) * kd + w * ce, entropy, n


# --------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def masked_loss(model, examples: list[tuple[list[int], list[int]]], pad_token_id: int, batch_size: int = 16) -> float:
    """Token-weighted mean next-token cross-entropy (nats) over the positions whose mask is 1, for
    (ids, mask) pairs; mask[j] = 1 means token j is predicted from ids[:j]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, (seq, mask) in enumerate(chunk):
            ids[j, : len(seq)] = torch.tensor(seq)
            attn[j, : len(seq)] = 1
            labels[j, : len(seq)] = torch.tensor([t if m else -100 for t, m in zip(seq, mask, strict=True)])
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float()
        lab = labels[:, 1:].to(device)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), lab.reshape(-1),
                                                         ignore_index=-100, reduction="sum"))
        count += int((lab != -100).sum())
    return total / count if count else math.nan


def timed_greedy(model, prompts: list[list[int]], *, eos_token_id, pad_token_id: int, max_new_tokens: int,
                 batch_size: int) -> tuple[list[list[int]], float]:
    """Greedy answers (alignline.evaluation.greedy_responses) and generated tokens per second, timed after
    a one-prompt warm-up so the first call's set-up is not counted."""
    from alignline.evaluation import greedy_responses

    kw = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id, batch_size=batch_size)
    greedy_responses(model, prompts[:1], max_new_tokens=2, **kw)
    t0 = time.perf_counter()
    out = greedy_responses(model, prompts, max_new_tokens=max_new_tokens, **kw)
    seconds = time.perf_counter() - t0
    return out, sum(len(x) for x in out) / max(seconds, 1e-9)
