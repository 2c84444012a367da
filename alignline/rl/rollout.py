"""Rollout helpers for RLHF: left-padding prompts, KV-cached sampling, truncating responses at
the first EOS, and the single forward passes that score a rollout (policy log-probs + entropy,
per-token values, sequence reward).

    from alignline.rl.rollout import left_pad, generate, truncate_after_eos
    ids, attn = left_pad(prompt_token_lists, pad_id)
    responses = generate(policy, ids, attn, max_new_tokens=16, temperature=0.7, eos_id=e, pad_id=p)
    responses, mask, has_eos = truncate_after_eos(responses, e, p)

Layout: a rollout is `query_response = [left-padded prompt (P) | response (R)]`. The logits
at position P-1+t predict response token t, so response log-probs and values read positions
P-1 .. P+R-2. Positions are counted from the first real token (left padding takes no
position), the same rule HF generate uses, so training forwards see what sampling saw.
Dropout must be off in every model used here; callers put models in eval() (see
`disable_dropout`).
"""

from __future__ import annotations

import inspect
import logging
import weakref

import torch
from torch import nn

from alignline.generation import decoding_config, generate_exactly
from alignline.rl.core import entropy_from_logits, logprobs_from_logits

log = logging.getLogger(__name__)


def disable_dropout(model: nn.Module) -> nn.Module:
    """eval() and p=0 on every Dropout: PPO's ratio must compare the same deterministic function
    at rollout and at training time (TRL and the InstructGPT setup do the same)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop"):
        if hasattr(model.config, key) and isinstance(getattr(model.config, key), float):
            setattr(model.config, key, 0.0)
    return model


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Left-pad token lists into (input_ids, attention_mask) so generation continues every row
    from the same column."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("left_pad needs a non-empty list of non-empty token sequences")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        attn[i, width - len(s) :] = 1
    return ids.to(device), attn.to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """Keep each response up to and including its first EOS; replace the rest by pad.

    Returns (responses, mask, has_eos): mask is 1 on kept tokens (a prefix of each row), has_eos
    says whether the row emitted EOS at all (rows that did not are cut at max_new_tokens).
    """
    if eos_id == pad_id:
        raise ValueError(
            f"pad id equals eos id ({eos_id}); RLHF masking needs a distinct pad token "
            "(the alignline tokenizer has <|pad|>; set tokenizer.pad_token to it)"
        )
    is_eos = responses == eos_id
    has_eos = is_eos.any(1)
    R = responses.shape[1]
    first = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, R, dtype=torch.long))
    mask = torch.arange(R, device=responses.device)[None, :] <= first[:, None]
    mask[:, : min(R, 1)] = True  # at least one token is always kept (the first sampled one)
    return torch.where(mask, responses, torch.full_like(responses, pad_id)), mask.long(), has_eos


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> torch.Tensor:
    """Sample continuations with HF generate (KV cache on). Returns response tokens [B, <=max_new].

    Tokens come from exactly softmax(logits / temperature) cut by top_k / top_p when set (0 / 1.0 =
    off), the distribution `response_logprobs` scores; the checkpoint's generation_config.json and
    transformers' defaults (top_k=50) play no part (alignline.generation.decoding_config)."""
    gen_cfg = decoding_config(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, eos_token_id=eos_id, pad_token_id=pad_id)
    out = generate_exactly(model, gen_cfg, input_ids=input_ids, attention_mask=attention_mask)
    return out[:, input_ids.shape[1] :]


def _accepts(model, name: str) -> bool:
    # A DDP wrapper's forward takes (*inputs, **kwargs): ask the module it wraps.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return name in inspect.signature(model.forward).parameters


