"""Pipeline flow behaviour with fake stages: caching, downstream re-runs, resume, retries, gates, report.

    .venv/bin/pytest tests/test_flow_pipeline.py

Fake stages (tests/prefect_fixtures.py) use the real stage-directory contract but train in
milliseconds; the real stages end to end are in tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignline.config import ConfigError
from stages import pipeline_stages
from tests.prefect_fixtures import fake_pipeline_overrides, make_fake_stages, prefect_harness  # noqa: F401

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

ALL = list(pipeline_stages())  # the registry's pipeline stages, in run order
# Output dirs: the rlhf stage writes rlhf-<algorithm>/ (the fake rlhf's default algorithm is ppo).
DIRS = {**{s: s for s in ALL}, "rlhf": "rlhf-ppo"}


@pytest.fixture()
def fake(tmp_path: Path, monkeypatch):
    pkg = make_fake_stages(tmp_path / "src")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "src"))
    for var in ("FAKE_FAIL_STAGE", "FAKE_FAIL_AT", "FAKE_FAIL_ONCE_FILE", "FAKE_STEP_SLEEP"):
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "run"

    def run(*extra: str, **kw):
        from flows.pipeline import load_pipeline_config, pipeline_flow

        cfg = load_pipeline_config(None, fake_pipeline_overrides(pkg, run_dir) + list(extra))
        return pipeline_flow(config=cfg, **kw)

    return run, run_dir


def statuses(result) -> dict[str, str]:
    return {s: r["status"] for s, r in result["stages"].items()}


def calls(run_dir: Path, stage: str) -> list[int]:
    p = run_dir / f"{stage}.calls"
    return [int(x) for x in p.read_text().split()] if p.exists() else []


def test_cache_reuse_and_downstream_rerun(fake) -> None:
    run, run_dir = fake
    first = run()
    assert statuses(first) == {s: "ran" for s in ALL}

    second = run()
    assert statuses(second) == {s: "cached" for s in ALL}
    assert all(calls(run_dir, DIRS[s]) == [0] for s in ALL)  # nothing was called again

    # An SFT change re-runs SFT and everything downstream, never pretraining.
    third = run("sft.lr=0.2")
    assert statuses(third) == {"data": "cached", "tokenizer": "cached", "pretrain": "cached",
                               "sft": "ran", "reward": "ran", "rlhf": "ran", "distill": "ran", "evaluate": "ran",
                               "export": "ran"}
    assert calls(run_dir, "pretrain") == [0]

    # A deleted output is rebuilt, never served from a stale cache.
    shutil.rmtree(run_dir / "reward")
    fourth = run("sft.lr=0.2")
    assert statuses(fourth)["reward"] == "ran"
    assert statuses(fourth)["sft"] == "cached"
    assert statuses(fourth)["rlhf"] == "ran"

    # A tampered output file (hash mismatch) is not reused either.
    (run_dir / "evaluate" / "eval.json").write_text("{}")
    assert statuses(run("sft.lr=0.2"))["evaluate"] == "ran"


def test_report_card_file_and_artifacts(fake) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    run, run_dir = fake
    result = run("name=card")  # its own artifact keys: other tests publish `fake-*` in the same harness
    report = (run_dir / "report.md").read_text()
    for stage in ALL:
        assert f"| {DIRS[stage]} | ran |" in report
    assert "loss=0.025" in report and "accuracy=0.9" in report  # every stage's headline metrics
    assert (run_dir / "report" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "![loss](report/loss.png)" in report
    assert "sft-0" in report and "rlhf-ppo-0" in report  # samples side by side

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["card-report-card", "card-metrics", "card-samples",
                                        "card-pretrain-progress"])))
    by_key = {a.key: a for a in arts}
    assert set(by_key) >= {"card-report-card", "card-metrics", "card-samples", "card-pretrain-progress"}
    card = by_key["card-report-card"].data
    assert "| rlhf-ppo | ran |" in card and "data:image/png;base64," in card
    table = json.loads(by_key["card-metrics"].data) if isinstance(by_key["card-metrics"].data, str) \
        else by_key["card-metrics"].data
    assert {"stage": "reward", "metric": "accuracy", "value": 0.9} in table
    progress = [a for a in arts if a.key == "card-pretrain-progress"]
    assert max(float(a.data) for a in progress) == 100.0

    # The run graph: each stage's task run waits for the task runs of the stages it reads.
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[result["flow_run_id"]])))
    by_name = {t.name: t for t in tasks}
    ids = {t.id: t.name for t in tasks}
    edges = {name: {ids[i.id] for i in t.task_inputs.get("wait_for", [])} for name, t in by_name.items()}
    assert edges["data"] == set() and edges["tokenizer"] == {"data"}
    assert edges["rlhf-ppo"] == {"data", "sft", "reward"}
    assert edges["evaluate"] == {"data", "sft", "reward", "rlhf-ppo", "distill"}


def test_an_optional_stage_turned_off_is_skipped_and_not_read(fake) -> None:
    """distill off: skipped, and evaluate's inputs do not name it; on again: it runs and evaluate re-runs
    with it as an input (its reuse key changed), the stages before it are reused."""
    run, run_dir = fake
    off = run("stages.distill.enabled=false")
    assert statuses(off) == {**{s: "ran" for s in ALL}, "distill": "skipped"}
    assert not (run_dir / "distill").exists()
    inputs = json.loads((run_dir / "evaluate" / "manifest.json").read_text())["inputs"]
    assert "distill" not in inputs and "rlhf" in inputs
    on = run()
    assert statuses(on) == {**{s: "cached" for s in ALL}, "distill": "ran", "evaluate": "ran", "export": "ran"}
    assert "distill" in json.loads((run_dir / "evaluate" / "manifest.json").read_text())["inputs"]


def test_crash_resumes_at_failed_stage_from_its_state(fake, monkeypatch) -> None:
    run, run_dir = fake
    monkeypatch.setenv("FAKE_FAIL_STAGE", "pretrain")
    monkeypatch.setenv("FAKE_FAIL_AT", "2")
    with pytest.raises(RuntimeError, match="fake pretrain crashed at step 2"):
        run()
    assert not (run_dir / "pretrain" / "manifest.json").exists()  # a failed stage leaves no manifest
    assert "FAILED" in (run_dir / "report.md").read_text()
    monkeypatch.delenv("FAKE_FAIL_STAGE")
    again = run()
    assert statuses(again)["data"] == "cached" and statuses(again)["tokenizer"] == "cached"
    assert statuses(again)["pretrain"] == "ran"
    assert calls(run_dir, "pretrain") == [0, 3]  # resumed after the last saved step (2)
    assert again["stages"]["pretrain"]["headline"]["resumed_from"] == 3


def test_retry_resumes_within_the_same_run(fake, monkeypatch, tmp_path: Path) -> None:
    run, run_dir = fake
    monkeypatch.setenv("FAKE_FAIL_STAGE", "sft")
    monkeypatch.setenv("FAKE_FAIL_AT", "1")
    monkeypatch.setenv("FAKE_FAIL_ONCE_FILE", str(tmp_path / "once"))
    result = run("retries=1")
    assert statuses(result)["sft"] == "ran"
    assert calls(run_dir, "sft") == [0, 2]


def test_killed_subprocess_stage_resumes(fake, monkeypatch) -> None:
    """A stage launched as a process group is killed on timeout mid-training; the next run resumes."""
    run, run_dir = fake
    monkeypatch.setenv("FAKE_STEP_SLEEP", "0.3")
    with pytest.raises(Exception, match="timed out"):
        run("pretrain.steps=400", "stages.pretrain.launcher=subprocess", "stages.pretrain.timeout_s=40",
            to_stage="pretrain")
    assert not (run_dir / "pretrain" / "manifest.json").exists()
    killed_at = json.loads((run_dir / "pretrain" / "state" / (run_dir / "pretrain" / "state" / "latest")
                            .read_text().strip() / "meta.json").read_text())["step"]
    assert killed_at > 0
    monkeypatch.setenv("FAKE_STEP_SLEEP", "0")
    # The launcher is not part of the stage config, so this in-process run resumes the same state.
    result = run("pretrain.steps=400", to_stage="pretrain")
    assert statuses(result)["pretrain"] == "ran"
    assert calls(run_dir, "pretrain") == [0, killed_at + 1]
    assert statuses(result)["sft"] == "pending"  # --to pretrain


def test_reward_gate_stops_before_rlhf(fake) -> None:
    from flows.pipeline import GateFailed

    run, run_dir = fake
    with pytest.raises(GateFailed, match="accuracy=0.500 < 0.7"):
        run("reward.accuracy=0.5")
    assert not (run_dir / "rlhf-ppo").exists() and not (run_dir / "rlhf").exists()
    report = (run_dir / "report.md").read_text()
    assert "GATE: reward model" in report and "| rlhf-ppo | stopped by gate |" in report
    # 0.5 on 200 pairs: the whole 95% interval is below the bar; the message says so.
    with pytest.raises(GateFailed, match=r"accuracy=0.500 < 0.7 \(on 200 held-out pairs, 95% interval 0.43-0.57\)"):
        run("reward.accuracy=0.5", "reward.accuracy_interval=[200,0.431,0.569]")


def test_the_reward_gate_does_not_stop_on_too_few_pairs(fake) -> None:
    """0.6 on 12 held-out pairs (interval 0.35-0.81) does not show the reward model is below 0.7:
    RLHF runs, and the report says why the gate let it through."""
    run, run_dir = fake
    result = run("reward.accuracy=0.6", "reward.accuracy_interval=[12,0.354,0.807]")
    assert statuses(result)["rlhf"] == "ran"
    assert any("too few pairs to stop on" in n and "on 12 held-out pairs" in n for n in result["notes"])
    assert "too few pairs to stop on" in (run_dir / "report.md").read_text()


def test_a_collapsed_policy_marks_the_run_by_default(fake) -> None:
    """A planted collapse (every RLHF answer the same looping string) marks the run, whatever the
    KL and gold say, and the report card's detector table shows it."""
    run, run_dir = fake
    result = run("rlhf.collapse=true")
    collapsed = [n for n in result["notes"] if "RLHF answers collapsed" in n]
    assert any("100% of the answers are one and the same string (SFT: 33%" in n for n in collapsed), result["notes"]
    assert any("3-grams repeat within it" in n for n in collapsed)
    report = (run_dir / "report.md").read_text()
    assert "## Are the answers still answers?" in report and "WARNING: RLHF answers collapsed" in report
    assert "| rlhf-ppo | 3 | 6 |" in report and "| sft | 3 | 1 |" in report
    healthy = run()  # the same run without the collapse: no mark
    assert not [n for n in healthy["notes"] if "collapsed" in n]
    assert not [n for n in run("rlhf.collapse=true", "gates.collapse=false")["notes"] if "collapsed" in n]


