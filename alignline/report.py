"""The run report card: markdown, metric tables, curves (PNG) and side-by-side samples, no Prefect.

    records = [StageRecord("pretrain", "ran", wall_s=41.2, path="runs/tiny/pretrain", headline={...}), ...]
    card = build_report(run_dir, records, title="tiny", notes=["gate: ..."])
    card.markdown          # also written to <run_dir>/report.md
    card.metrics_rows      # [{"stage", "metric", "value"}], for a table artifact
    card.sample_rows       # [{"prompt", "answer", "<stage>": response, ...}] on the fixed test prompts
    card.plots             # {"loss": <run_dir>/report/loss.png, "reward": ..., "kl": ...}

It reads only the stage directories (manifest.json headline, eval.json, metrics.jsonl,
samples.jsonl), so `alignline report RUN_DIR` rebuilds report.md for any run.
The flows publish the same content as Prefect artifacts.

Variants: a record is named by its output dir (`rlhf-ppo`; `StageRecord.stage` is the pipeline
stage, `rlhf`). `build_report` adds a "kept" row for every other complete variant of that stage
in the run dir (`rlhf-dpo/` from an earlier run with `algorithm: dpo`), so alternatives compare
side by side (table, curves, samples), and a "Variants" section says which one this run selected
(the one its evaluate stage and gates used).
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alignline.degeneration import output_stats
from alignline.files import write_text

# Curve kinds: a metrics.jsonl key goes into the first kind whose marker it contains.
CURVE_KINDS: dict[str, tuple[str, ...]] = {
    "kl": ("kl",),
    "accuracy": ("accuracy", "win_rate"),
    "reward": ("reward", "score"),
    "loss": ("loss",),
}
# Spread statistics (TRL's min/max reward, a std) stay in metrics.jsonl: on a chart with every stage
# overlaid they are clutter, not a curve to follow.
CURVE_SKIP = ("min_", "max_", "_std")
STATUS_ICON = {"ran": "ran", "cached": "cached (reused)", "failed": "FAILED", "gated": "stopped by gate",
               "skipped": "skipped", "pending": "not run", "running": "running",
               "kept": "kept, not current"}
# Statuses whose stage dir holds a finished output (its checkpoint is linked).
FINISHED = ("ran", "cached", "kept")


@dataclass
class StageRecord:
    """What the pipeline knows about one stage of a run."""

    name: str  # the output dir name: `rlhf-ppo` for a stage with variants, else the stage
    status: str = "pending"  # ran | cached | failed | gated | skipped | pending | running | kept
    wall_s: float | None = None
    path: str | None = None
    headline: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    stage: str | None = None  # the pipeline stage (`rlhf`) when `name` is one of its variants

    @property
    def kind(self) -> str:
        return self.stage or self.name

    @property
    def is_variant(self) -> bool:
        return self.kind != self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReportCard:
    markdown: str
    metrics_rows: list[dict[str, Any]]
    sample_rows: list[dict[str, Any]]
    plots: dict[str, Path]
    path: Path
    records: list[StageRecord] = field(default_factory=list)  # the rows, kept variants included
    health: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> degeneration detectors
    fits: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # stage -> split -> length fit
    estimates: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # stage -> metric -> n, CI
    benchmarks: list[dict[str, Any]] = field(default_factory=list)  # lm-eval scores (benchmark_rows)


# --------------------------------------------------------------------------- reading stage dirs


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # A stage killed mid-write leaves a partial last line; the rest is still valid.
                continue
    return rows


def metrics_path(stage_dir: Path) -> Path:
    """metrics.jsonl of a finished stage, or of the running one (still in .staging/)."""
    final = stage_dir / "metrics.jsonl"
    return final if final.is_file() else stage_dir / ".staging" / "metrics.jsonl"


def read_metrics(stage_dir: str | Path) -> list[dict[str, Any]]:
    return _read_jsonl(metrics_path(Path(stage_dir)))


def read_headline(stage_dir: str | Path) -> dict[str, Any]:
    """Headline metrics from manifest.json (falls back to nothing for an unfinished stage)."""
    p = Path(stage_dir) / "manifest.json"
    if not p.is_file():
        return {}
    try:
        return dict(json.loads(p.read_text(encoding="utf-8")).get("headline", {}))
    except json.JSONDecodeError:
        return {}


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, ensure_ascii=False)[:80]
    return str(v)


def _cell(text: Any, width: int = 60) -> str:
    s = _fmt(text) if not isinstance(text, str) else text
    s = s.replace("|", "\\|").replace("\n", " ⏎ ")
    return s if len(s) <= width else s[: width - 1] + "…"


# --------------------------------------------------------------------------- curves


def curve_series(run_dir: Path, stages: list[str]) -> dict[str, list[tuple[str, list[float], list[float]]]]:
    """{kind: [(label, steps, values)]} from every stage's metrics.jsonl (numeric keys only)."""
    out: dict[str, list[tuple[str, list[float], list[float]]]] = {k: [] for k in CURVE_KINDS}
    for stage in stages:
        rows = read_metrics(run_dir / stage)
        keys: list[str] = []
        for r in rows:
            for k, v in r.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and k not in keys:
                    keys.append(k)
        for key in keys:
            kind = next((kd for kd, marks in CURVE_KINDS.items() if any(m in key.lower() for m in marks)), None)
            if kind is None or any(m in key.lower() for m in CURVE_SKIP):
                continue
            pts = [(float(r.get("step", i)), float(r[key])) for i, r in enumerate(rows)
                   if isinstance(r.get(key), int | float) and math.isfinite(float(r[key]))]
            if len(pts) >= 1:
                out[kind].append((f"{stage}/{key}", [p[0] for p in pts], [p[1] for p in pts]))
    return {k: v for k, v in out.items() if v}


