"""Architecture ablations without Prefect: parameter counts, seed statistics, the comparison table and
plots that `alignline ablate` (flows/ablate.py) writes.

    rows = summary_rows(records, variants=["baseline", "alibi"], lengths=[1, 2, 4, 8])
    text = render_table(rows, lengths=[1, 2, 4, 8], seeds=2)
    plot_loss_curves({"baseline": [stage_dir_s0, stage_dir_s1], ...}, out_dir)
    plot_extrapolation({"baseline": [extrapolation_json_s0, ...], ...}, seq_len=128, out_dir=...)

A record is one (variant, seed) run as the flow collects it (`VariantRun.record` in flows/ablate.py):
variant, seed, status (ran | cached | failed), error, n_params, active_params (the pretrain stage's eval.json:
MoE layers count only the routed experts a token uses), tokens_per_s, val_loss,
gold_accuracy and `extrapolation` ({length multiple as a string: {"loss": float | None, "error": ...,
"buckets": [...]}}). Everything here reads only those records and the stage directories.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alignline.report import _cell, read_metrics

NA = "n/a"


# --------------------------------------------------------------------------- what a stage dir says


def tokens_per_second(stage_dir: str | Path) -> float | None:
    """The median `tokens_per_s` of a pretrain stage's metrics.jsonl (robust to the slow first steps), or
    None when it logged none."""
    values = [float(r["tokens_per_s"]) for r in read_metrics(stage_dir)
              if isinstance(r.get("tokens_per_s"), int | float) and math.isfinite(float(r["tokens_per_s"]))]
    return statistics.median(values) if values else None


def mean_spread(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation or None for fewer than two values, n) of the values that are
    numbers; (None, None, 0) when there are none."""
    nums = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(float(v))]
    if not nums:
        return None, None, 0
    return statistics.fmean(nums), (statistics.stdev(nums) if len(nums) > 1 else None), len(nums)


# --------------------------------------------------------------------------- the table


def length_key(multiple: int) -> str:
    return f"loss@{multiple}x"


def summary_rows(records: Sequence[Mapping[str, Any]], variants: Sequence[str],
                 lengths: Sequence[int]) -> list[dict[str, Any]]:
    """One row per variant (in `variants` order) over its seeds' records: status, params, active params,
    tokens/s, val loss mean and seed std, gold accuracy, and val loss at each extrapolation length (a
    length no seed could evaluate is "n/a" with the reason in `notes`). A variant with a failed seed is
    "failed" with the error; its numbers are over the seeds that finished."""
    rows = []
    for name in variants:
        mine = [r for r in records if r.get("variant") == name]
        ok = [r for r in mine if r.get("status") in ("ran", "cached")]
        failed = [r for r in mine if r.get("status") == "failed"]
        if failed:
            status = "failed"
        elif not mine or len(ok) < len(mine):
            status = "pending"
        else:
            statuses = {r["status"] for r in ok}
            status = statuses.pop() if len(statuses) == 1 else "ran+cached"
        loss, loss_sd, n = mean_spread([r.get("val_loss") for r in ok])
        row: dict[str, Any] = {
            "variant": name, "status": status, "seeds": n,
            "params": ok[0].get("n_params") if ok else None,
            "active_params": ok[0].get("active_params") if ok else None,
            "tokens_per_s": mean_spread([r.get("tokens_per_s") for r in ok])[0],
            "val_loss": loss, "val_loss_std": loss_sd,
            "gold_accuracy": mean_spread([r.get("gold_accuracy") for r in ok])[0],
        }
        notes = [f"seed {r.get('seed')}: {r.get('error') or 'failed'}" for r in failed]
        for m in lengths:
            entries = [(r.get("extrapolation") or {}).get(str(m)) or {} for r in ok]
            row[length_key(m)] = mean_spread([e.get("loss") for e in entries])[0]
            reasons = sorted({e["error"] for e in entries if e.get("loss") is None and e.get("error")})
            if reasons and row[length_key(m)] is None:
                notes.append(f"{m}x: {reasons[0]}")
        row["notes"] = "; ".join(notes)
        rows.append(row)
    return rows


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    return fmt.format(value) if isinstance(value, int | float) and not isinstance(value, bool) else NA


def _count(value: Any) -> str:
    if not isinstance(value, int | float):
        return NA
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    return f"{value / 1e6:.1f}M" if value >= 1e7 else f"{int(value):,}"  # small models: exact, to tell variants apart


