"""Distribution strategies: wrap a plain model in DDP, FSDP2 or DeepSpeed ZeRO-2/3.

Every strategy exposes the same small surface the loop needs: `module` (call it for the loss),
`backward`, `step` (clip, optimizer, scheduler; returns the grad norm), `no_sync` for
accumulation, sharded training checkpoints, and `full_state_dict` for the Hugging Face export.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sftmix_ray.config import TrainConfig
from sftmix_ray.train.background_save import BackgroundWriter, host_copy, host_staged_engine
from sftmix_ray.train.forward import CausalLMWithLoss
from sftmix_ray.train.meta_init import RankZeroWeights, materialize_from_rank0

MODEL_PREFIX = "model."  # the wrapper's state-dict prefix in front of the HF model's keys


def lr_lambda(total_steps: int, warmup_steps: int, kind: str) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warmup, then cosine/linear/flat."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return f


log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(MODEL_PREFIX): v for k, v in state.items()}


def _frozen(wrapper: nn.Module) -> set[str]:
    """The wrapper's state-dict names of parameters that do not train (LoRA's base weights)."""
    return {name for name, p in wrapper.named_parameters() if not p.requires_grad}


def _trainable_only(state: dict[str, torch.Tensor], frozen: set[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k not in frozen}


def _tied_aliases(wrapper: nn.Module) -> set[str]:
    """State-dict names that repeat a parameter under a second name (tied input and output
    embeddings: Llama-3.2-1B/3B, Qwen2.5 up to 3B, Gemma); `named_parameters` lists each once."""
    every = {name for name, _ in wrapper.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in wrapper.named_parameters()}


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class TorchStrategy:
    """DDP (or a single process) and FSDP2 share the torch optimizer path."""

    def __init__(self, wrapper: CausalLMWithLoss, train: TrainConfig, total_steps: int):
        self.wrapper = wrapper
        self.train = train
        # Frozen weights (a LoRA run's base) are read from the model at every start: resume
        # checkpoints and adapter exports hold the trained parameters only.
        self.frozen = _frozen(wrapper)
        # Tied weights are saved under one name: safetensors refuses two names for one tensor
        # ("Some tensors share memory"), and loading the parameter restores it under both.
        self.not_saved = self.frozen | _tied_aliases(wrapper)
        self._writer: BackgroundWriter | None = None  # DDP's background saves (first use)
        self.step_applied = True  # whether the last `step` updated the weights
        self.module = self._wrap(wrapper)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.module.parameters() if p.requires_grad],
            lr=train.learning_rate,
            weight_decay=train.weight_decay,
        )
        warmup = math.ceil(train.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, warmup, train.lr_scheduler_type)
        )

    def _wrap(self, wrapper: nn.Module) -> nn.Module:
        if _world() == 1:
            return wrapper
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(wrapper)

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce on micro-batches that do not end an optimizer step."""
        if sync or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step optimizer and scheduler, zero grads; returns the pre-clip grad norm.

        A gradient whose norm is not finite (inf or NaN: a bf16 overflow, a poisoned row)
        updates nothing: the optimizer and the schedule stay where they were and the gradient
        is dropped, as DeepSpeed's ZeRO optimizers do (`step_applied` is then False). The norm
        is the global one (DDP's gradients are all-reduced, FSDP2's norm is gathered), so every
        rank takes the same decision. Without the check, clipping by a NaN norm and one AdamW
        step turn every weight into NaN and the run goes on to export a NaN model.
        """
        max_norm = self.train.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        value = float(norm)
        self.step_applied = math.isfinite(value)
        if self.step_applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def full_state_dict(
        self, trainable_only: bool = False, masters: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The whole HF model's weights (or its trained ones only) on rank 0, None elsewhere;
        a collective call. `masters` asks for the fp32 master weights: DDP's (and FSDP2's)
        parameters are those already."""
        if _rank() != 0:
            return None
        state = self.wrapper.state_dict()
        return _strip_prefix(_trainable_only(state, self.frozen) if trainable_only else state)

    def save(self, directory: Path) -> None:
        """Training state for resume; rank 0 writes it (DDP replicas are identical)."""
        if _rank() == 0:
            _write_torch_state(*self._resume_state(), directory)

    def save_async(self, directory: Path) -> Future:
        """`save` in the background: rank 0 copies the state to host memory now (training may
        go on changing it) and a thread writes it; returns the future of this rank's part."""
        if self._writer is None:
            self._writer = BackgroundWriter()
        if _rank() == 0:
            self._writer.write(_write_torch_state, *host_copy(self._resume_state()), directory)
        return self._writer.finish()

    def _resume_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The trained weights, and the optimizer and scheduler state (live, not copies)."""
        trained = _trainable_only(self.wrapper.state_dict(), self.not_saved)
        weights = {k: v.detach().contiguous() for k, v in trained.items()}
        rest = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return weights, rest

    def load(self, directory: Path) -> None:
        """Restore model, optimizer and scheduler from `save`."""
        from safetensors.torch import load_file

        missing, unexpected = self.wrapper.load_state_dict(
            load_file(str(directory / "model.safetensors")), strict=False
        )
        _check_restored(missing, unexpected, self.not_saved, directory)
        # map_location: the saving rank's device is not necessarily this rank's.
        state = torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class FSDPStrategy(TorchStrategy):
    """FSDP2: `fully_shard` each decoder layer, then the wrapper (which owns the LM head).

    With `weights`, the wrapper was built on the meta device: after sharding, each rank
    allocates its shards on `device` and rank 0's checkpoint fills them (`meta_init`).
    """

    def __init__(
        self,
        wrapper: CausalLMWithLoss,
        train: TrainConfig,
        total_steps: int,
        *,
        weights: RankZeroWeights | None = None,
        device: torch.device | None = None,
        bf16_on_cpu: bool = False,
    ):
        self._weights, self._device = weights, device or torch.device("cpu")
        # bf16 policies apply with CUDA; `bf16_on_cpu` applies them on the CPU too (tests).
        self._bf16 = train.bf16 and (torch.cuda.is_available() or bf16_on_cpu)
        super().__init__(wrapper, train, total_steps)
        # Background saves run their collectives (plans, metadata) on a thread of their own:
        # on a gloo group of their own, never on the training group (NCCL has no CPU backend,
        # and two threads must not share one group). Created by every rank at the same point.
        # Its timeout is the training group's: the save's last gather waits for the slowest
        # rank's write to shared storage (gloo's default, 30 min, is shorter than 96 GB to NFS).
        self._save_group = None
        if train.async_checkpoint and dist.is_initialized():
            timeout = datetime.timedelta(seconds=train.collective_timeout_s)
            self._save_group = dist.new_group(backend="gloo", timeout=timeout)

    def _wrap(self, wrapper: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        layer_policy, root_policy = fsdp_mixed_precision(self._bf16)
        for layer in _decoder_layers(wrapper):
            fully_shard(layer, mp_policy=layer_policy)
        fully_shard(wrapper, mp_policy=root_policy)
        if self._weights is not None:  # before the optimizer exists: no state to rebuild
            materialize_from_rank0(wrapper, self._weights, self._device, MODEL_PREFIX)
            self._weights.state.clear()  # rank 0's full copy goes before the optimizer state
            self._weights.buffers.clear()
            self._weights = None
        return wrapper

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Reduce-scatter every micro-batch (sharded gradients only) unless deferring is asked.

        Deferring the gradient sync to the last micro-batch keeps *unsharded* fp32 gradients
        between micro-batches: the whole model's size on every GPU (32 GB for 8B).
        """
        if self.train.fsdp_defer_grad_sync:
            self.module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def full_state_dict(
        self, trainable_only: bool = False, masters: bool = False
    ) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
        )
        state = get_model_state_dict(self.module, options=options)
        return _strip_prefix(state) if _rank() == 0 else None

    def _dcp_options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        frozen = bool(self.frozen)  # then only the trained parameters are saved and restored
        return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)

    def _dcp_state(self) -> dict[str, Any]:
        """This rank's shards of the weights and optimizer state, as DCP saves and loads them."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        options = self._dcp_options()
        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=options)
        return {"model": model_state, "optimizer": optim_state}

    def _save_scheduler(self, directory: Path) -> None:
        if _rank() == 0:
            torch.save({"scheduler": self.scheduler.state_dict()}, directory / "scheduler.pt")

    def save(self, directory: Path) -> None:
        """Sharded DCP checkpoint: each rank writes its own shard (merged by Ray's storage)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(), checkpoint_id=str(directory))
        self._save_scheduler(directory)

    def save_async(self, directory: Path) -> Future:
        """`save` in the background: the state is copied to host memory now (training may
        go on changing it), then written by a thread; returns the future of this rank's part.
        The host copy is this rank's shards of the weights and optimizer state (~12 GB per
        rank for 8B with Adam on 8 GPUs), held until the write ends."""
        import torch.distributed.checkpoint as dcp

        state = self._dcp_state()
        # No copy-ahead: with it, DCP's writer thread stages through a CUDA stream of its
        # thread's current device, which is GPU 0 on every rank (a CUDA context each there).
        writer = dcp.FileSystemWriter(str(directory), per_thread_copy_ahead=0)
        future = dcp.async_save(state, storage_writer=writer, process_group=self._save_group)
        self._save_scheduler(directory)
        # `async_save` is typed to return a Future or, with a custom stager, an AsyncSaveResponse.
        return future  # type: ignore[return-value]

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self._dcp_options(),
        )
        sched = torch.load(directory / "scheduler.pt", weights_only=True, map_location="cpu")
        self.scheduler.load_state_dict(sched["scheduler"])


