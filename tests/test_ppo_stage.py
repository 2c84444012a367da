"""The rlhf stage end to end on the `tiny_chain` fixture (data/tokenizer/pretrain/sft/reward dirs).

    .venv/bin/pytest tests/test_ppo_stage.py -q

With the real configs/rlhf/tiny.yaml, PPO must raise both the RM score and the gold accuracy
above SFT's on held-out prompts; an interrupted run must resume from state/ and finish with the
same weights, bit for bit, as an uninterrupted one (also checked in seconds on a hand-made tiny
sft/reward/data trio, `test_killed_and_resumed_ppo_is_bitwise_the_uninterrupted_run`); DPO/GRPO/RLOO
run a few steps in the same slot and write the same contract.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alignline.artifacts import load_stage
from alignline.config import load_config
from alignline.files import read_jsonl
from alignline.training import FAIL_AFTER_ENV, SimulatedInterrupt

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "rlhf" / "tiny.yaml"
EVAL_KEYS = {"algorithm", "sft", "policy", "kl_to_ref", "win_rate", "overoptimisation", "rm_score_gain",
             "gold_accuracy_gain"}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread (conftest's `one_thread`)."""


def _run(run_dir: Path, chain, overrides: list[str], config: Path = TINY) -> Path:
    from stages import rlhf as ppo

    cfg = load_config(ppo.Config, config, ["logging.progress=false", *overrides])
    inputs = {"init": chain["sft"], "reward": chain["reward"], "data": chain["data"]}
    return ppo.run(cfg, inputs, run_dir)


def _check_contract(out: Path, algorithm: str) -> dict:
    sd = load_stage(out, expect="rlhf")
    assert sd.manifest["variant"] == algorithm and out.name == f"rlhf-{algorithm}"
    assert (out / "checkpoint" / "config.json").is_file()
    assert (out / "checkpoint" / "tokenizer.json").is_file()
    ev = json.loads((out / "eval.json").read_text())
    assert EVAL_KEYS <= set(ev), sorted(ev)
    assert ev["algorithm"] == algorithm
    for who in ("sft", "policy"):
        assert {"rm_score", "gold_accuracy"} <= set(ev[who])
    assert 0.0 <= ev["win_rate"] <= 1.0
    assert {"rm_score", "gold_accuracy", "kl", "win_rate"} <= set(sd.headline)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert rows, "no metrics logged"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == ev["num_prompts"]
    # The degeneration detectors of the trained policy are those of its samples.
    from alignline.degeneration import output_stats

    assert ev["policy"]["outputs"] == output_stats([s["response"] for s in samples])
    assert ev["sft"]["outputs"]["n"] == ev["num_prompts"]
    return ev


def _verbose_answers(stage_dir: Path) -> int:
    return sum("The answer is" in r["response"] for r in read_jsonl(stage_dir / "samples.jsonl"))


@pytest.mark.parametrize(("rm_gain", "gold_gain", "flag"), [
    (0.3, -0.05, True),    # the RM got happier while the answers got worse: reward hacking
    (0.3, 0.2, False),     # both up
    (0.3, 0.0, False),     # gold unchanged is not a drop
    (-0.1, -0.05, False),  # everything worse is a failed run, not overoptimisation
])
def test_overoptimisation_flag_is_rm_up_while_gold_down(rm_gain, gold_gain, flag):
    from alignline.evaluation import overoptimised

    assert overoptimised(rm_gain, gold_gain) is flag


@pytest.mark.slow
def test_tiny_ppo_beats_sft_and_logs_everything(tiny_chain, tmp_path):
    out = _run(tmp_path / "run", tiny_chain, [])
    ev = _check_contract(out, "ppo")
    # The tiny default's SFT data is 40% verbose demonstrations ("The answer is 19."), which the
    # preferences and the gold scorer reject (configs/data/tiny.yaml): PPO must learn the preferred
    # bare style. Measured: held-out gold 0.35 -> ~0.5 in 25 iterations, on the RM alone too.
    assert ev["policy"]["rm_score"] > ev["sft"]["rm_score"] + 0.2, ev
    assert ev["policy"]["gold_accuracy"] > ev["sft"]["gold_accuracy"] + 0.08, ev
    assert ev["win_rate"] > 0.6, ev
    assert ev["overoptimisation"] is False
    assert _verbose_answers(out) < _verbose_answers(tiny_chain.sft) / 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    need = {"rlhf_reward", "score", "kl", "entropy", "clipfrac", "approx_kl", "ratio_mean", "ratio_var",
            "value_loss", "explained_variance", "eos_rate", "response_length", "rollout_tokens_per_s",
            "train_tokens_per_s", "rollout_gold_accuracy", "score_rm"}
    assert need <= set(rows[-1]), need - set(rows[-1])
    assert len(rows) == load_config(__import__("stages.rlhf").rlhf.Config, TINY).steps
    assert rows[-1]["rollout_gold_accuracy"] > rows[0]["rollout_gold_accuracy"] + 0.05
    assert any((out / "tb").iterdir())


