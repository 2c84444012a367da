"""The install contract: pyproject.toml, lock/requirements.txt and the installed environment agree.

    .venv/bin/pytest tests/test_install.py -q

`make` installs from the lock, so a dependency added to pyproject without `make lock`, a bound the
locked version breaks, or a venv that drifted from the lock fails here, in CI, before a newcomer
meets it. Also: fast-moving libraries carry a tested upper bound, and every third-party import in
the code is declared.
"""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "lock" / "requirements.txt"
# Libraries whose minor releases change APIs we use; each needs an upper bound (issue 13).
FAST_MOVING = ("transformers", "trl", "peft", "accelerate", "datasets", "prefect")
# import name -> distribution name, where they differ
IMPORT_TO_DIST = {"yaml": "pyyaml", "huggingface_hub": "huggingface-hub"}
CODE_DIRS = ("alignline", "stages", "flows", "alignline_cli")


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements(extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    proj = project()
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in proj["optional-dependencies"][extra]]
    return reqs


def parse_lock(text: str, env: dict | None = None) -> dict[str, Version]:
    """name -> pinned version of every lock line whose environment marker holds in `env`."""
    env = env or default_environment()
    pins: dict[str, Version] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==":
            raise ValueError(f"lock line {number} is not an exact pin: {raw!r}")
        if req.marker is None or req.marker.evaluate(env):
            pins[canonicalize_name(req.name)] = Version(spec[0].version)
    return pins


def lock_disagreements(reqs: list[Requirement], pins: dict[str, Version]) -> list[str]:
    """Each requirement that the lock does not pin, or pins outside its range."""
    problems = []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate(default_environment()):
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req} is in pyproject.toml but not in the lock")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req} in pyproject.toml, but the lock pins {req.name}=={pinned}")
    return problems


def test_lock_pins_every_declared_dependency_inside_its_range():
    problems = lock_disagreements(requirements(), parse_lock(LOCK.read_text()))
    assert not problems, "pyproject.toml and the lock disagree; run `make lock`:\n" + "\n".join(problems)


def test_disagreement_is_detected(tmp_path):
    """The check above fails on a missing pin and on a pin outside the declared range."""
    pins = parse_lock("transformers==5.24.0\ntrl==1.16.0 ; sys_platform == 'nonexistent'\n")
    problems = lock_disagreements([Requirement("transformers>=5.0,<5.24"), Requirement("trl>=1.13")], pins)
    assert len(problems) == 2
    assert "pins transformers==5.24.0" in problems[0] and "trl" in problems[1]
    with pytest.raises(ValueError, match="line 1 is not an exact pin"):
        parse_lock("torch>=2.4\n")


def test_installed_environment_matches_the_lock():
    """What `make` installed is what the lock says: no stale or drifted package in .venv."""
    pins = parse_lock(LOCK.read_text())
    drift = []
    for name, pinned in pins.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # platform packages the CPU build does not pull (nvidia-*, triton)
        # torch's local label (+cpu, +cu128) names the build, not the release
        if Version(installed.base_version if name == "torch" else str(installed)) != pinned:
            drift.append(f"{name}: lock {pinned}, installed {installed}")
    missing = [str(r) for r in requirements() if not _installed(r.name)]
    assert not drift and not missing, (
        "the venv differs from lock/requirements.txt; reinstall with `rm -rf .venv && make install`:\n"
        + "\n".join(drift + [f"{m}: not installed" for m in missing])
    )


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("name", FAST_MOVING)
def test_fast_moving_dependencies_have_a_tested_upper_bound(name):
    req = next(r for r in requirements(()) if canonicalize_name(r.name) == name)
    uppers = [s for s in req.specifier if s.operator in ("<", "<=")]
    assert uppers, f"{name} has no upper bound in pyproject.toml ({req}); bound it at the newest tested minor"
    pinned = parse_lock(LOCK.read_text())[name]
    assert req.specifier.contains(pinned)
    # The bound is the next minor after the locked release: tested, and not needlessly tight.
    upper = Version(uppers[0].version)
    assert (upper.major, upper.minor) == (pinned.major, pinned.minor + 1), (
        f"{name}: bound {uppers[0]} but the lock tests {pinned}; bound at <{pinned.major}.{pinned.minor + 1}"
    )


def _third_party_imports() -> dict[str, str]:
    """Top-level module -> first file importing it, over the code that ships."""
    stdlib = set(sys.stdlib_module_names)
    ours = {"alignline", "stages", "flows", "alignline_cli"}
    found: dict[str, str] = {}
    for folder in CODE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in stdlib and top not in ours:
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_import_is_declared():
    proj = project()
    declared = {canonicalize_name(Requirement(r).name) for r in proj["dependencies"]}
    optional = {canonicalize_name(Requirement(r).name)
                for extra, reqs in proj["optional-dependencies"].items() if extra != "dev" for r in reqs}
    undeclared = {
        module: where for module, where in _third_party_imports().items()
        if canonicalize_name(IMPORT_TO_DIST.get(module, module)) not in declared | optional
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_declared_dependency_is_imported():
    """A dependency nobody imports is weight in every install (rich was one)."""
    imported = {canonicalize_name(IMPORT_TO_DIST.get(m, m)) for m in _third_party_imports()}
    # Used without an import statement of ours: tensorboard through torch.utils.tensorboard, accelerate
    # through transformers' Trainer (which refuses to start without it).
    indirect = {"tensorboard", "accelerate"}
    unused = [r for r in project()["dependencies"]
              if canonicalize_name(Requirement(r).name) not in imported | indirect]
    assert not unused, f"declared but never imported: {unused}"
