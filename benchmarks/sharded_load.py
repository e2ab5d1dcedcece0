"""Host memory of building an FSDP2-sharded model: meta device + rank 0's broadcast, against
every rank loading the full checkpoint first.

    python benchmarks/sharded_load.py --json out.json            # or through benchmarks/run.py

Two gloo processes on the CPU build the product's `FSDPStrategy` around a seeded Llama-style
model of about 1 GB (fp32) saved with `save_pretrained`, once each way:
- `full`: every rank `from_pretrained`s the whole model, then shards it (the path before);
- `meta`: every rank builds it on the meta device and shards it; rank 0 alone loads the
  checkpoint and broadcasts it into the shards (`sftmix_ray.train.meta_init`).
Per rank: peak RSS (VmHWM) above the RSS measured right before the build. The ratio
`sharded_load_peak_rss_over_full` compares the worst rank other than rank 0 (rank 0 still reads
the whole checkpoint): meta over full.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import measured_ratio, seeded_llama, single_benchmark_main

WORLD = 2
SIZES = {  # (vocab, hidden, layers, ffn, heads, kv_heads): ~1.06 GB and ~2.1 GB in fp32
    "quick": (32000, 1024, 16, 2816, 16, 8),
    "full": (32000, 1536, 18, 4096, 16, 8),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM). Not `ru_maxrss`: Linux carries that over from the
    parent across fork and exec, so a spawned worker would start at its parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _worker(rank: int, init_file: str, model_dir: str, how: str, out: str) -> None:
    from sftmix_ray.config import TrainConfig
    from sftmix_ray.losses import NTPLoss
    from sftmix_ray.modeling import load_model
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.meta_init import meta_model, rank_zero_weights
    from sftmix_ray.train.strategies import FSDPStrategy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        dist.barrier()
        before = _rss_bytes()
        train = TrainConfig(learning_rate=1e-5, warmup_ratio=0.0, lr_scheduler_type="constant")
        if how == "full":
            model = load_model(model_dir)
            strategy = FSDPStrategy(CausalLMWithLoss(model, NTPLoss()), train, 1)
        else:
            model = meta_model(model_dir, trust_remote_code=False, attn_implementation="sdpa")
            source = load_model(model_dir) if rank == 0 else None
            weights = rank_zero_weights(source)
            del source
            strategy = FSDPStrategy(
                CausalLMWithLoss(model, NTPLoss()), train, 1, weights=weights,
                device=torch.device("cpu"),
            )  # fmt: skip
        local = sum(p.to_local().numel() for p in strategy.module.parameters()) * 4
        dist.barrier()
        peak = _peak_rss_bytes()
        Path(out, f"{how}-{rank}.json").write_text(
            json.dumps({"before": before, "peak": peak, "local_param_bytes": local})
        )
    finally:
        dist.destroy_process_group()


def _run(model_dir: Path, how: str, work: Path) -> list[dict[str, int]]:
    init = work / f"pg-{how}"
    init.unlink(missing_ok=True)
    mp.spawn(_worker, args=(str(init), str(model_dir), how, str(work)), nprocs=WORLD, join=True)
    return [json.loads((work / f"{how}-{r}.json").read_text()) for r in range(WORLD)]


def measure(mode: str, repeats: int | None) -> dict[str, dict[str, Any]]:
    """`sharded_load_peak_rss_over_full`, measured `repeats` times (full and meta alternate)."""
    vocab, hidden, layers, ffn, heads, kv = SIZES[mode]
    repeats = repeats or (1 if mode == "quick" else 2)
    runs, details = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = seeded_llama(vocab, hidden, layers, ffn, heads, kv, 256)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(work / "ckpt")
        del model
        for _ in range(repeats):
            ranks = {how: _run(work / "ckpt", how, work) for how in ("full", "meta")}
            grew = {how: [r["peak"] - r["before"] for r in result] for how, result in ranks.items()}
            runs.append(max(grew["meta"][1:]) / max(grew["full"][1:]))
            details.append({"peak_rss_growth_bytes": grew, "ranks": ranks})
    settings = {
        "world_size": WORLD,
        "backend": "gloo (CPU)",
        "model": {"vocab": vocab, "hidden": hidden, "layers": layers, "ffn": ffn},
        "param_bytes_fp32": n_params * 4,
        "repeats": repeats,
        "memory": "peak RSS (VmHWM) minus RSS before the build, worst rank other than rank 0",
    }
    return measured_ratio("sharded_load_peak_rss_over_full", runs, settings, {"repeats": details})


def main(argv: list[str] | None = None) -> int:
    return single_benchmark_main(
        "sharded_load", "sharded_load_peak_rss_over_full", measure, __doc__.splitlines()[0], argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