def plot_curves(run_dir: str | Path, stages: list[str], out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write one PNG per curve kind (loss, accuracy, reward, kl) into `<run_dir>/report/`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    styles = ["-", "--", ":", "-."]
    for kind, series in curve_series(run_dir, stages).items():
        # One chart per metric kind, every stage overlaid (a colour per stage, a line style per key), so
        # pretrain, SFT and RLHF losses read against each other. Sized for the Prefect UI, which shows
        # the PNG at about its pixel width: 11-12 px tick labels.
        owners = list(dict.fromkeys(label.split("/", 1)[0] for label, _, _ in series))
        colours = {o: f"C{i % 10}" for i, o in enumerate(owners)}
        keys_seen: dict[str, list[str]] = {o: [] for o in owners}
        fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=110)
        for label, xs, ys in series:
            owner, key = label.split("/", 1)
            keys_seen[owner].append(key)
            ax.plot(xs, ys, label=label, linewidth=1.3, color=colours[owner],
                    linestyle=styles[(len(keys_seen[owner]) - 1) % len(styles)],
                    marker="." if len(xs) < 20 else None)
        spans = [max(xs) for _, xs, _ in series if xs]
        if spans and min(spans) > 0 and max(spans) / min(spans) > 20:
            ax.set_xscale("symlog", linthresh=10)  # 800 pretraining steps next to 30 PPO iterations
        ax.set_xlabel("step", fontsize=11)
        ax.set_ylabel(kind, fontsize=11)
        ax.set_title(f"{kind}: " + ", ".join(owners), fontsize=12)
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = out_dir / f"{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        paths[kind] = path
    return paths


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# --------------------------------------------------------------------------- tables


