"""The `split` stage: confident / unconfident subsets by confidence, and the cartography map."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftmix_ray.config import Config
from sftmix_ray.errors import SftmixError
from sftmix_ray.layout import RunDir

log = logging.getLogger(__name__)

RATIO_METADATA_KEY = b"sftmix.split_ratio"
_SIDE_COLUMNS = ["example_id", "confidence", "variability"]
_MAX_SCATTER_POINTS = 50_000  # beyond this the map plots a seeded sample of the points


def confident_count(n: int, ratio: float) -> int:
    """Size of the confident subset: `ratio * n` rounded half up, clamped to [1, n - 1]."""
    if n < 2:
        raise SftmixError(f"a confidence split needs at least 2 examples, got {n}")
    if not 0.0 < ratio < 1.0:
        raise SftmixError(f"split.ratio must lie in (0, 1), got {ratio}")
    # Half up, not Python's round-half-to-even; the epsilon absorbs float error in ratio * n.
    return min(max(math.floor(ratio * n + 0.5 + 1e-9), 1), n - 1)


def split_by_confidence(
    ids: np.ndarray, confidence: np.ndarray, ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the confident (top `ratio` by confidence) and unconfident examples.

    Both come in rank order: confidence descending, ties by example id ascending, so equal
    confidences put the lower ids on the confident side and the split is reproducible.
    """
    ids = np.asarray(ids, dtype=np.int64)
    confidence = np.asarray(confidence, dtype=np.float64)
    if ids.shape != confidence.shape or ids.ndim != 1:
        raise SftmixError(
            f"ids and confidence must be 1-D of one length, got {ids.shape} and {confidence.shape}"
        )
    if len(np.unique(ids)) != len(ids):
        raise SftmixError("example ids must be unique to split by confidence")
    if not np.isfinite(confidence).all():
        bad = ids[~np.isfinite(confidence)]
        raise SftmixError(
            f"{len(bad)} examples have no finite confidence (e.g. {bad[:5].tolist()})"
        )
    k = confident_count(len(ids), ratio)
    order = np.lexsort((ids, -confidence))  # last key is the primary one
    return ids[order[:k]], ids[order[k:]]


def _rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row positions in `ids` (unique) of each of `wanted`, in `wanted`'s order."""
    sorter = np.argsort(ids, kind="stable")
    return sorter[np.searchsorted(ids, wanted, sorter=sorter)]