def test_a_gate_whose_metric_is_absent_is_skipped_with_a_note(fake) -> None:
    """A metric the data cannot have (no verifier: no gold accuracy) skips its gate with a line in the
    report; it never stops or marks the run on a missing number."""
    run, run_dir = fake
    result = run("gates.gold_metric=pass_at_1", "gates.reward_metric=auc", "gates.kl_metric=kl_to_ref")
    assert statuses(result)["evaluate"] == "ran"  # the reward gate did not stop it
    notes = result["notes"]
    assert any(n.startswith("NOTE: gate min_reward_accuracy skipped: reward has no 'auc'") for n in notes), notes
    assert any("gate gold_must_not_drop skipped: rlhf-ppo has no 'pass_at_1'" in n for n in notes)
    assert any("gate max_kl skipped: rlhf-ppo has no 'kl_to_ref'" in n for n in notes)
    assert not [n for n in notes if n.startswith(("WARNING", "GATE"))]
    assert "NOTE: gate gold_must_not_drop skipped" in (run_dir / "report.md").read_text()


def test_rlhf_gates_mark_the_run(fake) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    run, run_dir = fake
    result = run("rlhf.kl=5.0", "rlhf.gold_accuracy=0.2", "name=marked")
    assert statuses(result)["evaluate"] == "ran"
    assert any("kl=5 exceeds" in n for n in result["notes"])
    assert any("dropped below SFT's 0.500" in n for n in result["notes"])
    assert "WARNING: RLHF kl=5" in (run_dir / "report.md").read_text()
    assert any(n.endswith("(rlhf-ppo)") for n in result["notes"])  # the gate names the algorithm it judged
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["gate-warning"])))
    assert runs, "the marked flow run carries the gate-warning tag"


