"""The project's chat format, in one place: special tokens, the alignline chat template, and the
ChatML-style default for released bases that ship no template.

    from alignline.chat import CHAT_TEMPLATE, SPECIAL_TOKENS, CHATML_TEMPLATE
    tok.chat_template = CHAT_TEMPLATE   # <|bos|><|user|>What is 12+7?<|eos|><|assistant|>19<|eos|>

Both templates put the assistant's content and its closing eos inside {% generation %}, so TRL's
assistant-only loss (and `return_assistant_tokens_mask`) find exactly what the model must learn to
say, and generation stops at the eos it was trained to emit. Unknown roles raise. The tokenizer
(alignline.tokenizer), the tiny test models (alignline.model.tiny) and the lora stage build on this.

Assistant masks (which tokens a chat fine-tune learns), for any template a base ships:

    mode = resolve_mask_mode("auto", template, "base")   # "generation" with {% generation %} tags, else "render"
    rows, fit = encode_conversations(tok, conversations, template, mode, max_length=512)  # fit: length_fit + dropped

`generation` reads the template's tags, as TRL does; `render` finds each assistant turn by
rendering the conversation up to it, for templates without tags.
"""

from __future__ import annotations

import logging
import re

from jinja2 import TemplateError
from tqdm.auto import tqdm

from alignline.config import UserError

log = logging.getLogger(__name__)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(UserError, ValueError):
    """A chat template that cannot render the data or locate the assistant's tokens (a user error)."""

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS: list[str] = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT]
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# <|bos|><|user|>What is 12+7?<|eos|><|assistant|>19<|eos|>
# Whitespace control ({%- -%}) keeps the template itself from adding characters.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- elif message['role'] == 'user' or message['role'] == 'system' -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

