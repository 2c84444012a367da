"""A stage as one multi-node job (alignline/jobs.py, deploy/): the Kubernetes and Slurm templates
render for a 2-node x 8-GPU stage and validate, the flow submits and waits through the real CLIs
(kubectl, sbatch; stand-ins on PATH here), and the pipeline config names wrong job settings.

    .venv/bin/pytest tests/test_deploy_jobs.py -q      # ~20 s

- Kubernetes: the Service and the Indexed Job validate against the Kubernetes 1.30 schema
  (kubernetes-validate, strict: an unknown field is an error), as do deploy/kubernetes/rbac.yaml and
  the Prefect work pool's flow-run Job rendered with its defaults. The Job runs 2 pods at once, each
  with 8 GPUs and torchrun --nnodes=2 --nproc_per_node=8 dialing pod 0 through the headless Service.
- Slurm: the sbatch script passes `bash -n` (and `sbatch --test-only` where Slurm exists); it asks for
  2 nodes x 8 GPUs and srun's one torchrun per node with the rendezvous on the first node. With
  stand-in `sbatch`/`scontrol`/`srun` on PATH the rendered script really runs the data stage through
  the pipeline's stage task (one node, one rank), so cd, setup, quoting and the torchrun line are
  exercised, not just read.
- run_kubernetes applies, polls and deletes through `kubectl` (a stand-in that records its calls); a
  failed pod fails the stage with pod 0's log, and the Job is deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignline.jobs import JobSpec, KubernetesJob, SlurmJob, job_name, render_kubernetes, render_slurm
from tests.prefect_fixtures import prefect_harness  # noqa: F401,E402

REPO = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.30.0"


def _spec(**kw) -> JobSpec:
    base = dict(stage="pretrain", module="stages.pretrain", nnodes=2, nproc_per_node=8,
                args=["--config", "/runs/big/.pipeline/pretrain.yaml", "--run-dir", "/runs/big", "--data",
                      "/runs/big/data", "--tokenizer", "/runs/big/tokenizer"],
                name=job_name("big", "pretrain", "3f2a9c1e-1"))
    base.update(kw)
    return JobSpec(**base)


def _validate(doc: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError


def test_kubernetes_job_for_two_nodes_of_eight_gpus_validates():
    spec = _spec()
    docs = render_kubernetes(spec, KubernetesJob(image="registry.example.com/alignline:1.0", pvc="alignline-runs",
                                                 namespace="ml", node_selector={"nvidia.com/gpu.product": "H100"},
                                                 env={"NCCL_DEBUG": "WARN"}))
    assert [d["kind"] for d in docs] == ["Service", "Job"]
    for doc in docs:
        _validate(doc)
    svc, job = docs
    name = spec.name
    assert name == "al-big-pretrain-3f2a9c1e-1" and len(name) <= 63
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    js = job["spec"]
    assert js["completionMode"] == "Indexed" and js["completions"] == js["parallelism"] == 2
    assert js["backoffLimit"] == 0
    pod = js["template"]["spec"]
    assert pod["subdomain"] == name == svc["metadata"]["name"]  # pod 0 resolves as <name>-0.<name>
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    cmd = c["command"]
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    for arg in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", f"--rdzv_endpoint={name}-0.{name}:29500",
                f"--rdzv_id={name}"):
        assert arg in cmd
    assert cmd[cmd.index("-m", 3):][:2] == ["-m", "stages.pretrain"] and cmd[-1] == "/runs/big/tokenizer"
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in c["env"]
    assert c["volumeMounts"][0]["mountPath"] == "/runs"


def test_kubernetes_rbac_and_the_work_pool_flow_job_validate():
    from prefect.utilities.templating import apply_values

    for doc in yaml.safe_load_all((REPO / "deploy/kubernetes/rbac.yaml").read_text()):
        _validate(doc)
    pool = json.loads((REPO / "deploy/kubernetes/work-pool.json").read_text())
    props = pool["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values.update(name="alignline-nightly", command="prefect flow-run execute", env={"PREFECT_API_URL": "http://x"},
                  labels={"app": "alignline"})
    manifest = apply_values(pool["job_configuration"]["job_manifest"], values)
    # The worker turns command and env into the container's list forms, as prefect-kubernetes does.
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["args"] = container["args"].split()
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]
    _validate(manifest)
    assert manifest["spec"]["template"]["spec"]["serviceAccountName"] == "alignline-launcher"
    assert manifest["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "alignline-runs"


def test_a_broken_manifest_does_not_validate():
    """The validator is strict: a misspelled field fails (so the tests above mean something)."""
    import kubernetes_validate

    svc, job = render_kubernetes(_spec(), KubernetesJob(image="i", pvc="p"))
    job["spec"]["completionsMode"] = job["spec"].pop("completionMode")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(job)


def test_slurm_script_for_two_nodes_of_eight_gpus(tmp_path):
    script = render_slurm(_spec(), SlurmJob(workdir="/shared/alignline repo", partition="gpu", account="ml",
                                            extra_sbatch=["--exclusive"], env={"NCCL_DEBUG": "WARN"}),
                          log=tmp_path / "pretrain.slurm.log")
    path = tmp_path / "pretrain.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [x for x in lines if x.startswith("#SBATCH")]
    for want in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--account=ml",
                 "--exclusive", f"--output={tmp_path / 'pretrain.slurm.log'}", "--job-name=al-big-pretrain-3f2a9c1e-1"):
        assert f"#SBATCH {want}" in directives, directives
    assert "cd '/shared/alignline repo'" in lines  # quoted: a space does not split the path
    (srun,) = [x for x in lines if x.startswith("srun ")]
    for want in ("--kill-on-bad-exit=1", "python -m torch.distributed.run", "--nnodes=2", "--nproc_per_node=8",
                 '--rdzv_endpoint="$RDZV_ENDPOINT"', "-m stages.pretrain"):
        assert want in srun, srun
    if shutil.which("sbatch"):  # a real Slurm: ask it whether it would schedule this
        subprocess.run(["sbatch", "--test-only", str(path)], check=True)


def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow  # a few processes: make test, not the fast lane
@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.timeout(300)
def test_the_pipeline_runs_a_stage_through_the_rendered_sbatch_script(tmp_path, monkeypatch):
    """The stage task with `launcher: slurm` renders the script, `sbatch --wait`s it, and the script runs:
    stand-ins play Slurm (sbatch runs the script in bash, scontrol names this host, srun runs its command),
    so the rendered cd/setup/env/torchrun lines really execute the data stage on one node."""
    from prefect.logging import disable_run_logger

    from flows.tasks import StageEntry, resolve_stage, stage_task

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "sbatch", 'test "$1" = --wait || exit 9\nout=$(grep "^#SBATCH --output=" "$2" | cut -d= -f2-)\n'
                                 'SLURM_JOB_NODELIST=localhost bash "$2" > "$out" 2>&1\n')
    _stand_in(bin_dir, "scontrol", 'echo 127.0.0.1\n')
    _stand_in(bin_dir, "srun", 'shift\nexec "$@"\n')  # drops --kill-on-bad-exit=1
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    entry = StageEntry(config=str(REPO / "configs/data/tiny.yaml"), set=["size=tiny"], launcher="slurm", nnodes=1,
                       job={"workdir": str(REPO), "setup": f"export PATH={Path(sys.executable).parent}:$PATH",
                            "python": sys.executable, "env": {"PYTHONPATH": str(REPO)}})
    rs = resolve_stage("data", entry)
    with disable_run_logger():
        out = stage_task.fn(stage="data", module=rs.module, config=rs.config_dict, inputs={}, run_dir=str(run_dir),
                            nproc=1, launcher="slurm", nnodes=1, job=rs.job)
    assert out["status"] == "ran" and (run_dir / "data" / "manifest.json").is_file()
    script = (run_dir / ".pipeline" / "data.sbatch").read_text()
    assert "--nnodes=1" in script and "-m stages.data" in script
    log = (run_dir / ".pipeline" / "data.slurm.log").read_text()
    assert "data: wrote" in log


def test_run_kubernetes_applies_waits_and_deletes(tmp_path, monkeypatch):
    from alignline.jobs import run_kubernetes
    from alignline.launch import LaunchError

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    state = tmp_path / "status"
    # kubectl stand-in: records its arguments; `get job` answers "<succeeded>,<failed>" from a file
    # whose lines are consumed one per call (pending, then the final state).
    _stand_in(bin_dir, "kubectl", f'echo "$*" >> {calls}\n'
                                  f'case "$*" in *"get job"*) head -n 1 {state}; sed -i 1d {state} ;;\n'
                                  f'  *logs*) echo "rank 0: CUDA out of memory" ;; *apply*) echo applied ;; esac\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    docs = render_kubernetes(_spec(), KubernetesJob(image="i", pvc="p", namespace="ml"))
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    name = docs[1]["metadata"]["name"]

    state.write_text(",\n1,\n2,\n")
    lines: list[str] = []
    run_kubernetes(manifest, docs, poll_s=0.01, on_line=lines.append)
    made = calls.read_text().splitlines()
    assert made[0] == f"-n ml apply -f {manifest}"
    assert sum("get job" in c for c in made) == 3
    assert made[-1] == f"-n ml delete service {name} --ignore-not-found"
    assert lines[-1] == f"job {name}: 2/2 pods succeeded"

    calls.unlink()
    state.write_text(",\n,1\n")
    with pytest.raises(LaunchError, match="CUDA out of memory") as exc:
        run_kubernetes(manifest, docs, poll_s=0.01)
    assert f"kubernetes job {name} failed" in str(exc.value)
    made = calls.read_text().splitlines()
    assert made[-1] == f"-n ml delete -f {manifest} --ignore-not-found --wait=false"  # no pod left running


@pytest.mark.parametrize(("entry", "expected"), [
    ({"launcher": "kubernetes", "nnodes": 2, "job": {"pvc": "runs"}}, "stages.pretrain.job (launcher kubernetes, "
     "alignline.jobs.KubernetesJob): image: Field required"),
    ({"launcher": "kubernetes", "job": {"image": "i", "pvc": "p", "gpus": 8}}, "gpus: Extra inputs"),
    ({"launcher": "slurm", "job": {}}, "workdir: Field required"),
    ({"nnodes": 2}, "stages.pretrain.nnodes=2 needs launcher: kubernetes or slurm"),
    ({"job": {"image": "i"}}, "stages.pretrain.job is only read by launcher: kubernetes or slurm"),
    ({"launcher": "slurm", "nnodes": 2, "nproc_per_node": 3, "job": {"workdir": "/w"}},
     "stages.pretrain on nproc_per_node=3 x nnodes=2 ranks: train.batch_size"),
])
def test_job_settings_are_checked_before_anything_runs(entry, expected):
    from alignline.config import ConfigError
    from flows.tasks import StageEntry, resolve_stage

    with pytest.raises(ConfigError) as exc:
        resolve_stage("pretrain", StageEntry(config=str(REPO / "configs/pretrain/tiny.yaml"), **entry))
    assert expected in str(exc.value), str(exc.value)


def test_job_names_are_dns_labels():
    name = job_name("My_Run.2026", "rlhf-ppo", "abcdef12-3" + "x" * 80)
    assert len(name) <= 63 and name[0].isalpha() and name == name.lower()
    assert all(c.isalnum() or c == "-" for c in name) and not name.endswith("-") and "--" not in name


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_dir_off_the_runs_volume_is_refused_before_anything_is_submitted(tmp_path, monkeypatch):
    from prefect.logging import disable_run_logger

    from alignline.config import ConfigError
    from flows.tasks import StageEntry, resolve_stage, stage_task

    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl: nothing could be submitted anyway
    entry = StageEntry(config=str(REPO / "configs/data/tiny.yaml"), launcher="kubernetes",
                       job={"image": "i", "pvc": "p", "mount_path": "/runs"})
    rs = resolve_stage("data", entry)
    with disable_run_logger(), pytest.raises(ConfigError, match=r"is not under job.mount_path /runs"):
        stage_task.fn(stage="data", module=rs.module, config=rs.config_dict, inputs={},
                      run_dir=str(tmp_path / "run"), launcher="kubernetes", job=rs.job)
    assert not (tmp_path / "run" / ".pipeline").exists()  # nothing written
