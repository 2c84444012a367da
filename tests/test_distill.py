"""The distill stage and its trainer (alignline/distill.py, stages/distill.py).

    .venv/bin/pytest tests/test_distill.py -q            # the loss checks are fast; the stage runs use tiny_chain

- The divergence TRL computes equals the closed form on hand-made logits, for forward KL, reverse KL and
  the JSD, at T != 1 and with a masked position.
- Our trainer's loss on a real batch equals (1 - w) closed-form divergence + w cross-entropy, the batch's
  answers are the data's (supervised) or the student's samples (on-policy), and split into micro-batches
  the losses add up to the whole batch's (gradient accumulation).
- User errors (tokenizer mismatch, prompt-only data with teacher forcing, LoRA without a student, no
  teacher) exit 2 with one message and write nothing.
- On the built-in suite the distilled student beats a same-size student trained on the SFT data alone,
  a killed run resumes to the uninterrupted run's weights, a LoRA student writes adapter + merged
  checkpoint, and a user's Alpaca file trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignline.artifacts import load_stage
from alignline.config import InputError
from alignline.training import FAIL_AFTER_ENV, SimulatedInterrupt
from tests.conftest import REPO, run_stage
from tests.lora_fixtures import build_base

SHARED = REPO.parent / "shared" / "data"


# --------------------------------------------------------------------------- closed forms


def closed_form(t_logits: torch.Tensor, s_logits: torch.Tensor, divergence: str, T: float, beta: float = 0.5):
    """Per-position divergence between softmax(teacher / T) and softmax(student / T), from the definitions."""
    lt, ls = torch.log_softmax(t_logits.double() / T, -1), torch.log_softmax(s_logits.double() / T, -1)
    pt, ps = lt.exp(), ls.exp()
    if divergence == "forward_kl":
        return (pt * (lt - ls)).sum(-1)
    if divergence == "reverse_kl":
        return (ps * (ls - lt)).sum(-1)
    m = (1 - beta) * ps + beta * pt
    return beta * (pt * (lt - m.log())).sum(-1) + (1 - beta) * (ps * (ls - m.log())).sum(-1)


@pytest.mark.parametrize("T", [0.5, 2.0])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_the_divergence_is_the_closed_form_on_hand_made_logits(divergence, beta, T):
    """TRL's chunked loss (what DistillTrainer minimises) with an identity output layer, so the hidden states
    are the logits: the masked mean over positions of the divergence's definition."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from alignline.distill import trl_beta

    g = torch.Generator().manual_seed(0)
    V = 300
    t_logits = torch.randn(2, 5, V, generator=g) * 3
    s_logits = torch.randn(2, 5, V, generator=g) * 2 + 0.5
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0  # padding: not part of the loss
    eye = torch.eye(V)
    loss, _, n = _chunked_divergence_loss(s_logits, t_logits, eye, eye, mask, trl_beta(divergence, beta),
                                          temperature=T)
    want = (closed_form(t_logits, s_logits, divergence, T, beta) * mask).sum() / mask.sum()
    assert int(n) == 8
    assert float(loss) == pytest.approx(float(want), rel=1e-4)
    assert float(loss) > 0.05  # not a trivially small case


def test_trl_beta_maps_each_divergence():
    from alignline.distill import trl_beta

    assert (trl_beta("forward_kl"), trl_beta("reverse_kl"), trl_beta("jsd", 0.3)) == (0.0, 1.0, 0.3)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        trl_beta("jsd", 1.0)


