"""Token rows for training workers: flat int32 arrays memory-mapped from a node-local cache.

Every training worker reads the whole (replicated) corpus. Python lists of it cost minutes and
gigabytes per worker at 1M rows; instead the first worker on a node streams the Parquet files
(a batch at a time) into flat binary files under a node-local directory, and every worker of
that node memory-maps them: one copy per node, shared in the page cache, no Python objects
per token. Rows are served in `example_id` order, so the batch plan does not depend on file
or worker order.

Cache layout (`<cache>/<key>/`): `input_ids.i32`, `labels.i32` (all rows' tokens end to end),
`offsets.i64` (n + 1 row starts), `example_id.i64` and `order.i64` (rows by example_id), and
`source.json` (the paths it was built from). The key hashes the source files' names, sizes and
modification times, so a re-prepared corpus never reads a stale cache. A split side (`keep`:
the example ids of the confident or the unconfident half) is a view of the corpus' entry, only
its row order computed in memory: one entry serves both sides, the NTP run and every trial of
a sweep, each with its own split.

Eviction (`evict`, run by whoever just built an entry): entries whose sources changed or are
gone, builders' leftovers, then the least recently opened entries until the cache fits its
budget (`train.token_cache_gb`); never an entry this process opened, nor one another process
holds the lock of. A worker that already mapped an evicted entry keeps reading it (the files'
space comes back when it exits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftmix_ray.errors import SftmixError

log = logging.getLogger(__name__)

CACHE_ENV = "SFTMIX_TOKEN_CACHE"  # node-local directory for the cache (default: the temp dir)
FILES = {
    "input_ids": np.int32,
    "labels": np.int32,
    "offsets": np.int64,
    "example_id": np.int64,
    "order": np.int64,
}
_SUFFIX = {np.int32: "i32", np.int64: "i64"}
SOURCE_FILE = "source.json"
_OPENED: set[tuple[Path, str]] = set()  # (cache root, key) this process has mapped


def _file(directory: Path, name: str) -> Path:
    return directory / f"{name}.{_SUFFIX[FILES[name]]}"


@dataclass(frozen=True)
class TokenRows:
    """Rows of token ids and labels, in example_id order, backed by memory-mapped arrays."""

    input_ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    example_id: np.ndarray
    order: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) of the i-th row by example_id: views, no copy."""
        j = self.order[i]
        start, end = self.offsets[j], self.offsets[j + 1]
        return self.input_ids[start:end], self.labels[start:end]

    def example_id_of(self, i: int) -> int:
        """example_id of the i-th row by example_id."""
        return int(self.example_id[self.order[i]])

    def lengths(self) -> np.ndarray:
        """Tokens per row, in example_id order."""
        return np.diff(self.offsets)[self.order]

    def ids(self) -> np.ndarray:
        """example_id of every row, ascending."""
        return self.example_id[self.order]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "sftmix-token-cache")


def _parquet_files(source: Path) -> list[Path]:
    return sorted(source.glob("*.parquet")) if source.is_dir() else [source]


def cache_key(source: Path, keep: Path | None) -> str:
    """Hash of the source files' (name, size, mtime) and of the id filter file's."""
    digest = hashlib.sha256()
    for path in [*_parquet_files(source), *([keep] if keep else [])]:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _batches(files: list[Path], columns: list[str]) -> Iterator[Any]:
    """Record batches of the files in order, one file and one batch at a time (no read-ahead:
    the builder's memory stays at a batch, whatever the corpus)."""
    import pyarrow.parquet as pq

    for path in files:
        with pq.ParquetFile(path) as parquet:
            yield from parquet.iter_batches(batch_size=4096, columns=columns, use_threads=False)


def _build(source: Path, target: Path) -> None:
    """Stream every row of `source` into `target`."""
    import pyarrow.compute as pc

    ids: list[np.ndarray] = []
    total = 0
    with contextlib.ExitStack() as stack:
        handles = {
            name: stack.enter_context(open(_file(target, name), "wb"))
            for name in FILES
            if name != "order"
        }
        handles["offsets"].write(np.zeros(1, np.int64).tobytes())
        columns = ["example_id", "input_ids", "labels"]
        for batch in _batches(_parquet_files(source), columns):
            if not batch.num_rows:
                continue
            for name in ("input_ids", "labels"):
                values = pc.list_flatten(batch.column(name)).to_numpy(zero_copy_only=False)
                handles[name].write(values.astype(np.int32, copy=False).tobytes())
            lengths = pc.list_value_length(batch.column("input_ids")).to_numpy()
            ends = total + np.cumsum(lengths, dtype=np.int64)
            total = int(ends[-1])
            handles["offsets"].write(ends.tobytes())
            batch_ids = batch.column("example_id").to_numpy().astype(np.int64)
            handles["example_id"].write(batch_ids.tobytes())
            ids.append(batch_ids)
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    np.argsort(all_ids, kind="stable").astype(np.int64).tofile(_file(target, "order"))


