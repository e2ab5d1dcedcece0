"""The sweep's results: one row per trial, the best trial, and the metric-vs-params plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sftmix_ray.layout import RunDir
from tuning.space import Domain, is_finite_number
from tuning.trial import ATTEMPTS_FILE, RESULT_FILE

STATUS_ORDER = ("TERMINATED", "ERROR", "RUNNING", "PAUSED", "PENDING")


def _short_error(text: str | None) -> str | None:
    """The last line of a traceback that names the exception (the whole message if shorter)."""
    if not text:
        return None
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if ":" in ln and not ln.startswith(("File ", "^", "~"))]
    return (named[-1] if named else lines[-1])[:1000]


def trial_rows(trials: list[Any], keys: list[str], metric: str, out: Path) -> list[dict]:
    """One row per trial: id, status, params, last reported metrics, error, attempts."""
    rows = []
    for trial in trials:
        last = trial.last_result or {}
        trial_out = RunDir.of(out).trial(trial.trial_id).root
        attempts_file = trial_out / ATTEMPTS_FILE
        attempts = json.loads(attempts_file.read_text()) if attempts_file.exists() else []
        error = trial.get_error() if trial.status == "ERROR" else None
        row: dict[str, Any] = {"trial_id": trial.trial_id, "status": trial.status}
        row.update({key: trial.config.get(key) for key in keys})
        row.update(
            {
                metric: last.get(metric),
                "step": last.get("step"),
                "loss": last.get("loss"),
                "reports": last.get("training_iteration"),
                "time_total_s": last.get("time_total_s"),
                # False for a trial the scheduler stopped early (no model/ exported).
                "completed_training": (trial_out / RESULT_FILE).exists(),
                "attempts": len(attempts),
                "tune_failures": trial.num_failures,
                "train_restarts": last.get("restarts"),
                "error": _short_error(str(error)) if error else None,
                "trial_dir": str(trial_out),
            }
        )
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def results_frame(rows: list[dict], keys: list[str]) -> Any:
    """The rows as a DataFrame whose columns Parquet can hold (one type per column)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    for key in keys:
        values = [v for v in frame[key] if v is not None]
        numeric = values and all(is_finite_number(v) for v in values)
        frame[key] = frame[key].astype(float) if numeric else frame[key].astype("string")
    return frame


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The trial that trained to the end with the best last-reported metric (ties: lowest
    trial id). Not one ASHA stopped early: Tune marks it TERMINATED too, but its last metric
    is from an earlier rung (not comparable) and it exported no model."""
    done = [
        r for r in rows
        if r["status"] == "TERMINATED" and r.get("completed_training", True)
        and isinstance(r[metric], (int, float)) and math.isfinite(r[metric])
    ]  # fmt: skip
    if not done:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(done, key=lambda r: (sign * r[metric], r["trial_id"]))


def plot_metric_vs_params(
    rows: list[dict], domains: list[Domain], metric: str, best: dict | None, path: Path
) -> Path:
    """One panel per swept param: the metric of every finished trial against its value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    swept = [d for d in domains if d.kind != "fixed"] or domains
    fig = Figure(figsize=(4.2 * len(swept), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(swept), squeeze=False)[0]
    scored = [r for r in rows if is_finite_number(r.get(metric))]
    for ax, domain in zip(axes, swept):
        values = [r[domain.key] for r in scored]
        numeric = all(is_finite_number(v) for v in values)
        labels = sorted({str(v) for v in values})
        xs = [v if numeric else labels.index(str(v)) for v in values]
        ax.scatter(xs, [r[metric] for r in scored], c="tab:blue", alpha=0.7, label="trial")
        if best is not None:
            bx = best[domain.key] if numeric else labels.index(str(best[domain.key]))
            ax.scatter([bx], [best[metric]], marker="*", s=220, c="tab:red", label="best")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif domain.log_scale:
            ax.set_xscale("log")
        ax.set(xlabel=domain.key, ylabel=metric, title=f"{metric} vs {domain.key}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