def metrics_rows(records: list[StageRecord]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        for k, v in rec.headline.items():
            rows.append({"stage": rec.name, "metric": k, "value": v if isinstance(v, int | float | str) else _fmt(v)})
    return rows


def _prompt_text(sample: dict[str, Any]) -> str:
    p = sample.get("prompt", "")
    if isinstance(p, list):  # a conversation: show the last user turn
        p = p[-1].get("content", "") if p and isinstance(p[-1], dict) else json.dumps(p)
    return str(p)


def sample_rows(run_dir: str | Path, stages: list[str], limit: int = 8) -> list[dict[str, Any]]:
    """The same fixed prompts, one column per stage that wrote samples.jsonl."""
    run_dir = Path(run_dir)
    by_stage = {s: _read_jsonl(run_dir / s / "samples.jsonl") for s in stages}
    by_stage = {s: rows for s, rows in by_stage.items() if rows and s != "evaluate"}
    table: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for stage, rows in by_stage.items():
        for sample in rows:
            prompt = _prompt_text(sample)
            if prompt not in table:
                if len(order) >= limit:
                    continue
                table[prompt] = {"prompt": prompt, "answer": sample.get("answer") or ""}
                order.append(prompt)
            table[prompt][stage] = sample.get("response", sample.get("completion", ""))
    return [table[p] for p in order]


def responses(stage_dir: str | Path) -> list[str]:
    """The responses a stage wrote to samples.jsonl (greedy answers on the fixed test prompts)."""
    return [str(s.get("response", s.get("completion", ""))) for s in _read_jsonl(Path(stage_dir) / "samples.jsonl")]


def read_eval(stage_dir: str | Path) -> dict[str, Any]:
    """A stage's eval.json ({} when missing or unreadable: an unfinished stage has none)."""
    p = Path(stage_dir) / "eval.json"
    if not p.is_file():
        return {}
    try:
        ev = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return ev if isinstance(ev, dict) else {}


def eval_sections(run_dir: str | Path, stages: list[str], key: str) -> dict[str, dict[str, Any]]:
    """{stage: eval.json[key]} for every stage whose eval.json has a non-empty dict under `key`:
    `length_fit` ({split: fit}: examples over max_length, alignline.chat.length_fit) or `estimates`
    ({metric: {value, n, low, high}}: held-out proportions, alignline.evaluation.estimate)."""
    out = {}
    for stage in stages:
        section = read_eval(Path(run_dir) / stage).get(key)
        if isinstance(section, dict) and section:
            out[stage] = section
    return out


def benchmark_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lm-evaluation-harness scores of the evaluate stage (eval.json `stages.<stage>.lm_eval`), one row
    per task and metric: {"task", "metric", "n", <stage>: value, <stage>_stderr: value, ...}."""
    stages = read_eval(Path(run_dir) / "evaluate").get("stages")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for stage, ev in (stages if isinstance(stages, dict) else {}).items():
        tasks = ev.get("lm_eval") if isinstance(ev, dict) else None
        for task, metrics in (tasks if isinstance(tasks, dict) else {}).items():
            for metric, value in metrics.items():
                if metric in ("n", "version", "alias") or metric.endswith("_stderr"):
                    continue
                row = rows.setdefault((task, metric), {"task": task, "metric": metric, "n": metrics.get("n")})
                row[stage] = value
                row[f"{stage}_stderr"] = metrics.get(f"{metric}_stderr")
    return list(rows.values())


# The rows of the student-vs-teacher table: (label, eval.json key of each model's section).
DISTILL_ROWS = [("parameters", "params"), ("generation tokens/s", "gen_tokens_per_s"), ("val loss", "val_loss"),
                ("gold accuracy", "gold_accuracy"), ("RM score", "rm_score")]


def distill_table(run_dir: str | Path, stages: list[str]) -> list[dict[str, Any]]:
    """The distill stage's student beside its teacher, one row per measurement (eval.json `student` /
    `teacher`), then the student's closeness to the teacher; [] without a finished distill stage."""
    if "distill" not in stages:
        return []
    ev = read_eval(Path(run_dir) / "distill")
    s, t = ev.get("student"), ev.get("teacher")
    if not isinstance(s, dict) or not isinstance(t, dict):
        return []
    rows = [{"metric": label, "student": s.get(key), "teacher": t.get(key)} for label, key in DISTILL_ROWS
            if key in s or key in t]
    rows += [{"metric": label, "student": ev.get(key), "teacher": None} for label, key in (
        ("KL(student ‖ teacher), nats per answer", "kl_student_teacher"),
        ("loss on the teacher's answers", "teacher_answer_loss"), ("same answer as the teacher", "agreement"))
        if key in ev]
    return rows