def _map(directory: Path) -> TokenRows:
    arrays = {}
    for name, dtype in FILES.items():
        path = _file(directory, name)
        # np.memmap cannot map an empty file; an empty array is the same thing.
        size = path.stat().st_size
        arrays[name] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return TokenRows(**arrays)


def open_token_rows(
    source: Path, keep: Path | None = None, root: Path | None = None, budget_gb: float = 0.0
) -> TokenRows:
    """The rows of a Parquet file/directory (only example_ids listed in `keep` when given),
    built once per node into the cache under a file lock and memory-mapped by every caller.
    Before and after a build the cache is trimmed to `budget_gb` (0: no size limit; `evict`).
    An entry found incomplete (its files cut short) is built again. `keep` selects from the
    corpus' own entry (`select`): a new split builds nothing."""
    root = (root or cache_root()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(source, None)
    final = root / key
    built = False
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per node; the others wait, then map
        if final.exists() and not _intact(final):
            log.warning("token cache %s: entry %s is incomplete; building it again", root, key)
            _remove(root, final)
        if not final.exists():  # this process builds it; the node's others wait above
            _trim(root, budget_gb)  # room for the new entry first
            tmp = _private_name(root, key)
            tmp.mkdir()
            try:
                _build(source, tmp)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)  # a restart must not find it filling
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SftmixError(_disk_full(root, source)) from exc
                raise
            paths = {"source": str(source.resolve()), "keep": None}
            (tmp / SOURCE_FILE).write_text(json.dumps(paths), encoding="utf-8")
            os.replace(tmp, final)
            built = True
        rows = _map(final)  # under the lock: an evicting process cannot remove it meanwhile
        os.utime(final)  # last opened, for eviction
    _OPENED.add((root, key))
    if built:
        _trim(root, budget_gb)
    return rows if keep is None else select(rows, keep)


def select(rows: TokenRows, keep: Path) -> TokenRows:
    """The rows whose example_id the Parquet file `keep` lists (ids it lists that `rows` lacks
    are not rows), as a view of `rows`: the same mapped arrays, another order (8 bytes a row
    in memory). A split used to be an entry of its own: each trial of a sweep over
    `split.ratio` built both sides again, two passes over OUT/data and the corpus' size on
    each node's disk per trial."""
    import pyarrow.parquet as pq

    listed = pq.read_table(keep, columns=["example_id"]).column("example_id")
    wanted = np.unique(listed.to_numpy().astype(np.int64, copy=False))
    ids = rows.ids()  # ascending
    at = np.searchsorted(ids, wanted)
    inside = at < len(ids)
    found = np.zeros(len(wanted), dtype=bool)
    found[inside] = ids[at[inside]] == wanted[inside]
    return dataclasses.replace(rows, order=np.ascontiguousarray(rows.order[at[found]]))


def _disk_full(root: Path, source: Path) -> str:
    """The error of a build that filled the cache's disk: where, how much it needs."""
    import pyarrow.parquet as pq

    tokens = rows = 0
    try:
        for path in _parquet_files(source):
            meta = pq.ParquetFile(path).metadata
            paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
            column = paths.index("input_ids.list.element")
            for group in range(meta.num_row_groups):
                tokens += meta.row_group(group).column(column).num_values
                rows += meta.row_group(group).num_rows
        needed = (8 * tokens + 24 * rows) / 2**30  # ids and labels int32; three int64s a row
        free = shutil.disk_usage(root).free / 2**30
        size = f", which take up to {needed:.1f} GB ({tokens} tokens, {rows} rows)"
        size += f"; {free:.1f} GB free now"
    except (OSError, ValueError):  # the message without the figures, never another error
        size = ""
    return (
        f"token cache {root}: the disk filled while building the token rows of {source}"
        f"{size}. Point "
        f"train.token_cache_dir (or ${CACHE_ENV}) at a node-local disk with room, or free "
        "space there; train.token_cache_gb trims older entries, never the one being built"
    )


