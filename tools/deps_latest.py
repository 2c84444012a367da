"""Drift check: alignline against the newest releases the registry serves, ignoring our upper bounds.

    make deps-latest                  # or: .venv/bin/python tools/deps_latest.py [--keep] [-- PYTEST ARGS]

Builds a throwaway venv (.venv-latest), installs every dependency of pyproject.toml (plus the dev
extra) with its upper bounds removed, so pip takes the newest release of each, then runs the
model, generation, TRL, PEFT and Prefect tests there. It prints which packages moved past the lock
and which tests break, and exits non-zero on any failure: when transformers (or TRL, PEFT, Prefect,
...) ships a release that breaks us, CI says so the same day, naming the test.

torch stays at the lock's release: the newest torch on PyPI is a multi-GB CUDA build, and torch
drift is not what this check watches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "lock" / "requirements.txt"
VENV = REPO / ".venv-latest"
TESTS = [
    "tests/test_model.py",
    "tests/test_generation.py",
    "tests/test_model_trl.py",
    "tests/test_peft_utils.py",
    "tests/test_lora.py",
    "tests/test_install.py::test_every_import_is_declared",
    "tests/test_flow_pipeline.py",
]


def unbounded(requirement: str) -> str:
    """The requirement with its upper bounds (<, <=, ==, ~=) dropped: lower bounds and extras stay."""
    req = Requirement(requirement)
    kept = [str(s) for s in req.specifier if s.operator in (">", ">=", "!=")]
    req.specifier = SpecifierSet(",".join(kept))
    return str(req)


def locked_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split(";")[0].split("==")
            pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="reuse .venv-latest if it exists (no reinstall)")
    ap.add_argument("pytest_args", nargs="*", help="tests to run instead of the default set")
    args = ap.parse_args()

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = locked_pins()
    torch_pin = f"torch=={pins['torch']}"
    reqs = [unbounded(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
            if canonicalize_name(Requirement(r).name) != "torch"]
    py = VENV / "bin" / "python"
    start = time.time()
    if not (args.keep and py.exists()):
        shutil.rmtree(VENV, ignore_errors=True)
        run([sys.executable, "-m", "venv", str(VENV)])
        run([str(py), "-m", "pip", "install", "-q", torch_pin])
        # torch==pin as a constraint too, so nothing upgrades it to a CUDA build.
        constraint = VENV / "torch-constraint.txt"
        constraint.write_text(torch_pin + "\n")
        run([str(py), "-m", "pip", "install", "-q", "-c", str(constraint), *reqs])
        run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)])
    print(f"venv ready in {time.time() - start:.0f} s")

    freeze = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout
    installed = {canonicalize_name(n): v for n, v in (line.split("==") for line in freeze.splitlines() if "==" in line)}
    moved = [(n, pins[n], installed[n]) for n in sorted(pins) if n in installed and installed[n] != pins[n]
             and n != "torch"]
    print("\nPackages at another version than the lock:" if moved else "\nEvery package is at its locked version.")
    for name, old, new in moved:
        print(f"  {name:28s} {old:>12s} -> {new}")

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    tests = args.pytest_args or TESTS
    result = subprocess.run([str(py), "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-rfE"],
                            cwd=REPO, env=env)
    versions = ", ".join(f"{n} {installed.get(n, '?')}" for n in
                         ("transformers", "trl", "peft", "accelerate", "datasets", "prefect"))
    if result.returncode != 0:
        print(f"\ndeps-latest FAILED on {versions}: the tests above (FAILED/ERROR lines) break on the "
              "newest releases. Fix the code or keep the upper bound in pyproject.toml.")
        return 1
    print(f"\ndeps-latest passed on {versions} ({time.time() - start:.0f} s).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