def test_configs_validated_before_any_stage_runs(fake) -> None:
    run, run_dir = fake
    with pytest.raises(ConfigError, match=r"(?s)\[rlhf\].*stepz: unknown key"):
        run("rlhf.stepz=3")
    assert not (run_dir / "data").exists()


def test_from_forces_a_stage_and_downstream(fake) -> None:
    run, run_dir = fake
    run()
    result = run(from_stage="reward")
    assert statuses(result) == {"data": "cached", "tokenizer": "cached", "pretrain": "cached", "sft": "cached",
                                "reward": "ran", "rlhf": "ran", "distill": "ran", "evaluate": "ran", "export": "ran"}
    # --from retrains: the forced stage's finished state is not resumed (that would train nothing), and
    # downstream stages see a new parent, so their state is not resumed either.
    assert calls(run_dir, "reward") == [0, 0] and calls(run_dir, "rlhf-ppo") == [0, 0]


def test_downstream_state_of_an_old_parent_is_never_resumed(fake, monkeypatch) -> None:
    """A changed parent re-runs its children from scratch: their state/ was trained on the old parent."""
    run, run_dir = fake
    monkeypatch.setenv("FAKE_FAIL_STAGE", "rlhf")
    monkeypatch.setenv("FAKE_FAIL_AT", "2")
    with pytest.raises(RuntimeError, match="fake rlhf crashed"):
        run()
    monkeypatch.delenv("FAKE_FAIL_STAGE")
    # reward has finished state (step 3), rlhf crashed with state at step 2; now SFT changes.
    result = run("sft.lr=0.2")
    assert statuses(result) == {"data": "cached", "tokenizer": "cached", "pretrain": "cached",
                                "sft": "ran", "reward": "ran", "rlhf": "ran", "distill": "ran", "evaluate": "ran",
                                "export": "ran"}
    assert calls(run_dir, "reward") == [0, 0]  # not [0, 4]: nothing trained on the new SFT
    assert calls(run_dir, "rlhf-ppo") == [0, 0]  # not [0, 3]
    # (the "discarding training state ... input 'sft' changed" log line: tests/test_reuse_keys.py)
    assert "input 'sft' changed" in result["stages"]["reward"]["message"]
    # The state now belongs to the new key: an unchanged rerun is cached, a crash-resume still works.
    assert statuses(run("sft.lr=0.2")) == {s: "cached" for s in ALL}


