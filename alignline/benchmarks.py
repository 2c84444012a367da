"""Standard benchmarks through lm-evaluation-harness (`lm_eval`), on any causal-LM checkpoint.

    from alignline.benchmarks import run_benchmarks
    res = run_benchmarks("runs/tiny/sft/checkpoint", ["alignline_gold", "alignline_pref"],
                         data_dir="runs/tiny/data", limit=32)
    res["tasks"]["alignline_pref"]        # {"acc": 0.81, "acc_stderr": 0.07, "acc_norm": ..., "n": 32, ...}
    alignline eval runs/tiny/sft --tasks alignline_gold,alignline_pref --data runs/tiny/data --limit 32
    alignline eval runs/tiny/sft --tasks hellaswag,arc_easy --limit 100   # online: the harness's own tasks

The harness runs in this process on a model instance we load (`alignline.models.load_causal_lm`, after
`import alignline.model` has registered model type "alignline" with the Auto classes), wrapped in
lm_eval's HFLM. So alignline checkpoints need no trust_remote_code and score exactly as their Llama
export does (`alignline convert --to llama`, which the bare `lm_eval --model hf` CLI can load); any
other transformers causal LM (Llama, Qwen2, GPT-2, ...) works the same way. A PEFT adapter directory is
refused: evaluate the merged checkpoint next to it.

Task names resolve against lm_eval's own tasks (hellaswag, arc_easy, gsm8k, mmlu, ...; their data
comes from the Hugging Face Hub, so they need network or a filled datasets cache) plus ours, the YAMLs
in alignline/lm_eval_tasks/ built from the built-in suite of a data stage directory (`data_dir`):

    alignline_gold  generate_until: the held-out prompts answered greedily, exact match (the evaluate
                    stage's gold accuracy with the "Q: ... A:" prompt format, see its YAML)
    alignline_pref  multiple_choice: the held-out preference pairs, chosen vs rejected by log-likelihood

Their YAMLs name the data files relative to a data stage directory; `_our_task_config` reads the YAML
and makes them absolute under `data_dir` at run time, handing lm_eval the config dict (a run's data
lives in the run, not in the package). An unknown task name is a UserError listing close matches; a
harness task whose dataset cannot be fetched (offline) is one UserError naming it.

Results are compact: {"tasks": {task: {metric: value, metric_stderr: value, "n": docs evaluated,
"version": task version}}, "lm_eval": harness version, "checkpoint", "limit", "num_fewshot"}.
Metrics of a filter other than lm_eval's "none" carry its name: gsm8k's `exact_match_strict_match`.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from alignline.config import InputError, UserError

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# The metric each task reports first (the headline one); others: the first metric lm_eval reports.
PRIMARY_METRIC = {"alignline_gold": "exact_match", "alignline_pref": "acc"}


def our_tasks() -> dict[str, Path]:
    """{task name: YAML path} of the offline tasks shipped in alignline/lm_eval_tasks/."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError as exc:  # an optional extra: the base install does not carry it
        raise UserError("lm-evaluation-harness is not installed; install it with pip install 'alignline[eval]' "
                        "(or leave lm_eval.tasks empty)") from exc
    return lm_eval


