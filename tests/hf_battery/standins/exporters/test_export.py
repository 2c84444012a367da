"""Stand-in for transformers' tests/exporters/test_export.py (not in the sdist).

ModelTesterMixin derives from `ExportTesterMixin`; the real one adds torch.export tests, which are
therefore not run. The empty base keeps ModelTesterMixin's own tests importable.
"""


class ExportTesterMixin:
    """Empty: the real export test mixin is not shipped in the sdist."""
