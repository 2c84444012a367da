"""The report card (alignline/report.py) from a hand-made run directory with known metrics.

    .venv/bin/pytest tests/test_report.py
"""

from __future__ import annotations

import json
from pathlib import Path

from alignline.report import StageRecord, build_report, curve_series, records_from_run_dir, sample_rows
from stages import stage_order


def _stage(run: Path, name: str, metrics: list[dict], samples: list[dict], headline: dict,
           kind: str | None = None, **manifest) -> None:
    d = run / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (d / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (d / "manifest.json").write_text(json.dumps({"stage": kind or name, "status": "complete", "headline": headline,
                                                 "wall_time_s": 1.5, **manifest}))


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    prompts = ["What is 1+1?", "Reverse a b."]
    _stage(run, "pretrain", [{"step": s, "loss": 5.0 - s} for s in range(1, 4)] ,
           [{"prompt": p, "response": "", "answer": a} for p, a in zip(prompts, ["2", "b a"])],
           {"val_loss": 2.5, "gold_accuracy": 0.0})
    _stage(run, "rlhf", [{"step": 1, "kl": 0.01, "reward_mean": 0.1, "reward_std": 1.0, "policy_loss": 0.3},
                         {"step": 2, "kl": 0.02, "reward_mean": 0.4, "reward_std": 0.9, "policy_loss": 0.2}],
           [{"prompt": p, "response": r, "answer": a} for p, r, a in zip(prompts, ["2", "b a"], ["2", "b a"])],
           {"kl": 0.02, "gold_accuracy": 1.0})
    # A stage killed mid-write leaves a partial last line; the report must still build.
    with open(run / "rlhf" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "kl": 0.0')
    return run


def test_curves_group_metrics_by_kind_with_exact_values(tmp_path: Path) -> None:
    run = _run(tmp_path)
    series = curve_series(run, ["pretrain", "rlhf"])
    loss = {label: (xs, ys) for label, xs, ys in series["loss"]}
    assert loss["pretrain/loss"] == ([1.0, 2.0, 3.0], [4.0, 3.0, 2.0])
    assert loss["rlhf/policy_loss"] == ([1.0, 2.0], [0.3, 0.2])
    assert {label for label, _, _ in series["kl"]} == {"rlhf/kl"}
    assert {label for label, _, _ in series["reward"]} == {"rlhf/reward_mean"}
    assert "rlhf/reward_std" not in {label for kind in series.values() for label, _, _ in kind}  # spread: not a curve


def test_report_card_markdown_pngs_and_tables(tmp_path: Path) -> None:
    run = _run(tmp_path)
    records = [StageRecord("pretrain", "cached", 1.5, str(run / "pretrain")),
               StageRecord("sft", "failed", 0.2, str(run / "sft"), message="RuntimeError: boom"),
               StageRecord("rlhf", "ran", 3.0, str(run / "rlhf"))]
    card = build_report(run, records, title="t", notes=["WARNING: something"])
    md = (run / "report.md").read_text()
    assert md.strip() == card.markdown.strip()
    assert "| pretrain | cached (reused) | 1.5 s | val_loss=2.5, gold_accuracy=0 |" in md
    assert "| sft | FAILED (RuntimeError: boom) | 0.2 s | - | - |" in md
    assert "> **WARNING: something**" in md
    for kind in ("loss", "kl", "reward"):
        assert (run / "report" / f"{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{kind}](report/{kind}.png)" in md
    assert {"stage": "rlhf", "metric": "kl", "value": 0.02} in card.metrics_rows
    # Samples line up by prompt across stages.
    assert card.sample_rows[1] == {"prompt": "Reverse a b.", "answer": "b a", "pretrain": "", "rlhf": "b a"}
    assert "| Reverse a b. | b a |  | b a |" in md


def test_rebuild_from_run_dir_alone(tmp_path: Path) -> None:
    run = _run(tmp_path)
    recs = records_from_run_dir(run, stage_order())
    assert [(r.name, r.status, r.wall_s) for r in recs] == [("pretrain", "ran", 1.5), ("rlhf", "ran", 1.5)]
    assert sample_rows(run, ["pretrain", "rlhf"], limit=1) == [
        {"prompt": "What is 1+1?", "answer": "2", "pretrain": "", "rlhf": "2"}]
    # In the order given (the registry's), whatever order the dirs were made in.
    assert [r.name for r in records_from_run_dir(run, ["rlhf", "pretrain"])] == ["rlhf", "pretrain"]


def test_alignline_report_rebuilds_the_card_of_a_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from alignline_cli.main import app

    run = _run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0 and f"wrote {run / 'report.md'}" in result.output, result.output
    md = (run / "report.md").read_text()
    assert md.index("| pretrain |") < md.index("| rlhf |")
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def _variants(tmp_path: Path) -> Path:
    """A run dir where PPO ran, then DPO, then PPO again (selected now): both rlhf outputs survive."""
    run = tmp_path / "run"
    for algo, acc, answer in (("ppo", 0.6, "2"), ("dpo", 0.4, "3")):
        _stage(run, f"rlhf-{algo}", [{"step": 1, "kl": 0.1 if algo == "ppo" else 0.2}],
               [{"prompt": "What is 1+1?", "response": answer, "answer": "2"}], {"gold_accuracy": acc},
               kind="rlhf", variant=algo)
    return run


def test_report_lists_every_surviving_variant_and_which_is_current(tmp_path: Path) -> None:
    run = _variants(tmp_path)
    (run / "rlhf").mkdir()  # a pre-variant dir left in place (its name was taken): listed, not lost
    (run / "rlhf" / "manifest.json").write_text(json.dumps({"stage": "rlhf", "status": "complete",
                                                           "headline": {"gold_accuracy": 0.1}}))
    records = [StageRecord("rlhf-ppo", "cached", 1.0, str(run / "rlhf-ppo"), stage="rlhf"),
               StageRecord("evaluate", "ran", 2.0, str(run / "evaluate"))]
    card = build_report(run, records, title="t", plots=False)
    md = card.markdown
    assert [r.name for r in card.records] == ["rlhf-ppo", "rlhf-dpo", "rlhf", "evaluate"]
    assert "| rlhf-ppo | cached (reused) | 1.0 s | gold_accuracy=0.6 |" in md
    assert "| rlhf-dpo | kept, not current (an earlier result; this run selects rlhf-ppo) | 1.5 s | gold_accuracy=0.4 |" in md
    assert "| rlhf | kept, not current (pre-variant output dir, left in place, not used) | - | gold_accuracy=0.1 |" in md
    assert ("- **rlhf**: this run selects `rlhf-ppo` (current: the one evaluated, gated and used downstream); "
            "also in the run directory, from earlier runs: `rlhf-dpo`, `rlhf`") in md
    assert {"stage": "rlhf-dpo", "metric": "gold_accuracy", "value": 0.4} in card.metrics_rows
    # Both algorithms' answers side by side, and their curves on the same charts.
    assert card.sample_rows == [{"prompt": "What is 1+1?", "answer": "2", "rlhf-ppo": "2", "rlhf-dpo": "3"}]
    assert "| prompt | answer | rlhf-ppo | rlhf-dpo |" in md
    assert {label for label, _, _ in curve_series(run, [r.name for r in card.records])["kl"]} == {
        "rlhf-ppo/kl", "rlhf-dpo/kl"}


def test_rebuilt_report_marks_the_evaluated_variant_current(tmp_path: Path) -> None:
    run = _variants(tmp_path)
    recs = records_from_run_dir(run, stage_order())
    # Without an evaluate stage nothing records which one is current: both are listed as they are.
    assert [(r.name, r.status, r.kind) for r in recs] == [("rlhf-dpo", "ran", "rlhf"), ("rlhf-ppo", "ran", "rlhf")]
    assert "(which one is current is not recorded)" in build_report(run, recs, plots=False).markdown
    _stage(run, "evaluate", [], [], {}, inputs={"rlhf": {"path": str(run / "rlhf-dpo"), "stage": "rlhf"}})
    recs = records_from_run_dir(run, stage_order())
    assert [(r.name, r.status) for r in recs] == [("rlhf-dpo", "ran"), ("rlhf-ppo", "kept"), ("evaluate", "ran")]
    assert "this run selects `rlhf-dpo`" in build_report(run, recs, plots=False).markdown


def test_wall_time_of_a_kept_dir_reads_its_manifest_and_says_when_it_cannot(tmp_path, capsys):
    from alignline.report import _wall_time

    d = tmp_path / "rlhf-dpo"
    assert _wall_time(d) is None and capsys.readouterr().err == ""  # not finished: nothing to say
    d.mkdir()
    (d / "manifest.json").write_text('{"wall_time_s": 12.5}')
    assert _wall_time(d) == 12.5
    (d / "manifest.json").write_text('{"wall_time_s": 12')
    assert _wall_time(d) is None
    assert f"cannot read {d / 'manifest.json'}" in capsys.readouterr().err


def test_examples_longer_than_max_length_are_a_table_and_a_warning(tmp_path: Path) -> None:
    """A stage's eval.json `length_fit` (alignline.chat.length_fit) reaches the card: the counts, what
    the trainer did with them, and a warning above 5%."""
    from alignline.chat import length_fit

    run = _run(tmp_path)
    fit = {"train": length_fit([10, 300, 40, 500], 256, "dropped", "dpo.max_length"),
           "val": {**length_fit([100, 100], 256, "truncated"), "identical_after_truncation": 0}}
    assert fit["train"] == {"n": 4, "over_max_length": 2, "share": 0.5, "longest": 500, "max_length": 256,
                            "action": "dropped", "key": "dpo.max_length"}
    (run / "rlhf" / "eval.json").write_text(json.dumps({"length_fit": fit}))
    md = build_report(run, records_from_run_dir(run, stage_order())).markdown
    assert "| rlhf | train | 4 | 2 | 50.0% | 500 | 256 | dropped |" in md
    assert "| rlhf | val |" not in md  # nothing cut there
    assert ("WARNING: rlhf train: 50% of the examples are longer than max_length and are dropped; raise rlhf's "
            "dpo.max_length") in md  # names the key to raise
