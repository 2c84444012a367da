"""Stage `data`: generate the built-in task suite (or prepare real data) into `<run_dir>/data/`.

    python -m stages.data --config configs/data/tiny.yaml --run-dir runs/tiny
    alignline stage data --config configs/data/tiny.yaml --set suite.seed=1

Output (the layout of docs/ARCHITECTURE.md): pretrain/{train,val}.jsonl, sft/{train,val,test}.jsonl,
preference/{train,val,test}.jsonl, prompts/{train,val,test}.jsonl, suite.json, plus the stage files
(config.yaml, manifest.json). `source: builtin` uses `alignline.data.tasks`.

`source: files` reads the user's files through `alignline.data.loaders` (pretraining text, SFT
chats, preference pairs, prompts) and holds out `val_fraction` of EVERY source on its own (each
pretraining file too), so every stage evaluates on the user's data:
- The split is by a hash of each record's prompt (its text for pretraining): deterministic, stable
  when rows are appended, and the same prompt is held out everywhere it appears (an SFT chat, a
  preference pair and the prompt derived from them are on the same side).
- prompts/ (RL training prompts, held-out evaluation and sample prompts) come from `files.prompts`
  when given; else from the prompts of the SFT chats and preference pairs (deduplicated). Prompt
  rows carry a gold `answer` and scorer (`match`: exact | numeric | module:callable) only when
  the prompt file has an answer column; without one there is no verifier and the stages report no
  gold accuracy. Only when no SFT, preference or prompt file is given are the built-in suite's
  prompts (with their gold answers) kept.
- val and test are the same held-out rows for files (the built-in suite has separate ones).
- kto/ (for `algorithm: kto`) holds unpaired labelled answers from `files.kto`; without it the
  rlhf stage unpairs the preference pairs (chosen: good, rejected: bad).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignline.artifacts import StageRun
from alignline.config import InputError, StrictModel
from alignline.data.loaders import LoaderConfig
from alignline.files import write_jsonl
from alignline.stage_cli import InputSpec, stage_main

INPUTS: list[InputSpec] = []


class FilesConfig(StrictModel):
    """Real data through alignline.data.loaders: each source is a LoaderConfig (path, format, columns...).

    `kind` is filled in from the section (pretrain / sft / preference) when omitted.
    """

    pretrain: list[LoaderConfig] = Field(default_factory=list, description="pretraining text sources")
    sft: LoaderConfig | None = Field(None, description="SFT source (alpaca, sharegpt, messages, ...)")
    preference: LoaderConfig | None = Field(None, description="preference source (sharegpt, hh, TRL layout)")
    kto: LoaderConfig | None = Field(
        None, description="unpaired labelled answers for algorithm: kto (TRL prompt/completion/label, or a chat with "
        "kto_tag); without it KTO unpairs the preference pairs")
    prompts: LoaderConfig | None = Field(
        None, description="RL and evaluation prompts, with an optional gold answer column (`answer`) and scorer "
        "(`match` / default_match: exact | numeric | module:callable); default: the sft and preference prompts")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of each source held out as val/test "
                                "(by a hash of each record's prompt)")

    @model_validator(mode="before")
    @classmethod
    def _kinds(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for kind in ("sft", "preference", "kto", "prompts"):
                if isinstance(data.get(kind), dict):
                    data[kind] = {"kind": kind, **data[kind]}
            if isinstance(data.get("pretrain"), list):
                data["pretrain"] = [{"kind": "pretrain", **x} if isinstance(x, dict) else x
                                    for x in data["pretrain"]]
        return data


class Config(StrictModel):
    """Config of the data stage."""

    source: Literal["builtin", "files"] = Field(
        "builtin", description="builtin: the generated task suite; files: real data from `files`"
    )
    size: Literal["tiny", "default", "small"] = Field("default", description="built-in suite preset")
    suite: dict[str, Any] = Field(default_factory=dict, description="SuiteConfig fields overriding the preset")
    files: FilesConfig | None = Field(None, description="source: files -> the local data sources to read")

    @model_validator(mode="after")
    def _check(self) -> Config:
        # Validate the suite overrides now (unknown key -> error), not when the stage runs.
        self.suite_config()
        if self.source == "files" and self.files is None:
            raise ValueError("source: files needs a `files:` section (pretrain, sft, preference paths)")
        return self

    def suite_config(self):
        from alignline.data.tasks import suite_config

        overrides = [f"{k}={json.dumps(v)}" for k, v in self.suite.items()]
        return suite_config(self.size, overrides)


def split_key(record: dict) -> str:
    """What decides a record's side of the split: its prompt (chats, pairs, prompts) or its text."""
    if "text" in record:
        return record["text"]
    prompt = record.get("prompt") or record["messages"][:-1]
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def _hash_unit(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_held_out(rows: list[dict], frac: float, what: str) -> tuple[list[dict], list[dict]]:
    """(train, held out): a record is held out when the hash of its split_key falls below `frac`.
    Deterministic and independent of row order, so appended rows never move old ones across the
    split. At least one record lands on each side; a source with fewer than two is refused."""
    if len(rows) < 2:
        raise InputError(f"{what}: {len(rows)} record(s); a source needs at least 2 so one can be held out "
                         "for evaluation")
    units = [_hash_unit(split_key(r)) for r in rows]
    held = [u < frac for u in units]
    if not any(held):
        held[min(range(len(rows)), key=units.__getitem__)] = True
    if all(held):
        held[max(range(len(rows)), key=units.__getitem__)] = False
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


def derived_prompts(loaded: dict[str, list[dict]], files: FilesConfig) -> list[dict]:
    """Prompt rows from the SFT chats', preference pairs' and KTO answers' prompts, first occurrence kept, tagged
    with the source file; no gold answer (no verifier)."""
    out, seen = [], set()
    for kind in ("sft", "preference", "kto"):
        src = getattr(files, kind)
        for r in loaded.get(kind, []):
            prompt = r["messages"][:-1] if kind == "sft" else r["prompt"]
            key = split_key({"prompt": prompt})
            if prompt and prompt[-1]["role"] == "user" and key not in seen:
                seen.add(key)
                out.append({"prompt": prompt, "task": Path(src.path).stem})
    return out


def _check_verifier(rows: list[dict], src: LoaderConfig) -> None:
    """A prompt file has a verifier on every row or on none: a metric over a silent subset misleads."""
    with_answer = sum(r.get("answer") is not None for r in rows)
    if 0 < with_answer < len(rows):
        raise InputError(
            f"{src.path}: {with_answer} of {len(rows)} prompts have a gold answer (column "
            f"{src.columns.answer!r}) and {len(rows) - with_answer} do not; give every prompt an answer (gold "
            "accuracy is measured on all of them) or none (no verifier)")


def _load_files(cfg: Config) -> dict[str, list[dict]]:
    """Read and validate every source (raises DataValidationError naming file:line)."""
    from alignline.data.loaders import load_records

    files = cfg.files
    assert files is not None
    loaded: dict[str, list[dict]] = {}
    for i, src in enumerate(files.pretrain):
        loaded[f"pretrain[{i}]"] = load_records(src, progress=True)
    for kind in ("sft", "preference", "kto", "prompts"):
        src = getattr(files, kind)
        if src is not None:
            loaded[kind] = load_records(src, progress=True)
    if "prompts" in loaded:
        _check_verifier(loaded["prompts"], files.prompts)
    return loaded


Splits = dict[str, tuple[list[dict], list[dict]]]


def split_files(cfg: Config, loaded: dict[str, list[dict]]) -> tuple[Splits, dict[str, Any]]:
    """({kind: (train, held out)}, {kind: {train, val, source(s)}}) for the user's sources."""
    files = cfg.files
    assert files is not None
    frac = files.val_fraction
    splits: dict[str, tuple[list[dict], list[dict]]] = {}
    info: dict[str, Any] = {}
    if files.pretrain:  # per source: a 1 MB file does not crowd a small one out of the val split
        train, val, per = [], [], []
        for i, src in enumerate(files.pretrain):
            t, v = split_held_out(loaded[f"pretrain[{i}]"], frac, src.path)
            train += t
            val += v
            per.append({"path": src.path, "train": len(t), "val": len(v)})
        splits["pretrain"] = (train, val)
        info["pretrain"] = {"train": len(train), "val": len(val), "sources": per}
    for kind in ("sft", "preference", "kto", "prompts"):
        if kind in loaded:
            splits[kind] = split_held_out(loaded[kind], frac, getattr(files, kind).path)
            info[kind] = {"source": getattr(files, kind).path}
    chats = [k for k in ("sft", "preference", "kto") if k in loaded]
    if "prompts" not in splits and chats:
        rows = derived_prompts(loaded, files)
        splits["prompts"] = split_held_out(rows, frac, f"prompts derived from the {' and '.join(chats)} data")
        info["prompts"] = {"source": f"derived from the {' and '.join(chats)} prompts"}
    for kind, (train, val) in splits.items():
        info[kind].update(train=len(train), val=len(val))
    if "prompts" in splits:
        info["prompts"]["verifier"] = "gold" if all("answer" in r for r in splits["prompts"][0]) else "none"
    return splits, info


def write_splits(splits: Splits, out: Path) -> None:
    """<kind>/{train,val}.jsonl, and test.jsonl = val for the chat kinds (files: one held-out set)."""
    for kind, (train, val) in splits.items():
        shutil.rmtree(out / kind, ignore_errors=True)  # the built-in part this source replaces
        (out / kind).mkdir(parents=True)
        write_jsonl(out / kind / "train.jsonl", train)
        write_jsonl(out / kind / "val.jsonl", val)
        if kind != "pretrain":
            write_jsonl(out / kind / "test.jsonl", val)


def row_counts(suite_sizes: dict[str, int], splits: Splits) -> dict[str, int]:
    """{"<kind>/<split>.jsonl": rows} of what the stage wrote (eval.json `sizes`; the report's data row):
    the built-in suite's counts for the parts no user file replaced, the splits' for the rest."""
    sizes = {rel: n for rel, n in suite_sizes.items() if rel.split("/", 1)[0] not in splits}
    for kind, (train, val) in splits.items():
        sizes[f"{kind}/train.jsonl"], sizes[f"{kind}/val.jsonl"] = len(train), len(val)
        if kind != "pretrain":
            sizes[f"{kind}/test.jsonl"] = len(val)
    return dict(sorted(sizes.items()))


def data_files(config: Config) -> dict[str, Path]:
    """The local files `source: files` reads; they are fingerprinted into the stage's reuse key, so
    changed rows re-run this stage (and everything downstream) instead of reusing the old output."""
    from alignline.data.loaders import local_source

    if config.source != "files" or config.files is None:
        return {}
    srcs = [(f"pretrain[{i}]", s) for i, s in enumerate(config.files.pretrain)]
    srcs += [(k, s) for k in ("sft", "preference", "kto", "prompts") if (s := getattr(config.files, k))]
    return {name: p for name, s in srcs if (p := local_source(s)) is not None}


def run(config: Config, inputs: dict[str, Path] | None, run_dir: str | Path) -> Path:
    from alignline.data.tasks import write_suite

    # Real data is read, validated and split before the stage dir is touched: a bad file leaves
    # nothing behind.
    splits, info = split_files(config, _load_files(config)) if config.source == "files" else ({}, {})
    run = StageRun(run_dir, "data", config, inputs={}, source=__file__, data=data_files(config))
    suite_cfg = config.suite_config()
    # The built-in suite is always written; with files, what the user gives replaces its parts.
    suite = write_suite(run.staging, suite_cfg)
    evaluation: dict[str, Any] = {"source": config.source}
    if config.source == "files":
        write_splits(splits, run.staging)
        evaluation["files"] = info
    evaluation["sizes"] = row_counts(suite["sizes"], splits)
    return run.finalize(eval=evaluation, headline={"source": config.source, "rows": rows_line(evaluation["sizes"])})


def rows_line(sizes: dict[str, int]) -> str:
    """"pretrain 6799/753, sft 902/97, ... (train/held-out)": the report card's data row."""
    kinds = [k for k in ("pretrain", "sft", "preference", "kto", "prompts") if f"{k}/train.jsonl" in sizes]
    parts = [f"{k} {sizes.get(f'{k}/train.jsonl', 0)}/{sizes.get(f'{k}/val.jsonl', 0)}" for k in kinds]
    return ", ".join(parts) + " (train/held-out rows)"


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main("data", Config, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
