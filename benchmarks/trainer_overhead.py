"""`torchtrainer_over_torchrun`: the same DDP loop under Ray Train's TorchTrainer and torchrun.

`train_steps` is the per-worker loop: a seeded small Llama-style model in `CausalLMWithLoss`
with the project's SFTMix loss, wrapped by the `ddp` strategy (DDP over gloo), the step done
as `sftmix_ray.train.loop.TrainWorker.train_step` does it (normalizer counts all-reduced, forward,
backward, clip, AdamW). It times each step after a warm-up and returns the per-step times, each
the slower rank's. Both arms run it with 2 workers and 1 torch thread per worker:

- ray: `TorchTrainer(ScalingConfig(num_workers=2))` on a fresh local Ray cluster (Train V2);
- torchrun: `torchrun --standalone --nproc-per-node 2` running this file with `--worker`.

The ratio is of median step times: start-up (Ray's controller and worker actors, process-group
set-up, imports) is excluded and reported separately as each arm's wall time. The arms
alternate, the order flipping every repeat.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402  (sent to Ray workers by value, like this module)

WORKERS = 2
SETTINGS = {
    "quick": {"warmup": 3, "steps": 20, "repeats": 3},
    "full": {"warmup": 5, "steps": 30, "repeats": 4},
}
LOOP = {
    "hidden": 256, "layers": 4, "ffn": 704, "heads": 4, "vocab": 2048,
    "pairs": 2, "seq_len": 128, "chunk_size": 1024, "mu": 0.2, "alpha": 0.5, "threads": 1,
}  # fmt: skip


def train_steps(config: dict[str, Any]) -> list[float]:
    """Run warm-up and timed DDP steps in an initialized gloo group; per-step max over ranks."""
    from sftmix_ray.config import TrainConfig
    from sftmix_ray.losses import SFTMixLoss
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.strategies import build_strategy

    torch.set_num_threads(config["threads"])
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = {k: config[k] for k in ("vocab", "hidden", "layers", "ffn", "heads", "seq_len")}
    model = _common.seeded_llama(kv_heads=config["heads"], **sizes)
    loss_fn = SFTMixLoss(config["alpha"], config["mu"], chunk_size=config["chunk_size"])
    wrapper = CausalLMWithLoss(model, loss_fn)
    train = TrainConfig(learning_rate=1e-5, lr_scheduler_type="constant")
    strategy = build_strategy("ddp", wrapper, train, total_steps=1_000_000)
    g = torch.Generator().manual_seed(1 + rank)
    shape = (2 * config["pairs"], config["seq_len"])
    input_ids = torch.randint(0, config["vocab"], shape, generator=g)
    attention_mask, labels = torch.ones_like(input_ids), input_ids.clone()

    seconds = []
    for i in range(config["warmup"] + config["steps"]):
        start = time.perf_counter()
        lam = loss_fn.sample_lambda(config["pairs"], seed=0, step=i, rank=rank)
        counts = loss_fn.normalizer_counts(labels, lam).double()
        dist.all_reduce(counts)
        loss, _ = strategy.module(
            input_ids, attention_mask, labels, lam=lam, normalizers=counts.float() / world
        )
        strategy.backward(loss)
        strategy.step()
        seconds.append(time.perf_counter() - start)
    timed = torch.tensor(seconds[config["warmup"] :], dtype=torch.float64)
    dist.all_reduce(timed, op=dist.ReduceOp.MAX)
    return timed.tolist()


def timed_loop(config: dict[str, Any]) -> None:
    """The shared loop; rank 0 writes the step times to `config["out"]` (both arms' entry)."""
    steps = train_steps(config)
    if dist.get_rank() == 0:
        Path(config["out"]).write_text(json.dumps({"step_s": steps}))


def run_ray(config: dict[str, Any], work: Path, name: str) -> tuple[list[float], float]:
    """Step times and wall seconds of one TorchTrainer run on the current Ray cluster."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    threads = str(config["threads"])
    config = {**config, "out": str(work / f"{name}.json")}
    trainer = TorchTrainer(
        timed_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=WORKERS, use_gpu=False, resources_per_worker={"CPU": 1}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(work / "ray_storage"),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": threads}},
        ),
    )
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    return json.loads(Path(config["out"]).read_text())["step_s"], seconds


def run_torchrun(config: dict[str, Any], work: Path, name: str) -> tuple[list[float], float]:
    """Step times and wall seconds of one `torchrun --nproc-per-node 2` run of this file."""
    config = {**config, "out": str(work / f"{name}.json")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={WORKERS}", __file__, "--worker", json.dumps(config),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"])}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    return json.loads(Path(config["out"]).read_text())["step_s"], seconds


def measure(mode: str, repeats: int | None = None) -> dict[str, dict[str, Any]]:
    """The trainer-overhead ratio's runs, settings and details."""
    import ray
    import ray.cloudpickle

    settings = {**SETTINGS[mode], **({"repeats": repeats} if repeats else {})}
    config = {**LOOP, "warmup": settings["warmup"], "steps": settings["steps"]}
    # Ray workers cannot import this script by name; send the loop by value instead.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(_common)
    # Workers' logs stay in Ray's session directory; a failed run still raises with its error.
    ray.init(address="local", num_cpus=os.cpu_count() or WORKERS, include_dashboard=False,
             configure_logging=False, log_to_driver=False)  # fmt: skip
    median: dict[str, list[float]] = {"ray": [], "torchrun": []}
    wall: dict[str, list[float]] = {"ray": [], "torchrun": []}
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
            for repeat in range(settings["repeats"]):
                order = ("torchrun", "ray") if repeat % 2 == 0 else ("ray", "torchrun")
                for arm in order:
                    run = run_ray if arm == "ray" else run_torchrun
                    steps, seconds = run(config, Path(tmp), f"{arm}-{repeat}")
                    median[arm].append(statistics.median(steps))
                    wall[arm].append(seconds)
                runs.append(median["ray"][-1] / median["torchrun"][-1])
                print(
                    f"  repeat {repeat}: ray {median['ray'][-1]:.4f}s/step, torchrun "
                    f"{median['torchrun'][-1]:.4f}s/step, x{runs[-1]:.3f}",
                    flush=True,
                )
    finally:
        ray.shutdown()
    return {
        "torchtrainer_over_torchrun": {
            "runs": runs,
            "settings": {
                **config,
                "workers": WORKERS,
                "repeats": settings["repeats"],
                "backend": "gloo",
                "strategy": "ddp",
                "loss": "sftmix",
            },
            "details": {
                "median_step_s": median,
                "wall_s_with_startup": wall,
            },
        }
    }


def worker_main(config_json: str) -> None:
    """torchrun entry: init gloo from the environment, then the shared loop."""
    dist.init_process_group("gloo")
    try:
        timed_loop(json.loads(config_json))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit(f"usage: torchrun ... {Path(__file__).name} --worker CONFIG_JSON")
    worker_main(sys.argv[2])