@cache
def harness_task_names() -> tuple[str, ...]:
    """Every task, group and tag name lm_eval knows (indexing its ~15k YAMLs takes seconds: cached)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return tuple(TaskManager().all_tasks)


def check_tasks(tasks: Sequence[str], data_dir: str | Path | None = None, missing_fields_ok: bool = False) -> None:
    """Raise a UserError, before any model is loaded, for an empty list, an unknown task name (with
    close matches), or one of our offline tasks without a data stage directory holding its files, or (unless
    missing_fields_ok: the caller skips those tasks itself) whose files lack a field the task reads."""
    names = [t.strip() for t in tasks]
    if not names or any(not n for n in names):
        raise UserError(f"tasks: give one or more task names (got {list(tasks)!r})")
    ours = our_tasks()
    theirs = [n for n in names if n not in ours]
    if theirs:
        # alignline_* is our namespace: a misspelt one of ours is unknown without indexing the harness.
        mine_unknown = [n for n in theirs if n.startswith("alignline")]
        known = set(harness_task_names()) if len(mine_unknown) < len(theirs) else set()
        unknown = [n for n in theirs if n not in known]
        if unknown:
            pool = [*ours, *known]
            hints = []
            for n in unknown:
                close = difflib.get_close_matches(n, pool, n=4, cutoff=0.6)
                hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise UserError(f"unknown lm-eval task {', '.join(hints)}; ours: {', '.join(ours)}; the harness's: "
                            "`lm_eval ls tasks` (e.g. hellaswag, arc_easy, gsm8k)")
    mine = [n for n in names if n in ours]
    if mine:
        if data_dir is None:
            raise UserError(f"tasks {', '.join(mine)} run on a data stage's held-out files: give its directory "
                            "(alignline eval --data runs/<name>/data)")
        for n in mine:
            for rel in _data_files(n).values():
                if not (Path(data_dir) / rel).is_file():
                    raise UserError(f"task {n} needs {Path(data_dir) / rel}, which does not exist; --data must be a "
                                    "data stage directory of the built-in suite (alignline stage data --run-dir ...)")
        unusable = {} if missing_fields_ok else missing_fields(mine, data_dir)
        if unusable:
            raise UserError("; ".join(f"task {t} cannot run on this data: {why}" for t, why in unusable.items()))


# Fields each of our tasks reads from every row of its files (the built-in suite writes them all; a user's
# own data may have no answers, i.e. no verifier, or no preference pairs).
REQUIRED_FIELDS = {"alignline_gold": ("prompt", "answer"), "alignline_pref": ("prompt", "chosen", "rejected")}


def missing_fields(tasks: Sequence[str], data_dir: str | Path) -> dict[str, str]:
    """{our task: why it cannot run on this data stage} for each task whose files lack a field it reads."""
    import json

    out: dict[str, str] = {}
    for task in (t for t in tasks if t in our_tasks()):
        for rel in _data_files(task).values():
            path = Path(data_dir) / rel
            with open(path, encoding="utf-8") as f:
                first = next((json.loads(line) for line in f if line.strip()), {})
            absent = [k for k in REQUIRED_FIELDS.get(task, ()) if first.get(k) is None]
            if absent:
                out[task] = f"{path} has no {', '.join(absent)} (e.g. prompts without a verifier)"
                break
    return out


def _data_files(task: str) -> dict[str, str]:
    return dict(yaml.safe_load(our_tasks()[task].read_text(encoding="utf-8"))["dataset_kwargs"]["data_files"])


def _fitting_pairs(tokenizer, max_length: int, dropped: dict[str, int]):
    """lm_eval `process_docs` for alignline_pref: keep the pairs whose every answer fits the model's context
    (the harness left-truncates a long prompt but asserts on a continuation longer than max_length; a user's
    data, e.g. Alpaca responses, can exceed a small model's context). Counts the rest in `dropped`."""

    def keep(doc) -> bool:
        return all(len(tokenizer(" " + doc[k][-1]["content"], add_special_tokens=False)["input_ids"]) < max_length
                   for k in ("chosen", "rejected"))

    def process(dataset):
        kept = dataset.filter(keep)
        dropped[str(dataset.split)] = len(dataset) - len(kept)
        return kept

    return process


def _our_task_config(task: str, data_dir: str | Path, chat: bool = False, fits=None) -> dict[str, Any]:
    """Our task's YAML as a config dict, its data files made absolute under `data_dir`. chat: the prompt is the
    bare question (the user turn the chat template wraps, as the evaluate stage asks chat models), not the
    plain-text "Q: ... A:" frame a base model continues."""
    cfg = yaml.safe_load(our_tasks()[task].read_text(encoding="utf-8"))
    root = Path(data_dir).resolve()
    cfg["dataset_kwargs"]["data_files"] = {split: str(root / rel) for split, rel in _data_files(task).items()}
    if chat:
        cfg["doc_to_text"] = "{{prompt[-1].content}}"
    if fits is not None and task == "alignline_pref":
        cfg["process_docs"] = fits
    return cfg


def resolve_checkpoint(path: str | Path) -> Path:
    """The HF model directory to evaluate: `path`, or `path/checkpoint` for a stage directory.
    InputError for a PEFT adapter (evaluate the merged model) or a directory without a model."""
    p = Path(path)
    if not (p / "config.json").is_file() and (p / "checkpoint" / "config.json").is_file():
        p = p / "checkpoint"
    if (p / "adapter_config.json").is_file():
        raise InputError(f"{p} is a PEFT adapter, not a model; evaluate the merged model instead: the lora, sft and "
                         "reward stages write it to <stage dir>/checkpoint next to the adapter (or merge it yourself "
                         "with peft's merge_and_unload() and save_pretrained())")
    if not (p / "config.json").is_file():
        raise InputError(f"{p} has no config.json: give a save_pretrained() checkpoint directory or a stage directory "
                         "holding checkpoint/")
    return p


@contextlib.contextmanager
def _quiet(level: int = logging.ERROR) -> Iterator[None]:
    """lm_eval logs every request batch and warns that a model instance ignores its loading arguments
    (we load the model ourselves, on purpose); keep our logs readable."""
    from datasets.utils import logging as ds_logging

    logger = logging.getLogger("lm_eval")
    before, bars = logger.level, ds_logging.is_progress_bar_enabled()
    logger.setLevel(max(level, before))
    ds_logging.disable_progress_bar()  # "Generating test split" for every local JSON file
    try:
        yield
    finally:
        logger.setLevel(before)
        if bars:
            ds_logging.enable_progress_bar()


def _load_tasks(names: list[str], data_dir: str | Path | None, chat: bool = False, fits=None):
    """(TaskManager, the built top-level tasks/groups): datasets are loaded here, so a harness task whose
    data cannot be fetched fails here, as one UserError, before any model work."""
    from lm_eval.tasks import TaskManager

    ours = our_tasks()
    # Indexing the harness's own YAMLs costs seconds; our tasks alone do without it.
    tm = TaskManager(include_defaults=any(n not in ours for n in names))
    built: list[Any] = []
    for name in names:
        try:  # building a task loads (downloads) its dataset
            one = tm.load([_our_task_config(name, data_dir, chat, fits) if name in ours else name])
        except OSError as exc:  # OfflineModeIsEnabled (a ConnectionError), DatasetNotFoundError, no route to host
            if name in ours:
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise UserError(f"lm-eval task {name}: its dataset could not be loaded ({type(exc).__name__}: {first}); "
                            "the harness's own tasks download their data from the Hugging Face Hub: run once with "
                            "network access (HF_DATASETS_OFFLINE and HF_HUB_OFFLINE unset) to fill the datasets "
                            f"cache, or use our offline tasks ({', '.join(ours)})") from exc
        built += _top_level(one)
    return tm, built


def _top_level(loaded: dict[str, Any]) -> list[Any]:
    """The groups not inside another group, plus the tasks outside any group (what simple_evaluate takes)."""
    inside = {t.task_name for g in loaded["groups"].values() for t in g.get_all_tasks()}
    subgroups = {s.name for g in loaded["groups"].values() for s in g.get_all_groups()}
    return [*(g for name, g in loaded["groups"].items() if name not in subgroups),
            *(t for name, t in loaded["tasks"].items() if name not in inside)]


def _metric_name(key: str) -> tuple[str, str] | None:
    """lm_eval's "acc,none" -> ("acc", "acc"); "exact_match,strict-match" -> ("exact_match", "exact_match_strict_match")."""
    if "," not in key:
        return None
    metric, flt = key.split(",", 1)
    base = metric[: -len("_stderr")] if metric.endswith("_stderr") else metric
    name = base if flt == "none" else f"{base}_{flt.replace('-', '_')}"
    return metric, name + ("_stderr" if metric.endswith("_stderr") else "")


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None  # lm_eval writes "N/A" for a stderr it did not compute
    return f if math.isfinite(f) else None


def compact_results(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: {metric: value, metric_stderr: value, "n": docs, "version": v}} from simple_evaluate's output."""
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in raw.get("results", {}).items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            named = _metric_name(key)
            if named is not None:
                row[named[1]] = _number(value)
        n = raw.get("n-samples", {}).get(task, {})
        if n:
            row["n"] = int(n.get("effective", n.get("original", 0)))
        if task in raw.get("versions", {}):
            row["version"] = raw["versions"][task]
        out[task] = row
    return out


def primary_metric(task: str, row: dict[str, Any]) -> str | None:
    """The one metric of a task for a headline: ours by name, else the first value lm_eval reports."""
    if task in PRIMARY_METRIC and PRIMARY_METRIC[task] in row:
        return PRIMARY_METRIC[task]
    return next((k for k, v in row.items() if k not in ("n", "version", "alias") and not k.endswith("_stderr")
                 and isinstance(v, float)), None)


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    samples: bool = False,
    chat_template: bool = False,
) -> dict[str, Any]:
    """Run lm_eval `tasks` on a loaded causal LM (on its device, in eval mode); the compact results.
    `samples=True` adds lm_eval's per-document records under "samples" ({task: [{doc_id, target,
    filtered_resps}]}: per choice (log-likelihood, is-greedy) for multiple choice, the text otherwise)."""
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    names = [t.strip() for t in tasks]
    check_tasks(names, data_dir)
    was_training = model.training
    model.eval()
    try:
        with _quiet():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            dropped: dict[str, int] = {}
            tm, built = _load_tasks(names, data_dir, chat_template, _fitting_pairs(tokenizer, lm.max_length, dropped))
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=built, task_manager=tm, num_fewshot=num_fewshot, limit=limit, log_samples=samples,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                apply_chat_template=chat_template,
            )
    finally:
        model.train(was_training)
    tasks_out = compact_results(raw)
    if "alignline_pref" in tasks_out and dropped.get("test"):  # test pairs that did not fit (not scored)
        tasks_out["alignline_pref"]["over_max_length"] = dropped["test"]
    out: dict[str, Any] = {"tasks": tasks_out, "lm_eval": getattr(lm_eval, "__version__", None),
                           "limit": limit, "num_fewshot": num_fewshot, "chat_template": chat_template}
    if samples:
        out["samples"] = {t: [{"doc_id": s["doc_id"], "target": s["target"], "filtered_resps": s["filtered_resps"]}
                              for s in rows] for t, rows in raw.get("samples", {}).items()}
    return out