def _private_name(root: Path, key: str) -> Path:
    """`.<key>.<pid>-<random>.tmp`: a build or removal in progress, unique across processes
    (PIDs repeat across containers that share a directory)."""
    return root / f".{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def _intact(entry: Path) -> bool:
    """Whether every file of the entry is there with consistent sizes."""
    try:
        size = {name: _file(entry, name).stat().st_size for name in FILES}
    except FileNotFoundError:
        return False
    rows = size["example_id"] // 8
    if size["order"] != size["example_id"] or size["offsets"] != 8 * (rows + 1):
        return False
    if size["input_ids"] != size["labels"]:
        return False
    with open(_file(entry, "offsets"), "rb") as fh:
        fh.seek(-8, os.SEEK_END)
        tokens = int(np.frombuffer(fh.read(8), np.int64)[0])
    return 4 * tokens == size["input_ids"]


def _remove(root: Path, entry: Path) -> None:
    """Rename `entry` away, then delete it: a crash midway never leaves a half-removed entry
    that looks whole. The caller holds its lock."""
    doomed = _private_name(root, entry.name)
    os.replace(entry, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _trim(root: Path, budget_gb: float) -> None:
    """`evict`, whose failures (permissions, a lock the filesystem refuses) are logged: a
    cache that cannot be trimmed must not stop training."""
    try:
        evict(root, budget_gb)
    except OSError as exc:
        log.warning("token cache %s: could not trim it: %s", root, exc)


@dataclass(frozen=True)
class Evicted:
    key: str
    reason: str  # "stale" (its sources changed or are gone), "leftover", "budget"
    bytes: int


def _size(directory: Path) -> int:
    """Bytes of the files in `directory` (0 once another process has removed it)."""
    try:
        return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    except FileNotFoundError:
        return 0


def _last_opened(entry: Path) -> float:
    try:
        return entry.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _is_stale(entry: Path) -> bool:
    """Whether the entry's recorded sources are gone or no longer hash to its key, or it holds
    one split side (sides are views of their corpus' entry now). An entry without a readable
    record, or whose sources cannot be read for another reason (a
    permission, a network filesystem's hiccup), is not called stale: the budget decides."""
    try:
        paths = json.loads((entry / SOURCE_FILE).read_text(encoding="utf-8"))
        source = Path(paths["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if paths.get("keep"):  # a split side's own entry (before sides were views): never opened
        return True
    try:
        return cache_key(source, None) != entry.name
    except FileNotFoundError:
        return True  # the corpus is gone
    except OSError:
        return False


@contextlib.contextmanager
def _unless_locked(root: Path, key: str) -> Iterator[bool]:
    """Hold `key`'s lock if no other process does (a builder holds it while building, an
    opener while mapping); yields whether it got it."""
    with open(root / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _remove_unlocked(root: Path, entry: Path) -> bool:
    """Remove `entry` if no other process holds its lock."""
    with _unless_locked(root, entry.name) as free:
        if not free:
            return False
        try:
            _remove(root, entry)
        except FileNotFoundError:  # another process removed it first
            return False
    return True


def evict(root: Path, budget_gb: float) -> list[Evicted]:
    """Trim the cache at `root`: leftovers of builds cut short, stale entries, then
    the least recently opened entries while the cache holds more than `budget_gb` (0: no
    size limit). Entries this process opened are kept. Each removal is logged; returns them."""
    removed: list[Evicted] = []
    for leftover in root.glob(".*.tmp"):  # `_private_name`: a build or removal cut short
        with _unless_locked(root, leftover.name[1:].split(".")[0]) as free:
            if free and leftover.is_dir():  # nobody is building that key
                size = _size(leftover)
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(Evicted(leftover.name, "leftover", size))
    mine = {key for opened_root, key in _OPENED if opened_root == root}
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    kept = []
    for entry in entries:
        if entry.name not in mine and _is_stale(entry):
            size = _size(entry)
            if _remove_unlocked(root, entry):
                removed.append(Evicted(entry.name, "stale", size))
                continue
        kept.append(entry)
    if budget_gb > 0:
        sizes = {entry: _size(entry) for entry in kept}
        total = sum(sizes.values())
        for entry in sorted(kept, key=_last_opened):
            if total <= budget_gb * 1024**3:
                break
            if entry.name not in mine and _remove_unlocked(root, entry):
                removed.append(Evicted(entry.name, "budget", sizes[entry]))
                total -= sizes[entry]
    for item in removed:
        log.warning(
            "token cache %s: removed %s (%s, %.2f GB)",
            root,
            item.key,
            item.reason,
            item.bytes / 1e9,
        )
    return removed