# --------------------------------------------------------------------------- the trainer on real batches


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny alignline teacher (width 32) on its own chat tokenizer (320 tokens), a half-width student on
    the same tokenizer, and chat rows of varying answer length."""
    from alignline.config import ModelConfig, build_model
    from alignline.distill import distill_examples
    from alignline.models import load_causal_lm, load_chat_tokenizer
    from tests.lora_fixtures import conversations

    base = build_base("alignline", tmp_path_factory.mktemp("teacher"))
    tok = load_chat_tokenizer(base)
    teacher = load_causal_lm(base)
    torch.manual_seed(1)
    student = build_model(ModelConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1), tok, teacher.config.vocab_size)
    rows = distill_examples(tok, [c["messages"] for c in conversations(8)], max_completion_length=12)
    return base, tok, teacher, student, rows


def _trainer(pair, tmp_path, *, divergence="jsd", T=1.5, on_policy_fraction=0.0, sft_weight=0.3):
    from datasets import Dataset
    from trl import DistillationConfig

    from alignline.distill import DistillTrainer, trl_beta

    _, tok, teacher, student, rows = pair
    args = DistillationConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1,
                              use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
                              beta=trl_beta(divergence, 0.4), temperature=T, max_completion_length=12, seed=3)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, on_policy_fraction=on_policy_fraction, sft_weight=sft_weight)
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_trainer_loss_is_the_closed_form_mixed_with_cross_entropy(pair, tmp_path, divergence):
    _, tok, teacher, student, rows = pair
    T, w = 1.5, 0.3
    trainer = _trainer(pair, tmp_path, divergence=divergence, T=T, sft_weight=w)
    batch = trainer._generate_and_score_completions(rows[:4])
    # Supervised: the completions are the data's answers, right-padded.
    for i, row in enumerate(rows[:4]):
        n = int(batch["completion_mask"][i].sum())
        assert batch["completion_ids"][i, :n].tolist() == row["completion_ids"]
    loss, _, _ = trainer._compute_loss(student, batch, None)

    kd, ce, n_tok = 0.0, 0.0, 0
    with torch.no_grad():
        for row in rows[:4]:
            seq = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            p, c = len(row["prompt_ids"]), len(row["completion_ids"])
            ls, lt = student(seq).logits[0, p - 1: p + c - 1], teacher(seq).logits[0, p - 1: p + c - 1]
            kd += float(closed_form(lt, ls, divergence, T, beta=0.4).sum())
            ce += float(torch.nn.functional.cross_entropy(ls.double(), seq[0, p:], reduction="sum"))
            n_tok += c
    assert float(loss) == pytest.approx((1 - w) * kd / n_tok + w * ce / n_tok, rel=1e-4)


def test_plain_sft_weight_one_is_cross_entropy_without_the_teacher(pair, tmp_path):
    trainer = _trainer(pair, tmp_path, sft_weight=1.0)
    batch = trainer._generate_and_score_completions(pair[4][:4])
    calls = []
    trainer.teacher_model.register_forward_hook(lambda *a: calls.append(1))
    loss, _, _ = trainer._compute_loss(pair[3], batch, None)
    assert not calls and float(loss) > 0


def test_on_policy_batches_are_the_students_samples_and_the_mix_is_seeded(pair, tmp_path):
    rows = pair[4]
    trainer = _trainer(pair, tmp_path, on_policy_fraction=1.0, sft_weight=0.0)
    batch = trainer._generate_and_score_completions(rows[:4])
    sampled = [batch["completion_ids"][i, : int(batch["completion_mask"][i].sum())].tolist() for i in range(4)]
    assert sampled != [r["completion_ids"] for r in rows[:4]]  # a random student does not write the data's answers
    assert trainer._metrics["train"]["on_policy"] == [1.0]

    mixed = _trainer(pair, tmp_path, on_policy_fraction=0.5)
    draws = []
    for step in range(40):
        mixed.state.global_step = step
        mixed._step = 1000 + 7 * step  # TRL's own counter restarts on resume: the draw must not depend on it
        draws.append(mixed.on_policy_now())
    again = _trainer(pair, tmp_path, on_policy_fraction=0.5)
    redraw = []
    for step in range(40):
        again.state.global_step = step
        redraw.append(again.on_policy_now())
    assert draws == redraw and 10 <= sum(draws) <= 30


def test_micro_batch_losses_add_up_to_the_whole_batch(pair, tmp_path):
    """Gradient accumulation: both terms are normalised by the whole generation batch's token counts, so
    the micro-batches' losses (and so their gradients) sum to the one-batch loss, with unequal lengths."""
    from trl.trainer.utils import split_tensor_dict

    trainer = _trainer(pair, tmp_path, sft_weight=0.4)
    batch = trainer._generate_and_score_completions(pair[4][:8])
    halves = split_tensor_dict(batch, 2)
    lengths = [int(h["completion_mask"].sum()) for h in halves]
    assert lengths[0] != lengths[1], "pick rows whose halves differ in answer tokens"
    whole = trainer.compute_loss(trainer.model, batch)
    parts = [trainer.compute_loss(trainer.model, h) for h in halves]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-5)


# --------------------------------------------------------------------------- user errors


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("distill_data")
    return run_dir, run_stage("data", run_dir)


