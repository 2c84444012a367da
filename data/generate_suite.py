"""Write the built-in task suite (pretraining text, SFT chats, preference pairs, RL prompts) to a directory.

    python data/generate_suite.py --out runs/tiny/data [--seed 0] [--size tiny|default|small] [--set key=value]

Same seed and size -> byte-identical files. Layout: docs/ARCHITECTURE.md ("Built-in task suite").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from alignline.data.tasks import SUITE_SIZES, suite_config, write_suite  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=None, help="overrides the preset's seed (0)")
    p.add_argument("--size", default="default", choices=sorted(SUITE_SIZES))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="SuiteConfig key=value")
    a = p.parse_args(argv)
    overrides = list(a.overrides) + ([f"seed={a.seed}"] if a.seed is not None else [])
    meta = write_suite(a.out, suite_config(a.size, overrides), progress=print)
    print(f"suite (seed {meta['seed']}, size {a.size}) written to {a.out}")


if __name__ == "__main__":
    main()
