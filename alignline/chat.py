"""The project's chat format, in one place: special tokens, the alignline chat template, and the
ChatML-style default for released bases that ship no template.

    from alignline.chat import CHAT_TEMPLATE, SPECIAL_TOKENS, CHATML_TEMPLATE
    tok.chat_template = CHAT_TEMPLATE   # <|bos|><|user|>What is 12+7?<|eos|><|assistant|>19<|eos|>

Both templates put the assistant's content and its closing eos inside {% generation %}, so TRL's
assistant-only loss (and `return_assistant_tokens_mask`) find exactly what the model must learn to
say, and generation stops at the eos it was trained to emit. Unknown roles raise. The tokenizer
(alignline.tokenizer), the tiny test models (alignline.model.tiny) and the lora stage build on this.
"""

from __future__ import annotations

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