@pytest.mark.slow
def test_interrupted_ppo_resumes_from_state(tiny_chain, tmp_path, monkeypatch):
    short = ["steps=4", "save_every=2", "eval.num_prompts=8", "ppo.rollout_batch_size=16",
             "ppo.mini_batch_size=8", "ppo.ppo_epochs=1"]
    straight = _run(tmp_path / "a", tiny_chain, short)
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(SimulatedInterrupt):
        _run(tmp_path / "b", tiny_chain, short)
    assert not (tmp_path / "b" / "rlhf-ppo" / "manifest.json").exists()
    assert (tmp_path / "b" / "rlhf-ppo" / "state" / "latest").read_text().strip() == "step_00000002"
    monkeypatch.delenv(FAIL_AFTER_ENV)
    resumed = _run(tmp_path / "b", tiny_chain, short)
    ev_a, ev_b = (json.loads((p / "eval.json").read_text()) for p in (straight, resumed))
    assert ev_b["train"]["resumed_from"] == 2
    for who in ("sft", "policy"):
        assert ev_b[who]["rm_score"] == pytest.approx(ev_a[who]["rm_score"], abs=1e-5)
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    _assert_same_weights(straight, resumed)
    shutil.rmtree(tmp_path / "a")


def _assert_same_weights(a: Path, b: Path) -> None:
    """The final policy checkpoint and the last resumable state (the trainer's own state_dict:
    policy + critic weights, AdamW moments, lr schedules, KL controller, reward statistics) of two
    runs are bitwise equal."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "checkpoint/model.safetensors")), load_file(str(b / "checkpoint/model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"checkpoint: {k} differs"
    sa, sb = (torch.load(p / "state/step_00000004/trainer.pt", weights_only=True) for p in (a, b))
    assert sa.keys() == sb.keys() and {"weights", "optimizer", "critic_optimizer", "kl_ctl", "step"} <= sa.keys()
    assert sa["step"] == sb["step"] == 4
    for head in ("policy", "value_model"):
        assert sa["weights"][head].keys() == sb["weights"][head].keys() and sa["weights"][head], head
        for k, t in sa["weights"][head].items():
            assert torch.equal(t, sb["weights"][head][k]), f"state {head}.{k} differs"
    for which in ("optimizer", "critic_optimizer"):  # policy and critic AdamW moments
        assert sa[which]["state"], which
        for i, st in sa[which]["state"].items():
            for k, t in st.items():
                assert torch.equal(t, sb[which]["state"][i][k]), f"{which} state {i}.{k} differs"
    for which in ("scheduler", "critic_scheduler", "kl_ctl", "reward_norm"):
        assert sa[which] == sb[which], which


def _fake_stage(run_dir: Path, stage: str, fill) -> Path:
    """A complete stage dir written through StageRun (manifest and all), its content made by `fill`."""
    from alignline.artifacts import StageRun

    run = StageRun(run_dir, stage, None)
    fill(run.staging)
    return run.finalize(eval=getattr(fill, "eval", None))


def _tiny_trio(root: Path) -> dict[str, Path]:
    """data (prompts with gold answers), sft (a random 2-layer alignline model + BPE tokenizer) and
    reward (a random sequence-classification head, reward_mean/std in eval.json), in about a second."""
    from alignline.model import AlignlineConfig, AlignlineForCausalLM, AlignlineForSequenceClassification
    from alignline.tokenizer import train_tokenizer

    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "answer": str(a + b), "match": "numeric",
             "task": "add"} for a in range(6) for b in range(4)]
    texts = [r["prompt"][0]["content"] + " " + r["answer"] for r in rows] * 4
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    policy = AlignlineForCausalLM(AlignlineConfig(**cfg))
    rm = AlignlineForSequenceClassification(AlignlineConfig(num_labels=1, **cfg))

    def data(d: Path):
        for split, part in (("train", rows[:16]), ("test", rows[16:])):
            (d / "prompts").mkdir(parents=True, exist_ok=True)
            (d / "prompts" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

    def model(m):
        def fill(d: Path):
            m.save_pretrained(str(d / "checkpoint"))
            tok.save_pretrained(str(d / "checkpoint"))
        return fill

    reward = model(rm)
    reward.eval = {"reward_mean": 0.3, "reward_std": 0.5}
    return {"data": _fake_stage(root, "data", data), "sft": _fake_stage(root, "sft", model(policy)),
            "reward": _fake_stage(root, "reward", reward)}


def test_killed_and_resumed_ppo_is_bitwise_the_uninterrupted_run(tmp_path, monkeypatch):
    """Killed after iteration 3 with state saved at 2, the resumed run must restore weights, AdamW,
    the adaptive KL coefficient and the RNG streams exactly: anything missed changes the bits."""
    trio = _tiny_trio(tmp_path / "chain")
    short = ["steps=4", "save_every=2", "eval.num_prompts=4", "eval.max_new_tokens=4", "ppo.rollout_batch_size=8",
             "ppo.forward_batch_size=8", "ppo.mini_batch_size=4", "ppo.grad_accum_steps=2", "ppo.ppo_epochs=2",
             "ppo.max_new_tokens=4", "optim.lr=1e-3", "ppo.kl.adaptive=true", "ppo.kl.horizon=16",
             "logging.report_to=[]"]
    straight = _run(tmp_path / "a", trio, short)
    monkeypatch.setenv(FAIL_AFTER_ENV, "3")
    with pytest.raises(SimulatedInterrupt):
        _run(tmp_path / "b", trio, short)
    monkeypatch.delenv(FAIL_AFTER_ENV)
    resumed = _run(tmp_path / "b", trio, short)
    ev_a, ev_b = (json.loads((p / "eval.json").read_text()) for p in (straight, resumed))
    assert ev_a["train"]["resumed_from"] == 0 and ev_b["train"]["resumed_from"] == 2
    assert ev_b["train"]["final"] == ev_a["train"]["final"]
    assert ev_a["train"]["final"]["beta"] != 0.05  # the adaptive controller did move (and was restored)
    _assert_same_weights(straight, resumed)
    with torch.no_grad():  # ... and training did change the policy, so equal bits mean something
        from safetensors.torch import load_file

        w0 = load_file(str(trio["sft"] / "checkpoint" / "model.safetensors"))
        w4 = load_file(str(straight / "checkpoint" / "model.safetensors"))
        assert any(not torch.equal(w0[k], w4[k]) for k in w0)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpo", "kto", "grpo", "rloo"])
def test_trl_algorithms_fill_the_same_slot(tiny_chain, tmp_path, algorithm):
    cfg = REPO / "configs" / "rlhf" / f"{algorithm}_tiny.yaml"
    steps = {"dpo": 8, "kto": 8, "grpo": 4, "rloo": 4}[algorithm]
    lr = 2.5 * load_config(__import__("stages.rlhf").rlhf.Config, cfg).optim.lr  # not the YAML's value
    out = _run(tmp_path, tiny_chain, [f"steps={steps}", "eval.num_prompts=16", f"optim.lr={lr}"], config=cfg)
    ev = _check_contract(out, algorithm)
    assert out == tmp_path / f"rlhf-{algorithm}"  # each algorithm has its own output dir
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # `optim.lr` is TRL's learning rate (constant schedule, no warmup: every step at lr).
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs and all(x == pytest.approx(lr) for x in lrs), lrs
    if algorithm in ("dpo", "kto"):
        # The implicit reward margin (good minus bad answers) on the training data must grow from 0.
        margins = [r["rewards/margins"] for r in rows if "rewards/margins" in r]
        assert margins and max(margins[-3:]) > 0, margins
        if algorithm == "kto":  # the built-in suite has no kto/: its preference pairs, unpaired
            fit = ev["length_fit"]["train"]
            assert fit["source"].endswith("preference/train.jsonl (unpaired)") and fit["desirable"] * 2 == fit["n"]
    else:
        # Our RM is the reward function: its normalised score is logged every step, and the policy's
        # KL to the SFT reference grows from 0 as it learns.
        steps_rows = [r for r in rows if "rewards/reward_model/mean" in r]
        assert len(steps_rows) >= steps - 1, rows
        assert steps_rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps_rows[-1]["kl"] > 0
    assert ev["kl_to_ref"] > 0  # the policy moved off the reference


def test_kto_learns_the_chosen_answers_as_good_and_a_kto_file_wins(tmp_path):
    """KTO's data: each preference pair unpaired into its chosen answer (label true) and its rejected
    one (false); the data stage's kto/train.jsonl (a user's own labels) is used as it is when present."""
    from alignline.files import write_jsonl
    from stages.rlhf import kto_rows

    user = [{"role": "user", "content": "What is 2+2?"}]
    good, bad = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    write_jsonl(tmp_path / "preference" / "train.jsonl", [{"prompt": user, "chosen": good, "rejected": bad}])
    rows, source = kto_rows(tmp_path)
    assert rows == [{"prompt": user, "completion": good, "label": True},
                    {"prompt": user, "completion": bad, "label": False}]
    assert source.endswith("preference/train.jsonl (unpaired)")
    write_jsonl(tmp_path / "kto" / "train.jsonl", [{"prompt": user, "completion": bad, "label": False}])
    assert kto_rows(tmp_path) == ([{"prompt": user, "completion": bad, "label": False}],
                                  str(tmp_path / "kto" / "train.jsonl"))


def test_gold_reward_scores_trl_completions_against_each_rows_answer():
    from stages.rlhf import gold_reward

    completions = [[{"role": "assistant", "content": c}] for c in ("19", " 19 ", "The answer is 19.", "t a c", "c a t")]
    got = gold_reward(prompts=None, completions=completions, answer=["19", "19", "19", "t a c", "t a c"],
                      match=["numeric", "numeric", "numeric", "exact", "exact"])
    assert got == [1.0, 1.0, 0.0, 1.0, 0.0]


@pytest.mark.slow
def test_grpo_adds_the_gold_scorer_as_a_verifiable_reward(tiny_chain, tmp_path):
    cfg = REPO / "configs" / "rlhf" / "grpo_tiny.yaml"
    out = _run(tmp_path, tiny_chain, ["steps=2", "eval.num_prompts=8", "grpo.gold_reward=true"], config=cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gold = [r["rewards/gold_reward/mean"] for r in rows if "rewards/gold_reward/mean" in r]
    assert gold and all(0.0 <= g <= 1.0 for g in gold), rows
    assert any(0.0 < g for g in gold)  # the SFT policy already gets some training prompts right


@pytest.mark.slow
def test_interrupted_dpo_resumes_from_its_trainer_checkpoint(tiny_chain, tmp_path, monkeypatch):
    # TRL algorithms checkpoint through the HF Trainer under rlhf-dpo/state/; a killed run continues from
    # the latest checkpoint and logs each step once.
    cfg = REPO / "configs" / "rlhf" / "dpo_tiny.yaml"
    short = ["steps=4", "save_every=2", "eval.num_prompts=8"]
    straight = _run(tmp_path / "a", tiny_chain, short, config=cfg)
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")
    with pytest.raises(SimulatedInterrupt):
        _run(tmp_path / "b", tiny_chain, short, config=cfg)
    assert not (tmp_path / "b" / "rlhf-dpo" / "manifest.json").exists()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    resumed = _run(tmp_path / "b", tiny_chain, short, config=cfg)
    ev_a, ev_b = (json.loads((p / "eval.json").read_text()) for p in (straight, resumed))
    assert ev_a["train"]["resumed_from"] == 0 and ev_b["train"]["resumed_from"] == 2
    assert ev_b["policy"]["rm_score"] == pytest.approx(ev_a["policy"]["rm_score"], abs=1e-4)
    losses = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in losses if "loss" in r]
    assert steps == [1, 2, 3, 4], steps


def test_eval_kl_and_greedy_ignore_the_checkpoint_generation_config(tmp_path, monkeypatch):
    """The evaluation's KL samples come from softmax(logits / T), the distribution the KL is computed
    under, and its greedy answers are plain greedy, whatever the checkpoint's generation_config.json says."""
    from alignline.evaluation import greedy_responses, kl_to_reference
    from tests.sampling_checks import leaky_checkpoint, load_like_the_stages, spy_processors

    policy = load_like_the_stages(leaky_checkpoint(tmp_path / "ckpt", vocab_size=64))
    seen = spy_processors(monkeypatch, policy)
    prompts = [[1, 5, 9], [1, 7]]
    kl = kl_to_reference(policy, policy, prompts, eos_token_id=2, pad_token_id=0, max_new_tokens=3, temperature=0.7)
    assert kl == pytest.approx(0.0, abs=1e-6)  # policy == ref
    greedy_responses(policy, prompts, eos_token_id=2, pad_token_id=0, max_new_tokens=3, batch_size=8)
    assert [[type(p).__name__ for p in s] for s in seen] == [["TemperatureLogitsWarper"], []]
