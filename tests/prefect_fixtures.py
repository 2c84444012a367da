"""Shared test helpers for the flow tests: one Prefect test harness per session, and fake stages.

    from tests.prefect_fixtures import prefect_harness, make_fake_stages  # noqa: F401

The fake stages are real stage modules (Config, INPUTS, run, main) written into a temporary
package: they use the real stage-directory contract (StageRun, manifests, training state,
metrics.jsonl, samples.jsonl) but "train" in milliseconds, so flow behaviour (caching,
resume, retries, gates, reports) is tested without waiting for real training. Like the real one,
the fake `rlhf` stage has variants (`algorithm: ppo|dpo|...`, its `variant_key`), so it writes
`rlhf-<algorithm>/`; each fake stage appends its start step to `<run_dir>/<output dir>.calls`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
from pathlib import Path

import pytest

from stages import optional_stages, pipeline_stages

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

_HARNESS: contextlib.ExitStack | None = None
REPO = Path(__file__).resolve().parent.parent


def ci_steps(stages=("pretrain", "sft", "reward", "rlhf", "evaluate", "export")) -> list[str]:
    """configs/pipeline/ci.yaml's few-step settings of these stages, as pipeline `--set` overrides:
    another pipeline YAML run end to end in the suite at CI size."""
    import yaml

    ci = yaml.safe_load((REPO / "configs/pipeline/ci.yaml").read_text())
    return [f"{stage}.{item}" for stage in stages for item in ci["stages"][stage].get("set", [])]


@pytest.fixture(scope="session")
def prefect_harness(request):
    """Start one `prefect_test_harness` (temporary SQLite API) for the whole test session."""
    global _HARNESS
    if _HARNESS is None:
        from prefect.testing.utilities import prefect_test_harness

        stack = contextlib.ExitStack()
        stack.enter_context(prefect_test_harness(server_startup_timeout=90))
        _HARNESS = stack

        def close() -> None:
            global _HARNESS
            if _HARNESS is not None:
                _HARNESS.close()
                _HARNESS = None

        request.session.addfinalizer(close)
    yield


FAKE_STAGE = textwrap.dedent(
    '''
    """Fake stage {stage!r} for flow tests: counts steps, saves state every step, can crash."""
    import os
    import time
    from pathlib import Path
    from typing import ClassVar

    from alignline.artifacts import StageRun
    from alignline.config import StrictModel
    from alignline.stage_cli import InputSpec, stage_main

    STAGE = {stage!r}
    # An optional stage's output (distill) is read only when there is one, as the real evaluate does.
    INPUTS = [InputSpec(n, default=n, required=n not in {optional!r}) for n in {inputs!r}]


    class Config(StrictModel):
        steps: int = 4
        lr: float = 0.1
        step_sleep_s: float = 0.0
        accuracy: float = 0.9
        kl: float = 0.05
        gold_accuracy: float = 0.5
        data_file: str | None = None  # a file read from outside the run dir (fingerprinted into the key)
        collapse: bool = False  # a collapsed policy: every answer is the same looping string
        accuracy_interval: list = []  # [n, low, high]: the held-out estimate of `accuracy`
        {extra}


    def data_files(config):
        return {{"data_file": Path(config.data_file)}} if config.data_file else {{}}


    def _should_fail(step):
        if os.environ.get("FAKE_FAIL_STAGE") != STAGE or step < int(os.environ.get("FAKE_FAIL_AT", "1")):
            return False
        once = os.environ.get("FAKE_FAIL_ONCE_FILE")
        if once:
            if Path(once).exists():
                return False
            Path(once).write_text("failed once")
        return True


    def run(config, inputs, run_dir):
        run = StageRun(run_dir, STAGE, config, inputs=inputs, source=__file__, data=data_files(config))
        meta = run.load_state()
        start = meta["step"] + 1 if meta else 0
        with open(Path(run_dir) / f"{{run.name}}.calls", "a") as fh:
            fh.write(f"{{start}}\\n")
        for step in range(start, config.steps):
            run.metrics.log(step, loss=config.lr / (step + 1), reward=0.1 * step, kl=config.kl * step)
            run.save_state(step, extra={{"lr": config.lr}})
            if _should_fail(step):
                raise RuntimeError(f"fake {{STAGE}} crashed at step {{step}}")
            time.sleep(float(os.environ.get("FAKE_STEP_SLEEP", config.step_sleep_s)))
            hold = os.environ.get("FAKE_HOLD_FILE")  # the stage waits while this file exists
            while hold and Path(hold).exists():
                time.sleep(0.05)
        samples = [{{"prompt": f"What is {{i}}+1?", "answer": str(i + 1),
                    "response": "1. 1. 1. 1. 1. 1." if config.collapse else f"{{run.name}}-{{i}}"}}
                   for i in range(3)]
        headline = {{"loss": config.lr / config.steps, "accuracy": config.accuracy, "kl": config.kl,
                    "gold_accuracy": config.gold_accuracy, "resumed_from": start}}
        est = config.accuracy_interval
        estimates = {{"accuracy": {{"value": config.accuracy, "n": est[0], "low": est[1], "high": est[2]}}}} if est else {{}}
        return run.finalize(eval={{**headline, "estimates": estimates}}, headline=headline, samples=samples)


    def main(argv=None):
        return stage_main(STAGE, Config, run, INPUTS, __doc__, argv)


    if __name__ == "__main__":
        main()
    '''
)

# One fake per registered pipeline stage (stages.REGISTRY), with the inputs the real one takes.
FAKE_INPUTS = {
    "data": [],
    "tokenizer": ["data"],
    "pretrain": ["data", "tokenizer"],
    "sft": ["data", "pretrain"],
    "reward": ["data", "sft"],
    "rlhf": ["data", "sft", "reward"],
    "distill": ["data", "rlhf"],
    "evaluate": ["data", "sft", "reward", "rlhf", "distill"],
    "export": ["evaluate", "rlhf"],
}
assert tuple(FAKE_INPUTS) == pipeline_stages(), "a pipeline stage was registered: give it a fake here"


# Extra Config lines per fake stage: rlhf selects its variant (output dir) by `algorithm`, as stages/rlhf.py does.
FAKE_EXTRA = {
    "rlhf": 'variant_key: ClassVar[str] = "algorithm"\n    algorithm: str = "ppo"',
}


def make_fake_stages(root: Path, package: str = "fakestages") -> str:
    """Write a package of fake stage modules under `root`, importable here and in subprocesses."""
    pkg = root / package
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for stage, inputs in FAKE_INPUTS.items():
        (pkg / f"{stage}.py").write_text(FAKE_STAGE.format(stage=stage, inputs=inputs, optional=optional_stages(),
                                                           extra=FAKE_EXTRA.get(stage, "")))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return package


def fake_pipeline_overrides(package: str, run_dir: Path, name: str = "fake") -> list[str]:
    """--set overrides turning the default pipeline into the fake one (no YAML files needed)."""
    out = [f"name={name}", f"run_dir={run_dir}", "retries=0", "retry_delay_s=0", "report.progress_every_s=0.2"]
    for stage in FAKE_INPUTS:
        out += [f"stages.{stage}.module={package}.{stage}", f"stages.{stage}.config=null"]
    # Optional stages (distill) are off unless enabled: the fake pipeline runs every stage.
    out += [f"stages.{stage}.enabled=true" for stage in optional_stages()]
    return out
