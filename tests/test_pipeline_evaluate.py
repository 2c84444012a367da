"""stages/evaluate.py: reward-model scoring of responses, batched vs one at a time.

    .venv/bin/pytest tests/test_pipeline_evaluate.py

The evaluate stage scores many (prompt, response) pairs in right-padded batches; the scalar
must be the one the reward model gives each pair alone (padding must not leak into scores).
The stage end to end is in tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import torch

from alignline.model.configuration import AlignlineConfig
from alignline.model.modeling import AlignlineForSequenceClassification
from alignline.tokenizer import train_tokenizer
from stages.evaluate import rm_scores


def test_batched_rm_scores_equal_single_scores() -> None:
    torch.manual_seed(0)
    texts = [f"What is {a}+{b}? {a + b}. Reverse c a t: t a c." for a in range(30) for b in range(3)]
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = AlignlineConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          num_labels=1, pad_token_id=tok.pad_token_id)
    rm = AlignlineForSequenceClassification(cfg).eval()
    prompts = [[{"role": "user", "content": "What is 1+2?"}], [{"role": "user", "content": "Reverse c a t."}],
               [{"role": "user", "content": "What is 12+7? Answer with a number only please."}]]
    responses = ["3", "t a c and some much longer text to force padding", ""]
    batched = rm_scores(rm, tok, prompts, responses, batch_size=3)
    single = [rm_scores(rm, tok, [p], [r], batch_size=1)[0] for p, r in zip(prompts, responses)]
    assert len(batched) == 3
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-5)
    assert len(set(round(s, 6) for s in single)) == 3  # distinct inputs, distinct scores
