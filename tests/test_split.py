"""Confidence split: a partition of every id, sizes from the ratio, reproducible ties, the map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftmix_ray.config import load_config
from sftmix_ray.errors import ConfigError, SftmixError
from sftmix_ray.split import confident_count, run_split, split_by_confidence


def _scores(n: int, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled, non-contiguous ids and confidences (few distinct values when `ties`)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(n) * 7 + 3)
    confidence = rng.integers(0, 4, n) / 4 if ties else rng.random(n)
    return ids, confidence


@pytest.mark.parametrize("n,ratio", [(10, 0.5), (101, 0.3), (7, 0.9), (1000, 0.01)])
def test_split_partitions_ids_by_confidence(n: int, ratio: float):
    ids, confidence = _scores(n, seed=n)
    conf, unconf = split_by_confidence(ids, confidence, ratio)
    assert len(conf) == confident_count(n, ratio)
    assert sorted([*conf, *unconf]) == sorted(ids) and not set(conf) & set(unconf)
    by_id = dict(zip(ids.tolist(), confidence.tolist()))
    assert min(by_id[i] for i in conf) >= max(by_id[i] for i in unconf)


def test_ties_break_by_example_id_and_are_reproducible():
    ids, confidence = _scores(200, ties=True)
    conf, unconf = split_by_confidence(ids, confidence, 0.5)
    by_id = dict(zip(ids.tolist(), confidence.tolist()))
    threshold = by_id[int(conf[-1])]
    tied_conf = [i for i in conf if by_id[i] == threshold]
    tied_unconf = [i for i in unconf if by_id[i] == threshold]
    assert tied_conf and tied_unconf  # the cut falls inside a tie
    assert max(tied_conf) < min(tied_unconf)  # lower ids go to the confident side
    # The same scores in another row order give the same split, in the same rank order.
    order = np.random.default_rng(1).permutation(len(ids))
    again = split_by_confidence(ids[order], confidence[order], 0.5)
    assert np.array_equal(again[0], conf) and np.array_equal(again[1], unconf)


@pytest.mark.parametrize(
    "n,ratio,expected",
    [(10, 0.5, 5), (5, 0.5, 3), (7, 0.5, 4), (10, 0.25, 3), (10, 0.01, 1), (10, 0.99, 9),
     (2, 0.5, 1), (2, 0.01, 1), (2, 0.99, 1), (3, 0.3, 1)],
)  # fmt: skip
def test_confident_size_rounds_half_up_and_keeps_both_sides(n: int, ratio: float, expected: int):
    assert confident_count(n, ratio) == expected
    conf, unconf = split_by_confidence(*_scores(n), ratio)
    assert (len(conf), len(unconf)) == (expected, n - expected)


def test_bad_inputs_are_refused():
    with pytest.raises(SftmixError, match="at least 2"):
        split_by_confidence(np.array([1]), np.array([0.5]), 0.5)
    with pytest.raises(SftmixError, match="unique"):
        split_by_confidence(np.array([1, 1, 2]), np.array([0.1, 0.2, 0.3]), 0.5)
    with pytest.raises(SftmixError, match="finite"):
        split_by_confidence(np.array([1, 2]), np.array([0.1, np.nan]), 0.5)
    with pytest.raises(SftmixError, match=r"\(0, 1\)"):
        split_by_confidence(*_scores(4), 1.0)
    with pytest.raises(ConfigError, match=r"split\.ratio"):
        load_config(None, ["split.ratio=0"])


def test_run_split_writes_both_sides_and_the_map(tmp_path: Path):
    ids, confidence = _scores(300, seed=3)
    variability = np.random.default_rng(4).random(300) * 0.1
    (tmp_path / "scores").mkdir()
    table = pa.table(
        {
            "example_id": pa.array(ids, pa.int64()),
            "confidence": confidence,
            "variability": variability,
            "n_response_tokens": pa.array(np.full(300, 5), pa.int64()),
            "nll": pa.array([[0.0, 0.0]] * 300, pa.list_(pa.float64())),
        }
    )
    pq.write_table(table, tmp_path / "scores" / "scores.parquet")
    summary = run_split(load_config(None, ["split.ratio=0.4"]), tmp_path)
    conf = pq.read_table(tmp_path / "split" / "confident.parquet")
    unconf = pq.read_table(tmp_path / "split" / "unconfident.parquet")
    assert conf.column_names == ["example_id", "confidence", "variability", "confident"]
    assert conf.column("confident").to_pylist() == [True] * 120
    assert unconf.column("confident").to_pylist() == [False] * 180
    assert (summary["confident"], summary["unconfident"]) == (120, 180)
    assert (conf.num_rows, unconf.num_rows) == (120, 180)
    assert np.array_equal(conf.column("example_id"), split_by_confidence(ids, confidence, 0.4)[0])
    conf_c, unconf_c = conf["confidence"].to_numpy(), unconf["confidence"].to_numpy()
    assert conf_c.min() >= unconf_c.max() and summary["threshold"] == conf_c.min()
    assert summary["mean_confidence_confident"] == pytest.approx(conf_c.mean())
    assert summary["mean_confidence_unconfident"] == pytest.approx(unconf_c.mean())
    by_id = dict(zip(ids.tolist(), variability.tolist()))
    expected = [by_id[i] for i in conf["example_id"].to_pylist()]
    assert conf["variability"].to_pylist() == expected
    png = tmp_path / "cartography.png"  # beside OUT/split, which holds Parquet files only
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_run_split_without_scores_says_what_to_run(tmp_path: Path):
    with pytest.raises(SftmixError, match="sftmix-ray score"):
        run_split(load_config(None, []), tmp_path)