def test_changed_data_file_reruns_the_stage_and_downstream(fake, tmp_path: Path) -> None:
    """Data read from outside the run dir is fingerprinted: new rows re-run the stage, never reuse it."""
    run, run_dir = fake
    rows = tmp_path / "sft_rows.jsonl"
    rows.write_text('{"text": "a"}\n')
    assert statuses(run(f"data.data_file={rows}")) == {s: "ran" for s in ALL}
    assert statuses(run(f"data.data_file={rows}")) == {s: "cached" for s in ALL}
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["key"]["data"]["data_file"]["path"] == str(rows.resolve())

    with open(rows, "a") as fh:  # the nightly job: same config, same code, fresh rows
        fh.write('{"text": "b"}\n')
    result = run(f"data.data_file={rows}")
    assert statuses(result) == {s: "ran" for s in ALL}
    assert calls(run_dir, "data") == [0, 0] and calls(run_dir, "sft") == [0, 0]
    assert f"data 'data_file' changed: {rows.resolve()}" in result["stages"]["data"]["message"]
    report = (run_dir / "report.md").read_text()
    assert "## Why stages ran" in report and f"{rows.resolve()} (content differs)" in report


# --------------------------------------------------------------------------- alternatives (variants)


def names(result) -> dict[str, str]:
    return {s: r["name"] for s, r in result["stages"].items()}


