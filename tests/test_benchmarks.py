"""Standard benchmarks through lm-evaluation-harness (alignline/benchmarks.py, `alignline eval`, the
evaluate stage's `lm_eval` block).

    .venv/bin/pytest tests/test_benchmarks.py -q

References: the harness's per-choice log-likelihoods and accuracy on alignline_pref equal our own direct
computation on the same rows (so a wrong prompt/continuation split fails); an alignline checkpoint and
its Llama export score the same; alignline_gold on a pipeline-trained model equals gold_eval's
accuracy with the "qa" prompt format. Error paths: unknown task, adapter directory, missing data dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from alignline.benchmarks import check_tasks, our_tasks, run_benchmarks  # noqa: E402
from alignline.config import UserError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LIMIT = 12


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A built-in suite (tiny) and a random tiny alignline model over a word-level tokenizer of its
    texts, saved as a checkpoint, plus its Llama export."""
    from alignline.data.tasks import suite_config, write_suite
    from alignline.files import read_jsonl
    from alignline.model.convert import convert_checkpoint
    from alignline.model.tiny import tiny_model, toy_tokenizer

    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    write_suite(data, suite_config("tiny"))
    texts = []
    for rel in ("preference/val.jsonl", "preference/test.jsonl", "prompts/val.jsonl", "prompts/test.jsonl"):
        for r in read_jsonl(data / rel):
            texts.append("Q: " + r["prompt"][-1]["content"] + " A:")
            texts += [r[k][-1]["content"] for k in ("chosen", "rejected") if k in r] + [r.get("answer", "")]
    tok = toy_tokenizer(texts)
    model = tiny_model(seed=0, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    ckpt = root / "alignline"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    llama = convert_checkpoint(ckpt, root / "llama", to="llama")
    return {"data": data, "ckpt": ckpt, "llama": llama, "tok": tok, "model": model.eval()}


def direct_pref(model, tok, rows):
    """Our own reference for alignline_pref: sum of log p(continuation tokens | "Q: .. A:") of each
    choice, with the continuation " <answer>" split off the whole string's tokens; argmax."""
    lls, acc = [], []
    for r in rows:
        ctx = "Q: " + r["prompt"][-1]["content"] + " A:"
        ctx_ids = tok(ctx)["input_ids"]
        row = []
        for choice in (r["chosen"][-1]["content"], r["rejected"][-1]["content"]):
            whole = tok(ctx + " " + choice)["input_ids"]
            assert whole[: len(ctx_ids)] == ctx_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            row.append(float(sum(logp[i - 1, whole[i]] for i in range(len(ctx_ids), len(whole)))))
        lls.append(row)
        acc.append(float(row.index(max(row)) == 0))  # the chosen answer is choice 0
    return lls, sum(acc) / len(acc)


def test_pref_equals_direct_loglikelihood_and_llama_export(toy_run):
    from alignline.files import read_jsonl

    rows = read_jsonl(toy_run["data"] / "preference" / "test.jsonl", LIMIT)
    ref_lls, ref_acc = direct_pref(toy_run["model"], toy_run["tok"], rows)
    res = {}
    for kind in ("ckpt", "llama"):
        res[kind] = run_benchmarks(toy_run[kind], ["alignline_pref"], data_dir=toy_run["data"], limit=LIMIT,
                                   device="cpu", batch_size=4, samples=True)
    ours = res["ckpt"]
    got = {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in ours["samples"]["alignline_pref"]}
    assert sorted(got) == list(range(LIMIT))
    for i, ref in enumerate(ref_lls):
        assert got[i] == pytest.approx(ref, abs=1e-4), f"doc {i}"
    assert ours["tasks"]["alignline_pref"]["acc"] == pytest.approx(ref_acc, abs=1e-12)
    assert ours["tasks"]["alignline_pref"]["n"] == LIMIT
    assert 0 < ref_acc < 1  # a random model: both outcomes occur, so the comparison has teeth
    # The Llama export (what `lm_eval --model hf` loads without alignline) gives the same numbers.
    other = {s["doc_id"]: [ll for ll, _ in s["filtered_resps"]] for s in res["llama"]["samples"]["alignline_pref"]}
    for i in got:
        assert other[i] == pytest.approx(got[i], abs=1e-5)
    for metric, value in ours["tasks"]["alignline_pref"].items():
        assert res["llama"]["tasks"]["alignline_pref"][metric] == pytest.approx(value, abs=1e-5)


def test_task_yamls_are_shipped_as_package_data():
    assert set(our_tasks()) >= {"alignline_gold", "alignline_pref"}
    text = (REPO / "pyproject.toml").read_text()
    assert "lm_eval_tasks/*.yaml" in text


def test_check_tasks_errors(tmp_path):
    with pytest.raises(UserError, match="alignline_gold"):  # close match offered
        check_tasks(["alignline_glod"], tmp_path)
    with pytest.raises(UserError, match="--data"):
        check_tasks(["alignline_gold"], None)
    with pytest.raises(UserError, match="does not exist"):
        check_tasks(["alignline_pref"], tmp_path / "nope")


def test_data_without_answers_is_named_not_scored(tmp_path, toy_run):
    """A user's prompts with no answers (no verifier): alignline_gold cannot score them. `alignline eval` says
    so (UserError naming the field and file); the evaluate stage skips that task (missing_fields)."""
    import shutil

    from alignline.benchmarks import missing_fields
    from alignline.files import read_jsonl, write_jsonl

    data = tmp_path / "data"
    shutil.copytree(toy_run["data"], data)
    for split in ("val", "test"):
        rows = [{k: v for k, v in r.items() if k != "answer"} for r in read_jsonl(data / "prompts" / f"{split}.jsonl")]
        write_jsonl(data / "prompts" / f"{split}.jsonl", rows)
    assert set(missing_fields(["alignline_gold", "alignline_pref"], data)) == {"alignline_gold"}
    assert missing_fields(["alignline_gold", "alignline_pref"], toy_run["data"]) == {}
    with pytest.raises(UserError, match=r"alignline_gold cannot run on this data: .*prompts/val.jsonl has no answer"):
        check_tasks(["alignline_pref", "alignline_gold"], data)
    check_tasks(["alignline_gold"], data, missing_fields_ok=True)


def test_pairs_longer_than_the_context_are_left_out_and_counted(tmp_path, toy_run):
    """A user's responses can be longer than a small model's context; the harness would assert on them. They
    are dropped and counted (over_max_length), the rest scored as before."""
    import shutil

    from alignline.files import read_jsonl, write_jsonl

    data = tmp_path / "data"
    shutil.copytree(toy_run["data"], data)
    rows = read_jsonl(data / "preference" / "test.jsonl")[:LIMIT]
    long = " ".join(["word"] * (toy_run["model"].config.max_position_embeddings + 8))
    rows[0]["chosen"][-1]["content"] = long
    rows[1]["rejected"][-1]["content"] = long
    write_jsonl(data / "preference" / "test.jsonl", rows)
    res = run_benchmarks(toy_run["ckpt"], ["alignline_pref"], data_dir=data, device="cpu")["tasks"]["alignline_pref"]
    assert (res["n"], res["over_max_length"]) == (LIMIT - 2, 2)


def test_adapter_dir_is_refused(tmp_path, toy_run):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "config.json").write_text("{}")
    with pytest.raises(UserError, match="PEFT adapter.*merged"):
        run_benchmarks(adapter, ["alignline_pref"], data_dir=toy_run["data"], device="cpu")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "alignline_cli.main", "eval", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_cli_table_and_user_errors(tmp_path, toy_run):
    out = tmp_path / "res.json"
    ok = _cli(str(toy_run["ckpt"]), "--tasks", "alignline_pref,alignline_gold", "--data", str(toy_run["data"]),
              "--limit", "4", "--device", "cpu", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert "alignline_pref  acc" in ok.stdout and "exact_match" in ok.stdout
    assert json.loads(out.read_text())["tasks"]["alignline_pref"]["n"] == 4
    for args, needle in [
        (["--tasks", "helaswag"], "hellaswag"),  # unknown: close matches from the harness's own names
        (["--tasks", "alignline_gold", "--data", str(tmp_path / "missing")], "does not exist"),
    ]:
        bad = tmp_path / "bad.json"
        r = _cli(str(toy_run["ckpt"]), *args, "--out", str(bad))
        assert r.returncode == 2, r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], r.stderr
        assert "Traceback" not in r.stderr and not bad.exists()