def render_table(rows: Sequence[Mapping[str, Any]], lengths: Sequence[int], seeds: int) -> str:
    """The comparison table as markdown: variant, status, parameters, active parameters, tokens/s,
    final val loss (mean; a "± std" column when there is more than one seed), gold accuracy, val loss at
    each length multiple, notes (failures, n/a reasons)."""
    head = ["variant", "status", "params", "active params", "tokens/s", "val loss"]
    if seeds > 1:
        head.append(f"± std ({seeds} seeds)")
    head += ["gold acc", *[f"val loss @{m}x" for m in lengths], "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], r["status"], _count(r.get("params")), _count(r.get("active_params")),
                 _num(r.get("tokens_per_s"), "{:,.0f}"), _num(r.get("val_loss"))]
        if seeds > 1:
            cells.append(_num(r.get("val_loss_std")))
        cells += [_num(r.get("gold_accuracy"), "{:.3f}"), *[_num(r.get(length_key(m))) for m in lengths],
                  _cell(r.get("notes") or "", 120)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    return plt


def _style(i: int) -> dict[str, str]:
    """Line style of the i-th variant: the 10 default colours, then the same colours dashed, dotted, ...
    so two variants never share a look."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4]}


def _mean_curve(stage_dirs: Sequence[str | Path], key: str) -> tuple[list[float], list[float]]:
    """`key` from each stage dir's metrics.jsonl, averaged over the dirs at the steps all of them logged."""
    per_dir = []
    for d in stage_dirs:
        per_dir.append({float(r.get("step", i)): float(r[key]) for i, r in enumerate(read_metrics(d))
                        if isinstance(r.get(key), int | float) and math.isfinite(float(r[key]))})
    if not per_dir:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in per_dir)))
    return steps, [statistics.fmean(c[s] for c in per_dir) for s in steps]


def plot_loss_curves(stage_dirs: Mapping[str, Sequence[str | Path]], out_dir: str | Path) -> Path | None:
    """`<out_dir>/loss_curves.png`: training loss (left) and val loss (right) against step, one line per
    variant (the mean over its seeds); None when no variant logged a loss."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=110)
    drawn = False
    for i, (name, dirs) in enumerate(stage_dirs.items()):
        for ax, key in zip(axes, ("loss", "val_loss"), strict=True):
            xs, ys = _mean_curve(dirs, key)
            if xs:
                ax.plot(xs, ys, label=name, linewidth=1.3, marker="." if len(xs) < 20 else None, **_style(i))
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(axes, ("training loss", "val loss"), strict=True):
        ax.set_xlabel("step", fontsize=11)
        ax.set_ylabel("loss", fontsize=11)
        ax.set_title(title, fontsize=12)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=10)
    axes[1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "loss_curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def longest_curve(extrapolations: Sequence[Mapping[str, Any]]) -> tuple[int, list[float], list[float]] | None:
    """(length multiple, bucket centres, mean loss per bucket) at the longest length every one of a
    variant's seeds evaluated (the extrapolation.json `lengths` entries), or None when none did."""
    common = None
    for ex in extrapolations:
        done = {int(m) for m, e in (ex.get("lengths") or {}).items() if e.get("buckets")}
        common = done if common is None else common & done
    if not common:
        return None
    m = max(common)
    per_seed = [ex["lengths"][str(m)]["buckets"] for ex in extrapolations]
    xs = [(b["start"] + b["end"] - 1) / 2 for b in per_seed[0]]
    ys = [statistics.fmean(seed[j]["loss"] for seed in per_seed) for j in range(len(xs))]
    return m, xs, ys


def plot_extrapolation(extrapolations: Mapping[str, Sequence[Mapping[str, Any]]], seq_len: int,
                       out_dir: str | Path) -> Path | None:
    """`<out_dir>/extrapolation.png`: val loss against token position, one line per variant (its longest
    evaluated length, mean over seeds; the legend says which length), a dashed vertical line at the
    training length. None when no variant has a curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 4.5), dpi=110)
    drawn = False
    for i, (name, exs) in enumerate(extrapolations.items()):
        curve = longest_curve(exs)
        if curve is None:
            continue
        m, xs, ys = curve
        ax.plot(xs, ys, label=f"{name} ({m}x)", linewidth=1.5, **_style(i))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axvline(seq_len, color="black", linestyle="--", linewidth=1.0, label=f"training length ({seq_len})")
    ax.set_xlabel("token position", fontsize=11)
    ax.set_ylabel("val loss (bucket mean)", fontsize=11)
    ax.set_title("length extrapolation: val loss by position", fontsize=12)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=10)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "extrapolation.png"
    fig.savefig(path)
    plt.close(fig)
    return path