def plot_cartography(
    confidence: np.ndarray,
    variability: np.ndarray,
    confident: np.ndarray,
    threshold: float,
    path: Path,
    measure: str = "neg_mean_perplexity",
) -> Path:
    """Write the cartography map (variability vs confidence by side) and the histogram as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas, without pyplot's global backend state
    ax_map, ax_hist = fig.subplots(1, 2)
    shown = np.arange(len(confidence))
    if len(shown) > _MAX_SCATTER_POINTS:
        shown = np.random.default_rng(0).choice(shown, _MAX_SCATTER_POINTS, replace=False)
    bins = np.histogram_bin_edges(confidence, bins=50)  # one set of bins for both sides
    for mask, label, color in ((confident, "confident", "tab:blue"),
                               (~confident, "unconfident", "tab:orange")):  # fmt: skip
        pick = shown[mask[shown]]
        ax_map.scatter(variability[pick], confidence[pick], s=6, alpha=0.5, c=color, label=label)
        ax_hist.hist(confidence[mask], bins=bins, alpha=0.6, color=color, label=label)
    per_checkpoint = "exp(nll)" if measure == "neg_mean_perplexity" else "exp(-nll)"
    mean = "-mean exp(nll)" if measure == "neg_mean_perplexity" else "mean exp(-nll)"
    ax_map.set(
        xlabel=f"variability (std of {per_checkpoint} over checkpoints)",
        ylabel=f"confidence ({mean})",
        title=f"Data map ({len(confidence)} examples)",
    )
    ax_map.legend(loc="best", markerscale=3)
    ax_hist.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax_hist.set(xlabel="confidence", ylabel="examples", title="Confidence")
    ax_hist.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def confidence_table(scores_path: Path, measure: str) -> pa.Table:
    """`example_id`, `confidence`, `variability` under `measure`.

    Scores made with another measure (named in the file's metadata by the score stage) are
    recomputed from their stored per-checkpoint NLL, so switching `score.confidence` never
    needs a rescoring pass. A scores file that names no measure is a user's own: its
    `confidence` column is taken as it is.
    """
    from sftmix_ray.losses import confidence_and_variability
    from sftmix_ray.scoring import MEASURE_METADATA_KEY

    schema = pq.read_schema(scores_path)
    stored = (schema.metadata or {}).get(MEASURE_METADATA_KEY, b"").decode() or None
    if stored is None or stored == measure:
        return pq.read_table(scores_path, columns=_SIDE_COLUMNS)
    if "nll" not in schema.names:
        raise SftmixError(
            f"{scores_path} holds confidence as {stored} and has no nll column to recompute "
            f"score.confidence={measure} from; rerun `sftmix-ray score`"
        )
    log.info("confidence recomputed as %s from the stored NLL (scores hold %s)", measure, stored)
    table = pq.read_table(scores_path, columns=["example_id", "nll"])
    lists = table.column("nll").combine_chunks()
    nll = lists.flatten().to_numpy().reshape(len(lists), -1)  # [examples, checkpoints]
    confidence, variability = confidence_and_variability(nll, measure)
    return pa.table(
        {
            "example_id": table.column("example_id"),
            "confidence": pa.array(confidence, pa.float64()),
            "variability": pa.array(variability, pa.float64()),
        }
    )


def run_split(cfg: Config, out_dir: Path | RunDir) -> dict[str, Any]:
    """Split OUT/scores/scores.parquet by confidence into OUT/split (two files, one dataset
    with a `confident` column); draw OUT/cartography.png; return counts and means."""
    from sftmix_ray.io_utils import fresh_tmp_dir, replace_dir

    run = RunDir.of(out_dir)
    scores_path = run.scores
    if not scores_path.exists():
        raise SftmixError(f"{scores_path} does not exist; run `sftmix-ray score` first")
    measure = cfg.score.confidence
    scores = confidence_table(scores_path, measure)
    ids = scores.column("example_id").to_numpy()
    confidence = scores.column("confidence").to_numpy()
    variability = scores.column("variability").to_numpy()
    conf_ids, unconf_ids = split_by_confidence(ids, confidence, cfg.split.ratio)
    conf_rows = _rows_of(ids, conf_ids)
    is_confident = np.zeros(len(ids), dtype=bool)
    is_confident[conf_rows] = True
    threshold = float(confidence[conf_rows[-1]])  # the least confident confident example
    target = run.split_dir
    tmp = fresh_tmp_dir(target)
    # Rank order (confidence descending, ties by id) so each file reads as a ranking.
    # The ratio travels with the files: `train` refuses a split made for another ratio.
    meta = {RATIO_METADATA_KEY: repr(cfg.split.ratio).encode()}
    for rows, side_name in ((conf_rows, "confident"), (_rows_of(ids, unconf_ids), "unconfident")):
        side = scores.take(pa.array(rows))
        flag = pa.array(np.full(len(rows), side_name == "confident"), pa.bool_())
        side = side.append_column("confident", flag)
        pq.write_table(
            side.replace_schema_metadata({**(side.schema.metadata or {}), **meta}),
            tmp / run.split_file(side_name).name,
        )
    # The map is drawn before anything is put in place (a full disk fails the stage whole).
    drawn = tmp / RunDir.CARTOGRAPHY
    plot_cartography(confidence, variability, is_confident, threshold, drawn, measure)
    os.replace(drawn, run.cartography)
    replace_dir(tmp, target)
    summary = {
        "ratio": cfg.split.ratio,
        "confidence_measure": measure,
        "confident": len(conf_ids),
        "unconfident": len(unconf_ids),
        "threshold": threshold,
        "mean_confidence_confident": float(confidence[is_confident].mean()),
        "mean_confidence_unconfident": float(confidence[~is_confident].mean()),
        "mean_variability_confident": float(variability[is_confident].mean()),
        "mean_variability_unconfident": float(variability[~is_confident].mean()),
        "plot": str(run.cartography),
    }
    log.info(
        "split %d examples: %d confident (mean %.4f), %d unconfident (mean %.4f)",
        len(ids), summary["confident"], summary["mean_confidence_confident"],
        summary["unconfident"], summary["mean_confidence_unconfident"],
    )  # fmt: skip
    return summary