def last_hidden_state(backbone, query_response: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A backbone's last hidden states [B, L, H] for a left-padded batch (positions from the mask, no cache)."""
    return backbone(
        input_ids=query_response,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state


def response_logits(
    model, query_response: torch.Tensor, attention_mask: torch.Tensor, context_len: int, temperature: float
) -> torch.Tensor:
    """Logits (fp32, divided by temperature) that predict each response token: [B, R, V]."""
    R = query_response.shape[1] - context_len
    kwargs = {}
    # Only compute the LM head on the R+1 last positions when the model supports it.
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = R + 1
    out = model(
        input_ids=query_response,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    # Upcast before dividing: in bf16 the division itself rounds (8-bit mantissa), which shifts every
    # log-prob, the PPO ratio and the KL by up to ~0.4% of the logit.
    logits = out.logits[:, -(R + 1) : -1].float()
    return logits / temperature


def response_logprobs(
    model,
    query_response: torch.Tensor,
    attention_mask: torch.Tensor,
    context_len: int,
    temperature: float,
    with_entropy: bool = False,
    mask: torch.Tensor | None = None,
):
    """log p(response token) per position [B, R] (and entropy [B, R] when asked), one forward.

    With the response `mask` [B, R], the LM head, softmax and gather run only on the real response
    tokens (packed, verl's "remove padding"): at a 32k-150k vocabulary the head over padding is
    most of a short-answer batch's cost. Masked positions are 0."""
    if mask is None:
        logits = response_logits(model, query_response, attention_mask, context_len, temperature)
        responses = query_response[:, context_len:]
        logp = logprobs_from_logits(logits, responses)
        if with_entropy:
            return logp, entropy_from_logits(logits)
        return logp
    keep = mask.bool()
    split = _packable(model)
    if split is None:
        logits = response_logits(model, query_response, attention_mask, context_len, temperature)[keep]
    else:
        backbone, head = split
        hidden = last_hidden_state(backbone, query_response, attention_mask)
        logits = head(hidden[:, context_len - 1 : -1][keep]).float() / temperature  # [N, V]
    logp = logprobs_from_logits(logits, query_response[:, context_len:][keep])
    packed = [logp, entropy_from_logits(logits)] if with_entropy else [logp]
    out = [torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(keep, x) for x in packed]
    return tuple(out) if with_entropy else out[0]


_PACKABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packable(model) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, LM head) of a causal LM whose logits are exactly head(backbone(x)), else None.

    Checked once per model on a 4-token input: Llama, Qwen2, Mistral, GPT-2 and ours pass; a model
    that scales or soft-caps its logits after the head (Gemma 2, Cohere, Granite) does not and is
    scored through its own forward (same values, head on every response position)."""
    if model in _PACKABLE:
        return _PACKABLE[model]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own
    backbone, head = getattr(base, base.base_model_prefix, None), base.get_output_embeddings()
    split = None
    if backbone is not None and head is not None:
        ids = torch.arange(4, device=head.weight.device)[None, :]
        with torch.no_grad():
            full = model(input_ids=ids).logits
            parts = head(backbone(input_ids=ids).last_hidden_state)
        if torch.equal(full, parts):  # the same operations on the same inputs: bit for bit
            split = (backbone, head)
    if split is None:
        log.info("%s: logits are not head(backbone(x)); response log-probs use its full forward",
                 type(base).__name__)
    _PACKABLE[model] = split
    return split


class PolicyForward(nn.Module):
    """The policy's training forwards as one module, so that DDP (which syncs gradients only for the
    forwards it runs) can wrap them: packed response log-probs (`response_logprobs` with a mask), or,
    called with keywords only, the model's own forward (PPO-ptx's language-model loss)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, query_response=None, attention_mask=None, context_len=None, temperature=None, mask=None,
                **lm_kwargs):
        if query_response is None:
            return self.policy(**lm_kwargs)
        return response_logprobs(self.policy, query_response, attention_mask, context_len, temperature, mask=mask)


def _score_head_outputs(model, query_response: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position outputs of a *ForSequenceClassification model's score head: [B, L] (label 0)."""
    hidden = last_hidden_state(getattr(model, model.base_model_prefix), query_response, attention_mask)
    return model.score(hidden)[..., 0].float()


def token_values(value_model, query_response: torch.Tensor, attention_mask: torch.Tensor, context_len: int):
    """V(state before response token t) for every response position: [B, R]."""
    out = _score_head_outputs(value_model, query_response, attention_mask)
    return out[:, context_len - 1 : -1]


class TokenValues(nn.Module):
    """`token_values` of a value model as a module of its own, so that the critic's training forward
    can go through a DDP wrapper (DDP syncs gradients only for forwards it runs): the per-token
    values come from the backbone and the score head, not from the model's own (pooled) forward."""

    def __init__(self, value_model: nn.Module):
        super().__init__()
        self.value_model = value_model

    def forward(self, query_response: torch.Tensor, attention_mask: torch.Tensor, context_len: int) -> torch.Tensor:
        return token_values(self.value_model, query_response, attention_mask, context_len)


def sequence_scores(
    reward_model, query_response: torch.Tensor, attention_mask: torch.Tensor, context_len: int, mask: torch.Tensor
) -> torch.Tensor:
    """Reward-model score at the last real response token (the EOS when there is one): [B]."""
    out = _score_head_outputs(reward_model, query_response, attention_mask)
    last = context_len + mask.long().sum(1) - 1
    return out[torch.arange(out.shape[0], device=out.device), last]
