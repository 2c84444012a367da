"""Tiny models and a toy word-level tokenizer for fast tests and demos (CPU, well under a second).

    from alignline.model.tiny import tiny_config, tiny_model, toy_tokenizer
    tok = toy_tokenizer(["the cat sat", "a dog ran"])
    model = tiny_model(vocab_size=len(tok), pad_token_id=tok.pad_token_id)

The toy tokenizer splits on whitespace, has the project's special tokens (<|bos|>, <|eos|>, <|pad|>,
<|system|>, <|user|>, <|assistant|>, pad != eos) and the chat template from docs/ARCHITECTURE.md,
so TRL trainers and chat code can run on it. Real runs use alignline.tokenizer (byte-level BPE).
"""

from collections.abc import Iterable
from typing import Any

from alignline.chat import ASSISTANT, BOS, CHAT_TEMPLATE, EOS, PAD, SYSTEM, USER
from alignline.model.configuration import AlignlineConfig
from alignline.model.modeling import AlignlineForCausalLM

# The toy word-level tokenizer needs an unk token; ids 0..6 match tiny_config (pad 0, bos 1, eos 2).
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|unk|>", SYSTEM, USER, ASSISTANT]


def tiny_config(**overrides: Any) -> AlignlineConfig:
    """2 layers, width 64, 4 query heads, 2 key/value heads (GQA); override any field."""
    fields: dict[str, Any] = dict(
        vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    fields.update(overrides)
    return AlignlineConfig(**fields)


def tiny_model(seed: int = 0, **overrides: Any) -> AlignlineForCausalLM:
    import torch

    torch.manual_seed(seed)
    return AlignlineForCausalLM(tiny_config(**overrides))


def toy_tokenizer(corpus: Iterable[str]):
    """A whitespace word-level PreTrainedTokenizerFast over `corpus` (ids 0..6 are SPECIAL_TOKENS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(list(corpus), trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        unk_token="<|unk|>", additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "tiny_config", "tiny_model", "toy_tokenizer"]
