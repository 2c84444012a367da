"""Convert a local file or hub dataset into the suite's record shapes (validated first) under OUT/<kind>/.

    python data/prepare.py ../shared/data/sft/alpaca_en_demo.json --kind sft --out runs/real/data
    python data/prepare.py ../shared/data/preference/dpo_en_demo.json --kind preference --out runs/real/data
    python data/prepare.py ../shared/data/pretrain/tinyshakespeare.txt --kind pretrain --text-unit paragraph --out D

Writes OUT/<kind>/train.jsonl and OUT/<kind>/val.jsonl (the first `--val-fraction` of records, at least 1).
Validation covers the whole source before anything is written; on failure every problem is listed as
file:line: message, the exit status is 1, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from alignline.config import ConfigError, apply_overrides, config_from_dict  # noqa: E402
from alignline.data.loaders import DataValidationError, LoaderConfig, load_records  # noqa: E402
from alignline.files import write_jsonl  # noqa: E402


def prepare(cfg: LoaderConfig, out: Path, val_fraction: float) -> dict[str, int]:
    records = load_records(cfg, progress=True)  # raises before anything is written
    n_val = max(1, int(len(records) * val_fraction)) if len(records) > 1 else 0
    write_jsonl(out / cfg.kind / "train.jsonl", records[n_val:])
    write_jsonl(out / cfg.kind / "val.jsonl", records[:n_val])
    return {"train": len(records) - n_val, "val": n_val}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="file, directory, or hub dataset id")
    p.add_argument("--kind", required=True, choices=["pretrain", "sft", "preference", "prompts"])
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "hh", "messages", "text"])
    p.add_argument("--text-unit", default="line", choices=["line", "paragraph", "file"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="LoaderConfig key=value")
    a = p.parse_args(argv)
    fields = {"path": a.source, "kind": a.kind, "format": a.format, "text_unit": a.text_unit}
    try:
        cfg = config_from_dict(LoaderConfig, apply_overrides(fields, a.overrides), source="command line")
        sizes = prepare(cfg, a.out, a.val_fraction)
    except (ConfigError, DataValidationError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{a.source} -> {a.out / a.kind}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
