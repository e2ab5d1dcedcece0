"""The Ray Train loop for both objectives: the reference NTP run and SFTMix training.

Everything comes from the config dict handed to `train_loop_per_worker`; no module globals.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sftmix_ray.batching import collate
from sftmix_ray.config import TrainConfig
from sftmix_ray.train.checkpointing import CheckpointReporter, remove_orphans
from sftmix_ray.train.collectives import all_reduce_sum
from sftmix_ray.train.forward import OnHost
from sftmix_ray.train.meta_init import rank_zero_weights
from sftmix_ray.train.reporting import MetricSinks
from sftmix_ray.train.sampling import BatchPlan
from sftmix_ray.train.spec import RunSpec
from sftmix_ray.train.token_rows import TokenRows, open_token_rows

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"


def training_model(spec: RunSpec, *, meta: bool = False) -> torch.nn.Module:
    """The HF model a worker trains: loaded, gradient checkpointing as configured, train mode.

    `from_pretrained` returns the model in eval mode: dropout off, and transformers recomputes
    a checkpointed layer only when `self.training`, so without `train()` checkpointing does
    nothing and every layer's activations stay in memory.
    """
    from sftmix_ray.modeling import load_model, set_activation_checkpointing
    from sftmix_ray.train.lora import apply_lora, quantized_base_kwargs
    from sftmix_ray.train.meta_init import meta_model
    from sftmix_ray.train.strategies import load_dtype

    lora = spec.train.lora
    if meta:  # the modules, no weights (FSDP2 init)
        model = meta_model(spec.model_path, **_load_options(spec))
    else:
        quantized = quantized_base_kwargs(lora)  # QLoRA: the 4-bit base on this worker's GPU
        if quantized:
            quantized["device_map"] = {"": torch.cuda.current_device()}
        dtype = load_dtype(spec.train)  # DeepSpeed bf16 below ZeRO-3: bf16, else fp32
        model = load_model(spec.model_path, **_load_options(spec), dtype=dtype, **quantized)
    if spec.train.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    if lora.r > 0:
        model = apply_lora(model, lora, spec.train.seed)
    model.train()
    return model


def _load_options(spec: RunSpec) -> dict[str, Any]:
    return {
        "trust_remote_code": spec.trust_remote_code,
        "attn_implementation": spec.attn_implementation,
    }


def checkpoint_steps(total: int, count: int, per_epoch: int | None = None) -> list[int]:
    """`count` steps spread evenly over a run of `total` steps, the last one included; with
    `per_epoch`, the ends of the first `count` epochs instead."""
    if per_epoch is not None:
        return [per_epoch * (k + 1) for k in range(count)]
    return sorted({max(1, round(total * (k + 1) / count)) for k in range(count)})


def batch_plan(train: TrainConfig, streams: list[TokenRows], world: int) -> BatchPlan:
    """Which rows of `streams` every rank trains at every step (the same on all ranks)."""
    return BatchPlan(
        sizes=tuple(len(s) for s in streams),
        rows_per_device=train.per_device_train_batch_size,
        world_size=world,
        grad_accum=train.gradient_accumulation_steps,
        seed=train.seed,
        lengths=None if train.group_by_length == "none" else tuple(s.lengths() for s in streams),
        window_steps=train.length_group_steps,
        group="rows" if train.group_by_length == "rows" else "pairs",
    )


def step_example_ids(plan: BatchPlan, streams: list[TokenRows], step: int) -> list[int]:
    """example_id of every row of optimizer step `step` (0-based), on every rank and
    micro-batch: the plan is the same on all ranks, so no collective is needed."""
    return sorted(
        streams[s].example_id_of(i)
        for micro in range(plan.grad_accum)
        for rank in range(plan.world_size)
        for s, rows in enumerate(plan.rows(step, micro, rank))
        for i in rows
    )


class TrainWorker:
    """One worker's training run."""

    def __init__(self, spec: RunSpec):
        import ray.train

        from sftmix_ray.losses import NTPLoss, build_loss
        from sftmix_ray.modeling import load_tokenizer
        from sftmix_ray.train.forward import CausalLMWithLoss
        from sftmix_ray.train.sampling import total_steps
        from sftmix_ray.train.strategies import build_strategy, zero3_partitioned_loading

        self.spec = spec
        self.train_cfg = train = spec.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = torch.device("cuda" if train.use_gpu else "cpu")
        if train.use_gpu:
            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)  # NCCL object collectives use the current device
        torch.manual_seed(train.seed)
        self.nodes = self._gather_nodes()

        cache = Path(train.token_cache_dir) if train.token_cache_dir else None
        budget = train.token_cache_gb
        self.streams = [
            open_token_rows(Path(source), Path(keep) if keep else None, cache, budget)
            for source, keep in spec.sources
        ]
        self.heldout = None
        if spec.heldout_source:
            self.heldout = open_token_rows(Path(spec.heldout_source), None, cache, budget)
        self.plan = batch_plan(train, self.streams, self.world)
        self.total_steps = total_steps(self.plan, spec.num_train_epochs, spec.max_steps)
        self.tokenizer = load_tokenizer(
            spec.tokenizer_path, trust_remote_code=spec.trust_remote_code
        )
        # FSDP2 over several workers: no rank holds the whole model; every rank builds it on
        # the meta device and rank 0 alone reads the checkpoint, broadcast into the shards.
        # ZeRO-3 likewise: the model is built and loaded partition by partition.
        sharded_init = train.strategy == "fsdp" and self.world > 1
        zero3 = zero3_partitioned_loading(train)
        model = training_model(spec, meta=sharded_init)
        self.config_json = model.config.to_json_string()
        self.loss = build_loss(spec.loss.name, **spec.loss.kwargs)
        self.eval_loss = NTPLoss(chunk_size=train.loss_chunk_size, chunk_mb=train.loss_chunk_mb)
        wrapper = CausalLMWithLoss(model, self.loss)
        weights = None
        if sharded_init:
            weights = rank_zero_weights(self._rank_zero_source(spec))
        elif zero3 is None:  # (ZeRO-3 places its partitions itself)
            wrapper = wrapper.to(self.device)
        self.strategy = build_strategy(
            train.strategy, wrapper, train, self.total_steps,
            weights=weights, device=self.device,
        )  # fmt: skip
        del zero3  # deepspeed.initialize has run: from_pretrained may build whole models again
        self.step = 0
        self.restarts = 0
        self.history: list[dict[str, float]] = []
        self.skipped: list[dict[str, Any]] = []  # steps with a non-finite gradient, their rows

    def _rank_zero_source(self, spec: RunSpec) -> torch.nn.Module | None:
        """The model as rank 0 trains it (LoRA adapters included), on the CPU: what it
        broadcasts into the other ranks' shards. None on every other rank."""
        return training_model(spec) if self.rank == 0 else None

    def _gather_nodes(self) -> list[str]:
        """The Ray node id of every rank (recorded to show where workers ran)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        if self.world == 1:
            return [node]
        nodes: list[Any] = [None] * self.world
        dist.all_gather_object(nodes, node)
        return nodes

    # ------------------------------------------------------------------ batches and losses
    def _micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        per_stream = self.plan.rows(step, micro, self.rank)
        pairs = [self.streams[s].row(i) for s, rows in enumerate(per_stream) for i in rows]
        inputs, labels = [p[0] for p in pairs], [p[1] for p in pairs]
        pad = self.tokenizer.pad_token_id
        return collate(inputs, labels, pad if pad is not None else 0, self.device)

    def _lambda(self, step: int, micro: int) -> torch.Tensor | None:
        """This micro-batch's slice of the step's Mixup weights, drawn for the global batch.

        Drawing per global pair position (not per rank) keeps lambda of every pair the same
        whatever the worker count or accumulation, so runs stay comparable.
        """
        lam = self.loss.sample_lambda(
            self.plan.global_pairs, seed=self.train_cfg.seed, step=step, rank=0
        )
        if lam is None:
            return None
        start = (micro * self.world + self.rank) * self.plan.pairs_per_device
        return lam[start : start + self.plan.pairs_per_device]

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        accum = self.train_cfg.gradient_accumulation_steps
        batches = [self._micro_batch(self.step, m) for m in range(accum)]
        lams = [self._lambda(self.step, m) for m in range(accum)]
        # Normalize by the global count over ranks and micro-batches, so neither changes
        # the loss or its gradients (DDP/FSDP/DeepSpeed average gradients over ranks).
        counts = sum(
            self.loss.normalizer_counts(b["labels_host"], lam) for b, lam in zip(batches, lams)
        )
        normalizers = all_reduce_sum(counts, self.device).float() / self.world
        # Device metrics stay on the device until the step's one all-reduce (a `float()` per
        # micro-batch would stall the host on every forward); host ones are summed here.
        on_device: dict[str, torch.Tensor] = {}
        on_host: dict[str, float] = {}
        tokens = 0
        for m, (batch, lam) in enumerate(zip(batches, lams)):
            with self.strategy.no_sync(m == accum - 1), self._autocast():
                loss, metrics = self.strategy.module(
                    batch["input_ids"],
                    batch["attention_mask"],
                    OnHost(batch["labels_host"]),
                    lam=None if lam is None else OnHost(lam),
                    normalizers=normalizers,
                )
            self.strategy.backward(loss)
            tokens += int(batch["attention_mask_host"].sum())
            for k, v in metrics.items():
                if isinstance(v, torch.Tensor) and v.device.type != "cpu":
                    v = v.detach().to(torch.float64)
                    on_device[k] = on_device[k] + v if k in on_device else v
                else:
                    on_host[k] = on_host.get(k, 0.0) + float(v)
        grad_norm = self.strategy.step()
        lr = self.strategy.lr()
        if not self.strategy.step_applied:
            self._skip(grad_norm)
        self.step += 1
        # Loss terms are each micro-batch's share of the global mean (summed over micro-batches,
        # averaged over ranks); token counts add up; anything else is a mean over calls.
        device_keys, host_keys = sorted(on_device), sorted(on_host)
        host = torch.tensor([on_host[k] for k in host_keys], dtype=torch.float64)
        parts = [torch.stack([on_device[k] for k in device_keys])] if device_keys else []
        stacked = torch.cat([*parts, host.to(self.device)])  # one host-to-device copy
        keys = [*device_keys, *host_keys]
        reduced = all_reduce_sum(stacked, self.device).tolist()  # the step's one host sync
        out = {}
        for k, v in zip(keys, reduced):
            if k in ("loss", "ntp", "mix"):
                out[k] = v / self.world
            elif k == "n_tokens":
                out[k] = v
            else:
                out[k] = v / (self.world * accum)
        out.update({"grad_norm": grad_norm, "lr": lr, "tokens": float(tokens)})
        if not self.strategy.step_applied:
            out["skipped"] = 1.0
        return out

    def _skip(self, grad_norm: float) -> None:
        """Record a step whose update was skipped (its gradient norm is not finite)."""
        ids = step_example_ids(self.plan, self.streams, self.step)
        self.skipped.append(
            {"step": self.step + 1, "grad_norm": str(grad_norm), "example_ids": ids}
        )
        if self.rank == 0:
            log.warning(
                "step %d: gradient norm %s, the update was skipped (%d so far, at most %d: "
                "train.max_skipped_steps); the step's rows by example_id: %s",
                self.step + 1, grad_norm, len(self.skipped), self.train_cfg.max_skipped_steps,
                _some(ids),
            )  # fmt: skip

    def over_skip_limit(self) -> str | None:
        """Why the run must stop (more skipped steps than `train.max_skipped_steps`), or None."""
        limit = self.train_cfg.max_skipped_steps
        if limit < 0 or len(self.skipped) <= limit:
            return None
        last = self.skipped[-1]
        return (
            f"{len(self.skipped)} optimizer steps had a non-finite gradient norm (inf or NaN), "
            f"more than train.max_skipped_steps={limit}: steps "
            f"{_some([s['step'] for s in self.skipped])}; step {last['step']}'s rows by "
            f"example_id: {_some(last['example_ids'])} (every skipped step's rows: "
            f"skipped_steps in {self.spec.history_path}). Lower train.learning_rate, look at "
            "those rows, or raise train.max_skipped_steps; a rerun goes on from the last resume "
            "checkpoint (train.save_steps), if there is one"
        )

    def _autocast(self) -> Any:
        if self.train_cfg.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        import contextlib

        return contextlib.nullcontext()

    def evaluate(self) -> float:
        """Held-out mean response NLL over all workers (token-weighted), in eval mode."""
        if self.heldout is None:
            return float("nan")
        self.strategy.module.eval()
        try:
            with torch.no_grad():
                return self._heldout_nll()
        finally:
            self.strategy.module.train()

    def _heldout_nll(self) -> float:
        heldout = self.heldout
        mine = range(self.rank, len(heldout), self.world)
        rows = self.plan.rows_per_device
        nll = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device
        tokens = 0.0
        idx = list(mine)
        # Equal number of forward calls on every rank (FSDP/ZeRO-3 forwards are collective).
        n_batches = -(-len(range(0, len(heldout), self.world)) // rows)
        one = torch.ones(1, device=self.device)
        for b in range(n_batches):
            # A rank out of rows runs a row again, uncounted (held-out sets smaller than the
            # worker count leave some ranks none at all).
            part = idx[b * rows : (b + 1) * rows] or idx[:1] or [0]
            pairs = [heldout.row(i) for i in part]
            batch = collate(
                [p[0] for p in pairs],
                [p[1] for p in pairs],
                self.tokenizer.pad_token_id or 0,
                self.device,
            )
            with self._autocast():
                loss, _ = self.strategy.module(
                    batch["input_ids"],
                    batch["attention_mask"],
                    OnHost(batch["labels_host"]),
                    normalizers=one,
                    loss=self.eval_loss,
                )
            if idx[b * rows : (b + 1) * rows]:
                nll = nll + loss.detach().to(torch.float64)
                tokens += float(self.eval_loss.normalizer_counts(batch["labels_host"]).sum())
        total = torch.stack([nll, torch.tensor(tokens, dtype=torch.float64, device=self.device)])
        tokens_nll, tokens = all_reduce_sum(total, self.device).tolist()
        return tokens_nll / tokens if tokens > 0 else float("nan")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: Path) -> None:
        self.strategy.save(directory)
        self._write_state(directory)

    def _write_state(self, directory: Path) -> None:
        """Step and history beside the strategy's files (rank 0)."""
        if self.rank == 0:
            state = {"step": self.step, "history": self.history, "skipped": self.skipped}
            (directory / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")

    def save_checkpoint_async(self, directory: Path) -> Future:
        """Start `save_checkpoint` in the background; the future of this rank's part."""
        future = self.strategy.save_async(directory)
        self._write_state(directory)
        return future

    def restore(self, directory: Path) -> None:
        self.strategy.load(directory)
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        self.step = int(state["step"])
        self.history = state["history"]
        self.skipped = state.get("skipped", [])

    def export_hf(self, target: str | None, adapter: str | None = None) -> None:
        """Gather the weights (collective) and save, from rank 0, the HF model to `target` and,
        in a LoRA run, the adapter to `adapter` (either may be None)."""
        if self.train_cfg.lora.r > 0:
            self._export_lora(target, adapter)
            return
        # An fp32 export of a bf16 DeepSpeed run takes the fp32 master weights, not the copies.
        masters = export_dtype(self.train_cfg) == torch.float32
        state = self.strategy.full_state_dict(masters=masters)
        if self.rank != 0 or target is None:
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        from sftmix_ray.modeling import save_hf

        config = AutoConfig.from_pretrained(
            self.spec.model_path, trust_remote_code=self.spec.trust_remote_code
        )
        dtype = export_dtype(self.train_cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # To host memory first, then cast: DDP and ZeRO-2 hand over the live weights on rank 0's
        # GPU, where a cast copy of the whole model would sit beside the optimizer state.
        state = {
            k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in state.items()
        }
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"export is missing weights: {missing[:5]}")
        save_hf(model, self.tokenizer, Path(target))

    def _export_lora(self, target: str | None, adapter: str | None) -> None:
        """A LoRA run's export: only the adapter's weights are gathered (the base did not
        change); rank 0 reloads the base from its checkpoint, puts the adapter on it, saves the
        adapter and the merged model (merged in fp32, written in `train.export_dtype`)."""
        # The adapter's fp32 masters: it is merged in fp32 (small: the adapter alone).
        trained = self.strategy.full_state_dict(trainable_only=True, masters=True)
        if self.rank != 0:
            return
        from sftmix_ray.modeling import load_model, save_hf
        from sftmix_ray.train.lora import apply_lora, save_adapter

        assert trained is not None  # rank 0 holds the gathered weights
        lora = self.train_cfg.lora
        model: Any = apply_lora(
            load_model(self.spec.model_path, **_load_options(self.spec)), lora, self.train_cfg.seed
        )
        missing, unexpected = model.load_state_dict(trained, strict=False)
        absent = [n for n, p in model.named_parameters() if p.requires_grad and n in missing]
        if absent or unexpected:
            raise RuntimeError(f"adapter export: missing {absent[:5]}, unexpected {unexpected[:5]}")
        if adapter is not None:
            save_adapter(model, self.tokenizer, self.spec.model_path, Path(adapter))
        if target is not None:
            merged = model.merge_and_unload().to(export_dtype(self.train_cfg))
            save_hf(merged, self.tokenizer, Path(target))


def export_dtype(train: Any) -> torch.dtype:
    """The dtype HF exports are written in (`train.export_dtype`; auto follows `train.bf16`)."""
    name = train.export_dtype
    if name == "auto":
        name = "bfloat16" if train.bf16 else "float32"
    return torch.bfloat16 if name == "bfloat16" else torch.float32


FAULT_ENV = "SFTMIX_FAULT_AT_STEP"


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Fault-injection hook for the reliability tests: `SFTMIX_FAULT_AT_STEP=STEP:MARKER[,...]`.

    Rank 0 dies (a real process exit, no cleanup) after finishing `STEP`, once per entry: the
    marker file records that the fault happened, so the restarted attempt runs through.
    """
    value = os.environ.get(FAULT_ENV)
    if not value or rank != 0:
        return
    for entry in value.split(","):
        fault_step, marker = entry.split(":", 1)
        if step == int(fault_step) and not Path(marker).exists():
            Path(marker).write_text(f"killed after step {step}\n", encoding="utf-8")
            # Give the controller time to register the checkpoints already reported, so the
            # test knows which one the restart must resume from (a real crash has no grace).
            time.sleep(3)
            os._exit(17)


HOLD_ENV = "SFTMIX_HOLD_AFTER_STEP"


def _maybe_hold(step: int) -> None:
    """Test hook: `SFTMIX_HOLD_AFTER_STEP=STEP:FILE` makes every rank wait after `STEP` until
    FILE exists (the multi-node test sends a reclaim notice meanwhile)."""
    value = os.environ.get(HOLD_ENV)
    if not value:
        return
    hold_step, path = value.split(":", 1)
    while step == int(hold_step) and not Path(path).exists():
        time.sleep(0.05)


def record_start(path: Path, run_name: str) -> int:
    """Count one more worker-group start of `run_name` in `path`; returns the count so far.

    Every start counts, with or without a checkpoint to resume from, so `restarts` (starts
    minus one) is the number of times Ray Train (or a rerun of the same command) started the
    run's workers again. Rank 0 alone calls this, once per worker-group start.
    """
    from sftmix_ray.io_utils import atomic_write_json

    starts = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    starts[run_name] = int(starts.get(run_name, 0)) + 1
    atomic_write_json(path, starts)
    return starts[run_name]


def node_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_threads(requested: int, cpus: int, local_workers: int) -> int:
    """Intra-op threads of one worker: its share of its own node's CPUs among the workers on
    that node, capped by `requested` (> 0: the local cluster's `ray.num_cpus` share)."""
    share = max(1, cpus // max(1, local_workers))
    return min(requested, share) if requested > 0 else share


class PreemptionNotices:
    """Whether a node of the run got a reclaim notice since the last check (Ray Train's
    `get_preemption_info`, which watches Ray's node drains: a spot reclaim, a preemptible
    VM's, an autoscaler's). Asked every `every` steps, on every rank at the same steps (it is
    a collective); each new notice answers True once, and the loop saves a checkpoint then,
    where a reclaimed node used to cost every step since the last `train.save_steps`."""

    def __init__(self, every: int):
        self.every = every
        self.seen: set[tuple[str, ...]] = set()

    def new_notice(self, step: int) -> bool:
        if not self.every or step % self.every:
            return False
        import ray.train

        try:
            info = ray.train.get_preemption_info()
        except (RuntimeError, DeprecationWarning) as exc:  # not a Ray Train worker
            log.warning("preemption notices are not available (%s); not asking again", exc)
            self.every = 0
            return False
        if info is None:
            return False
        nodes = tuple(info.preempted_node_ids)
        if nodes in self.seen:
            return False
        self.seen.add(nodes)
        log.warning("step %d: node(s) %s will be reclaimed (deadline %s ms): saving a "
                    "checkpoint now", step, ", ".join(nodes), info.deadline_ms)  # fmt: skip
        return True


def train_loop_per_worker(config: dict[str, RunSpec]) -> None:
    """Ray Train entry (`train_loop_config={"spec": RunSpec}`): resume if a checkpoint exists,
    train, report, export."""
    import ray.train

    spec = config["spec"]
    local_workers = ray.train.get_context().get_local_world_size()
    threads = worker_threads(spec.torch_threads, node_cpus(), local_workers)
    torch.set_num_threads(threads)
    trainer = TrainWorker(spec)
    if trainer.rank == 0:
        trainer.restarts = record_start(Path(spec.starts_path), spec.run_name) - 1
    checkpoint = ray.train.get_checkpoint()
    orphans = 0
    if trainer.rank == 0:
        orphans = remove_orphans(checkpoint.path if checkpoint is not None else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.restore(Path(d))
    save_every = spec.train.save_steps
    notices = PreemptionNotices(spec.train.preemption_check_steps)
    export_steps = set()
    if spec.export_count:
        per_epoch = trainer.plan.steps_per_epoch() if spec.export_at == "epochs" else None
        export_steps = set(checkpoint_steps(trainer.total_steps, spec.export_count, per_epoch))
    stopped = None
    log_every = spec.train.logging_steps
    eval_every = spec.train.eval_steps
    sinks = MetricSinks(spec, trainer.rank, trainer.step, trainer.total_steps)
    reporter = CheckpointReporter(
        trainer.world, trainer.rank, trainer.device, trainer.save_checkpoint,
        trainer.save_checkpoint_async if spec.train.async_checkpoint else None,
    )  # fmt: skip
    if checkpoint is not None:
        sinks.replay(trainer.history)
    last_time = time.perf_counter()
    while trainer.step < trainer.total_steps:
        metrics = trainer.train_step()
        step = trainer.step
        _maybe_inject_fault(step, trainer.rank)
        _maybe_hold(step)
        now = time.perf_counter()
        metrics["tokens_per_s"] = metrics.pop("tokens") / max(now - last_time, 1e-9)
        last_time = now
        metrics["step"] = float(step)
        if trainer.device.type == "cuda":  # the allocator's own count: no device sync
            peak = torch.cuda.max_memory_allocated(trainer.device)
            metrics["gpu_peak_gib"] = round(peak / 2**30, 3)
        is_last = step == trainer.total_steps
        if (eval_every and step % eval_every == 0) or is_last:
            metrics["eval_loss"] = trainer.evaluate()
        metrics["restarts"] = float(trainer.restarts)
        trainer.history.append({k: round(v, 6) for k, v in metrics.items()})
        sinks.log(step, metrics)
        stopped = trainer.over_skip_limit()  # the same on every rank: the norm is global
        if stopped:
            reporter.settle(metrics)  # a background save in flight stays to resume from
            break
        if step in export_steps:
            trainer.export_hf(str(Path(spec.export_dir) / f"checkpoint-{step}"))
        save = is_last or (save_every and step % save_every == 0) or step in export_steps
        noticed = notices.new_notice(step)  # asked on every rank alike: a collective
        # Every eval is reported (a Tune scheduler stops trials on it), whatever logging_steps.
        if not (save or noticed or step % log_every == 0 or "eval_loss" in metrics):
            continue
        # On a reclaim notice the save is written and registered now, never in the background
        # (a background save is registered at a later report, which may never come).
        reporter.report(metrics, step, save=bool(save or noticed), final=is_last or noticed)
        if trainer.rank == 0:
            log.info("step %d/%d %s", step, trainer.total_steps, _fmt(metrics))
    reporter.close()
    sinks.close()
    if (spec.final_export or spec.adapter_export) and not stopped:
        trainer.export_hf(spec.final_export, spec.adapter_export)
    if trainer.rank == 0:
        from sftmix_ray.io_utils import atomic_write_json

        atomic_write_json(
            Path(spec.history_path),
            {
                "restarts": trainer.restarts,
                "history": trainer.history,
                "nodes": trainer.nodes,
                "torch_threads": threads,
                "async_checkpoints_registered": reporter.async_registered,
                "export_steps": sorted(export_steps),
                "orphan_checkpoints_removed": orphans,
                "skipped_steps": trainer.skipped,
                "stopped": stopped,
            },
        )


def _some(values: list[int], shown: int = 16) -> str:
    """The first `shown` values, comma-separated, and how many more there are."""
    text = ", ".join(map(str, values[:shown]))
    return text + (f" (+{len(values) - shown} more)" if len(values) > shown else "")


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
