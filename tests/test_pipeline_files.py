"""The pipeline on real files end to end: configs/pipeline/files_tiny.yaml (the ../shared/data
samples: Shakespeare/Wikipedia/C4 text, Alpaca chats, ShareGPT preference pairs) with the few
steps of configs/pipeline/ci.yaml, through the Prefect flow.

    .venv/bin/pytest tests/test_pipeline_files.py      # ~3 min; skipped without ../shared

The report card must make sense to someone who has never seen the built-in suite: the samples
are the user's own held-out prompts, no gold accuracy appears (these prompts have no verifier)
and says so, and held-out numbers come with their sample size and interval.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from alignline.files import read_jsonl
from tests.prefect_fixtures import ci_steps, prefect_harness  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.usefixtures("prefect_harness"),
              pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present (CI has it)")]


def test_real_files_pipeline_reports_only_what_exists_for_the_data(tmp_path, monkeypatch):
    from flows.pipeline import load_pipeline_config, pipeline_flow

    monkeypatch.chdir(REPO)  # data paths in configs/data/files_tiny.yaml are relative to the working directory
    run_dir = tmp_path / "run"
    cfg = load_pipeline_config(REPO / "configs/pipeline/files_tiny.yaml",
                               [f"run_dir={run_dir}", "gates.min_reward_accuracy=0.0", "stages.distill.enabled=true",
                                *ci_steps(("pretrain", "sft", "reward", "rlhf", "distill", "evaluate", "export"))])
    result = pipeline_flow(config=cfg)
    assert {s: r["status"] for s, r in result["stages"].items()} == {
        s: "ran" for s in ("data", "tokenizer", "pretrain", "sft", "reward", "rlhf", "distill", "evaluate", "export")}

    def ev(stage: str) -> dict:
        return json.loads((run_dir / stage / "eval.json").read_text())

    # No verifier: gold accuracy is absent everywhere, never a 0.
    for stage in ("pretrain", "sft", "rlhf-ppo"):
        assert "gold_accuracy" not in ev(stage) and ev(stage)["verifier"] == "none", stage
    # The student is compared with its teacher on what these files allow: no gold accuracy for either.
    assert "gold_accuracy" not in ev("distill")["student"] and "gold_accuracy" not in ev("distill")["teacher"]
    assert math.isfinite(ev("distill")["student"]["val_loss"]) and ev("distill")["param_ratio"] < 1.0
    assert "gold_accuracy" not in ev("rlhf-ppo")["policy"] and "overoptimisation" not in ev("rlhf-ppo")
    evaluation = ev("evaluate")
    assert evaluation["verifier"] == "none" and evaluation["best_by"] == "rm_score"
    assert not any("gold_accuracy" in r for r in evaluation["stages"].values())
    # lm-eval likewise: alignline_gold needs answers and is skipped, named; the preference task runs on the pairs.
    assert "prompts/val.jsonl has no answer" in evaluation["lm_eval_skipped"]["alignline_gold"]
    assert all(set(r["lm_eval"]) == {"alignline_pref"} for r in evaluation["stages"].values())
    # rm_score is one computation everywhere: normalised with the reward stage's statistics.
    assert ev("rlhf-ppo")["rm_normalisation"] == evaluation["rm_normalisation"] == {
        k: ev("reward")[k] for k in ("reward_mean", "reward_std")}
    # Held-out numbers are on the user's held-out data, with n and an interval.
    pref_val = read_jsonl(run_dir / "data/preference/val.jsonl")
    est = ev("reward")["estimates"]["accuracy"]
    assert est["n"] == len(pref_val) >= 20 and est["low"] <= est["value"] <= est["high"]
    test_prompts = [r["prompt"][-1]["content"] for r in read_jsonl(run_dir / "data/prompts/test.jsonl")]
    assert ev("rlhf-ppo")["estimates"]["win_rate"]["n"] == ev("rlhf-ppo")["num_prompts"] > 0
    fit = ev("rlhf-ppo")["length_fit"]["prompts"]  # long Alpaca prompts: dropped from PPO and counted
    assert fit["n"] == len(read_jsonl(run_dir / "data/prompts/train.jsonl")) and fit["over_max_length"] > 0
    samples = read_jsonl(run_dir / "rlhf-ppo/samples.jsonl")
    assert samples and all(s["prompt"] in test_prompts for s in samples)
    assert "ppl" in " ".join(ev("sft")) and ev("sft")["val_chats"] == len(read_jsonl(run_dir / "data/sft/val.jsonl"))

    report = (run_dir / "report.md").read_text()
    assert "no verifier" in report and "gold_accuracy=" not in report  # no headline shows one
    assert not re.search(r"What is \d+ ?[-+]", report)  # nothing of the built-in arithmetic suite
    assert "## Held-out measurements" in report and "| reward | accuracy |" in report
    assert "| prompt | sft |" in report.replace("pretrain | ", "")  # samples table without an answer column
    assert any(p[:40].replace("|", "\\|") in report for p in test_prompts)
    assert any("gate gold_must_not_drop skipped" in n for n in result["notes"])
    assert "| `sft/checkpoint` |" in report  # the checkpoint column: relative to the run directory named above
    assert "| rlhf-ppo | prompts |" in report and "raise rlhf-ppo's prompts.max_prompt_tokens" in report
    sizes = ev("data")["sizes"]
    assert sizes["sft/train.jsonl"] + sizes["sft/val.jsonl"] == 999  # the real data's size, in the data row:
    assert f"sft {sizes['sft/train.jsonl']}/{sizes['sft/val.jsonl']}" in report
