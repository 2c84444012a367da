"""Malformed inputs are user errors: one message naming the file/key, exit code 2, no traceback,
and no `<stage>/.staging/` left behind (issue 15, part 5).

    .venv/bin/pytest tests/test_user_errors.py

Each case writes tiny files under tmp_path and runs a stage's CLI entry point (`main(argv)`, the
same code `python -m stages.<name>` and `alignline stage <name>` run); two cases go through the
real `alignline` command in a subprocess to check the exit code and stderr end to end. Every case
fails before any model is built, so the table is fast.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def fake_stage(path: Path, stage: str) -> Path:
    """A complete (empty) stage dir of kind `stage`: enough for the input checks."""
    write(path / "manifest.json", json.dumps({"stage": stage, "status": "complete", "files": {}}))
    return path


def hf_dir(path: Path, model_type: str = "llama", weights: bytes | None = None) -> Path:
    write(path / "config.json", json.dumps({"model_type": model_type}))
    if weights is not None:
        write(path / "model.safetensors", weights)
    return path


def data_cfg(tmp: Path, section: str, path: str, **extra) -> list[str]:
    src = {"path": path, **extra}
    files = {section: [src] if section == "pretrain" else src}
    cfg = write(tmp / "data.yaml", json.dumps({"source": "files", "files": files}))  # JSON is YAML
    return ["--config", str(cfg)]


SFT_ROW = {"instruction": "Say hi", "output": "hi"}
PAIR = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "a"}]}


# Each case: (stage, build(tmp) -> argv, [substrings the message must contain]).
def _invalid_json(t):
    return data_cfg(t, "sft", str(write(t / "in/sft.jsonl", '{"instruction": "a", "output": \n')))


def _missing_file(t):
    return data_cfg(t, "sft", str(t / "in/nope.jsonl"))


def _mistyped_relative(t):
    write(t / "in/sft.jsonl", json.dumps(SFT_ROW) + "\n")
    return data_cfg(t, "sft", "in/sft.jsonll")  # relative, first component exists: local, not a hub id


def _empty_file(t):
    return data_cfg(t, "sft", str(write(t / "in/sft.jsonl", "")))


def _non_utf8(t):
    return data_cfg(t, "sft", str(write(t / "in/sft.jsonl", b'{"instruction": "\xff\xfe", "output": "x"}\n')))


def _chosen_is_rejected(t):
    return data_cfg(t, "preference", str(write(t / "in/pref.jsonl", json.dumps(PAIR) + "\n")))


def _wrong_format(t):
    return data_cfg(t, "sft", str(write(t / "in/sft.jsonl", json.dumps(SFT_ROW) + "\n")), format="hh")


def _yaml_not_utf8(t):
    return ["--config", str(write(t / "bad.yaml", b"seed: 1\n# caf\xe9\n"))]


def _unknown_key(t):
    return ["--set", "train.lr=3e-4", "--print-config"]


def _sft_init_tokenizer(t):
    return ["--init", str(fake_stage(t / "run/tokenizer", "tokenizer")), "--run-dir", str(t / "run")]


def _reward_init_data(t):
    return ["--init", str(fake_stage(t / "run/data", "data")), "--run-dir", str(t / "run")]


def _ppo_reward_pretrain(t):
    return ["--init", str(fake_stage(t / "run/sft", "sft")), "--reward", str(fake_stage(t / "run/pretrain", "pretrain")),
            "--run-dir", str(t / "run")]


def _truncated_safetensors(t):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    blob = struct.pack("<Q", len(header)) + header
    return ["--init", str(hf_dir(t / "hf", weights=blob[: len(blob) // 2])), "--run-dir", str(t / "run")]


def _bogus_model_type(t):
    return ["--init", str(hf_dir(t / "hf", model_type="llamaa")), "--run-dir", str(t / "run")]


def _corpus_record_without_text(t):
    bad = write(t / "in/corpus.jsonl", json.dumps({"foo": 1}) + "\n")
    return ["--data", str(fake_stage(t / "run/data", "data")), "--set", f"corpus=[{bad}]"]


def _cuda_without_gpu(t):
    return ["--set", "device=cuda", "--data", str(fake_stage(t / "run/data", "data")),
            "--sft", str(fake_stage(t / "run/sft", "sft")), "--run-dir", str(t / "run")]


CASES = {
    "data-invalid-json": ("data", _invalid_json, ["sft.jsonl:1", "invalid JSON"]),
    "data-missing-file": ("data", _missing_file, ["nope.jsonl", "does not exist"]),
    "data-mistyped-relative-path": ("data", _mistyped_relative, ["in/sft.jsonll", "does not exist"]),
    "data-empty-file": ("data", _empty_file, ["sft.jsonl", "empty"]),
    "data-non-utf8": ("data", _non_utf8, ["sft.jsonl:1", "UTF-8"]),
    "data-chosen-equals-rejected": ("data", _chosen_is_rejected, ["pref.jsonl:1", "identical"]),
    "data-wrong-format": ("data", _wrong_format, ["sft.jsonl:1", "HH"]),
    "yaml-not-utf8": ("data", _yaml_not_utf8, ["bad.yaml", "UTF-8"]),
    "set-unknown-key": ("data", _unknown_key, ["train", "unknown key"]),
    "sft-init-is-tokenizer": ("sft", _sft_init_tokenizer, ["--init", "tokenizer", "'pretrain'"]),
    "reward-init-is-data": ("reward", _reward_init_data, ["--init", "run/data", "'data'"]),
    "ppo-reward-is-pretrain": ("rlhf", _ppo_reward_pretrain, ["--reward", "run/pretrain", "'reward'"]),
    "hf-truncated-safetensors": ("sft", _truncated_safetensors, ["model.safetensors", "truncated"]),
    "hf-bogus-model-type": ("sft", _bogus_model_type, ["config.json", "llamaa"]),
    # alignline.distributed.pick_device, checked before the stage dir exists (this suite runs without CUDA)
    "tokenizer-corpus-record-without-text": ("tokenizer", _corpus_record_without_text,
                                             ["corpus.jsonl:1", "`text` field, `messages`", "['foo']"]),
    "device-cuda-without-gpu": ("evaluate", _cuda_without_gpu, ["'cuda'", "CUDA is not available", "device: auto"]),
}


def run_stage(stage: str, argv: list[str]) -> int:
    from stages import load_stage_module

    try:
        load_stage_module(stage).main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_table(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    stage, build, expected = CASES[case]
    if case == "device-cuda-without-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("needs a machine without CUDA")
    monkeypatch.chdir(tmp_path)
    argv = build(tmp_path)
    if "--run-dir" not in argv:
        argv += ["--run-dir", str(tmp_path / "run")]
    t0 = time.monotonic()
    code = run_stage(stage, argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}; stderr:\n{err}"
    assert "Traceback" not in err
    message = err[err.index("error: "):]
    for piece in expected:
        assert piece in message, f"{piece!r} not in:\n{message}"
    assert not list(tmp_path.rglob(".staging")), "a failed stage left .staging/ behind"
    assert not (tmp_path / "run" / stage).exists() or (tmp_path / "run" / stage / "manifest.json").exists()
    assert time.monotonic() - t0 < 20, "a user error must fail fast (no hub retries, no training)"


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code = run_stage("data", _missing_file(tmp_path) + ["--run-dir", str(tmp_path / "run"), "--debug"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "nope.jsonl" in err


def test_help_example_key_is_accepted(capsys) -> None:
    """Every stage's --help suggests a --set key that the stage accepts."""
    from stages import STAGES

    for stage in sorted(set(STAGES) - {"lora"}):
        assert run_stage(stage, ["--help"]) == 0
        out = capsys.readouterr().out
        example = re.search(r"e\.g\.\s+--set\s+(\S+=\S+)", " ".join(out.split()))
        assert example, out
        if example.group(1).endswith("=..."):
            continue  # no lr key in this stage: the example names its first key only
        assert run_stage(stage, ["--set", example.group(1), "--print-config"]) == 0, (stage, example.group(1))
        capsys.readouterr()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignline_cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_data_error_exit_code_and_no_traceback(tmp_path: Path) -> None:
    argv = _invalid_json(tmp_path)
    proc = _cli("stage", "data", *argv, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "sft.jsonl:1" in proc.stderr
    assert not list(tmp_path.rglob(".staging"))


def test_pipeline_bad_from_is_rejected_before_prefect(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = _cli("pipeline", "--config", str(REPO / "configs/pipeline/tiny.yaml"), "--run-dir", str(tmp_path / "run"),
                "--from", "sftt", cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "'sftt'" in proc.stderr and "did you mean 'sft'" in proc.stderr
    assert "prefect" not in (proc.stdout + proc.stderr).lower().replace("prefect_", "")
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run").exists()


PIPELINE_CASES = {
    "to-before-from": (["--from", "sft", "--to", "pretrain"], ["--from sft comes after --to pretrain"]),
    "bad-to": (["--to", "evaluat"], ["'evaluat'", "did you mean 'evaluate'"]),
    "missing-config": (["--config", "nope/pipeline.yaml"], ["nope/pipeline.yaml", "does not exist"]),
    "unknown-set-key": (["--set", "gates.enabeld=false"], ["gates.enabeld", "unknown key"]),
    "unknown-stage-set-key": (["--set", "sft.train.lr=1e-4"], ["train", "unknown key"]),
    "from-without-earlier-stages": (["--from", "sft"], ["earlier stage 'data'", "manifest.json"]),
    # stages.load_stage_module, the one stage importer, for a pipeline entry's own `module:`
    "missing-stage-module": (["--set", "stages.sft.module=stages.sftt"], ["stages.sftt", "does not exist",
                                                                            "stages/sftt.py"]),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_pipeline_arguments_checked_before_prefect(case: str, tmp_path: Path, monkeypatch) -> None:
    """In-process through typer (exit codes as the shell sees them): each fails before Prefect starts."""
    from typer.testing import CliRunner

    from alignline_cli.main import app

    monkeypatch.chdir(REPO)
    args, expected = PIPELINE_CASES[case]
    if "--config" not in args:
        args = ["--config", str(REPO / "configs/pipeline/tiny.yaml"), *args]
    result = CliRunner().invoke(app, ["pipeline", *args, "--run-dir", str(tmp_path / "run")])
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    for piece in expected:
        assert piece in out, f"{piece!r} not in:\n{out}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["bad-from", "unknown-set-key"])
def test_pipeline_process_user_errors_exit_2_without_traceback(case: str, tmp_path: Path) -> None:
    """The command as its own process (what a user's shell sees): one `error:` line, exit 2."""
    args, expected = {"bad-from": (["--from", "sftt"], ["'sftt'", "did you mean 'sft'"]),
                      "unknown-set-key": (["--set", "gates.enabeld=false"], ["gates.enabeld", "unknown key"])}[case]
    proc = subprocess.run([sys.executable, "-m", "alignline_cli", "pipeline", "--config",
                           str(REPO / "configs/pipeline/tiny.yaml"),
                           "--run-dir", str(tmp_path / "run"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("error: ") == 1, proc.stderr
    for piece in expected:
        assert piece in proc.stderr, f"{piece!r} not in:\n{proc.stderr}"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["inprocess", "subprocess"])
def test_user_error_inside_the_flow_is_one_message_not_retried(launcher: str, tmp_path: Path) -> None:
    """Bad data is found only once the data stage runs inside the flow: still exit 2, the message, no
    traceback (Prefect's task and flow loggers print one line, flows.tasks.quiet_user_errors), no retry
    (the pipeline's `retries: 1` is for crashes), and no data/ dir or .staging/ left behind. The
    subprocess launcher turns the stage's exit 2 back into a user error (flows.tasks.StageUserError)."""
    bad = write(tmp_path / "bad.json", '{"instruction": "hi", "output": "x"\n')
    run = tmp_path / "run"
    proc = _cli("pipeline", "--config", str(REPO / "configs/pipeline/tiny.yaml"), "--run-dir", str(run),
                "--to", "data", "--set", "data.source=files", "--set", f"data.files.sft.path={bad}",
                "--set", "data.files.sft.format=alpaca",
                "--set", f"data.files.pretrain=[{{path: {REPO.parent / 'shared/data/pretrain/tinyshakespeare.txt'}}}]",
                "--set", f"stages.data.launcher={launcher}", cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    assert f"{bad}:1: expected a JSON array of records" in proc.stderr
    assert out.count("data: running") == 1, out  # not retried
    assert not (run / "data").exists() and not list(run.rglob(".staging"))
