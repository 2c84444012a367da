"""The export stage: the pipeline-trained model as a Llama dir and a GGUF file, each validated in its runtime.

    .venv/bin/pytest tests/test_export_stage.py

Built on tiny_chain's SFT model and an evaluate run over it (whose sample prompts validate the exports). A
mismatch fails the stage with no manifest; a model export cannot express is refused before the stage dir
exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignline.artifacts import is_complete, load_stage
from tests.conftest import run_stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(tiny_chain, tmp_path_factory) -> Path:
    """A run dir holding an evaluate stage over tiny_chain's SFT model (4 prompts, no harness tasks)."""
    run_dir = tmp_path_factory.mktemp("export_run")
    run_stage("evaluate", run_dir, ["num_prompts=4", "lm_eval.tasks=[]"],
              inputs={"data": tiny_chain.data, "sft": tiny_chain.sft})
    return run_dir


def export_inputs(run_dir: Path, tiny_chain) -> dict[str, Path]:
    return {"evaluate": run_dir / "evaluate", "sft": tiny_chain.sft}


def test_the_stage_writes_a_llama_dir_and_a_gguf_that_decode_like_the_source(evaluated, tiny_chain):
    from transformers import LlamaConfig

    out = run_stage("export", evaluated, ["source=sft", "max_new_tokens=12"], export_inputs(evaluated, tiny_chain))
    stage = load_stage(out, expect="export")  # complete, every file hashed in the manifest
    assert LlamaConfig.from_pretrained(out / "llama").model_type == "llama"
    assert (out / "model.gguf").stat().st_size > 0
    report = json.loads((out / "eval.json").read_text())
    samples = [json.loads(line)["prompt"] for line in (evaluated / "evaluate" / "samples.jsonl").open()]
    for fmt in ("llama", "gguf"):
        check = report[fmt]
        assert (check["matched"], check["total"]) == (4, 4), fmt
        assert [r["prompt"][0]["content"] for r in check["prompts"]] == samples[:4]
    # eos is suppressed, so every prompt compares the full 12 tokens (not a vacuous match of empty answers)
    assert all(len(r["hf"]) == 12 == len(r["gguf"]) for r in report["gguf"]["prompts"])
    assert stage.headline["llama_matched"] == stage.headline["gguf_matched"] == 1.0
    assert stage.headline["gguf_max_abs_logprob_diff"] < 1e-3
    assert report["gguf"]["dtype"] == "f32"
    assert str(tiny_chain.sft / "checkpoint") in report["checkpoint"] or report["source"] == "sft"


def test_a_gguf_that_decodes_differently_fails_the_stage(evaluated, tiny_chain, monkeypatch):
    import alignline.export as export

    real = export.validate_gguf

    def drifting(*args, **kwargs):
        report = real(*args, **kwargs)
        report["prompts"][0].update(matched=False, first_divergence=3)
        return {**report, "matched": report["total"] - 1, "all_matched": False}

    monkeypatch.setattr(export, "validate_gguf", drifting)
    run_dir = evaluated
    with pytest.raises(RuntimeError, match=r"match transformers on 3/4 prompts, below min_gguf_match=1.0"):
        run_stage("export", run_dir, ["source=sft", "formats=[gguf]", "max_new_tokens=4"],
                  export_inputs(run_dir, tiny_chain))
    assert not is_complete(run_dir / "export")  # no manifest: nothing a later run could reuse
    # the same drift is accepted where the config allows it (q8_0 users lower the bar), and recorded
    out = run_stage("export", run_dir, ["source=sft", "formats=[gguf]", "max_new_tokens=4", "min_gguf_match=0.75"],
                    export_inputs(run_dir, tiny_chain))
    assert json.loads((out / "eval.json").read_text())["gguf"]["matched"] == 3
    assert not (out / "llama").exists()


def test_an_unexportable_model_is_refused_before_the_stage_dir_exists(evaluated, tiny_chain, tmp_path, monkeypatch):
    import alignline.export as export
    from alignline.config import ConfigError
    from alignline.model.convert import ConversionError

    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def refuse(checkpoint, formats):
        raise ConversionError("position='alibi' has no Llama counterpart")

    monkeypatch.setattr(export, "check_exportable", refuse)
    with pytest.raises(ConversionError, match="alibi"):
        run_stage("export", run_dir, ["source=sft"], export_inputs(evaluated, tiny_chain))
    assert not (run_dir / "export").exists()
    with pytest.raises(ConfigError, match="source='rlhf' but there is no complete rlhf stage"):
        run_stage("export", run_dir, [], {"evaluate": evaluated / "evaluate"})
    assert not (run_dir / "export").exists()