# ChatML-style layout that needs no new tokens: the base's own eos ends every turn, so generation
# stops where training taught it to (the lora stage's default for a base without a template).
CHATML_TEMPLATE = (
    "{%- if bos_token and bos_token != eos_token -%}{{- bos_token -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}{{- message['content'] + eos_token -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# --------------------------------------------------------------------------- assistant masks


def has_generation_tags(template: str | None) -> bool:
    """The template marks assistant content with {% generation %} ... {% endgeneration %}."""
    return bool(template) and _GENERATION_TAG.search(template) is not None


def resolve_mask_mode(mode: str, template: str, template_from: str) -> str:
    """`auto` -> `generation` when the template has generation tags, else `render`; asking for
    `generation` on a template without tags is an error naming where the template came from."""
    if mode == "auto":
        return "generation" if has_generation_tags(template) else "render"
    if mode == "generation" and not has_generation_tags(template):
        raise ChatTemplateError(
            f"chat.mask is 'generation' but the {template_from} chat template has no {{% generation %}} tags, so "
            "the assistant tokens cannot be found from it. Use chat.mask=render (find turns by rendering "
            "prefixes) or chat.template_source=config (the ChatML-style default, which has the tags)."
        )
    return mode


def render(tokenizer, messages, template: str | None = None, add_generation_prompt: bool = False) -> str:
    """The conversation as text under `template` (None: the tokenizer's own)."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_ids(tokenizer, conversations: list[list[dict]], template: str | None = None) -> list[list[int]]:
    """Token ids of each conversation rendered with the generation prompt: what the model continues.
    The template writes any bos itself, so the tokenizer adds no special tokens."""
    return [tokenizer(render(tokenizer, c, template, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for c in conversations]


def conversation_ids(tokenizer, conversations: list[list[dict]], template: str | None = None) -> list[list[int]]:
    """Token ids of each whole conversation rendered with the chat template (what a trainer sees)."""
    return [tokenizer(render(tokenizer, c, template), add_special_tokens=False)["input_ids"] for c in conversations]


def length_fit(lengths: list[int], max_length: int, action: str, key: str = "train.max_length") -> dict:
    """How a set of examples fits `max_length` tokens: {n, over_max_length, share, longest, max_length,
    action, key}. `action` says what the trainer does with a longer one ("truncated" or "dropped");
    `key` is the config key that sets the limit (the report names it in its warning)."""
    over = sum(n > max_length for n in lengths)
    return {"n": len(lengths), "over_max_length": over, "share": over / len(lengths) if lengths else 0.0,
            "longest": max(lengths, default=0), "max_length": max_length, "action": action, "key": key}


def warn_if_cut(fit: dict, what: str, key: str = "train.max_length", limit: float = 0.05) -> None:
    """Log a warning when more than `limit` of the examples do not fit (the report card shows it too)."""
    if fit["share"] > limit:
        log.warning("%s: %d of %d examples (%.0f%%) are longer than %s=%d tokens (longest %d) and are %s; raise "
                    "%s", what, fit["over_max_length"], fit["n"], 100 * fit["share"], key, fit["max_length"],
                    fit["longest"], fit["action"], key)


def encode_render(tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[int]]:
    """Token ids and assistant mask, found by rendering each assistant turn's prefix.

    For assistant turn i, the characters between render(messages[:i], add_generation_prompt=True)
    and render(messages[:i+1]) are that turn (content plus whatever closes it, e.g. eos). A token
    is an assistant token when it starts inside such a span (trailing whitespace excluded, so on a
    tagged template this equals the {% generation %} mask). Needs a prefix-preserving template
    and a fast tokenizer (character offsets); anything else is an error, not a guess.
    """
    if not tokenizer.is_fast:
        raise ChatTemplateError("chat.mask=render needs a fast tokenizer (character offsets); use chat.mask=generation")
    full = render(tokenizer, messages, template)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], template)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ChatTemplateError(
                f"the chat template is not prefix-preserving at assistant turn {i} (rendering the conversation up "
                "to a turn does not give a prefix of the whole), so assistant tokens cannot be located by rendering. "
                "Use chat.template_source=config (ChatML-style default with {% generation %} tags), or a template "
                "with generation tags and chat.mask=generation."
            )
        # Whitespace a template puts between turns (ChatML's "\n" after <|im_end|>) is not the answer.
        spans.append((len(before), len(upto.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def encode_generation(tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[int]]:
    """Token ids and assistant mask from the template's {% generation %} tags (as TRL does)."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def encode_conversations(tokenizer, conversations, template, mode, max_length, what="train"):
    """Encode + mask every conversation; truncate to max_length; drop ones left without answer tokens.
    Returns (rows, fit): fit is `length_fit` (how many were cut at max_length) plus `dropped`."""
    fn = encode_generation if mode == "generation" else encode_render
    rows, dropped, lengths = [], 0, []
    for i, messages in enumerate(tqdm(conversations, desc=f"tokenizing {what}", disable=len(conversations) < 500)):
        try:
            ids, mask = fn(tokenizer, messages, template)
        except TemplateError as exc:
            # e.g. a template that rejects a system turn or a non-alternating conversation
            raise ChatTemplateError(
                f"{what} conversation {i}: the chat template refused it ({exc}); roles: "
                f"{[m['role'] for m in messages]}. Fix the data, or use another template (chat.template_source=config)."
            ) from exc
        lengths.append(len(ids))
        ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask) == 0:
            dropped += 1
            continue
        rows.append({"input_ids": ids, "assistant_masks": mask})
    if not rows:
        raise ChatTemplateError(
            f"no {what} example has assistant tokens left after masking/truncation to train.max_length={max_length}; "
            "check that the data has assistant turns and raise train.max_length"
        )
    if dropped:
        log.warning("%d %s example(s) had no assistant tokens within %d tokens and were dropped", dropped, what,
                    max_length)
    fit = {**length_fit(lengths, max_length, "truncated"), "dropped": dropped}
    warn_if_cut(fit, f"lora {what}")
    return rows, fit