@pytest.mark.slow
def test_offline_harness_task_is_one_clear_error(toy_run, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import datasets

        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    except ImportError:
        pass
    try:
        run_benchmarks(toy_run["ckpt"], ["arc_easy"], limit=2, device="cpu")
    except UserError as exc:
        assert "arc_easy" in str(exc) and "network" in str(exc)
    else:  # the datasets cache already holds it: nothing to report
        pytest.skip("arc_easy is in the local datasets cache")


@pytest.mark.slow
def test_evaluate_stage_on_tiny_chain(tiny_chain, tmp_path):
    """The evaluate stage with lm_eval tasks on pipeline-trained models: scores in eval.json, headline
    and report card; alignline_gold on the pretrained model equals gold_eval with prompt_format "qa"."""
    from alignline.evaluation import gold_eval, load_prompts
    from alignline.models import load_causal_lm, load_chat_tokenizer
    from alignline.report import build_report, records_from_run_dir
    from stages import stage_order
    from tests.conftest import run_stage

    inputs = {"data": tiny_chain.data, "reward": tiny_chain.reward, "pretrain": tiny_chain.pretrain,
              "sft": tiny_chain.sft}
    run_dir = tmp_path / "run"
    for name in ("data", "pretrain", "sft", "reward"):  # the report reads the run dir's stages
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).symlink_to(tiny_chain[name], target_is_directory=True)
    out = run_stage("evaluate", run_dir, ["num_prompts=8", "lm_eval.limit=16"], inputs)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["lm_eval"]["tasks"] == ["alignline_gold", "alignline_pref"] and ev["lm_eval"]["limit"] == 16
    for stage in ("pretrain", "sft"):
        scores = ev["stages"][stage]["lm_eval"]
        assert scores["alignline_pref"]["n"] == 16 and 0 <= scores["alignline_pref"]["acc"] <= 1
        assert scores["alignline_gold"]["exact_match_stderr"] is not None
    head = json.loads((out / "manifest.json").read_text())["headline"]
    assert head["pretrain_alignline_gold_exact_match"] == ev["stages"]["pretrain"]["lm_eval"]["alignline_gold"]["exact_match"]
    assert "sft_alignline_pref_acc" in head and "sft_alignline_pref_acc_norm" not in head  # one number per task

    # Reference: the same 16 prompts through gold_eval's "Q: ... A:" format give the same accuracy.
    ckpt = tiny_chain.pretrain / "checkpoint"
    rows = load_prompts(tiny_chain.data, "test", limit=16)
    gold = gold_eval(load_causal_lm(ckpt).eval(), load_chat_tokenizer(ckpt), rows, max_new_tokens=16,
                     prompt_format="qa")
    assert ev["stages"]["pretrain"]["lm_eval"]["alignline_gold"]["exact_match"] == pytest.approx(gold.accuracy)
    # chat_template auto: the SFT model is asked the bare question through its chat template, as gold_eval asks
    # chat models, and scores what gold_eval scores (a plain "Q: ... A:" prompt would be off its distribution).
    assert (ev["stages"]["pretrain"]["lm_eval_chat_template"], ev["stages"]["sft"]["lm_eval_chat_template"]) == \
        (False, True)
    ckpt = tiny_chain.sft / "checkpoint"
    chat_gold = gold_eval(load_causal_lm(ckpt).eval(), load_chat_tokenizer(ckpt), rows, max_new_tokens=16)
    assert ev["stages"]["sft"]["lm_eval"]["alignline_gold"]["exact_match"] == pytest.approx(chat_gold.accuracy)

    card = build_report(run_dir, records_from_run_dir(run_dir, stage_order()), plots=False)
    assert "## Standard benchmarks (lm-evaluation-harness)" in card.markdown
    pref = ev["stages"]["sft"]["lm_eval"]["alignline_pref"]
    line = next(ln for ln in card.markdown.splitlines() if ln.startswith("| alignline_pref | acc |"))
    assert f"{pref['acc']:.4g} ± {pref['acc_stderr']:.4g}" in line