class DeepSpeedStrategy:
    """DeepSpeed ZeRO-2/3 from our config, or a user's DeepSpeed JSON."""

    def __init__(self, wrapper: CausalLMWithLoss, train: TrainConfig, total_steps: int):
        import deepspeed

        skip_cpu_shm_comm_build()
        self.wrapper = wrapper
        self.train = train
        self.frozen = _frozen(wrapper)
        ds_config = deepspeed_config(train)
        self.stage = zero_stage(ds_config)
        if self.stage == 3:
            wrapper.register_head_for_zero3()
        optimizer = torch.optim.AdamW(
            [p for p in wrapper.parameters() if p.requires_grad],
            lr=train.learning_rate,
            weight_decay=train.weight_decay,
        )
        warmup = math.ceil(train.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total_steps, warmup, train.lr_scheduler_type)
        )
        self.step_applied = True  # whether the last `step` updated the weights
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=wrapper,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        # Background saves: DeepSpeed's own writes go through an engine that stages a host
        # copy and leaves the files to a writer thread (`background_save`).
        self._writer: BackgroundWriter | None = None
        if train.async_checkpoint:
            self._writer = BackgroundWriter()
            self.module.checkpoint_engine = host_staged_engine(self.module._config, self._writer)

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # DeepSpeed counts micro-batches itself

    def backward(self, loss: torch.Tensor) -> None:
        # Our loss is already normalized over the whole accumulation window: no extra 1/GAS.
        # `scale_wrt_gas=False` is not enough alone: the engine's forward hooked the loss to
        # divide its gradient by GAS unless a hook on the tensor backward starts from fires
        # first, and that tensor is the loss itself where the optimizer does not rescale it
        # (BF16_Optimizer: ZeRO-0/1 with bf16 from a user's JSON), so the division happened.
        # A fresh tensor (a no-op view in autograd) always comes first.
        self.module.backward(loss.view_as(loss), scale_wrt_gas=False)
        self.module.step()  # an optimizer step only at DeepSpeed's accumulation boundary

    def step(self) -> float:
        """The step's grad norm; DeepSpeed's ZeRO optimizers already skipped the update of a
        non-finite gradient (engine `was_step_applied`), its schedule included. Under fp16 (a
        user's DeepSpeed JSON) such a skip is the dynamic loss scaler's routine overflow, not
        counted as a skipped step (DeepSpeed logs it and lowers the scale)."""
        self.step_applied = bool(self.module.was_step_applied()) or self.module.fp16_enabled()
        norm = self.module.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def full_state_dict(
        self, trainable_only: bool = False, masters: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """The weights on rank 0 (None elsewhere); a collective call. Under bf16 or fp16
        DeepSpeed's parameters are 16-bit copies of the optimizer's fp32 master weights:
        `masters` (an fp32 export, a LoRA adapter) takes the trained parameters from the masters
        instead, where a 16-bit copy has lost every update smaller than its rounding step
        (1/256 of the weight in bf16: most of a step at the recipe's learning rate of 2e-6)."""
        if self.stage == 3:
            state = self.module._zero3_consolidated_16bit_state_dict(
                exclude_frozen_parameters=trainable_only
            )
        else:
            state = self.wrapper.state_dict() if _rank() == 0 else None
            if state is not None and trainable_only:
                state = _trainable_only(state, self.frozen)
        if masters and (self.module.bfloat16_enabled() or self.module.fp16_enabled()):
            state = self._with_masters(state)
        return _strip_prefix(state) if _rank() == 0 and state is not None else None

    def _with_masters(self, state: StateDict | None) -> StateDict | None:
        """`state` (rank 0's; None elsewhere) with each trained parameter's fp32 master, under
        every name it has (tied embeddings). One collective per parameter: each rank holds one
        whole fp32 parameter at a time (2.1 GB at most at 8B: the 128k x 4096 embedding)."""
        from deepspeed.utils import safe_get_full_fp32_param

        names: dict[int, list[str]] = {}
        warned = False
        for name, param in self.wrapper.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        for name, param in self.wrapper.named_parameters():
            if not param.requires_grad:
                continue
            master = safe_get_full_fp32_param(param)  # the same call on every rank
            if master is None:  # FP16_Optimizer (ZeRO-0 with fp16) links no masters
                if _rank() == 0 and not warned:
                    log.warning("no fp32 master weight for %s: exported in 16 bits", name)
                warned = True
                continue
            if state is not None:
                for alias in names[id(param)]:
                    state[alias] = master.detach().to("cpu")  # the parameter's own shape
        return state

    def save(self, directory: Path) -> None:
        self._save_checkpoint(directory)
        if self._writer is not None:  # written in the background: wait for this rank's files
            self._writer.finish().result()

    def save_async(self, directory: Path) -> Future:
        """`save` in the background (with `train.async_checkpoint`): every file DeepSpeed saves
        is copied to host memory now and written by a thread; the future of this rank's part."""
        if self._writer is None:
            raise RuntimeError("DeepSpeed saves in the background only with train.async_checkpoint")
        self._save_checkpoint(directory)
        return self._writer.finish()

    def _save_checkpoint(self, directory: Path) -> None:
        frozen = bool(self.frozen)
        self.module.save_checkpoint(str(directory), tag="ds", exclude_frozen_parameters=frozen)

    def load(self, directory: Path) -> None:
        # Without the frozen weights in the checkpoint, the module's own (loaded) ones stay.
        self.module.load_checkpoint(str(directory), tag="ds", load_module_strict=not self.frozen)


def _write_torch_state(
    weights: dict[str, torch.Tensor], rest: dict[str, Any], directory: Path
) -> None:
    """DDP's resume files: the trained weights, then the optimizer and scheduler state."""
    from safetensors.torch import save_file

    save_file(weights, str(directory / "model.safetensors"))
    torch.save(rest, directory / "optimizer.pt")


def _check_restored(
    missing: list[str], unexpected: list[str], not_saved: set[str], directory: Path
) -> None:
    """A resume checkpoint restored every trained parameter and nothing unknown (`not_saved`:
    frozen weights and tied aliases, which the model already holds)."""
    lost = [k for k in missing if k not in not_saved]
    if lost or unexpected:
        raise RuntimeError(
            f"checkpoint {directory} does not match the model: missing {lost[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def skip_cpu_shm_comm_build() -> bool:
    """On DeepSpeed's CPU accelerator, do not JIT-compile its shared-memory all-reduce op.

    DeepSpeed's communication backend compiles a C++ extension (`deepspeed_shm_comm`) when it
    first initializes on the CPU accelerator: 55 s on an idle 2-core machine, 160 s under load,
    and again whenever the environment's path changes (the build cache is keyed by name only).
    The op serves `inference_all_reduce` (tensor-parallel inference) alone; ZeRO training
    reduces through torch.distributed, so skipping it changes no result. Returns whether it was
    skipped; GPU accelerators never build it, and an already initialized backend is left alone.
    """
    import deepspeed.comm.comm as ds_comm
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or ds_comm.cdb is not None:
        return False
    # By name: `import deepspeed.comm.torch as x` binds the `torch` attribute of
    # `deepspeed.comm` (PyTorch itself), not the submodule.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if not hasattr(ds_torch_comm, "build_shm_op"):
        return False
    ds_torch_comm.build_shm_op = lambda: None
    return True


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it has none)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def zero3_partitioned_loading(train: TrainConfig) -> Any | None:
    """Under ZeRO-3, what makes `from_pretrained` build the model partitioned: while the
    returned object is alive, transformers constructs the model under `deepspeed.zero.Init`
    (each rank allocates only its partition) and loads the checkpoint into the partitions.
    Keep a reference until `deepspeed.initialize` (transformers holds it weakly). None for
    other strategies and stages."""
    if train.strategy != "deepspeed":
        return None
    config = deepspeed_config(train)
    if zero_stage(config) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    skip_cpu_shm_comm_build()  # zero.Init brings DeepSpeed's communication backend up
    return HfDeepSpeedConfig(config)


def load_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype a worker loads the model in: fp32, except under DeepSpeed ZeRO-0/1/2 with
    bf16 or fp16 on. DeepSpeed casts every parameter to that dtype at `initialize`, before
    anything reads it, and builds its fp32 master weights from those copies; loading in it
    gives the same model with half the host memory per rank while every rank loads at once
    (8 x 16 GB instead of 8 x 32 GB at 8B, 8 x 28 GB instead of 8 x 56 GB at 14B, against a
    GPU pod's 480 GiB). ZeRO-3 builds the model partitioned (`zero3_partitioned_loading`); DDP
    and FSDP2 keep fp32 parameters (bf16 runs under autocast or FSDP2's param policy)."""
    if train.strategy != "deepspeed":
        return torch.float32
    config = deepspeed_config(train)
    if zero_stage(config) == 3:
        return torch.float32
    if config.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def deepspeed_config(train: TrainConfig) -> dict[str, Any]:
    """Our ZeRO config, or the user's JSON with batch keys filled in from our config."""
    if train.deepspeed_config:
        config = json.loads(Path(train.deepspeed_config).read_text(encoding="utf-8"))
    else:
        stage = int(train.deepspeed_stage)
        on_gpu = torch.cuda.is_available()
        # Overlapping the gradient reduction with backward needs CUDA streams.
        zero: dict[str, Any] = {"stage": stage, "overlap_comm": on_gpu}
        if stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        config = {"zero_optimization": zero}
        if train.bf16 and on_gpu:
            # bf16 compute, but gradients accumulate in fp32 (master weights stay fp32).
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    config["train_micro_batch_size_per_gpu"] = train.per_device_train_batch_size
    config["gradient_accumulation_steps"] = train.gradient_accumulation_steps
    config["gradient_clipping"] = train.max_grad_norm
    config.setdefault("bf16", {"enabled": bool(train.bf16 and torch.cuda.is_available())})
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def fsdp_mixed_precision(bf16: bool) -> tuple[Any, Any]:
    """FSDP2 policies `(decoder layers, root)`: bf16 compute over fp32 master weights.

    The root unit does not cast its floating inputs: those are the Mixup weights and the loss
    normalizers, which must reach the loss in fp32 (lambda >= 0.998 rounds to 1.0 in bf16).
    The layers get bf16 hidden states from the root's bf16 embedding anyway.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy(), MixedPrecisionPolicy(cast_forward_inputs=False)
    layer = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    root = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    return layer, root


def _decoder_layers(wrapper: nn.Module) -> Iterator[nn.Module]:
    """The repeated transformer blocks (the usual FSDP wrapping unit)."""
    layers = getattr(wrapper.decoder(), "layers", None)  # type: ignore[operator]
    if layers is None:
        raise ValueError("FSDP needs a decoder with a `layers` ModuleList (Llama-style models)")
    yield from layers


STRATEGIES = {"ddp": TorchStrategy, "fsdp": FSDPStrategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(
    name: str,
    wrapper: CausalLMWithLoss,
    train: TrainConfig,
    total_steps: int,
    *,
    weights: RankZeroWeights | None = None,
    device: torch.device | None = None,
) -> TorchStrategy | DeepSpeedStrategy:
    """Wrap the model with the strategy named by `train.strategy`; `weights` when the wrapper
    was built on the meta device (FSDP2 only: rank 0's checkpoint, sent into the shards)."""
    if name == "fsdp":
        return FSDPStrategy(wrapper, train, total_steps, weights=weights, device=device)
    if weights is not None:
        raise ValueError(f"a model built on the meta device needs the fsdp strategy, not {name}")
    return STRATEGIES[name](wrapper, train, total_steps)