def test_switching_the_algorithm_keeps_both_outputs_and_reuses_each(fake) -> None:
    """ppo -> dpo -> ppo in one run dir: rlhf-ppo/ and rlhf-dpo/ both survive, the second PPO run is
    a cache hit (no retraining), evaluate evaluates the selected one, the report lists both."""
    run, run_dir = fake
    first = run()
    assert names(first)["rlhf"] == "rlhf-ppo" and statuses(first)["rlhf"] == "ran"
    ppo_manifest = (run_dir / "rlhf-ppo" / "manifest.json").read_bytes()

    dpo = run("rlhf.algorithm=dpo")
    assert statuses(dpo) == {"data": "cached", "tokenizer": "cached", "pretrain": "cached", "sft": "cached",
                             "reward": "cached", "rlhf": "ran", "distill": "ran", "evaluate": "ran",
                                "export": "ran"}
    assert names(dpo)["rlhf"] == "rlhf-dpo"
    assert (run_dir / "rlhf-ppo" / "manifest.json").read_bytes() == ppo_manifest  # PPO's output untouched
    assert json.loads((run_dir / "rlhf-dpo" / "manifest.json").read_text())["variant"] == "dpo"
    assert not (run_dir / "rlhf").exists()

    again = run()  # back to PPO: reused, not retrained
    assert statuses(again)["rlhf"] == "cached" and names(again)["rlhf"] == "rlhf-ppo"
    assert calls(run_dir, "rlhf-ppo") == [0] and calls(run_dir, "rlhf-dpo") == [0]
    assert (run_dir / "rlhf-ppo" / "manifest.json").read_bytes() == ppo_manifest
    # evaluate's input moved back to the PPO output, so it re-ran on it (and says why).
    assert statuses(again)["evaluate"] == "ran"
    assert f"input 'rlhf' changed: now {run_dir / 'rlhf-ppo'} (was {run_dir / 'rlhf-dpo'})" \
        in again["stages"]["evaluate"]["message"]
    evaluated = json.loads((run_dir / "evaluate" / "manifest.json").read_text())["inputs"]["rlhf"]["path"]
    assert Path(evaluated).name == "rlhf-ppo"

    report = (run_dir / "report.md").read_text()
    assert "| rlhf-ppo | cached (reused) (" in report
    assert "| rlhf-dpo | kept, not current (an earlier result; this run selects rlhf-ppo) |" in report
    assert "this run selects `rlhf-ppo`" in report and "from earlier runs: `rlhf-dpo`" in report
    assert "rlhf-ppo-0" in report and "rlhf-dpo-0" in report  # both algorithms' samples side by side

    assert statuses(run("rlhf.algorithm=dpo"))["rlhf"] == "cached"  # and DPO is reused in turn
    assert calls(run_dir, "rlhf-dpo") == [0]


def test_from_rlhf_restarts_only_the_selected_algorithm(fake) -> None:
    run, run_dir = fake
    run()
    run("rlhf.algorithm=dpo")
    ppo_manifest = (run_dir / "rlhf-ppo" / "manifest.json").read_bytes()

    result = run("rlhf.algorithm=dpo", from_stage="rlhf")
    assert statuses(result) == {"data": "cached", "tokenizer": "cached", "pretrain": "cached", "sft": "cached",
                                "reward": "cached", "rlhf": "ran", "distill": "ran", "evaluate": "ran",
                                "export": "ran"}
    assert result["stages"]["rlhf"]["message"] == "forced"
    assert calls(run_dir, "rlhf-dpo") == [0, 0]  # retrained from scratch
    assert calls(run_dir, "rlhf-ppo") == [0]  # the other algorithm is not touched
    assert (run_dir / "rlhf-ppo" / "manifest.json").read_bytes() == ppo_manifest

    # The selected variant's dir name works as a stage name; another variant's says how to select it.
    assert statuses(run("rlhf.algorithm=dpo", from_stage="rlhf-dpo"))["rlhf"] == "ran"
    assert calls(run_dir, "rlhf-dpo") == [0, 0, 0]
    with pytest.raises(ConfigError, match=r"--from rlhf-ppo: this pipeline's rlhf stage is rlhf-dpo.*"
                                          r"`algorithm: ppo`: --set rlhf.config=PATH"):
        run("rlhf.algorithm=dpo", from_stage="rlhf-ppo")


def test_pre_variant_rlhf_dir_is_moved_not_lost(fake) -> None:
    """A run dir from before per-variant dirs: its rlhf/ becomes rlhf-<algorithm>/ and is reused; when
    that name is taken, it is left in place, said once, and listed in the report."""
    run, run_dir = fake
    run()
    (run_dir / "rlhf-ppo").rename(run_dir / "rlhf")  # what an older alignline left behind
    result = run()
    assert not (run_dir / "rlhf").exists() and statuses(result)["rlhf"] == "cached"
    assert calls(run_dir, "rlhf-ppo") == [0]  # reused: nothing in the dir names its own path
    assert any(n.startswith(f"moved {run_dir / 'rlhf'} to {run_dir / 'rlhf-ppo'} (algorithm ppo)")
               for n in result["notes"])
    assert "moved " in (run_dir / "report.md").read_text()

    shutil.copytree(run_dir / "rlhf-ppo", run_dir / "rlhf")  # both exist: the old one is not used
    result = run()
    assert (run_dir / "rlhf").is_dir() and statuses(result)["rlhf"] == "cached"
    assert any("rlhf-ppo/ exists already" in n and "not used" in n for n in result["notes"])
    report = (run_dir / "report.md").read_text()
    assert "| rlhf | kept, not current (pre-variant output dir, left in place, not used) |" in report


