"""Held-out quality of NTP, SFTMix and SFTMix with random pairs, over seeds, on the demo corpus.

    python benchmarks/quality_study.py --json benchmarks/results/quality_study.json \
        --png benchmarks/results/quality_study.png [--seeds 0,1,2] [--train-steps N] \
        [--work DIR] [--config FILE] [--set key=value ...]

The recipe runs once with the project's own stages (`prepare -> reference -> score -> split`,
by default `configs/quickstart.yaml`: demo corpus, tiny preset, local Ray). Then, for every seed
(`train.seed`: the batch plan and the Mixup lambda draws) and variant, `train` and `eval` run in
their own directory that links the shared data/, heldout/, base_model/, scores/ and split/:

- `ntp`: `mixup.mu=0` (uniform batches over the whole corpus);
- `sftmix`: the default recipe (b confident + b unconfident rows, Mixup of the pairs);
- `sftmix_position`: `mixup.align=position` (the earlier Mixup at equal absolute positions);
- `sftmix_random_pairs`: `mixup.pairing=random` (the same Mixup on uniformly drawn pairs);
- `mixup_only`: `mixup.ntp_weight=0` (the paper's "Mixup only" ablation).

Every variant trains the same steps on the same batch size from the same base model. With the
same seed, `ntp` and `sftmix_random_pairs` see exactly the same batches. Deltas against `ntp`
are paired by seed: mean, std, wins, the paired t statistic and an exact sign-flip p-value.
One local Ray cluster serves every run. A rerun with the same `--work` skips finished stages.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
for key, value in {
    "DS_ACCELERATOR": "cpu",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}.items():
    os.environ.setdefault(key, value)

from _common import load_average, machine_info  # noqa: E402

from sftmix_ray.config import Config, load_config  # noqa: E402
from sftmix_ray.errors import SftmixError  # noqa: E402
from sftmix_ray.stages import stage_fingerprint  # noqa: E402
from sftmix_ray.summary import read_summary  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.yaml"
STUDY = ["train.report_to=none", "train.progress_bar=false"]  # on top of the quickstart config
VARIANTS = {
    "ntp": ["mixup.mu=0"],
    "sftmix": [],
    "sftmix_position": ["mixup.align=position"],  # the earlier, position-aligned Mixup
    "sftmix_random_pairs": ["mixup.pairing=random"],
    "mixup_only": ["mixup.ntp_weight=0"],  # the paper's "Mixup only" ablation
}
SHARED = ("data", "heldout", "base_model", "scores", "split")
METRICS = ("response_nll", "perplexity", "exact_match")
COLORS = ["#999999", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd"]
COMPARISONS = (
    ("sftmix", "sftmix_minus_ntp"),
    ("sftmix_position", "position_minus_ntp"),
    ("sftmix_random_pairs", "random_minus_ntp"),
    ("mixup_only", "mixup_only_minus_ntp"),
)


def run_stages(stages: list[str], cfg: Config, out: Path) -> dict[str, float]:
    """Run `stages` in `out`, skipping those already complete for this config; wall seconds."""
    from sftmix_ray.pipeline import run_stage

    seconds, rerun = {}, False
    for stage in stages:
        done = read_summary(out)["stages"].get(stage, {})
        fresh = done.get("status") == "completed"
        if fresh and not rerun and done.get("config_fingerprint") == stage_fingerprint(cfg, stage):
            print(f"[quality] {out.name}: {stage} already complete, skipped", flush=True)
            continue
        rerun = True
        start = time.perf_counter()
        run_stage(stage, cfg, out)
        seconds[stage] = round(time.perf_counter() - start, 2)
        print(f"[quality] {out.name}: {stage} {seconds[stage]:.1f}s", flush=True)
    return seconds


def train_and_eval(cfg: Config, base: Path, out: Path) -> dict[str, Any]:
    """One variant/seed: link the shared stage outputs, train, evaluate; its metrics."""
    out.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if not (out / name).exists():
            (out / name).symlink_to((base / name).resolve(), target_is_directory=True)
    seconds = run_stages(["train", "eval"], cfg, out)
    train = read_summary(out)["stages"]["train"]
    if train.get("steps") != cfg.train.max_steps:
        raise SftmixError(f"{out}: trained {train.get('steps')} steps, not {cfg.train.max_steps}")
    metrics = json.loads((out / "eval.json").read_text(encoding="utf-8"))["sftmix"]
    if not math.isfinite(metrics["response_nll"]):
        raise SftmixError(f"{out}: held-out response NLL is {metrics['response_nll']}")
    return {
        **{m: metrics[m] for m in (*METRICS, "response_tokens", "exact_match_rows")},
        "final_train_loss": train["metrics"].get("loss"),
        "final_eval_loss": train["metrics"].get("eval_loss"),
        "seconds": seconds,
        "out": str(out),
    }


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value) and the values."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def paired(deltas: list[float], lower_is_better: bool) -> dict[str, Any]:
    """Paired comparison of per-seed deltas (variant - ntp): t statistic, sign-flip p, wins."""
    out = summarize(deltas)
    n = len(deltas)
    out["wins"] = sum((d < 0) if lower_is_better else (d > 0) for d in deltas)
    out["t"] = out["mean"] / (out["std"] / math.sqrt(n)) if n > 1 and out["std"] > 0 else None
    # Exact two-sided sign-flip test: the share of the 2^n sign patterns whose |mean| is as large.
    observed = abs(sum(deltas))
    flips = list(itertools.product((1, -1), repeat=n))
    hits = sum(abs(sum(s * d for s, d in zip(f, deltas))) >= observed - 1e-12 for f in flips)
    out["sign_flip_p"] = hits / len(flips)
    return out


def delta(by_variant: dict[str, Any], variant: str, metric: str) -> list[float]:
    """Per-seed `variant - ntp` of one metric (runs of one seed share an index)."""
    pairs = zip(by_variant[variant][metric]["values"], by_variant["ntp"][metric]["values"])
    return [a - b for a, b in pairs]


def plot(variants: dict[str, Any], path: Path) -> None:
    """Per variant: mean +- std bars for held-out NLL and exact match, with per-seed points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    names = list(variants)
    for ax, metric, label in zip(
        fig.subplots(1, 2),
        ("response_nll", "exact_match"),
        ("held-out response NLL (lower is better)", "held-out exact match (higher is better)"),
    ):
        stats = [variants[v][metric] for v in names]
        means, stds = [s["mean"] for s in stats], [s["std"] for s in stats]
        ax.bar(names, means, yerr=stds, capsize=6, color=COLORS[: len(names)], alpha=0.6)
        for i, s in enumerate(stats):
            offsets = [(j - (len(s["values"]) - 1) / 2) * 0.08 for j in range(len(s["values"]))]
            ax.plot([i + o for o in offsets], s["values"], "k.", markersize=8)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelsize=7, labelrotation=20)
        if metric == "response_nll":  # differences are small next to the absolute value
            low = min(min(s["values"]) for s in stats)
            high = max(max(s["values"]) for s in stats)
            ax.set_ylim(low - 0.5 * (high - low + 0.01), high + 0.5 * (high - low + 0.01))
    fig.suptitle("Mean +- std over seeds; dots are seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def study(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the recipe once, then every seed x variant; the results document."""
    from sftmix_ray.ray_utils import init_ray

    start = time.perf_counter()
    base_cfg = load_config(args.config, [*STUDY, *args.set])
    init_ray(base_cfg.ray)  # one local cluster for every stage of every run
    base = work / "base"
    base_seconds = run_stages(["prepare", "reference", "score", "split"], base_cfg, base)
    runs = []
    for seed in args.seeds:  # seeds outermost, so a drift in machine load hits every variant
        for variant, overrides in VARIANTS.items():
            extra = [*overrides, f"train.seed={seed}", f"train.max_steps={args.train_steps}"]
            cfg = load_config(args.config, [*STUDY, *args.set, *extra])
            result = train_and_eval(cfg, base, work / f"{variant}-seed{seed}")
            runs.append({"variant": variant, "seed": seed, **result})
            shown = ", ".join(f"{m} {result[m]:.4f}" for m in METRICS)
            print(f"[quality] {variant} seed {seed}: {shown}", flush=True)
    by_variant = {
        v: {m: summarize([r[m] for r in runs if r["variant"] == v]) for m in METRICS}
        for v in VARIANTS
    }
    deltas = {
        name: {m: paired(delta(by_variant, variant, m), m != "exact_match") for m in METRICS}
        for variant, name in COMPARISONS
    }
    ppl = {v: by_variant[v]["perplexity"]["mean"] for v in VARIANTS}
    base_summary = read_summary(base)["stages"]
    return {
        "benchmark": "quality_study",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_info(),
        "settings": {
            "config": str(args.config),
            "overrides": [*STUDY, *args.set],
            "variants": VARIANTS,
            "train_steps": args.train_steps,
            "resolved": {s: v for s, v in base_cfg.to_dict().items() if s not in ("tune", "ray")},
            "reference_steps": base_summary["reference"].get("steps"),
            "split": {k: v for k, v in base_summary["split"].items() if k != "plot"},
        },
        "seeds": args.seeds,
        "runs": runs,
        "variants": by_variant,
        "deltas": deltas,
        "ratios": {f"{v}_over_ntp_perplexity": ppl[v] / ppl["ntp"] for v in VARIANTS if v != "ntp"},
        "wall_s": {"total": round(time.perf_counter() - start, 1), "base_stages": base_seconds},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--png", required=True, type=Path, help="where to write the plot")
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--train-steps", type=int, default=125, help="optimizer steps per run")
    parser.add_argument("--work", type=Path, help="run directory (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--config",
        type=Path,
        default=CONFIG.relative_to(ROOT),
        help="the recipe (a GPU one at scale)",
    )
    args = parser.parse_args(argv)
    if args.train_steps < 1 or not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error("--train-steps must be >= 1 and --seeds distinct integers")
    import ray

    load_before = load_average()
    tmp = None if args.work else tempfile.mkdtemp(prefix="quality_study_")
    try:
        result = study(args, args.work or Path(tmp))
    except SftmixError as exc:
        print(f"quality study failed: {exc}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result["load_average"] = {"before": load_before, "after": load_average()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(result["variants"], args.png)
    for name, delta in result["deltas"].items():
        nll, em = delta["response_nll"], delta["exact_match"]
        print(
            f"[quality] {name}: NLL {nll['mean']:+.4f} +- {nll['std']:.4f} "
            f"(wins {nll['wins']}/{len(args.seeds)}, p {nll['sign_flip_p']:.3f}), "
            f"exact match {em['mean']:+.4f} +- {em['std']:.4f}"
        )
    print(f"[quality] wrote {args.json} and {args.png} ({result['wall_s']['total']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
