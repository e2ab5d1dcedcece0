"""OUT/report.md: the run's key numbers in one page, with loss curves and the cartography map."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sftmix_ray.io_utils import atomic_write_text
from sftmix_ray.layout import RunDir
from sftmix_ray.summary import read_summary


def _histories(run: RunDir) -> dict[str, list[dict[str, float]]]:
    """Per training run (reference, train, NTP baseline) its per-step metrics."""
    runs = {}
    for path in sorted(run.logs.glob("*-history.json")):
        runs[path.name.removesuffix("-history.json")] = json.loads(
            path.read_text(encoding="utf-8")
        )["history"]
    return runs


def plot_losses(histories: dict[str, list[dict[str, float]]], path: Path) -> Path | None:
    """Training loss (and held-out eval loss where measured) per step, one line per run."""
    if not any(histories.values()):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, history in histories.items():
        steps = [h["step"] for h in history]
        line = ax.plot(steps, [h["loss"] for h in history], label=f"{name} train loss")[0]
        evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        if evals:
            ax.plot(*zip(*evals), "o--", color=line.get_color(), label=f"{name} held-out loss")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per response token)", title="Training")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _fmt(value: Any) -> str:
    if value is None:  # a non-finite value, as the JSON files write it
        return "nan"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _lm_eval_table(results: dict[str, dict]) -> list[str]:
    """lm-eval-harness metrics, one row per task and metric, one column per model."""
    models = [m for m, r in results.items() if r.get("lm_eval")]
    if not models:
        return []
    lines = ["", "## lm-eval-harness", "", f"| task | metric | {' | '.join(models)} |",
             "|---|---|" + "---|" * len(models)]  # fmt: skip
    rows = sorted({(t, k) for m in models for t, ms in results[m]["lm_eval"].items() for k in ms})
    for task, metric in rows:
        values = [results[m]["lm_eval"].get(task, {}).get(metric, float("nan")) for m in models]
        lines.append(f"| {task} | {metric} | {' | '.join(_fmt(v) for v in values)} |")
    return lines


def write_report(out_dir: Path | RunDir) -> Path:
    """Write OUT/report.md (and OUT/loss_curves.png) from summary.json, eval.json and the logs."""
    from sftmix_ray.stages import STAGE_NAMES

    run = RunDir.of(out_dir)
    stages = read_summary(run.root)["stages"]
    lines = ["# sftmix-ray run report", "", f"Output directory: `{run.root}`", ""]
    lines += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    # Pipeline order, then anything else recorded (summary.json's keys are sorted).
    order = [s for s in STAGE_NAMES if s in stages] + sorted(set(stages) - set(STAGE_NAMES))
    for name in order:
        entry = stages[name]
        lines.append(f"| {name} | {entry.get('status')} | {_fmt(entry.get('seconds', ''))} |")

    prepare = stages.get("prepare", {})
    if prepare.get("status") == "completed":
        lines += ["", "## Data", ""]
        for part in ("train", "heldout"):
            if part in prepare:
                c = prepare[part]
                lines.append(
                    f"- {part}: {c['input']} rows read, {c['rejected']} rejected, "
                    f"{c['written']} written ({c['truncated']} truncated), {c['tokens']} tokens"
                )
                kinds = c.get("rejections_by_kind") or {}
                if kinds:
                    shown = ", ".join(f"{k} {v['count']}" for k, v in kinds.items())
                    lines.append(f"  - rejected by kind: {shown}")
                if c.get("repairs"):
                    shown = ", ".join(f"{k} {n}" for k, n in c["repairs"].items())
                    lines.append(f"  - repaired and kept: {shown}")
    score = stages.get("score", {})
    split = stages.get("split", {})
    if split.get("status") == "completed":
        lines += [
            "",
            "## Confidence split",
            "",
            f"- scored examples: {_fmt(score.get('scored', ''))} "
            f"({_fmt(score.get('tokens_per_s', ''))} tokens/s)",
            f"- split.ratio {_fmt(split['ratio'])}: {split['confident']} confident "
            f"(mean confidence {_fmt(split['mean_confidence_confident'])}), "
            f"{split['unconfident']} unconfident "
            f"(mean {_fmt(split['mean_confidence_unconfident'])})",
            "",
            f"![cartography]({RunDir.CARTOGRAPHY})",
        ]
    for stage in ("reference", "train"):
        entry = stages.get(stage, {})
        if entry.get("status") == "completed":
            metrics = entry.get("metrics", {})
            lines += [
                "",
                f"## {stage.capitalize()} training",
                "",
                f"- steps {entry.get('steps')}, restarts {entry.get('restarts')}, "
                f"final loss {_fmt(metrics.get('loss', float('nan')))}",
            ]
    skipped = stages.get("eval", {}).get("heldout_skipped")
    results = json.loads(run.eval_file.read_text("utf-8")) if run.eval_file.exists() else {}
    if skipped:
        lines += ["", "## Held-out evaluation", "", f"Skipped: {skipped}."]
    elif results:
        lines += [
            "",
            "## Held-out evaluation",
            "",
            "| model | response NLL | perplexity | exact match |",
            "|---|---|---|---|",
        ]
        for model, r in results.items():
            lines.append(
                f"| {model} | {_fmt(r['response_nll'])} | {_fmt(r['perplexity'])} | "
                f"{_fmt(r.get('exact_match', float('nan')))} |"
            )
    lines += _lm_eval_table(results)
    if plot_losses(_histories(run), run.loss_plot):
        lines += ["", "## Loss curves", "", f"![loss curves]({RunDir.LOSS_PLOT})"]
    path = run.report
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