def _cli(argv, capsys):
    from stages.distill import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def test_user_errors_exit_2_with_one_message_and_write_nothing(data_run, tmp_path, capsys):
    run_dir, data = data_run
    from transformers import AutoModelForCausalLM

    from alignline.models import load_chat_tokenizer

    teacher = build_base("alignline", tmp_path / "teacher")
    llama = build_base("llama", tmp_path / "llama")  # as many tokens as the teacher's, other tokens
    bigger = tmp_path / "bigger"  # two tokens more
    tok = load_chat_tokenizer(llama)
    tok.add_tokens(["<x1>", "<x2>"])
    model = AutoModelForCausalLM.from_pretrained(llama)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(bigger)
    tok.save_pretrained(bigger)
    padded = tmp_path / "padded"  # the teacher's tokenizer, an output layer of 384 rows (vocab padded to 64s)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.resize_token_embeddings(384)
    model.save_pretrained(padded)
    load_chat_tokenizer(teacher).save_pretrained(padded)
    capsys.readouterr()  # the bases' save progress bars
    common = ["--run-dir", str(run_dir), "--data", str(data), "--set", "logging.progress=false"]
    cases = [
        (["--teacher", str(teacher), "--student", str(llama)], "the tokens differ"),
        (["--teacher", str(teacher), "--student", str(bigger)], "must share a tokenizer"),
        (["--teacher", str(teacher), "--student", str(padded)], "must share a tokenizer (teacher"),
        (["--teacher", str(teacher), "--set", "data.train=prompts"], "loss.on_policy_fraction=1"),
        (["--teacher", str(teacher), "--set", "student.lora.enabled=true"], "needs a --student"),
        ([], "no teacher"),
        (["--teacher", str(tmp_path / "nope")], "does not exist"),
        (["--set", "teacher_model=nobody/no-such-model"], "downloading it from the Hugging Face hub failed"),
        (["--teacher", str(teacher), "--set", "data.train=" + str(tmp_path / "missing.jsonl")], "missing.jsonl"),
    ]
    for argv, needle in cases:
        code, err = _cli(common + argv, capsys)
        assert code == 2, (argv, err)
        assert needle in err and "Traceback" not in err, (argv, err)
        assert err.startswith("error: ") and err.count("error: ") == 1, err
        assert not (run_dir / "distill").exists(), argv
    # the mismatch names both sizes
    code, err = _cli(common + ["--teacher", str(teacher), "--student", str(bigger)], capsys)
    assert "320 tokens in its tokenizer, vocab_size 320" in err and "322 tokens, vocab_size 322" in err, err


def test_same_size_different_tokens_is_refused():
    from alignline.distill import check_shared_tokenizer

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def __len__(self):
            return len(self.vocab)

        def get_vocab(self):
            return self.vocab

    with pytest.raises(InputError, match="the tokens differ"):
        check_shared_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 0, "c": 1}), 2, 2, "t", "s")


# --------------------------------------------------------------------------- the stage on the built-in suite


FAST = ["train.batch_size=8", "train.eval_every=50", "train.save_every=50", "logging.progress=false",
        "eval.gold_prompts=16", "eval.val_chats=32", "eval.max_new_tokens=8", "schedule.warmup_steps=2"]


def _inputs(chain, **extra):
    return {"teacher": chain.sft, "data": chain.data, **extra}


@pytest.mark.slow
def test_distilled_student_beats_the_same_student_trained_on_sft_data_alone(tiny_chain, tmp_path, one_thread):
    """Same fresh half-width student, same batches and steps: the teacher's full distributions (forward KL)
    teach it more than the data's answers alone (sft_weight=1)."""
    steps = ["train.max_steps=300", "train.batch_size=16", "optim.lr=1e-2", "eval.gold_prompts=64",
             "eval.val_chats=128"]
    kd = run_stage("distill", tmp_path / "kd", [*FAST, *steps], _inputs(tiny_chain))
    sft = run_stage("distill", tmp_path / "sft", [*FAST, *steps, "loss.sft_weight=1"], _inputs(tiny_chain))
    a, b = (json.loads((d / "eval.json").read_text()) for d in (kd, sft))
    keys = ("teacher_answer_loss", "kl_student_teacher", "agreement")
    print("\ndistilled:", {k: a[k] for k in keys}, a["student"]["val_loss"],
          "\nsft only: ", {k: b[k] for k in keys}, b["student"]["val_loss"])
    assert a["teacher"] == {**b["teacher"], "gen_tokens_per_s": a["teacher"]["gen_tokens_per_s"]}  # one teacher
    assert a["student"]["params"] == b["student"]["params"] < 0.5 * a["teacher"]["params"]
    # Closer to the teacher on held-out prompts: the loss of its greedy answers, the KL along its samples
    # (measured here, 2026-11-30: 0.830 vs 0.863 and 4.43 vs 4.52 nats).
    assert a["teacher_answer_loss"] < 0.98 * b["teacher_answer_loss"]
    assert a["kl_student_teacher"] < b["kl_student_teacher"]
    # And a better model of the held-out chats' answers (2.11 vs 2.18).
    assert a["student"]["val_loss"] < b["student"]["val_loss"] - 0.03
    assert math.isfinite(a["speedup"]) and a["param_ratio"] < 0.5


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = load_stage(stage_dir).checkpoint
    return {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_weights(tiny_chain, tmp_path, monkeypatch, one_thread, caplog):
    """Mixed on-policy/supervised batches, JSD at T=1.5, the SFT term and gradient accumulation: every path
    whose state (RNG, step, optimizer) a resume must restore."""
    cfg = [*FAST, "train.max_steps=6", "train.save_every=2", "train.grad_accum=2", "loss.divergence=jsd",
           "loss.temperature=1.5", "loss.on_policy_fraction=0.5", "loss.sft_weight=0.3", "train.max_length=12",
           "logging.every_steps=1"]
    full = run_stage("distill", tmp_path / "a", cfg, _inputs(tiny_chain))
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(SimulatedInterrupt):
        run_stage("distill", tmp_path / "b", cfg, _inputs(tiny_chain))
    assert (tmp_path / "b" / "distill" / "state" / "trainer" / "checkpoint-4").is_dir()  # killed after that save
    assert not (tmp_path / "b" / "distill" / "manifest.json").exists()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    caplog.clear()
    with caplog.at_level("INFO"):
        resumed = run_stage("distill", tmp_path / "b", cfg, _inputs(tiny_chain))
    # It continued from the checkpoint (a rerun from scratch would end with the same weights too).
    assert "distill: resumed from step 4" in caplog.text and "training from step 4 to 6" in caplog.text
    wa, wb = _weights(full), _weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)
    ma = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("on_policy") == 1.0 for r in ma) and any(r.get("on_policy") == 0.0 for r in ma)
    assert [r["step"] for r in mb if "loss" in r] == [r["step"] for r in ma if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["on_policy"] for r in mb if "loss" in r] == [r["on_policy"] for r in ma if "loss" in r]


