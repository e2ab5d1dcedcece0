"""The host copy and writer thread behind DDP's and DeepSpeed's background saves."""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict, namedtuple
from pathlib import Path

import pytest
import torch

from sftmix_ray.train.background_save import BackgroundWriter, host_copy


def test_host_copy_is_a_snapshot_of_nested_state() -> None:
    """Later in-place updates (an optimizer step) do not reach the copy; containers keep
    their types; views are copied with their own elements only."""
    Pair = namedtuple("Pair", "a b")
    flat = torch.arange(10.0)
    state = {
        "weights": OrderedDict(w=torch.ones(2, 3)),
        "adam": defaultdict(dict, {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(1.0)}}),
        "groups": [{"lr": 1e-3, "params": [0, 1]}],
        "pair": Pair(torch.ones(1), "x"),
        "view": flat[2:4],
        "dtype": torch.bfloat16,
    }
    copied = host_copy(state)
    state["weights"]["w"].add_(1.0)
    state["adam"][0]["exp_avg"].add_(5.0)
    state["pair"].a.mul_(3.0)
    flat.zero_()
    state["groups"][0]["lr"] = 9.0
    assert torch.equal(copied["weights"]["w"], torch.ones(2, 3))
    assert torch.equal(copied["adam"][0]["exp_avg"], torch.zeros(3))
    assert isinstance(copied["weights"], OrderedDict) and isinstance(copied["adam"], defaultdict)
    assert isinstance(copied["pair"], Pair) and float(copied["pair"].a) == 1.0
    assert copied["groups"] == [{"lr": 1e-3, "params": [0, 1]}]
    assert torch.equal(copied["view"], torch.tensor([2.0, 3.0]))
    assert copied["view"].untyped_storage().nbytes() == 2 * 4  # not the whole base storage
    assert copied["dtype"] is torch.bfloat16


def test_writer_writes_in_order_off_the_caller_thread_and_raises_failures(tmp_path: Path) -> None:
    threads: list[str] = []
    written: list[str] = []

    def write(name: str) -> None:
        threads.append(threading.current_thread().name)
        (tmp_path / name).write_text(name)
        written.append(name)

    writer = BackgroundWriter()
    for name in ("a", "b", "c"):
        writer.write(write, name)
    writer.finish().result(timeout=30)
    assert written == ["a", "b", "c"] and sorted(p.name for p in tmp_path.iterdir()) == written
    assert all(t.startswith("checkpoint-writer") for t in threads)

    def fail() -> None:
        raise OSError("disk full")

    writer.write(fail)
    writer.write(write, "d")  # a later file of the same save still runs
    with pytest.raises(OSError, match="disk full"):
        writer.finish().result(timeout=30)
    assert writer.finish().result(timeout=30) is None  # the next save starts clean


def test_a_run_removal_cut_short_leaves_no_snapshot_naming_removed_checkpoints(
    tmp_path: Path,
) -> None:
    """Ray Train's snapshot lists a run's checkpoints; one that names deleted checkpoints
    fails the next run of that name at start (`CheckpointManagerInitializationError`) until
    the directory is removed by hand. The snapshot goes first, so a removal that fails midway
    (here: after one checkpoint, as an NFS error would) leaves only checkpoints behind."""
    import shutil

    import pyarrow.fs as pafs

    from sftmix_ray.train.checkpointing import delete_run_dir

    run = tmp_path / "train-abc"
    for step in (1, 2, 3):
        (run / f"checkpoint-{step:08d}-0123abcd").mkdir(parents=True)
        (run / f"checkpoint-{step:08d}-0123abcd" / "state.pt").write_bytes(b"x" * 10)
    (run / "checkpoint_manager_snapshot.json").write_text('{"checkpoint_results": []}')

    class FailsMidway:  # a filesystem whose removal stops after one checkpoint
        def __init__(self) -> None:
            self.local = pafs.LocalFileSystem()

        def __getattr__(self, name: str):
            return getattr(self.local, name)

        def delete_dir(self, path: str) -> None:
            shutil.rmtree(Path(path) / "checkpoint-00000001-0123abcd")
            raise OSError(5, "Input/output error", path)

    with pytest.raises(OSError, match="Input/output error"):
        delete_run_dir(FailsMidway(), str(run))
    assert not (run / "checkpoint_manager_snapshot.json").exists()
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint-00000002-0123abcd", "checkpoint-00000003-0123abcd",
    ]  # fmt: skip
    assert delete_run_dir(pafs.LocalFileSystem(), str(run)) == 2 and not run.exists()
