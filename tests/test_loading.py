"""alignline.models: one way to find and load a model (local dir, stage dir, hub id), checked first.

    .venv/bin/pytest tests/test_loading.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignline.config import InputError
from alignline.models import check_causal_lm, hash_weights, load_causal_lm, load_classifier, resolve_model
from tests.lora_fixtures import build_base


def test_resolve_names_every_kind_of_bad_spec(tmp_path: Path) -> None:
    base = build_base("llama", tmp_path / "base")
    src = resolve_model(str(base))
    assert (src.source, src.path) == ("local", base.resolve())
    hash_weights(src)
    assert set(src.identity()["weight_sha256"]) == {"model.safetensors"}
    (tmp_path / "f").write_text("x")
    (tmp_path / "empty").mkdir()
    for spec, msg in ((None, "no model: pass --init"), (str(tmp_path / "f"), "is a file"),
                      (str(tmp_path / "empty"), "no config.json"), ("./nope/x", "no such directory")):
        with pytest.raises(InputError, match=msg):
            resolve_model(spec, flag="--init")


def test_causal_lm_check_refuses_a_classifier(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    base = build_base("llama", tmp_path / "base")
    assert check_causal_lm(base).model_type == "llama"
    clf = tmp_path / "clf"
    LlamaForSequenceClassification(LlamaConfig.from_pretrained(str(base))).save_pretrained(str(clf))
    with pytest.raises(InputError, match="LlamaForSequenceClassification, not a causal language model"):
        check_causal_lm(clf)


@pytest.mark.parametrize("arch", ["alignline", "gpt2"])
def test_loaders_give_fp32_models_of_the_checkpoint(tmp_path: Path, arch: str) -> None:
    """load_causal_lm loads fp32 whatever dtype was saved; load_classifier puts a fresh one-score
    head on a causal-LM checkpoint, fp32 too."""
    base = build_base(arch, tmp_path / "base")
    ids = torch.tensor([[1, 5, 7, 9]])
    model = load_causal_lm(base, device="cpu")
    assert model.dtype == torch.float32 and model.config.model_type == arch
    bf16 = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(str(bf16))
    again = load_causal_lm(bf16)  # transformers' own default would keep the saved bf16
    assert again.dtype == torch.float32 and again(ids).logits.dtype == torch.float32
    rm = load_classifier(base, num_labels=1, pad_token_id=0)
    assert rm.dtype == torch.float32 and rm(ids).logits.shape == (1, 1)
    assert type(rm).__name__.endswith("ForSequenceClassification")
