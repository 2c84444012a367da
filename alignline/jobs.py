"""One stage as one multi-node job: torchrun across N nodes on Kubernetes (an Indexed Job) or Slurm.

    spec = JobSpec(stage="pretrain", module="stages.pretrain", args=["--config", cfg, "--run-dir", rd],
                   nnodes=2, nproc_per_node=8, name="tiny-pretrain-1a2b3c")
    docs = render_kubernetes(spec, KubernetesJob(image="registry/alignline:1", pvc="alignline-runs"))
    script = render_slurm(spec, SlurmJob(partition="gpu", workdir="/shared/alignline"), log="run.log")

The templates live in deploy/ (deploy/kubernetes/torchrun-job.yaml.j2, deploy/slurm/torchrun.sbatch.j2)
so a cluster admin can read and adapt them; this module fills them. Every node runs
`python -m torch.distributed.run --nnodes=N --nproc_per_node=G --rdzv_backend=c10d` against the first
node, so node ranks are assigned by the rendezvous and the stage code sees plain torchrun ranks:
rank 0 writes the stage dir, and a rerun resumes from its state/ as on one machine. The pipeline
submits the rendered job (`flows/tasks.py`, `launcher: kubernetes | slurm`) and waits for it.
No Prefect here: this is library code.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from alignline.config import StrictModel

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S_TEMPLATE = DEPLOY / "kubernetes" / "torchrun-job.yaml.j2"
SLURM_TEMPLATE = DEPLOY / "slurm" / "torchrun.sbatch.j2"


class KubernetesJob(StrictModel):
    """`job:` of a pipeline stage with `launcher: kubernetes` (deploy/kubernetes/torchrun-job.yaml.j2)."""

    image: str = Field(..., description="container image with this repository and its dependencies (CUDA torch)")
    namespace: str = Field("default", description="namespace of the Job and its headless Service")
    pvc: str = Field(..., description="PersistentVolumeClaim (ReadWriteMany) holding the run directories")
    mount_path: str = Field("/runs", description="where the claim is mounted; run_dir must lie under it")
    workdir: str = Field("/opt/alignline", description="the repository inside the image (the working directory)")
    cpu: int = Field(16, gt=0, description="CPU cores requested per pod")
    memory: str = Field("200Gi", description="memory requested and limited per pod")
    shm_size: str = Field("64Gi", description="size of /dev/shm (NCCL, DataLoader workers)")
    port: int = Field(29500, gt=0, lt=65536, description="rendezvous port on pod 0")
    service_account: str | None = Field(None, description="pod service account; none = the namespace default")
    node_selector: dict[str, str] = Field(default_factory=dict, description="e.g. {nvidia.com/gpu.product: H100}")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment (NCCL_*, HF_HOME, ...)")
    omp_num_threads: int = Field(4, gt=0, description="OMP_NUM_THREADS per rank")
    ttl_seconds_after_finished: int = Field(86400, ge=0, description="finished Jobs are deleted after this long")
    poll_s: float = Field(10.0, gt=0, description="how often the flow checks the Job's status")


class SlurmJob(StrictModel):
    """`job:` of a pipeline stage with `launcher: slurm` (deploy/slurm/torchrun.sbatch.j2)."""

    workdir: str = Field(..., description="the repository checkout on the shared filesystem (working directory)")
    setup: str = Field("source .venv/bin/activate", description="shell lines run first on every node (venv, modules)")
    python: str = Field("python", description="the interpreter after `setup`")
    partition: str | None = Field(None, description="#SBATCH --partition")
    account: str | None = Field(None, description="#SBATCH --account")
    time: str = Field("24:00:00", description="#SBATCH --time (wall-time limit)")
    mem: str | None = Field("0", description="#SBATCH --mem per node (0 = all of it); none = cluster default")
    cpus_per_task: int = Field(16, gt=0, description="#SBATCH --cpus-per-task (one task per node)")
    port: int = Field(29500, gt=0, lt=65536, description="rendezvous port on the first node")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment (NCCL_*, HF_HOME, ...)")
    omp_num_threads: int = Field(4, gt=0, description="OMP_NUM_THREADS per rank")
    extra_sbatch: list[str] = Field(default_factory=list, description="more #SBATCH lines, e.g. --exclusive")


@dataclass
class JobSpec:
    """What runs: `python -m <module> <args>` as `nproc_per_node` ranks on each of `nnodes` nodes."""

    stage: str
    module: str
    args: list[str]
    nnodes: int
    nproc_per_node: int
    name: str
    extra: dict[str, Any] = field(default_factory=dict)

    def torchrun(self, python: str, endpoint: str) -> list[str]:
        return [python, "-m", "torch.distributed.run", f"--nnodes={self.nnodes}",
                f"--nproc_per_node={self.nproc_per_node}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                f"--rdzv_id={self.name}", "-m", self.module, *self.args]


def job_name(run_name: str, stage_dir: str, attempt: str) -> str:
    """A DNS-1035 label (lower case, digits, '-', <= 63 chars, starting with a letter) for a stage's job."""
    raw = f"al-{run_name}-{stage_dir}-{attempt}".lower()
    clean = "".join(c if c.isalnum() else "-" for c in raw).strip("-")
    while "--" in clean:
        clean = clean.replace("--", "-")
    return clean[:63].rstrip("-")


