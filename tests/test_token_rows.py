"""Training workers' token rows: a node-local cache built once, memory-mapped by every worker,
served in example_id order whatever the file order, filtered by a split file."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftmix_ray.train.token_rows import open_token_rows


def _write(directory: Path, seed: int = 0) -> dict[int, tuple[list[int], list[int]]]:
    """Three shards with example ids out of order; returns id -> (input_ids, labels)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(300) * 3 + 1  # sparse, shuffled ids
    rows = {}
    directory.mkdir(parents=True, exist_ok=True)
    for shard, part in enumerate(np.array_split(ids, 3)):
        inputs = [rng.integers(0, 50000, rng.integers(1, 40)).tolist() for _ in part]
        labels = [[-100 if k % 3 else x for k, x in enumerate(row)] for row in inputs]
        rows.update({int(i): (a, b) for i, a, b in zip(part, inputs, labels)})
        table = pa.table(
            {
                "example_id": pa.array(part, pa.int64()),
                "messages_json": pa.array(["[]"] * len(part)),
                "input_ids": pa.array(inputs, pa.list_(pa.int32())),
                "labels": pa.array(labels, pa.list_(pa.int32())),
            }
        )
        pq.write_table(table, directory / f"part-{shard:05d}.parquet", row_group_size=37)
    return rows


def _open_and_sum(args: tuple[str, str]) -> tuple[int, int]:
    source, root = args
    rows = open_token_rows(Path(source), root=Path(root))
    return len(rows), int(sum(int(rows.row(i)[0].sum()) for i in range(len(rows))))


def test_rows_come_in_example_id_order_zero_copy(tmp_path):
    expected = _write(tmp_path / "data")
    rows = open_token_rows(tmp_path / "data", root=tmp_path / "cache")
    assert len(rows) == 300 and list(rows.ids()) == sorted(expected)
    for i, example_id in enumerate(sorted(expected)):
        ids, labels = rows.row(i)
        assert ids.tolist() == expected[example_id][0]
        assert labels.tolist() == expected[example_id][1]
    assert isinstance(rows.input_ids, np.memmap) and rows.input_ids.dtype == np.int32
    assert rows.lengths().tolist() == [len(expected[k][0]) for k in sorted(expected)]


def test_split_file_keeps_its_ids_only(tmp_path):
    """A split side is the rows its file lists, in example_id order, as a view of the corpus'
    one cache entry: both sides, the whole corpus and a new split (each trial of a sweep over
    `split.ratio`) build nothing more. Ids a split lists that the corpus lacks are not rows."""
    expected = _write(tmp_path / "data")
    root = tmp_path / "cache"
    ids = sorted(expected)
    sides = {"confident": ids[::4], "unconfident": [i for k, i in enumerate(ids) if k % 4]}
    sides["other split"] = [*ids[1::3], 10**9]
    for name, keep in sides.items():
        split = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"example_id": pa.array(keep[::-1], pa.int64())}), split)
        rows = open_token_rows(tmp_path / "data", split, root=root)
        assert list(rows.ids()) == [i for i in keep if i in expected]
        assert rows.row(5)[0].tolist() == expected[keep[5]][0]
        assert rows.lengths().tolist() == [len(expected[i][0]) for i in rows.ids()]
    assert len(open_token_rows(tmp_path / "data", root=root)) == len(ids)
    assert len(_entries(root)) == 1  # one build for all of them


def test_one_build_per_node_and_a_new_corpus_gets_a_new_cache(tmp_path):
    _write(tmp_path / "data")
    root = tmp_path / "cache"
    with mp.get_context("spawn").Pool(3) as pool:
        results = pool.map(_open_and_sum, [(str(tmp_path / "data"), str(root))] * 3)
    assert len(set(results)) == 1 and results[0][0] == 300
    assert len([p for p in root.iterdir() if p.is_dir()]) == 1  # built once, mapped thrice
    assert not list(root.glob(".*.tmp"))
    (old,) = [p.name for p in root.iterdir() if p.is_dir()]
    _write(tmp_path / "data", seed=1)  # re-prepared: other rows, same file names
    again = open_token_rows(tmp_path / "data", root=root)
    assert int(sum(int(again.row(i)[0].sum()) for i in range(300))) != results[0][1]
    # The old entry can never be read again: the new build removed it.
    (new,) = [p.name for p in root.iterdir() if p.is_dir()]
    assert new != old