def measurement_notes(run_dir: str | Path, stages: list[str]) -> list[str]:
    """What the run could not measure, and why: prompts without a verifier (no gold accuracy),
    on-policy reward pairs skipped for the same reason."""
    notes = []
    no_verifier = [s for s in stages if s != "data" and read_eval(Path(run_dir) / s).get("verifier") == "none"]
    if no_verifier:
        notes.append(f"no verifier: the prompts have no gold answers, so gold accuracy is not measured "
                     f"({', '.join(no_verifier)}); RM scores, win rates and the detectors below are what "
                     "there is. Give prompts with an answer column (files.prompts) to measure it")
    for s in stages:
        onpolicy = read_eval(Path(run_dir) / s).get("onpolicy")
        if isinstance(onpolicy, dict) and onpolicy.get("skipped"):
            notes.append(f"{s}: on-policy pairs skipped ({onpolicy['skipped']})")
    return notes


def output_health(run_dir: str | Path, stages: list[str]) -> dict[str, dict[str, Any]]:
    """The degeneration detectors (alignline.degeneration) of every stage that wrote samples.jsonl."""
    out = {}
    for stage in stages:
        texts = responses(Path(run_dir) / stage)
        if texts and stage != "evaluate":
            out[stage] = output_stats(texts)
    return out


# --------------------------------------------------------------------------- markdown


