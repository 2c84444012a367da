"""Fetch transformers' common test files for the installed version and import them as a package.

    from tests.hf_battery.upstream import load_battery
    modeling_common, configuration_common = load_battery()

The sdist of the installed transformers (`transformers.__version__`) is downloaded once with
`python -m pip download --no-binary :all: --no-deps` and its top-level `tests/*.py` files are extracted,
unmodified, to `.cache/hf-battery/<version>/tests/` (ignored by git). They are imported as the package
`alignline_hf_battery`, whose search path is that folder followed by our `standins/` folder: the
sdist's `tests/` lacks three modules that its files import relatively (generation/test_utils.py,
exporters/test_export.py, utils/test_configuration_utils.py), and the stand-ins fill exactly those.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "hf-battery"
STANDINS = Path(__file__).resolve().parent / "standins"
PACKAGE = "alignline_hf_battery"  # unique: never clashes with our `tests` package or transformers'
NEEDED = ("test_modeling_common.py", "test_configuration_common.py")


class BatteryUnavailable(RuntimeError):
    """The sdist could not be downloaded or does not hold the expected test files."""


def _download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
           "--no-deps", "--disable-pip-version-check", "-q", "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    sdists = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise BatteryUnavailable(
            f"could not download the transformers {version} sdist for the HF test battery "
            f"(`{' '.join(cmd)}` exited {proc.returncode}); the battery needs the package registry.\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    return sdists[0]


def _extract_tests(sdist: Path, version: str, dest: Path) -> None:
    prefix = f"transformers-{version}/tests/"
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix="extract-"))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                # Only the top-level test files: nothing else is imported, and no path can escape `dest`.
                if member.isfile() and name.endswith(".py") and "/" not in name:
                    (staging / name).write_bytes(tar.extractfile(member).read())
        missing = [n for n in NEEDED if not (staging / n).is_file()]
        if missing:
            raise BatteryUnavailable(f"the transformers {version} sdist has no tests/{', tests/'.join(missing)}")
        # The sdist ships tests/ without __init__.py; test_configuration_common executes `<its folder>/__init__.py`
        # at import (direct_transformers_import), so the package marker must exist. It is empty.
        (staging / "__init__.py").write_text("")
        staging.rename(dest)  # atomic: a half-extracted folder is never used
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def battery_dir(version: str | None = None) -> Path:
    """The extracted `tests/` folder of the transformers sdist for `version` (default: the installed one)."""
    if version is None:
        import transformers

        version = transformers.__version__
    dest = CACHE / version / "tests"
    if all((dest / n).is_file() for n in NEEDED):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="download-") as tmp:
        _extract_tests(_download_sdist(version, Path(tmp)), version, dest)
    return dest


def load_battery(version: str | None = None) -> tuple[ModuleType, ModuleType]:
    """Import (test_modeling_common, test_configuration_common) from the extracted sdist."""
    folder = battery_dir(version)
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder), str(STANDINS)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"))