def _open_in_process(args: tuple[str, str | None, str, float]) -> list[tuple[str, str]]:
    """Open rows in a fresh process (another worker); returns what its eviction removed."""
    import logging

    source, keep, root, budget = args
    removed: list[tuple[str, str]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            removed.append((str(record.args[1]), str(record.args[2])))

    logging.getLogger("sftmix_ray.train.token_rows").addHandler(Catch())
    open_token_rows(Path(source), Path(keep) if keep else None, Path(root), budget_gb=budget)
    return removed


def _entries(root: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in root.iterdir() if p.is_dir() and p.name[0] != "."}


def test_cache_keeps_to_its_budget_least_recently_opened_first(tmp_path):
    """Three corpora of ~14 KB each under a 30 KB budget: building the third removes the
    least recently opened entry, not one another process holds, and a process that mapped the
    removed entry still reads it. Stale entries and a build's leftovers go whatever the budget."""
    import fcntl
    import os
    import time

    from sftmix_ray.train import token_rows

    root = tmp_path / "cache"
    corpora = [tmp_path / name for name in ("a", "b", "c", "d")]
    expected = [_write(path, seed=k) for k, path in enumerate(corpora)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        first = pool.map(_open_in_process, [(str(corpora[0]), None, str(root), 0.0)])
    mapped = open_token_rows(corpora[1], root=root)  # this process keeps b mapped
    a, b = (token_rows.cache_key(path, None) for path in corpora[:2])
    os.utime(root / a, (time.time() + 5, time.time() + 5))  # a opened last, b before it
    size = sum(f.stat().st_size for f in (root / a).iterdir())
    budget = 2.2 * size / 1024**3
    with ctx.Pool(1) as pool:
        removed = pool.map(_open_in_process, [(str(corpora[2]), None, str(root), budget)])[0]
    assert first == [[]] and removed == [(b, "budget")]
    assert set(_entries(root)) == {a, token_rows.cache_key(corpora[2], None)}
    ids = sorted(expected[1])
    assert mapped.row(7)[0].tolist() == expected[1][ids[7]][0]  # still readable after removal

    # A locked entry (another process mapping or building it) is never removed.
    with open(root / f"{a}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with ctx.Pool(1) as pool:
            removed = pool.map(_open_in_process, [(str(corpora[3]), None, str(root), 1e-9)])[0]
    c = token_rows.cache_key(corpora[2], None)
    assert removed == [(c, "budget")] and a in _entries(root)

    # Stale (its corpus is gone) and leftovers (a build cut short) go with budget 0 too. A
    # split opens its corpus' entry (here b's, built again).
    split = tmp_path / "confident.parquet"
    pq.write_table(pa.table({"example_id": pa.array(ids[:9], pa.int64())}), split)
    with ctx.Pool(1) as pool:
        pool.map(_open_in_process, [(str(corpora[1]), str(split), str(root), 0.0)])
    assert b in _entries(root)
    shutil.rmtree(corpora[1])
    # An entry of one split side, as builds before sides were views made: nothing opens it.
    old_side = root / ("0" * 32)
    old_side.mkdir()
    record = {"source": str(corpora[0]), "keep": str(split)}
    (old_side / "source.json").write_text(json.dumps(record))
    (root / ".deadbeef.12345.tmp").mkdir()
    (root / ".deadbeef.12345.tmp" / "input_ids.i32").write_bytes(b"\0" * 64)
    _write(tmp_path / "e")
    with ctx.Pool(1) as pool:
        removed = pool.map(_open_in_process, [(str(tmp_path / "e"), None, str(root), 0.0)])
    assert sorted(removed[0]) == sorted(
        [(".deadbeef.12345.tmp", "leftover"), (b, "stale"), (old_side.name, "stale")]
    ), removed[0]
    assert not list(root.glob(".*.tmp"))


def test_an_incomplete_entry_is_built_again_and_trimming_failures_do_not_stop_a_worker(
    tmp_path, monkeypatch, caplog
):
    from sftmix_ray.train import token_rows

    expected = _write(tmp_path / "data")
    root = tmp_path / "cache"
    open_token_rows(tmp_path / "data", root=root)
    (entry,) = [p for p in root.iterdir() if p.is_dir()]
    with open(entry / "input_ids.i32", "r+b") as fh:  # cut short, as by a full disk
        fh.truncate(100)
    rows = open_token_rows(tmp_path / "data", root=root)
    assert "incomplete; building it again" in caplog.text
    ids = sorted(expected)
    assert [rows.row(i)[0].tolist() for i in range(300)] == [expected[k][0] for k in ids]

    def refused(root: Path, budget_gb: float) -> list:
        raise PermissionError(13, "Permission denied", str(root))

    monkeypatch.setattr(token_rows, "evict", refused)
    _write(tmp_path / "other", seed=3)
    assert len(open_token_rows(tmp_path / "other", root=root, budget_gb=1e-9)) == 300
    assert "could not trim it" in caplog.text


def test_a_build_that_fills_the_disk_leaves_nothing_and_says_what_it_needs(tmp_path, monkeypatch):
    """A full disk mid-build (ENOSPC from a write): the half-built entry is removed at once
    (a Ray Train restart would otherwise find the disk full of it), and the error names the
    cache, the corpus, the space it takes and the setting to change. The next build works."""
    import errno

    import pytest

    from sftmix_ray.errors import SftmixError
    from sftmix_ray.train import token_rows

    expected = _write(tmp_path / "data")
    tokens = sum(len(ids) for ids, _ in expected.values())
    real = token_rows._batches

    def batches_then_full(files, columns):
        batches = real(files, columns)
        yield next(batches)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_rows, "_batches", batches_then_full)
    root = tmp_path / "cache"
    with pytest.raises(SftmixError) as failed:
        open_token_rows(tmp_path / "data", root=root)
    needed = (8 * tokens + 24 * len(expected)) / 2**30
    message = str(failed.value)
    assert message.startswith(f"token cache {root.resolve()}: the disk filled while building ")
    size = f"which take up to {needed:.1f} GB ({tokens} tokens, {len(expected)} rows)"
    assert f"the token rows of {tmp_path / 'data'}, {size}" in message
    assert "train.token_cache_dir" in message and isinstance(failed.value.__cause__, OSError)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(token_rows, "_batches", real)
    assert len(open_token_rows(tmp_path / "data", root=root)) == len(expected)
