"""Helpers for tests that sampling uses exactly softmax(logits / T) (plus the filters asked for),
whatever a checkpoint's generation_config.json says.

    from tests.sampling_checks import leaky_checkpoint, load_like_the_stages, rank_chi_square, spy_processors

`leaky_checkpoint` saves a tiny alignline model whose generation_config.json turns on every filter a
released checkpoint might ship (top-k 5, top-p 0.5, repetition penalty, suppressed tokens, ...), with
near-uniform but not flat logits over a large vocabulary, so that transformers' default top_k=50 is
visible (tokens ranked past 50 carry most of the mass).
"""

from __future__ import annotations

from pathlib import Path

import torch

# Every knob here changes which tokens can be sampled; none of them may reach our sampling.
LEAKY_GENERATION = dict(do_sample=True, temperature=0.6, top_k=5, top_p=0.5, typical_p=0.9, min_p=0.2,
                        repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=2, suppress_tokens=[7, 8])


def spread_model(vocab_size: int, logit_std: float = 1.0, seed: int = 0, **overrides):
    """A tiny alignline model whose next-token logits have std ~logit_std (near-uniform, not flat)."""
    from alignline.model.tiny import tiny_model

    model = tiny_model(seed=seed, vocab_size=vocab_size, **overrides).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9]])).logits[0, -1]
        model.lm_head.weight.mul_(logit_std / float(logits.std()))
    return model


def leaky_checkpoint(path: Path, vocab_size: int = 1000, tokenizer=None, **overrides) -> Path:
    """Save a spread_model whose generation_config.json sets LEAKY_GENERATION (and the tokenizer)."""
    from transformers import GenerationConfig

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    model = spread_model(vocab_size, **ids, **overrides)
    model.generation_config = GenerationConfig(**LEAKY_GENERATION, **ids)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_like_the_stages(path: Path):
    """AutoModelForCausalLM.from_pretrained, as stages/rlhf.py's load_models does (reads generation_config.json)."""
    from transformers import AutoModelForCausalLM

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert model.generation_config.top_k == LEAKY_GENERATION["top_k"]  # the checkpoint's config was loaded
    return model


def rank_chi_square(samples: torch.Tensor, probs: torch.Tensor, bins: int = 10) -> float:
    """Pearson chi-square of sampled token ids against `probs` [V], over `bins` groups of tokens with
    about equal probability mass taken in rank order (so mass far down the ranking is checked)."""
    order = torch.argsort(probs, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    cum = probs[order].double().cumsum(0)
    group_of_rank = torch.clamp((cum - probs[order].double() / 2) * bins, max=bins - 1).long()
    group = group_of_rank[rank]
    expected = torch.zeros(bins, dtype=torch.float64).index_add_(0, group, probs.double()) * len(samples)
    observed = torch.bincount(group[samples], minlength=bins).double()
    keep = expected > 0
    return float(((observed - expected)[keep] ** 2 / expected[keep]).sum())


# Chi-square critical value for 9 degrees of freedom at p = 1e-4 (the tests use fixed seeds anyway).
CHI2_9DF_1E4 = 33.7


def ranks_under(probs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """0-based rank of each sampled token under `probs` (0 = most likely)."""
    order = torch.argsort(probs, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return rank[samples]


def spy_processors(monkeypatch, model) -> list:
    """Record the logits-processor list each generate() call on `model` builds (one list per call)."""
    seen: list = []
    build = model._get_logits_processor

    def spy(*args, **kwargs):
        out = build(*args, **kwargs)
        seen.append(list(out))
        return out

    monkeypatch.setattr(model, "_get_logits_processor", spy)
    return seen
