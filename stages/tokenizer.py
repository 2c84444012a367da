"""Stage `tokenizer`: train the byte-level BPE tokenizer on the pretraining corpus, or reuse one.

    python -m stages.tokenizer --config configs/tokenizer/tiny.yaml --run-dir runs/tiny
    alignline stage tokenizer --data runs/tiny/data --set vocab_size=1024

The tokenizer files go to `<run_dir>/tokenizer/checkpoint/` (the same place as in every model
stage, so `alignline.tokenizer.load_tokenizer(<stage dir>)` and `AutoTokenizer.from_pretrained(
<stage dir>/checkpoint)` work for all of them). `source: reuse` copies the tokenizer of an existing
checkpoint or stage dir (`reuse_from`) instead of training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignline.artifacts import StageRun
from alignline.config import InputError, StrictModel
from alignline.stage_cli import InputSpec, stage_main

INPUTS = [InputSpec("data", default="data", kinds=("data",), help="data stage directory (its pretrain/train.jsonl is the corpus)")]


class Config(StrictModel):
    """Config of the tokenizer stage."""

    source: Literal["train", "reuse"] = Field(
        "train", description="train: a new BPE on `corpus`; reuse: copy the tokenizer of `reuse_from`"
    )
    vocab_size: int = Field(512, ge=262, description="BPE vocabulary size incl. 256 bytes and 6 special tokens")
    min_frequency: int = Field(2, ge=1, description="minimum pair count for a BPE merge")
    corpus: list[str] = Field(default_factory=lambda: ["pretrain/train.jsonl"],
                              description="files relative to the data stage dir (or absolute paths)")
    max_docs: int | None = Field(None, ge=1, description="train on the first N documents only")
    reuse_from: str | None = Field(None, description="source: reuse -> checkpoint/stage dir to take the tokenizer from")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.source == "reuse" and not self.reuse_from:
            raise ValueError("source: reuse needs reuse_from: <checkpoint or stage dir>")
        return self


def _record_text(rec: dict, where: str) -> str:
    """The text a tokenizer learns from one JSONL record: `text` (pretraining), or the contents of
    a chat (`messages`) or a preference pair (`prompt` + `chosen` + `rejected`), one per line."""
    if isinstance(rec.get("text"), str):
        return rec["text"]
    turns = [m for key in ("messages", "prompt", "chosen", "rejected") for m in (rec.get(key) or [])
             if isinstance(m, dict) and isinstance(m.get("content"), str)]
    if turns:
        return "\n".join(m["content"] for m in turns)
    raise InputError(f"{where}: a corpus record needs a `text` field, `messages` (chat) or `prompt`/`chosen`/"
                     f"`rejected` (preference pairs); got keys {sorted(rec)}. Check `corpus:` in the config")


def _texts(paths: list[Path], max_docs: int | None) -> Iterator[str]:
    n = 0
    jsonl = [p for p in paths if p.suffix == ".jsonl"]
    others = [p for p in paths if p.suffix != ".jsonl"]
    for p in jsonl:
        with open(p, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                yield _record_text(json.loads(line), f"{p}:{i}")
                n += 1
                if max_docs and n >= max_docs:
                    return
    if others:
        from alignline.tokenizer import iter_corpus_texts

        for t in iter_corpus_texts(others):
            yield t
            n += 1
            if max_docs and n >= max_docs:
                return


def data_files(config: Config) -> dict[str, Path]:
    """Files read from outside the run dir: absolute corpus paths and the `reuse_from` tokenizer."""
    out = {f"corpus[{i}]": Path(c) for i, c in enumerate(config.corpus)
           if config.source == "train" and Path(c).is_absolute()}
    if config.source == "reuse" and config.reuse_from:
        out["reuse_from"] = Path(config.reuse_from)
    return out


def run(config: Config, inputs: dict[str, Path], run_dir: str | Path) -> Path:
    from alignline.tokenizer import load_tokenizer, save_tokenizer, tokenizer_hash, train_tokenizer

    # Every given input is part of the reuse key (as the flow computes it), used or not.
    stage_inputs = {"data": inputs["data"]} if inputs.get("data") is not None else {}
    run = StageRun(run_dir, "tokenizer", config, inputs=stage_inputs, source=__file__, data=data_files(config))
    out = run.staging / "checkpoint"
    if config.source == "train":
        data_dir = Path(inputs["data"])
        paths = [p if Path(p).is_absolute() else data_dir / p for p in map(Path, config.corpus)]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"tokenizer corpus files not found: {missing}; check `corpus:` in the config")
        tok = train_tokenizer(_texts(paths, config.max_docs), vocab_size=config.vocab_size,
                              min_frequency=config.min_frequency, show_progress=False)
        save_tokenizer(tok, out)
    else:
        tok = load_tokenizer(config.reuse_from)
        save_tokenizer(tok, out)
    headline = {"vocab_size": len(tok), "tokenizer_sha256": tokenizer_hash(tok)}
    # A quick round-trip check on the fixed prompts' style of text keeps a broken tokenizer out.
    probe = "What is 12+7? Reverse c a t."
    if tok.decode(tok(probe, add_special_tokens=False)["input_ids"]) != probe:
        raise RuntimeError(f"tokenizer does not round-trip {probe!r}; the trained tokenizer is broken")
    return run.finalize(eval=headline, headline=headline)


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main("tokenizer", Config, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