def _env():
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["shquote"] = lambda s: shlex.quote(str(s))
    return env


def render_kubernetes(spec: JobSpec, job: KubernetesJob) -> list[dict]:
    """The headless Service and the Indexed Job of one stage, as manifests (dicts)."""
    command = spec.torchrun("python", f"{spec.name}-0.{spec.name}:{job.port}")
    text = _env().from_string(K8S_TEMPLATE.read_text(encoding="utf-8")).render(
        name=spec.name, stage=spec.stage, nnodes=spec.nnodes, nproc_per_node=spec.nproc_per_node, job=job,
        command=command)
    return [d for d in yaml.safe_load_all(text) if d]


def render_slurm(spec: JobSpec, job: SlurmJob, log: str | Path) -> str:
    """The sbatch script of one stage (one srun task per node, each a torchrun of nproc_per_node ranks)."""
    cmd = spec.torchrun(job.python, "ENDPOINT")
    line = " ".join('--rdzv_endpoint="$RDZV_ENDPOINT"' if a == "--rdzv_endpoint=ENDPOINT" else shlex.quote(a)
                    for a in cmd)
    return _env().from_string(SLURM_TEMPLATE.read_text(encoding="utf-8")).render(
        name=spec.name, stage=spec.stage, nnodes=spec.nnodes, nproc_per_node=spec.nproc_per_node, job=job,
        log=str(log), command_line=line)


# --------------------------------------------------------------------------- submitting and waiting


def run_slurm(script: Path, *, on_line=None, timeout: float | None = None) -> None:
    """`sbatch --wait script`: blocks until the job ends; a failed job raises LaunchError with the tail
    of its log (#SBATCH --output). Ctrl-C or a cancelled flow run `scancel`s the job."""
    import subprocess

    from alignline.launch import LaunchError, launch

    name = _sbatch_value(script, "--job-name")
    try:
        launch(["sbatch", "--wait", str(script)], on_line=on_line, timeout=timeout)
    except LaunchError as exc:
        log = Path(_sbatch_value(script, "--output"))
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-60:] if log.is_file() else exc.tail
        raise LaunchError(f"slurm job {name} failed ({exc.returncode}); its log {log} ends:\n" + "\n".join(tail),
                          exc.returncode, tail) from None
    except BaseException:
        subprocess.run(["scancel", "--name", name], check=False)
        raise


def _sbatch_value(script: Path, key: str) -> str:
    for line in script.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"#SBATCH {key}="):
            return line.split("=", 1)[1].strip()
    raise ValueError(f"{script} has no #SBATCH {key}=")


def run_kubernetes(manifest: Path, docs: list[dict], *, poll_s: float = 10.0, on_line=None,
                   timeout: float | None = None) -> None:
    """`kubectl apply` the Service + Indexed Job in `manifest`, wait until every pod succeeded, then
    delete the Service. A failed pod fails the Job (backoffLimit 0): LaunchError with the last log
    lines of pod 0. Ctrl-C, a cancelled flow run or `timeout` delete the Job and its pods."""
    import subprocess
    import time

    from alignline.launch import LaunchError

    job = next(d for d in docs if d["kind"] == "Job")
    name, ns, want = job["metadata"]["name"], job["metadata"]["namespace"], job["spec"]["completions"]

    def kubectl(*args: str, check: bool = True) -> str:
        out = subprocess.run(["kubectl", "-n", ns, *args], capture_output=True, text=True, check=False)
        if check and out.returncode != 0:
            raise LaunchError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}", out.returncode,
                              out.stderr.splitlines())
        return out.stdout.strip()

    def delete() -> None:
        kubectl("delete", "-f", str(manifest), "--ignore-not-found", "--wait=false", check=False)

    emit = on_line or (lambda _line: None)
    emit(kubectl("apply", "-f", str(manifest)))
    start = time.monotonic()
    try:
        while True:
            status = kubectl("get", "job", name, "-o", "jsonpath={.status.succeeded},{.status.failed}")
            succeeded, failed = (int(x or 0) for x in (status.split(",") + ["", ""])[:2])
            if succeeded >= want:
                emit(f"job {name}: {succeeded}/{want} pods succeeded")
                break
            if failed:
                tail = kubectl("logs", f"job/{name}", "--tail=60", check=False).splitlines()
                raise LaunchError(f"kubernetes job {name} failed ({failed} pod(s)); pod 0's log ends:\n"
                                  + "\n".join(tail), 1, tail)
            if timeout is not None and time.monotonic() - start > timeout:
                raise LaunchError(f"kubernetes job {name} did not finish in {timeout:.0f}s; deleted", None, [])
            time.sleep(poll_s)
    except BaseException:
        delete()
        raise
    kubectl("delete", "service", name, "--ignore-not-found", check=False)
