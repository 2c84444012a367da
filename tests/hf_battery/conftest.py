"""Collection rules for transformers' test battery (tests/hf_battery/).

The battery module downloads and imports transformers' sdist tests when it is imported, so it is not even
collected unless the run selects the `hf_battery` marker (`pytest tests -m hf_battery`); the default
`pytest tests` deselects it through pyproject's addopts and never downloads. `standins/` holds modules
named test_*.py that are imported by the battery, not collected. Battery tests listed in the module's
KNOWN_FAILURES are marked xfail(strict=True) with their reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

collect_ignore = ["standins"]

# Markers the battery's tests carry (directly or through transformers.testing_utils decorators); transformers'
# own conftest registers them, and our --strict-markers would otherwise reject the module.
TRANSFORMERS_MARKERS = (
    "accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test",
    "is_staging_test", "is_pipeline_test", "is_agent_test", "is_training_test", "is_tensor_parallel_test",
    "is_expert_parallel_test", "is_fsdp_test", "order",
)


def pytest_configure(config: pytest.Config) -> None:
    for name in TRANSFORMERS_MARKERS:
        config.addinivalue_line("markers", f"{name}: used by transformers' common tests (hf_battery)")


def _selects_battery(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr") or ""
    if not markexpr:
        return True  # no marker filter at all: everything runs, the battery included
    # pytest's own mark-expression evaluator (what `-m` uses), asked about an item marked hf_battery only.
    from _pytest.mark.expression import Expression

    return Expression.compile(markexpr).evaluate(lambda name, /, **kwargs: name == "hf_battery" and not kwargs)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.name == "test_hf_battery.py" and not _selects_battery(config):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        known = getattr(item.module, "KNOWN_FAILURES", None) if hasattr(item, "module") else None
        if known and item.name in known:
            item.add_marker(pytest.mark.xfail(reason=known[item.name], strict=True))
