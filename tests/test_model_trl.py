"""The alignline decoder inside the training libraries we rely on: TRL SFTTrainer and RewardTrainer
lower their losses on a tiny model (the LLaMA recipe and mixes of the architecture lab's switches),
PEFT LoRA attaches by HF module names and trains only adapters.

    .venv/bin/pytest tests/test_model_trl.py -q
"""

import random

import pytest
import torch

from alignline.model import AlignlineForSequenceClassification
from alignline.model.tiny import tiny_config, tiny_model, toy_tokenizer

pytestmark = pytest.mark.slow  # trains with TRL/PEFT: out of `make test-fast`

pytest.importorskip("trl")


# Architecture-lab mixes that must train through TRL like the default (tests/test_architectures.py has each
# switch alone; PPO with them is there too).
ARCHES = {
    "llama": {},
    "alibi-moe-layernorm-gelu": dict(position="alibi", num_experts=4, num_experts_per_tok=2, norm="layernorm",
                                     activation="gelu"),
    "infini-t5-sandwich-window": dict(attention="infini", infini_segment_len=8, position="t5_bias",
                                      norm_position="sandwich", sliding_window=6),
    "deepnorm-sinusoidal-geglu": dict(norm="deepnorm", position="sinusoidal", activation="geglu"),
    "learned-relu-post": dict(position="learned", activation="relu", norm_position="post"),
    "nope-swish-infini-delta": dict(position="none", activation="swish", attention="infini", infini_segment_len=8,
                                  infini_update="delta"),
}
# DeepNorm's small (beta-scaled) init learns more slowly in 15 steps: (SFT, reward) loss ratios it must beat.
SLOWER = {"deepnorm-sinusoidal-geglu": (0.7, 0.65)}


def _arith(n=48, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        # rejected answers are off-topic words: separable in a few steps by a tiny reward model
        rows.append((f"what is {a} + {b} ?", str(a + b), rng.choice(["banana", "dog", "no idea"])))
    return rows


@pytest.fixture(scope="module")
def tok():
    corpus = [q for q, _, _ in _arith()] + [str(i) for i in range(10)] + ["banana dog no idea"]
    return toy_tokenizer(corpus)


def _train_args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=kw.pop("max_steps", 15),
        logging_steps=5, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **kw,
    )


def _lm_loss(model, tok, rows):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     tokenize=False) for q, a, _ in rows]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


@pytest.mark.parametrize("arch", list(ARCHES))
def test_sft_trainer_lowers_loss(tok, tmp_path, arch):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = _arith()
    model = tiny_model(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, **ARCHES[arch])
    data = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a, _ in rows])
    before = _lm_loss(model, tok, rows[:16])
    trainer = SFTTrainer(model=model, args=_train_args(SFTConfig, tmp_path, max_length=32),
                         train_dataset=data, processing_class=tok)
    trainer.train()
    after = _lm_loss(model, tok, rows[:16])
    assert after < SLOWER.get(arch, (0.6, 0.5))[0] * before, (before, after)
    # TRL adds (and logs) the MoE balance loss from the router logits our backbone returns; none for dense models.
    logged = [h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h]
    assert bool(logged) == bool(ARCHES[arch].get("num_experts")), logged
    assert all(x > 0 for x in logged)


@pytest.mark.parametrize("arch", list(ARCHES))
def test_reward_trainer_lowers_loss(tok, tmp_path, arch):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = _arith(seed=1)
    torch.manual_seed(0)
    model = AlignlineForSequenceClassification(tiny_config(
        vocab_size=len(tok), num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **ARCHES[arch]))
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]}
        for q, good, bad in rows
    ])

    def pair_loss():
        def enc(field):
            texts = [tok.apply_chat_template(r["prompt"] + r[field], tokenize=False) for r in data]
            return tok(texts, return_tensors="pt", padding=True)

        model.eval()
        with torch.no_grad():
            margin = model(**enc("chosen")).logits - model(**enc("rejected")).logits
        return -torch.nn.functional.logsigmoid(margin).mean().item()

    before = pair_loss()
    trainer = RewardTrainer(model=model, args=_train_args(RewardConfig, tmp_path, max_length=32),
                            train_dataset=data, processing_class=tok)
    trainer.train()
    after = pair_loss()
    assert after < SLOWER.get(arch, (0.6, 0.5))[1] * before, (before, after)


def test_lora_attaches_by_name_and_only_adapters_train():
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    for t in targets:  # every layer's projection got an A and a B
        assert sum(f".{t}.lora_A" in n for n in lora_names) == 2, t
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(trainable) == len(lora_names)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(3, 128, (4, 12))
    loss0 = peft_model(input_ids=ids, labels=ids).loss
    loss0.backward()
    opt.step()
    for n, p in peft_model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == ("lora_" in n), n
    with torch.no_grad():
        assert peft_model(input_ids=ids, labels=ids).loss < loss0
