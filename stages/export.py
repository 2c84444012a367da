"""Stage `export`: the run's final model for other runtimes, each artifact validated in its runtime.

    python -m stages.export --config configs/export/tiny.yaml --run-dir runs/tiny
    alignline stage export --run-dir runs/tiny --set gguf_dtype=q8_0 --set min_gguf_match=0.5

After evaluate, it exports one model stage's checkpoint (`source`: rlhf by default, the pipeline's aligned
model) with `alignline.export`:
- `llama/`: a transformers `LlamaForCausalLM` dir (vLLM, TGI, anything that reads Llama), loaded back and
  greedy-decoded on the report's sample prompts (evaluate's samples.jsonl): every prompt must give the
  source's tokens (the same weights);
- `model.gguf` (`gguf_dtype`): loaded in llama.cpp (xllamacpp) and greedy-decoded on the same prompts, eos
  suppressed so each compares `max_new_tokens` tokens; at least `min_gguf_match` of the prompts must match
  transformers exactly (f32 matches all; lower it for f16/q8_0, whose drift is recorded either way).
A conversion that does not load or does not match fails the stage: no manifest, nothing to reuse. A model
with no Llama counterpart (an architecture-lab variant) is refused naming the switch; leave the stage out
with `--set stages.export.enabled=false` in the pipeline. eval.json holds every prompt's tokens from both
sides; the headline has `llama_matched`, `gguf_matched` (fractions) and `gguf_max_abs_logprob_diff`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignline.artifacts import StageRun
from alignline.config import ConfigError, StrictModel
from alignline.stage_cli import InputSpec, stage_main

log = logging.getLogger("stages.export")

MODEL_STAGES = ("pretrain", "sft", "rlhf")
OUTPUTS = {"llama": "llama", "gguf": "model.gguf"}  # format -> its path in the stage dir
INPUTS = [
    InputSpec("evaluate", default="evaluate", kinds=("evaluate",),
              help="evaluate stage (its samples.jsonl prompts validate the exports)"),
    *[InputSpec(s, default=s, required=False, help=f"{s} stage (exported when source={s})", variants=s == "rlhf")
      for s in MODEL_STAGES],
]


class Config(StrictModel):
    """Config of the export stage."""

    source: Literal["rlhf", "sft", "pretrain"] = Field("rlhf", description="which model stage's checkpoint to export")
    formats: list[Literal["llama", "gguf"]] = Field(
        default_factory=lambda: ["llama", "gguf"], min_length=1,
        description="llama = a LlamaForCausalLM dir (llama/); gguf = a llama.cpp file (model.gguf)")
    gguf_dtype: Literal["f32", "f16", "bf16", "q8_0"] = Field("f32", description="GGUF weight type")
    num_prompts: int = Field(4, gt=0, description="first N prompts of evaluate's samples.jsonl to validate on")
    max_new_tokens: int = Field(16, gt=0, description="greedy tokens compared per prompt")
    min_gguf_match: float = Field(
        1.0, ge=0, le=1, description="fraction of prompts whose llama.cpp tokens must equal transformers'")


def run(config: Config, inputs: dict[str, Path], run_dir: str | Path) -> Path:
    from alignline.artifacts import load_stage
    from alignline.export import check_exportable, export_gguf, export_llama, validate_gguf, validate_llama
    from alignline.files import remove_path

    stage_inputs = {k: v for k, v in inputs.items() if v is not None}
    if config.source not in stage_inputs:
        raise ConfigError(f"export: source={config.source!r} but there is no complete {config.source} stage under "
                          f"{run_dir}; run it first, or set source to one of "
                          f"{[s for s in MODEL_STAGES if s in stage_inputs] or list(MODEL_STAGES)}")
    # A model export cannot express (a variant, an unknown tokenizer split) is refused before the stage dir exists.
    # (verify=False: StageRun verifies every input's hashes just below; hashing a large checkpoint twice is waste)
    check_exportable(load_stage(stage_inputs[config.source], verify=False).checkpoint, config.formats)
    run = StageRun(run_dir, "export", config, inputs=stage_inputs, source=__file__)
    # finalize replaces what this run writes; an artifact of a format no longer asked for (a re-run with
    # formats: [gguf] after [llama, gguf]) would otherwise sit next to a manifest that does not describe it.
    for stale in OUTPUTS.values():
        remove_path(run.path / stale)
    checkpoint = run.input(config.source).checkpoint
    samples = run.input("evaluate").file("samples.jsonl")
    with open(samples, encoding="utf-8") as f:
        prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}] for line in f if line.strip()]
    prompts = prompts[: config.num_prompts]
    if not prompts:
        raise ConfigError(f"export: {samples} has no prompts to validate the exports on")

    from alignline.generation import load_model

    source = load_model(checkpoint, device="cpu")  # once, for both formats' validation
    results: dict[str, dict] = {"source": config.source, "checkpoint": str(checkpoint)}
    headline: dict[str, float] = {}
    if "llama" in config.formats:
        log.info("export: %s -> llama/ (LlamaForCausalLM)", checkpoint)
        out = export_llama(checkpoint, run.staging / OUTPUTS["llama"])
        check = validate_llama(checkpoint, out, prompts, config.max_new_tokens, loaded=source)
        results["llama"] = check
        headline["llama_matched"] = check["matched"] / check["total"]
        log.info("export: llama/ greedy tokens match the source on %d/%d prompts", check["matched"], check["total"])
        if not check["all_matched"]:
            raise RuntimeError(f"export: the Llama export of {checkpoint} decodes differently from it on "
                               f"{check['total'] - check['matched']} of {check['total']} prompts: a conversion bug")
    if "gguf" in config.formats:
        log.info("export: %s -> model.gguf (%s)", checkpoint, config.gguf_dtype)
        out = export_gguf(checkpoint, run.staging / OUTPUTS["gguf"], dtype=config.gguf_dtype)
        check = validate_gguf(checkpoint, out, prompts, config.max_new_tokens, ignore_eos=True, loaded=source)
        results["gguf"] = {"dtype": config.gguf_dtype, "bytes": out.stat().st_size, **check}
        headline["gguf_matched"] = check["matched"] / check["total"]
        headline["gguf_max_abs_logprob_diff"] = check["max_abs_logprob_diff"]
        log.info("export: llama.cpp greedy tokens match transformers on %d/%d prompts (max |dlogp| %.2g)",
                 check["matched"], check["total"], check["max_abs_logprob_diff"])
        if headline["gguf_matched"] < config.min_gguf_match:
            raise RuntimeError(
                f"export: llama.cpp's greedy tokens from model.gguf ({config.gguf_dtype}) match transformers on "
                f"{check['matched']}/{check['total']} prompts, below min_gguf_match={config.min_gguf_match}; "
                "first divergences: " + ", ".join(str(r["first_divergence"]) for r in check["prompts"]))
    return run.finalize(eval=results, headline=headline)


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main("export", Config, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