def run_benchmarks(
    checkpoint: str | Path,
    tasks: Sequence[str],
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
    samples: bool = False,
    chat_template: bool = False,
) -> dict[str, Any]:
    """Run lm_eval `tasks` on the causal LM in `checkpoint` (a model dir, or a stage dir holding
    checkpoint/) and return the compact results (module docstring), with "checkpoint" added.

    tasks: our offline task names (need `data_dir`, a data stage directory) and/or the harness's.
    limit: first N documents per task (None: all). num_fewshot: examples in context (None: each task's
    default, 0 for ours; drawn from the validation split with `seed`). device: auto | cpu | cuda.
    chat_template: render each prompt as a user turn through the tokenizer's chat template (lm_eval's
    apply_chat_template), as chat models are asked; False: the task's plain text prompt.
    Every problem found before loading the model (task names, data files, adapter dir) is a UserError.
    """
    from alignline.distributed import pick_device
    from alignline.models import load_causal_lm

    _require_lm_eval()
    names = [t.strip() for t in tasks]
    check_tasks(names, data_dir)
    ckpt = resolve_checkpoint(checkpoint)
    dev = pick_device(device)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    model = load_causal_lm(ckpt, device=dev)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{ckpt}: the tokenizer has no chat template; evaluate without --chat-template")
    out = evaluate_model(model, tokenizer, names, data_dir=data_dir, limit=limit, num_fewshot=num_fewshot,
                         batch_size=batch_size, seed=seed, samples=samples, chat_template=chat_template)
    return {"checkpoint": str(ckpt), **out}