def test_stage_command_with_flow_runs_caches_forces_and_refuses_bad_keys(tmp_path: Path) -> None:
    """`alignline stage data --flow` is the stage's own command run by flows/stage.py: it runs, is reused
    while nothing changed, re-runs with --force, publishes a report card, and a bad key is one message,
    exit 2, with nothing written."""
    from typer.testing import CliRunner

    from alignline_cli.main import app

    runner = CliRunner()
    run_dir = tmp_path / "run"
    argv = ["stage", "data", "--flow", "--run-dir", str(run_dir), "--set", "size=tiny"]
    first = runner.invoke(app, argv)
    assert first.exit_code == 0, first.output
    assert f"data: ran -> {run_dir / 'data'}" in first.output
    manifest = (run_dir / "data" / "manifest.json").read_bytes()
    again = runner.invoke(app, argv)
    assert again.exit_code == 0 and "data: cached ->" in again.output, again.output
    assert (run_dir / "data" / "manifest.json").read_bytes() == manifest  # reused, not rewritten
    assert (run_dir / "report.md").is_file()
    forced = runner.invoke(app, [*argv, "--force"])
    assert forced.exit_code == 0 and "data: ran ->" in forced.output, forced.output

    bad = runner.invoke(app, ["stage", "data", "--flow", "--run-dir", str(tmp_path / "bad"), "--set", "sise=tiny"])
    assert bad.exit_code == 2 and "sise: unknown key" in bad.output, bad.output
    assert not (tmp_path / "bad" / "data").exists()
    lora = runner.invoke(app, ["stage", "lora", "--flow", "--run-dir", str(tmp_path / "l")])
    assert lora.exit_code == 2 and "use `alignline lora`" in lora.output


def test_a_registered_stage_runs_in_the_pipeline_with_nothing_else_changed(fake, tmp_path: Path) -> None:
    """Adding a stage is a module plus a registry entry: the pipeline config, its order, inputs, the
    cache, --from and the report card all pick it up from stages.REGISTRY."""
    import importlib

    import stages
    from tests.prefect_fixtures import FAKE_STAGE

    run, run_dir = fake
    # Next to the fake stages this session imported (the package is imported once, from the first test's dir).
    src = Path(importlib.import_module("fakestages").__path__[0])
    (src / "toy.py").write_text(FAKE_STAGE.format(stage="toy", inputs=["sft"], optional=(), extra=""))
    importlib.invalidate_caches()
    stages.register(stages.StageSpec("toy", "fakestages.toy", "a toy stage between sft and reward"), after="sft")
    try:
        assert stages.pipeline_stages() == ("data", "tokenizer", "pretrain", "sft", "toy", "reward", "rlhf",
                                            "distill", "evaluate", "export")
        first = run()
        assert list(first["stages"]) == list(stages.pipeline_stages())  # run in registry order
        assert statuses(first)["toy"] == "ran" and calls(run_dir, "toy") == [0]
        toy = json.loads((run_dir / "toy" / "manifest.json").read_text())
        assert toy["stage"] == "toy" and Path(toy["inputs"]["sft"]["path"]) == run_dir / "sft"
        assert "| toy | ran" in (run_dir / "report.md").read_text()
        assert statuses(run())["toy"] == "cached" and calls(run_dir, "toy") == [0]
        again = run(from_stage="toy")  # --from accepts it, and re-runs it and what follows
        assert statuses(again)["sft"] == "cached" and statuses(again)["toy"] == "ran"
        assert calls(run_dir, "toy") == [0, 0]
        # Its pipeline entry takes the usual keys; an unregistered name is refused, naming the stages.
        assert statuses(run("toy.steps=6"))["toy"] == "ran"
        with pytest.raises(ConfigError, match=r"unknown pipeline stage\(s\) 'toys'; the pipeline's stages are "
                                              r"data, tokenizer, pretrain, sft, toy, reward"):
            run("stages.toys.config=null")
    finally:
        stages.unregister("toy")
    assert "toy" not in stages.STAGES and "toy" not in stages.pipeline_stages()