def render_markdown(
    records: list[StageRecord],
    *,
    title: str,
    notes: list[str] | None = None,
    plots: dict[str, Path] | None = None,
    samples: list[dict[str, Any]] | None = None,
    run_dir: Path | None = None,
    embed_images: bool = False,
    health: dict[str, dict[str, Any]] | None = None,
    fits: dict[str, dict[str, dict[str, Any]]] | None = None,
    estimates: dict[str, dict[str, dict[str, Any]]] | None = None,
    benchmarks: list[dict[str, Any]] | None = None,
    distill: list[dict[str, Any]] | None = None,
) -> str:
    """The report card. Images are relative links (report.md) or data URIs (`embed_images`)."""
    lines = [f"# alignline report card: {title}", ""]
    if run_dir is not None:
        lines += [f"Run directory: `{run_dir}`", ""]
    for note in notes or []:
        lines.append(f"> **{note}**")
    if notes:
        lines.append("")
    lines += ["## Stages", "", "| stage | status | wall time | headline metrics | checkpoint |",
              "|---|---|---|---|---|"]
    for rec in records:
        wall = f"{rec.wall_s:.1f} s" if rec.wall_s is not None else "-"
        head = ", ".join(f"{k}={_fmt(v)}" for k, v in rec.headline.items()) or "-"
        ckpt = "-"
        if rec.path and rec.status in FINISHED:
            ck = Path(rec.path) / "checkpoint"
            ckpt = f"`{_short(ck if ck.is_dir() else Path(rec.path), run_dir)}`"
        status = STATUS_ICON.get(rec.status, rec.status)
        if rec.message and rec.status != "ran":  # why a stage ran gets its own section below
            status += f" ({_cell(rec.message, 80)})"
        lines.append(f"| {rec.name} | {status} | {wall} | {_cell(head, 1000)} | {ckpt} |")
    lines.append("")
    lines += _variants_section(records)
    # Why each stage ran in full (the table cell is cut): which input or data file changed.
    why = [rec for rec in records if rec.status == "ran" and rec.message]
    if why:
        lines += ["## Why stages ran", ""]
        lines += [f"- **{rec.name}**: {rec.message.replace(chr(10), ' ')}" for rec in why]
        lines.append("")
    if plots:
        lines += ["## Curves", ""]
        for kind, path in plots.items():
            src = png_data_uri(path) if embed_images else (
                str(Path(path).relative_to(run_dir)) if run_dir and Path(path).is_relative_to(run_dir) else str(path))
            lines += [f"### {kind}", "", f"![{kind}]({src})", ""]
    cut = [(stage, split, f) for stage, by in (fits or {}).items() for split, f in by.items() if f.get("over_max_length")]
    if cut:
        lines += ["## Examples longer than max_length", "",
                  "| stage | split | examples | longer | share | longest | max_length | what happens |",
                  "|---|---|---|---|---|---|---|---|"]
        for stage, split, f in cut:
            what = f["action"]
            if f.get("identical_after_truncation"):
                what += f"; {f['identical_after_truncation']} pairs identical after the cut"
            if f.get("prompt_fills_max_length"):
                what += f"; {f['prompt_fills_max_length']} prompts fill max_length (nothing to train on)"
            lines.append(f"| {stage} | {split} | {f['n']} | {f['over_max_length']} | {f['share']:.1%} | "
                         f"{f['longest']} | {f['max_length']} | {what} |")
        lines.append("")
        lines += [f"> **WARNING: {stage} {split}: {f['share']:.0%} of the examples are longer than max_length and "
                  f"are {f['action']}; raise {stage}'s {f.get('key', 'max_length')}**" for stage, split, f in cut if f["share"] > 0.05]
        lines.append("")
    rows = [(stage, name, e) for stage, by in (estimates or {}).items() for name, e in by.items()
            if isinstance(e, dict) and e.get("n")]
    if rows:
        lines += ["## Held-out measurements", "",
                  "Measured on held-out data, with the number of examples and a 95% interval (Wilson for "
                  "proportions, normal for means): a difference inside the interval is not a difference.", "",
                  "| stage | metric | value | n | 95% interval |", "|---|---|---|---|---|"]
        for stage, name, e in rows:
            lines.append(f"| {stage} | {name} | {_fmt(float(e['value']))} | {e['n']} | "
                         f"{_fmt(float(e['low']))} – {_fmt(float(e['high']))} |")
        lines.append("")
    if benchmarks:
        cols = [s for s in dict.fromkeys(k for row in benchmarks for k in row
                                         if k not in ("task", "metric", "n") and not k.endswith("_stderr"))]
        lines += ["## Standard benchmarks (lm-evaluation-harness)", "",
                  "Scored by lm-evaluation-harness in the evaluate stage (alignline/benchmarks.py), value ± standard "
                  "error over n documents; alignline_* tasks run on this run's held-out data.", "",
                  "| task | metric | n | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
        for row in benchmarks:
            cells = []
            for c in cols:
                v, se = row.get(c), row.get(f"{c}_stderr")
                cells.append("-" if v is None else _fmt(v) + (f" ± {_fmt(se)}" if se is not None else ""))
            lines.append(f"| {row['task']} | {row['metric']} | {row.get('n') or '-'} | " + " | ".join(cells) + " |")
        lines.append("")
    if distill:
        lines += ["## Distillation: student beside teacher", "",
                  "The distill stage's student and its teacher on the same held-out data (stages/distill.py).", "",
                  "| metric | student | teacher |", "|---|---|---|"]
        for row in distill:
            cells = ["-" if row[c] is None else _fmt(row[c]) for c in ("student", "teacher")]
            lines.append(f"| {row['metric']} | " + " | ".join(cells) + " |")
        lines.append("")
    if health:
        lines += ["## Are the answers still answers?", "",
                  "Degeneration detectors on each stage's samples (alignline/degeneration.py): a collapsed policy "
                  "repeats one string (identical share up), loops (repeated 3-grams up) or loses variety "
                  "(distinct-2 down).", "",
                  "| stage | n | mean length | distinct-1 | distinct-2 | repeated 3-grams | identical share | empty |",
                  "|---|---|---|---|---|---|---|---|"]
        for stage, h in health.items():
            cells = [h["n"], h["mean_length"], h["distinct_1"], h["distinct_2"], h["repeated_3gram_rate"],
                     h["identical_share"], h["empty_share"]]
            lines.append(f"| {stage} | " + " | ".join("-" if c is None else _fmt(c) for c in cells) + " |")
        lines.append("")
    if samples:
        names = [r.name for r in records] + [k for row in samples for k in row if k not in ("prompt", "answer")]
        stage_cols = [s for s in dict.fromkeys(names) if any(s in row for row in samples)]
        # A gold-answer column only where the prompts have answers (a user's own prompts may not).
        answers = any(row.get("answer") not in (None, "") for row in samples)
        lines += ["## Samples on held-out prompts", "",
                  "| prompt | " + ("answer | " if answers else "") + " | ".join(stage_cols) + " |",
                  "|---|" + ("---|" if answers else "") + "---|" * len(stage_cols)]
        for row in samples:
            cells = [_cell(row.get("prompt", ""), 70)] + ([_cell(row.get("answer", ""), 30)] if answers else [])
            cells += [_cell(row.get(s, ""), 50) for s in stage_cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _short(path: Path, run_dir: Path | None) -> str:
    """A stage path relative to the run directory (named above the table), so the column fits."""
    if run_dir is not None and path.is_relative_to(run_dir):
        return str(path.relative_to(run_dir))
    return str(path)


def _variants_section(records: list[StageRecord]) -> list[str]:
    """Which variant of a stage this run selected, and which others the run dir keeps."""
    kinds = list(dict.fromkeys(r.kind for r in records if r.is_variant))
    if not kinds:
        return []
    lines = ["## Variants", ""]
    for kind in kinds:
        current = [r for r in records if r.kind == kind and r.status != "kept"]
        kept = [r for r in records if r.kind == kind and r.status == "kept"]
        if len(current) == 1:
            head = (f"- **{kind}**: this run selects `{current[0].name}` (current: the one evaluated, gated and "
                    "used downstream)")
        elif current:  # rebuilt from a run dir that does not record which one was selected
            head = f"- **{kind}**: " + ", ".join(f"`{r.name}`" for r in current) + " (which one is current is not recorded)"
        else:
            head = f"- **{kind}**: no variant selected by this run"
        if kept:
            head += "; also in the run directory, from earlier runs: " + ", ".join(f"`{r.name}`" for r in kept)
        lines.append(head)
    lines.append("")
    return lines


def other_variant_records(run_dir: str | Path, records: list[StageRecord]) -> list[StageRecord]:
    """Records (status "kept") for the complete variants of a stage that this run did not select, and for
    a pre-variant `<stage>/` dir left in place, in a run dir where `records` hold the selected variant."""
    from alignline.artifacts import is_complete, variant_dirs

    run_dir = Path(run_dir)
    have = {r.name for r in records}
    out: list[StageRecord] = []
    for kind in dict.fromkeys(r.kind for r in records if r.is_variant):
        current = next(r.name for r in records if r.kind == kind)
        legacy = run_dir / kind
        found = [*variant_dirs(run_dir, kind), *([legacy] if kind not in have and is_complete(legacy) else [])]
        for d in found:
            if d.name in have:
                continue
            what = ("pre-variant output dir, left in place, not used" if d == legacy
                    else f"an earlier result; this run selects {current}")
            out.append(StageRecord(d.name, "kept", wall_s=_wall_time(d), path=str(d), headline=read_headline(d),
                                   message=what, stage=kind))
    return out


def _wall_time(stage_dir: Path) -> float | None:
    """wall_time_s from a stage's manifest; None without one (not finished). A corrupt manifest is said
    on stderr (the report still renders; `load_stage` is where it is an error)."""
    path = stage_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("wall_time_s")
    except (OSError, json.JSONDecodeError) as exc:
        print(f"report: cannot read {path} ({exc}); its wall time is not shown", file=sys.stderr)
        return None


def _with_kept(records: list[StageRecord], kept: list[StageRecord]) -> list[StageRecord]:
    """`records` with each kept variant placed right after its stage's row."""
    out: list[StageRecord] = []
    for rec in records:
        out.append(rec)
        if rec.is_variant:
            out.extend(k for k in kept if k.kind == rec.kind)
    return out


def build_report(
    run_dir: str | Path,
    records: list[StageRecord],
    *,
    title: str | None = None,
    notes: list[str] | None = None,
    sample_limit: int = 8,
    plots: bool = True,
) -> ReportCard:
    """Plots + tables + markdown for a run; writes `<run_dir>/report.md` and returns everything."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for rec in records:
        if not rec.headline and rec.path:
            rec.headline = read_headline(rec.path)
    records = _with_kept(records, other_variant_records(run_dir, records))
    names = [r.name for r in records]
    # Plotting costs a second or two; the flow skips it for the interim report after each stage.
    pngs = plot_curves(run_dir, names) if plots else {}
    samples = sample_rows(run_dir, names, limit=sample_limit)
    health = output_health(run_dir, names)
    fits = eval_sections(run_dir, names, "length_fit")
    estimates = eval_sections(run_dir, names, "estimates")
    benchmarks = benchmark_rows(run_dir)
    distill = distill_table(run_dir, names)
    notes = [*(notes or []), *(f"NOTE: {n}" for n in measurement_notes(run_dir, names))]
    md = render_markdown(records, title=title or run_dir.name, notes=notes, plots=pngs, samples=samples,
                         run_dir=run_dir, health=health, fits=fits, estimates=estimates, benchmarks=benchmarks,
                         distill=distill)
    path = write_text(run_dir / "report.md", md + "\n")
    return ReportCard(markdown=md, metrics_rows=metrics_rows(records), sample_rows=samples, plots=pngs, path=path,
                      records=records, health=health, fits=fits, estimates=estimates, benchmarks=benchmarks)


def records_from_run_dir(run_dir: str | Path, stages: Sequence[str]) -> list[StageRecord]:
    """Records for every stage dir present in a run (complete ones with their headline), in the order
    of `stages` (the registry's: `stages.stage_order()`).

    Complete variant dirs (`rlhf-ppo/`, `rlhf-dpo/`) are records too. The one the evaluate stage
    evaluated is the current one; the others are "kept" (all are "ran" when evaluate did not use one).
    """
    from alignline.artifacts import variant_dirs

    run_dir = Path(run_dir)
    evaluated: set[str] = set()
    ev_manifest = run_dir / "evaluate" / "manifest.json"
    if ev_manifest.is_file():  # no evaluate stage yet: no variant is "the evaluated one"
        try:
            inputs = json.loads(ev_manifest.read_text(encoding="utf-8")).get("inputs", {})
            evaluated = {Path(i["path"]).name for i in inputs.values() if isinstance(i, dict) and i.get("path")}
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            print(f"report: cannot read {ev_manifest} ({exc}); listing every variant as ran", file=sys.stderr)
    recs = []
    for name in stages:
        variants = variant_dirs(run_dir, name)
        dirs = [run_dir / name] if (run_dir / name).is_dir() else []
        dirs += variants
        current = {d.name for d in variants} & evaluated
        for d in dirs:
            complete = (d / "manifest.json").is_file()
            wall = None
            if complete:
                try:
                    wall = json.loads((d / "manifest.json").read_text(encoding="utf-8")).get("wall_time_s")
                except json.JSONDecodeError:
                    complete = False
            status = "ran" if complete else "failed"
            if current and d.name not in current:
                status = "kept"
            recs.append(StageRecord(d.name, status, wall_s=wall, path=str(d), headline=read_headline(d),
                                    stage=name if d.name != name else None))
    return recs