@pytest.mark.slow
def test_lora_on_a_given_student_writes_adapter_and_merged_checkpoint(tiny_chain, tmp_path, one_thread):
    out = run_stage("distill", tmp_path, [*FAST, "train.max_steps=4", "student.lora.enabled=true", "optim.lr=1e-2"],
                    _inputs(tiny_chain, student=tiny_chain.pretrain))
    sd = load_stage(out)
    assert (sd.adapter / "adapter_config.json").is_file()
    merged, base = _weights(out), _weights(tiny_chain.pretrain)
    assert not any("lora" in k for k in merged)
    assert any(not torch.equal(base[k], merged[k]) for k in base if "proj" in k)
    assert all(torch.equal(base[k], merged[k]) for k in base if "embed" in k)
    assert sd.manifest["inputs"]["student"]["path"] == str(tiny_chain.pretrain.resolve())


@pytest.mark.slow
def test_a_users_alpaca_file_trains_the_student(tiny_chain, tmp_path, one_thread):
    alpaca = SHARED / "sft" / "alpaca_en_demo.json"
    if not alpaca.is_file():
        pytest.skip(f"{alpaca} is not beside the repository (../shared)")
    # ... into a student of another architecture (the lab's switches), from a hub-style `teacher_model` dir.
    variant = {"position": "alibi", "norm": "layernorm", "activation": "gelu"}
    teacher_dir = load_stage(tiny_chain.sft).checkpoint
    out = run_stage("distill", tmp_path, [*FAST, "train.max_steps=3", f"data.train={alpaca}", f"teacher_model={teacher_dir}",
                                          "train.max_train_examples=32", "student.model.intermediate_size=null",
                                          *[f"student.model.{k}={v}" for k, v in variant.items()]], {"data": tiny_chain.data})
    ev = json.loads((out / "eval.json").read_text())
    assert ev["train_examples"] == 32 and ev["train_steps"] == 3
    assert ev["teacher_model"] == str(teacher_dir.resolve())
    manifest = load_stage(out).manifest
    assert "data.train" in manifest["key"]["data"] and "teacher_model" in manifest["key"]["data"]
    config = json.loads((load_stage(out).checkpoint / "config.json").read_text())
    assert {k: config[k] for k in variant} == variant


@pytest.mark.slow
def test_on_policy_distillation_on_the_rl_prompts(tiny_chain, tmp_path, one_thread):
    """Prompts without answers: the student samples, the teacher scores (reverse KL, T=0.7), every batch."""
    out = run_stage("distill", tmp_path, [*FAST, "train.max_steps=3", "logging.every_steps=1", "data.train=prompts",
                                          "loss.on_policy_fraction=1", "loss.divergence=reverse_kl",
                                          "loss.temperature=0.7", "train.max_length=8"], _inputs(tiny_chain))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows if "loss" in r] == [1.0, 1.0, 1.0]
    assert all(r["completions/max_length"] <= 8 for r in rows if "loss" in r)
    assert json.loads((out / "eval.json").read_text())["train_steps"] == 3
