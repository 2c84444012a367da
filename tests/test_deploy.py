"""Deployments against a real `prefect server start`: cron schedules, scheduled runs, a worker run.

    .venv/bin/pytest tests/test_deploy.py

Starts a Prefect server on 127.0.0.1 (free port, its own PREFECT_HOME in a tmp dir), runs
`alignline deploy`, checks the nightly cron schedule and that the scheduler created flow runs,
runs the single-stage deployment (the real `data` stage) through
`prefect worker start --run-once`, and kills every process group it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from alignline.launch import free_port

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "alignline-test"


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture()
def server(tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("PREFECT_")]:
        env.pop(key)  # nothing from the test harness or the user's profile leaks in
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
    })
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("prefect server did not start:\n" + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url, env
    finally:
        _kill(proc)
        log.close()


def _client_script(env: dict[str, str], code: str) -> dict:
    """Run `code` (defines `result`) against the server with a sync client; returns result as JSON."""
    prog = (
        "import json\nfrom prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as client:\n"
        + "".join(f"    {line}\n" for line in code.strip().splitlines())
        + "print('RESULT=' + json.dumps(result, default=str))\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT=")][-1]
    return json.loads(line[len("RESULT="):])


def test_deploy_schedules_and_worker_run(server, tmp_path: Path) -> None:
    url, env = server
    run_dir = tmp_path / "run"
    lora = (REPO / "flows" / "lora.py").is_file()
    cmd = [str(BIN / "alignline"), "deploy", "--pool", POOL, "--stage", "data", "--set", f"run_dir={run_dir}",
           "--cron", "0 2 * * *"] + ([] if lora else ["--no-lora"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "alignline-pipeline/nightly" in out.stdout and "alignline-stage/retrain-data" in out.stdout

    deps = _client_script(env, f"""
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
deps = client.read_deployments(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=["{POOL}"])))
pool = client.read_work_pool("{POOL}")
result = {{"pool_type": pool.type, "deps": {{d.name: {{"id": str(d.id), "crons": [s.schedule.cron for s in d.schedules],
          "entrypoint": d.entrypoint, "params": d.parameters}} for d in deps}}}}
""")
    assert deps["pool_type"] == "process"
    nightly = deps["deps"]["nightly"]
    assert nightly["crons"] == ["0 2 * * *"]
    assert nightly["entrypoint"] == "flows/pipeline.py:pipeline_flow"
    assert nightly["params"]["config"]["run_dir"] == str(run_dir)
    assert deps["deps"]["retrain-data"]["crons"] == []
    if lora:
        assert deps["deps"]["lora-refresh"]["crons"] == ["0 4 * * 0"]

    # The scheduler (loop: 2 s here) creates upcoming runs for the cron deployment.
    deadline = time.monotonic() + 90
    while True:
        scheduled = _client_script(env, f"""
from uuid import UUID
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[UUID("{nightly['id']}")])))
result = [[r.state_type.value, r.expected_start_time.isoformat()] for r in runs]
""")
        if scheduled or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert scheduled, "the scheduler created no runs for the nightly deployment"
    assert all(state == "SCHEDULED" for state, _ in scheduled)
    assert all("T02:00:00" in start for _, start in scheduled)

    # Run the single-stage deployment (the real data stage) through a worker, once.
    stage_id = deps["deps"]["retrain-data"]["id"]
    created = _client_script(env, f"""
from uuid import UUID
fr = client.create_flow_run_from_deployment(UUID("{stage_id}"), parameters={{"stage": "data",
     "run_dir": "{run_dir}", "entry": {{"config": "configs/data/tiny.yaml", "set": ["suite.seed=1"]}}}})
result = str(fr.id)
""")
    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once"],
                              env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
                              cwd=tmp_path)
    try:
        worker.wait(timeout=240)
    finally:
        _kill(worker)
        worker_log.close()
    state = _client_script(env, f"""
from uuid import UUID
fr = client.read_flow_run(UUID("{created}"))
result = [fr.state_type.value, fr.state.message]
""")
    assert state[0] == "COMPLETED", (state, (tmp_path / "worker.log").read_text()[-4000:])
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "data"


def test_prefect_yaml_matches_the_flows() -> None:
    """prefect.yaml's entrypoints exist and its parameters validate against the flows' signatures."""
    import importlib

    import yaml
    from prefect import Flow

    from alignline.config import config_from_dict
    from flows.pipeline import PipelineConfig
    from flows.tasks import StageEntry

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"nightly", "lora-refresh", "retrain-reward"}
    assert deps["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    assert deps["lora-refresh"]["schedules"][0]["cron"] == "0 4 * * 0"
    for name, dep in deps.items():
        path, func = dep["entrypoint"].split(":")
        assert (REPO / path).is_file(), f"{name}: {path} is missing"
        flow_obj = getattr(importlib.import_module(path[:-3].replace("/", ".")), func)
        assert isinstance(flow_obj, Flow)
        assert set(dep.get("parameters", {})) <= set(flow_obj.parameters.properties)
    nightly = config_from_dict(PipelineConfig, deps["nightly"]["parameters"]["config"])
    assert nightly.run_dir == "runs/nightly" and nightly.stages["pretrain"].config == "configs/pretrain/tiny.yaml"
    entry = StageEntry(**deps["retrain-reward"]["parameters"]["entry"])
    assert (REPO / entry.config).is_file()
