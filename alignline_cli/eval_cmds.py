"""`alignline eval`: standard benchmarks (lm-evaluation-harness) on one checkpoint.

    alignline eval runs/tiny/sft --tasks alignline_gold,alignline_pref --data runs/tiny/data --limit 32
    alignline eval runs/tiny/sft/checkpoint --tasks hellaswag,arc_easy --limit 200 --out sft_lm_eval.json

CHECKPOINT: any HF causal-LM directory (alignline, Llama, Qwen2, GPT-2, ...) or a stage directory holding
checkpoint/. Ours (alignline_*) run offline over a data stage's held-out files (--data); the harness's own
tasks fetch their data from the Hugging Face Hub. alignline/benchmarks.py does the work.
"""

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        checkpoint: Path = typer.Argument(..., help="Checkpoint dir, or a stage dir holding checkpoint/."),
        tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval task names (ours: alignline_gold, "
                                  "alignline_pref; the harness's: hellaswag, arc_easy, gsm8k, ...)."),
        limit: int | None = typer.Option(None, "--limit", min=1, help="First N documents per task (default all)."),
        num_fewshot: int | None = typer.Option(None, "--num-fewshot", min=0,
                                               help="Examples in context (default: each task's own; 0 for ours)."),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Requests per batch."),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:1."),
        data: Path | None = typer.Option(None, "--data", help="Data stage dir (runs/<name>/data) for alignline_* tasks."),
        seed: int = typer.Option(0, "--seed", help="Seed of the harness (few-shot sampling)."),
        chat_template: bool = typer.Option(False, "--chat-template/--no-chat-template",
                                           help="Ask each prompt as a user turn through the checkpoint's chat "
                                                "template (chat models); default: the task's plain text."),
        out: Path | None = typer.Option(None, "--out", help="Also write the results as JSON here."),
    ) -> None:
        """Run lm-evaluation-harness tasks on a checkpoint and print a table of scores."""
        from alignline.benchmarks import run_benchmarks
        from alignline.files import write_json

        names = [t.strip() for t in tasks.split(",") if t.strip()]
        # Every UserError (unknown task, missing --data, adapter dir) is raised before anything is written.
        res = run_benchmarks(checkpoint, names, data_dir=data, limit=limit, num_fewshot=num_fewshot,
                             batch_size=batch_size, device=device, seed=seed, chat_template=chat_template)
        typer.echo(format_table(res))
        if out is not None:
            write_json(out, res)
            typer.echo(f"wrote {out}")


def format_table(res: dict) -> str:
    """A plain table: task, metric, value, stderr, n."""
    rows = [("task", "metric", "value", "stderr", "n")]
    for task, metrics in res["tasks"].items():
        for k, v in metrics.items():
            if k in ("n", "version", "alias") or k.endswith("_stderr"):
                continue
            se = metrics.get(f"{k}_stderr")
            rows.append((task, k, "-" if v is None else f"{v:.4f}", "-" if se is None else f"{se:.4f}",
                         str(metrics.get("n", "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([f"{res.get('checkpoint', '')} (lm-eval {res.get('lm_eval')}, limit={res.get('limit')}, "
                      f"num_fewshot={res.get('num_fewshot')}, chat_template={res.get('chat_template', False)})",
                      *lines])
