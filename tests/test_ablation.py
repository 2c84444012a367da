"""The architecture lab (`alignline ablate`, flows/ablate.py; alignline/ablation.py; loss_by_position).

    .venv/bin/pytest tests/test_ablation.py -m "not slow"     # config errors, loss by position, param counts
    .venv/bin/pytest tests/test_ablation.py                   # + configs/ablation/ci.yaml end to end (~1.5 min)

Fast: a config mistake (unknown key, a variant's bad override key, a variant changing the token budget)
is one `error:` message naming the variant and key, exit 2, nothing written; loss_by_position against a
prefix-by-prefix hand computation; bucket means; active parameters against the closed form (and the
expert size against the model's real MLP); a length the model cannot take is n/a, not a failure.
Slow (one Prefect test harness): the CI config end to end (a table row per variant, extrapolation
JSONs, plots); a second run retrains nothing; changing one variant's override retrains only it, and a
variant that crashes is a failed row while the others finish (exit 1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.prefect_fixtures import prefect_harness  # noqa: F401 - the session-wide Prefect test harness

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "configs" / "ablation" / "ci.yaml"


def _run_command(config, *overrides: str, run_dir: Path | None = None) -> tuple[int, list[tuple[str, str]]]:
    from flows.cli import run_ablate_command

    said: list[tuple[str, str]] = []
    code = run_ablate_command(config, run_dir=run_dir, overrides=list(overrides),
                              say=lambda message, kind="out": said.append((kind, message)))
    return code, said


def _errors(said: list[tuple[str, str]]) -> list[str]:
    return [m for kind, m in said if kind == "error"]


# --------------------------------------------------------------------------- config errors


def _write_config(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(CI.read_text())
    data.update(changes)
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_unknown_key_is_one_error_and_nothing_is_written(tmp_path) -> None:
    run_dir = tmp_path / "run"
    code, said = _run_command(_write_config(tmp_path, max_concurency=2), run_dir=run_dir)
    assert code == 2
    (msg,) = _errors(said)
    assert msg.startswith("error: ") and "max_concurency: unknown key" in msg
    assert not run_dir.exists()


def test_bad_override_key_names_the_variant_and_the_key(tmp_path) -> None:
    run_dir = tmp_path / "run"
    variants = [{"name": "baseline"}, {"name": "typo", "overrides": {"model.hiden_size": 32}}]
    code, said = _run_command(_write_config(tmp_path, variants=variants), run_dir=run_dir)
    assert code == 2
    (msg,) = _errors(said)
    assert "variants[1] 'typo'" in msg and "model.hiden_size: unknown key" in msg
    assert "baseline" not in msg  # only the broken variant is named
    assert not run_dir.exists()


def test_bad_override_value_and_budget_changes_are_errors_before_any_work(tmp_path) -> None:
    run_dir = tmp_path / "run"
    variants = [{"name": "wide", "overrides": {"model.hidden_size": 30}},  # not divisible by 4 heads
                {"name": "longer", "overrides": {"train.max_steps": 50}},
                {"name": "seeded", "overrides": {"train.seed": 3}}]
    code, said = _run_command(_write_config(tmp_path, variants=variants), run_dir=run_dir)
    assert code == 2
    (msg,) = _errors(said)
    assert "variants[0] 'wide'" in msg and "hidden_size=30" in msg
    assert "variants[1] 'longer'" in msg and "train.max_steps (12 -> 50)" in msg
    assert "variants[2] 'seeded'" in msg and "seeds" in msg
    assert not run_dir.exists()


def test_config_shapes() -> None:
    from alignline.config import ConfigError
    from flows.ablate import load_ablation_config, resolve_ablation

    cfg = load_ablation_config(CI, ["seeds=3", "pretrain.train.max_steps=7", "max_concurrency=1"])
    assert cfg.seeds == [0, 1, 2]
    plan = resolve_ablation(cfg)
    assert [r.label for r in plan.runs][:3] == ["baseline-s0", "baseline-s1", "baseline-s2"]
    assert len(plan.runs) == 3 * len(cfg.variant_specs)
    moe = [r for r in plan.runs if r.variant == "moe"]
    assert {r.resolved.config.model.num_experts for r in moe} == {4}
    assert [r.resolved.config.train.seed for r in moe] == [0, 1, 2]
    # rope-yarn trains exactly as baseline: each seed shares the baseline run of the same seed
    base = {r.seed: r for r in plan.runs if r.variant == "baseline"}
    for r in (r for r in plan.runs if r.variant == "rope-yarn"):
        assert r.run_dir == base[r.seed].run_dir and r.out_dir != r.run_dir
        assert plan.runs[r.shares] is base[r.seed] and r.eval_rope_scaling["rope_type"] == "yarn"
    assert all(r.shares is None for r in plan.runs if r.variant != "rope-yarn")
    assert {r.resolved.config.train.max_steps for r in plan.runs} == {7}  # pretrain.<key> reaches every variant
    # Override values (a dict like rope_scaling's, strings YAML would read otherwise) reach the config unchanged.
    from alignline.config import apply_overrides
    from flows.ablate import _yaml_value

    for value in ({"rope_type": "yarn", "factor": 8}, "none", "null", "layernorm", None, 1e-3, 8, True, [1, 2]):
        assert apply_overrides({}, [f"model.x={_yaml_value(value)}"])["model"]["x"] == value
    with pytest.raises(ConfigError, match="unique"):
        load_ablation_config(CI, ["variants=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="launcher: subprocess"):
        load_ablation_config(CI, ["pretrain.launcher=inprocess"])
    with pytest.raises(ConfigError, match="lower-case"):
        load_ablation_config(CI, ["variants=[{name: Rope_Yarn}]"])


# --------------------------------------------------------------------------- loss by position


def _tiny_model(vocab: int = 37):
    from alignline.model import AlignlineConfig, AlignlineForCausalLM

    torch.manual_seed(0)
    cfg = AlignlineConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return AlignlineForCausalLM(cfg).eval()


def test_loss_by_position_matches_a_prefix_by_prefix_hand_computation() -> None:
    from alignline.evaluation import loss_by_position

    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 37, (3, 10), generator=g)  # 3 windows of T=9 predictions
    got = loss_by_position(model, windows, batch_size=2)
    assert got.shape == (9,) and got.dtype == torch.float64
    # By hand: position p's loss is -log softmax(model(w[:p+1]) at its last position)[w[p+1]], averaged over
    # windows; each prefix runs on its own, so a shift or a peek at later tokens would show.
    want = torch.zeros(9, dtype=torch.float64)
    with torch.no_grad():
        for w in windows:
            for p in range(9):
                logits = model(input_ids=w[None, :p + 1]).logits[0, -1].double()
                want[p] += -(logits.log_softmax(-1)[w[p + 1]])
    want /= 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Its mean is the ordinary val loss (stages.pretrain.lm_loss on the same windows).
    from contextlib import nullcontext

    from stages.pretrain import lm_loss

    with torch.no_grad():
        assert float(got.mean()) == pytest.approx(float(lm_loss(model, windows, nullcontext)), rel=1e-5)


def test_bucket_means() -> None:
    from alignline.evaluation import bucket_means

    out = bucket_means([1.0, 2.0, 3.0, 4.0, 10.0], 2)
    assert out == [{"start": 0, "end": 2, "loss": 1.5}, {"start": 2, "end": 4, "loss": 3.5},
                   {"start": 4, "end": 5, "loss": 10.0}]
    with pytest.raises(ValueError):
        bucket_means([1.0], 0)


class _ShortModel(torch.nn.Module):
    """A model that, like learned position embeddings, refuses sequences longer than `limit`."""

    def __init__(self, inner, limit: int):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, input_ids):
        if input_ids.shape[1] > self.limit:
            raise ValueError(f"position {input_ids.shape[1] - 1} >= max_position_embeddings={self.limit}")
        return self.inner(input_ids=input_ids)


def test_a_length_the_model_cannot_take_is_na_with_its_reason() -> None:
    from flows.ablate import ExtrapolationConfig, extrapolation_losses

    seq_len = 8
    stream = torch.randint(0, 37, (200,), generator=torch.Generator().manual_seed(2))
    ex = ExtrapolationConfig(lengths=[1, 2, 4, 32], windows=3, buckets_per_length=4, batch_size=2)
    out = extrapolation_losses(_ShortModel(_tiny_model(), 2 * seq_len), stream, seq_len, ex)
    assert out["1"]["windows"] == 3 and out["2"]["windows"] == 3
    assert len(out["2"]["buckets"]) == 8 and out["2"]["buckets"][0] == {**out["2"]["buckets"][0], "start": 0, "end": 2}
    assert math.isfinite(out["1"]["loss"]) and math.isfinite(out["2"]["loss"])
    assert out["4"]["loss"] is None and "ValueError: position 31 >= max_position_embeddings=16" in out["4"]["error"]
    assert out["32"]["loss"] is None and "fewer than one window of 257" in out["32"]["error"]
    # ... and the table shows n/a with the reason, not a failure.
    from alignline.ablation import render_table, summary_rows

    rec = {"variant": "learned", "seed": 0, "status": "ran", "val_loss": 1.0, "extrapolation": out}
    rows = summary_rows([rec], ["learned"], [1, 2, 4, 32])
    assert rows[0]["status"] == "ran" and rows[0]["loss@4x"] is None
    line = render_table(rows, [1, 2, 4, 32], seeds=1).splitlines()[-1]
    assert line.count("n/a") >= 2 and "4x: ValueError: position 31" in line


def test_summary_rows_mean_and_spread_over_seeds() -> None:
    from alignline.ablation import render_table, summary_rows

    recs = [{"variant": "a", "seed": s, "status": "cached", "n_params": 10, "active_params": 10, "tokens_per_s": 100.0,
             "val_loss": v, "gold_accuracy": 0.5, "extrapolation": {"1": {"loss": v + 1}}}
            for s, v in ((0, 1.0), (1, 3.0))]
    recs.append({"variant": "b", "seed": 0, "status": "failed", "error": "RuntimeError: boom"})
    rows = summary_rows(recs, ["a", "b"], [1])
    assert rows[0]["val_loss"] == 2.0 and rows[0]["val_loss_std"] == pytest.approx(math.sqrt(2))
    assert rows[0]["loss@1x"] == 3.0 and rows[0]["status"] == "cached"
    assert rows[1]["status"] == "failed" and "RuntimeError: boom" in rows[1]["notes"]
    table = render_table(rows, [1], seeds=2)
    assert "± std (2 seeds)" in table.splitlines()[0] and "| 1.4142 |" in table


# --------------------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory, prefect_harness):  # noqa: F811 - the fixture, not the import
    run_dir = tmp_path_factory.mktemp("ablation") / "run"
    code, said = _run_command(CI, run_dir=run_dir)
    return run_dir, code, said


def _manifest_times(run_dir: Path) -> dict[str, str]:
    return {p.parent.parent.name: json.loads(p.read_text())["created"]
            for p in sorted((run_dir / "variants").glob("*/pretrain/manifest.json"))}


def _runs(run_dir: Path) -> dict[str, dict]:
    return {f"{r['variant']}-s{r['seed']}": r for r in json.loads((run_dir / "ablation.json").read_text())["runs"]}


VARIANTS = ["baseline", "alibi", "moe", "rope-yarn"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ci_config_end_to_end(ci_run) -> None:
    run_dir, code, said = ci_run
    assert code == 0, _errors(said)
    table = (run_dir / "ablation.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and ("| ran |" in line or "| cached |" in line)]
    assert [r.split("|")[1].strip() for r in rows] == VARIANTS
    runs = _runs(run_dir)
    for label, rec in runs.items():
        # rope-yarn waited for the baseline's training and found it cached
        assert rec["status"] == ("cached" if label == "rope-yarn-s0" else "ran"), label
        assert math.isfinite(rec["val_loss"]) and rec["tokens_per_s"] > 0
        ex = json.loads((run_dir / "variants" / label / "extrapolation.json").read_text())
        assert set(ex["lengths"]) == {"1", "2", "4", "8"}
        assert all(math.isfinite(e["loss"]) for e in ex["lengths"].values())
        assert len(ex["lengths"]["8"]["buckets"]) == 8 * 4  # buckets_per_length: 4
    moe, base = runs["moe-s0"], runs["baseline-s0"]
    # 2 of 4 experts idle per token in each of 4 layers: 2 x 4 x (3 x 64 x 176) weights not active
    assert moe["n_params"] - moe["active_params"] == 2 * 4 * 3 * 64 * 176
    assert base["active_params"] == base["n_params"] and moe["active_params"] > base["n_params"] - 1000
    # rope-yarn is the baseline's model, scaled at evaluation: same training numbers, other long-range losses
    yarn = runs["rope-yarn-s0"]
    assert yarn["path"] == base["path"] and yarn["val_loss"] == base["val_loss"]
    assert yarn["extrapolation"]["8"]["loss"] != base["extrapolation"]["8"]["loss"]
    assert (run_dir / "ablation" / "loss_curves.png").is_file()
    assert (run_dir / "ablation" / "extrapolation.png").is_file()
    assert "val loss @8x" in table and "![length extrapolation](ablation/extrapolation.png)" in table
    assert not (run_dir / "variants" / "rope-yarn-s0" / "pretrain").exists()
    # The variants trained on one data and tokenizer, each in its own stage dir (sharing the token shards).
    for label in ("baseline-s0", "alibi-s0", "moe-s0"):
        manifest = json.loads((run_dir / "variants" / label / "pretrain" / "manifest.json").read_text())
        assert manifest["inputs"]["data"]["path"] == str((run_dir / "data").resolve())
        assert (run_dir / "variants" / label / "cache").resolve() == (run_dir / "cache").resolve()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_second_run_reuses_and_one_changed_variant_retrains_alone(ci_run, tmp_path) -> None:
    run_dir, code, _ = ci_run
    assert code == 0
    before = _manifest_times(run_dir)
    code, said = _run_command(CI, run_dir=run_dir)
    assert code == 0, _errors(said)
    assert {k: r["status"] for k, r in _runs(run_dir).items()} == {f"{v}-s0": "cached" for v in VARIANTS}
    assert {k: r["extrapolation_status"] for k, r in _runs(run_dir).items()} == {f"{v}-s0": "cached" for v in VARIANTS}
    assert _manifest_times(run_dir) == before  # nothing retrained

    # alibi's override changes; a fifth variant crashes (seq_len 64 > max_position_embeddings 32).
    data = yaml.safe_load(CI.read_text())
    data["variants"][1]["overrides"] = {"model.position": "t5_bias"}
    data["variants"].append({"name": "broken", "overrides": {"model.max_position_embeddings": 32}})
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data, sort_keys=False))
    code, said = _run_command(changed, run_dir=run_dir)
    assert code == 1
    (msg,) = _errors(said)
    assert "1 of 5 runs failed: broken-s0" in msg and "re-run" in msg
    runs = _runs(run_dir)
    assert {k: r["status"] for k, r in runs.items()} == {"baseline-s0": "cached", "alibi-s0": "ran", "moe-s0": "cached",
                                                          "rope-yarn-s0": "cached", "broken-s0": "failed"}
    after = _manifest_times(run_dir)
    assert {k: after[k] for k in ("baseline-s0", "moe-s0")} == {k: before[k] for k in ("baseline-s0", "moe-s0")}
    assert after["alibi-s0"] != before["alibi-s0"]
    assert runs["alibi-s0"]["extrapolation_status"] == "ran"  # its model changed, so its evaluation too
    table = (run_dir / "ablation.md").read_text()
    broken = next(line for line in table.splitlines() if line.startswith("| broken |"))
    assert "| failed |" in broken and "broken-s0" not in broken and "seed 0:" in broken


def test_qa_prompt_format_asks_like_the_corpus_and_reads_up_to_the_next_question(monkeypatch) -> None:
    """A base model's gold accuracy (eval.prompt_format=qa, the ablation's setting): prompts are the
    corpus's "Q: ... A:" and the answer ends at the next " Q:"; the chat format would score it 0."""
    import alignline.evaluation as ev
    from alignline.model.tiny import toy_tokenizer

    tok = toy_tokenizer(["Q: What is 12+15? A: 27 Q: Sort b a. A: a b"])
    rows = [{"prompt": [{"role": "user", "content": "What is 12+15?"}], "answer": "27", "match": "numeric"},
            {"prompt": [{"role": "user", "content": "Sort b a."}], "answer": "a b", "match": "exact"}]
    seen = {}

    def fake_greedy(model, prompts, **kw):
        seen["prompts"] = [tok.decode(p) for p in prompts]
        return [tok(" 27 Q: Sort", add_special_tokens=False)["input_ids"],
                tok(" a b Q: What", add_special_tokens=False)["input_ids"]]

    monkeypatch.setattr(ev, "greedy_responses", fake_greedy)
    result = ev.gold_eval(None, tok, rows, prompt_format="qa")
    assert [p.replace(" ", "") for p in seen["prompts"]] == ["Q:Whatis12+15?A:", "Q:Sortba.A:"]
    assert result.accuracy == 1.0 and [s["response"].strip() for s in result.samples] == ["27", "a b"]
    with pytest.raises(ValueError, match="prompt_format"):
        ev.gold_eval(None, tok, rows, prompt_format="plain")
