"""Stage `data`: generate the built-in task suite (or prepare real data) into `<run_dir>/data/`.

    python -m stages.data --config configs/data/tiny.yaml --run-dir runs/tiny
    alignline stage data --config configs/data/tiny.yaml --set suite.seed=1

Output (the layout of docs/ARCHITECTURE.md): pretrain/{train,val}.jsonl, sft/{train,val,test}.jsonl,
preference/{train,val,test}.jsonl, prompts/{train,val,test}.jsonl, suite.json, plus the stage files
(config.yaml, manifest.json). `source: builtin` uses `alignline.data.tasks`; `source: files` reads
local files through `alignline.data.loaders` (pretraining text, SFT and preference data) and still
takes the held-out prompts (and gold answers) from the built-in suite, so gold accuracy stays defined.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignline.artifacts import StageRun
from alignline.config import StrictModel
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
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of each source held out as val")

    @model_validator(mode="before")
    @classmethod
    def _kinds(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for kind in ("sft", "preference"):
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


def _split(rows: list[dict], frac: float) -> tuple[list[dict], list[dict]]:
    n_val = max(1, int(len(rows) * frac))
    return rows[n_val:], rows[:n_val]


def _load_files(cfg: Config) -> dict[str, list[dict]]:
    """Read and validate every source (raises DataValidationError naming file:line)."""
    from alignline.data.loaders import load_records

    files = cfg.files
    assert files is not None
    loaded: dict[str, list[dict]] = {}
    if files.pretrain:
        loaded["pretrain"] = [r for src in files.pretrain for r in load_records(src, progress=True)]
    for kind, src in (("sft", files.sft), ("preference", files.preference)):
        if src is not None:
            loaded[kind] = load_records(src, progress=True)
    return loaded


def _write_files(cfg: Config, loaded: dict[str, list[dict]], out: Path) -> dict[str, Any]:
    files = cfg.files
    assert files is not None
    info: dict[str, Any] = {}
    for kind, rows in loaded.items():
        train, val = _split(rows, files.val_fraction)
        (out / kind).mkdir(parents=True, exist_ok=True)
        write_jsonl(out / kind / "train.jsonl", train)
        write_jsonl(out / kind / "val.jsonl", val)
        if kind == "pretrain":
            info[kind] = {"train": len(train), "val": len(val)}
        else:
            write_jsonl(out / kind / "test.jsonl", val)
            info[kind] = {"train": len(train), "val": len(val), "source": getattr(files, kind).path}
    return info


def data_files(config: Config) -> dict[str, Path]:
    """The local files `source: files` reads; they are fingerprinted into the stage's reuse key, so
    changed rows re-run this stage (and everything downstream) instead of reusing the old output."""
    from alignline.data.loaders import local_source

    if config.source != "files" or config.files is None:
        return {}
    srcs = [(f"pretrain[{i}]", s) for i, s in enumerate(config.files.pretrain)]
    srcs += [(k, s) for k, s in (("sft", config.files.sft), ("preference", config.files.preference)) if s]
    return {name: p for name, s in srcs if (p := local_source(s)) is not None}


def run(config: Config, inputs: dict[str, Path] | None, run_dir: str | Path) -> Path:
    from alignline.data.tasks import write_suite

    # Real data is read and validated before the stage dir is touched: a bad file leaves nothing behind.
    loaded = _load_files(config) if config.source == "files" else {}
    run = StageRun(run_dir, "data", config, inputs={}, source=__file__, data=data_files(config))
    suite_cfg = config.suite_config()
    # The built-in suite is always written: its held-out prompts + gold answers are the fixed eval set.
    meta = write_suite(run.staging, suite_cfg)
    headline: dict[str, Any] = {"source": config.source, "sizes": meta["sizes"]}
    if config.source == "files":
        # Real data replaces the built-in training files; the built-in held-out prompts stay.
        for sub in ("pretrain", "sft", "preference"):
            if getattr(config.files, sub):
                shutil.rmtree(run.staging / sub)
        headline["files"] = _write_files(config, loaded, run.staging)
    return run.finalize(eval={}, headline=headline)


def main(argv: list[str] | None = None) -> Path | None:
    return stage_main("data", Config, run, INPUTS, __doc__, argv)


if __name__ == "__main__":
    main()
