"""Loss normalization is invariant to worker count and gradient accumulation (real gloo + DDP).

One process on the whole batch, two DDP processes on half each, and one process accumulating
two micro-batches must give the same loss and the same gradients when the loop follows the
losses' contract: all-reduce the counts, pass `global_counts / world_size`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from sftmix_ray.losses import NTPLoss, SFTMixLoss
from tests.conftest import spawn_ranks

V, D, L, PAIRS, WORLD = 53, 16, 9, 4, 2
TOL = 1e-5


class Toy(nn.Module):
    """A stand-in LM: embedding, one layer, LM head; the loss runs inside forward."""

    def __init__(self, loss: NTPLoss | SFTMixLoss) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D)
        self.layer = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)
        # Large logits make per-token losses differ a lot between rows, so that a mean of
        # per-rank means is visibly not the global mean.
        nn.init.normal_(self.lm_head.weight, std=2.0)
        self.loss = loss

    def forward(self, ids: Tensor, labels: Tensor, lam: Tensor | None, normalizers: Tensor | None):
        hidden = torch.tanh(self.layer(self.embed(ids)))
        return self.loss(hidden, labels, self.lm_head, lam=lam, normalizers=normalizers)


def make_data() -> dict[str, Tensor]:
    """2 * PAIRS rows (confident then unconfident) with very unequal response lengths."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2 * PAIRS, L), generator=g)
    labels = ids.clone()
    # Responses of 8, 8, 1, 1 tokens (confident) and 7, 8, 2, 1 (unconfident) after the shift:
    # the first half of the pairs holds 31 tokens, the second half 5.
    for row, start in enumerate([0, 0, 7, 7, 1, 0, 6, 7]):
        labels[row, : start + 1] = -100
    lam = torch.tensor([0.2, 0.9, 0.55, 0.03])
    return {"ids": ids, "labels": labels, "lam": lam}


def shard(data: dict[str, Tensor], part: int, parts: int) -> dict[str, Tensor]:
    """Part `part` of `parts`: its confident rows, then the unconfident rows they pair with."""
    per = PAIRS // parts
    pairs = list(range(part * per, (part + 1) * per))
    rows = pairs + [PAIRS + p for p in pairs]
    return {"ids": data["ids"][rows], "labels": data["labels"][rows], "lam": data["lam"][pairs]}


def make_loss(name: str) -> NTPLoss | SFTMixLoss:
    # NTP sees the same 2b rows as SFTMix; it just ignores the pairing.
    return NTPLoss(chunk_size=5) if name == "ntp" else SFTMixLoss(mu=0.7, chunk_size=5)


def grad_vector(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def run_single(name: str, micro_batches: int, global_counts: bool) -> tuple[float, Tensor]:
    """One process; with `global_counts`, counts are summed over the step's micro-batches."""
    model = Toy(make_loss(name))
    data = make_data()
    parts = [shard(data, m, micro_batches) for m in range(micro_batches)]
    totals = sum(model.loss.normalizer_counts(p["labels"], p["lam"]) for p in parts)
    loss_sum = 0.0
    for part in parts:
        normalizers = totals if global_counts else None
        loss, _ = model(part["ids"], part["labels"], part["lam"], normalizers)
        # Without global counts, a naive loop averages the micro-batch means.
        (loss if global_counts else loss / micro_batches).backward()
        loss_sum += float(loss.detach()) if global_counts else float(loss.detach()) / micro_batches
    return loss_sum, grad_vector(model)


def _exit_without_teardown() -> None:
    """End a spawned gloo worker that finished (results saved, process group destroyed)
    without the interpreter's teardown. DeepSpeed's engine can leave a native thread that
    aborts the process at teardown ("terminate called without an active exception", SIGABRT;
    about 1 run in 3 while another gloo test runs beside it), and the FSDP2 worker did so once
    in a fresh-clone CI run, after everything the test checks was written; spawn_ranks would
    report that as a failure. Every worker ends so. A worker that raised never gets here: its
    exception still fails the test."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name in ("ntp", "sftmix"):
            for use_global in (True, False):
                model = nn.parallel.DistributedDataParallel(Toy(make_loss(name)))
                part = shard(make_data(), rank, WORLD)
                normalizers = None
                if use_global:
                    counts = model.module.loss.normalizer_counts(part["labels"], part["lam"])
                    dist.all_reduce(counts)  # SUM over ranks
                    normalizers = counts / WORLD
                loss, _ = model(part["ids"], part["labels"], part["lam"], normalizers)
                loss.backward()  # DDP averages the gradients over ranks
                value = loss.detach().clone()
                dist.all_reduce(value)
                results[(name, use_global)] = (float(value) / WORLD, grad_vector(model.module))
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def assert_rel(actual: Tensor | float, expected: Tensor | float, tol: float = TOL) -> None:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    err = float((actual - expected).abs().max() / expected.abs().max())
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def rel_diff(actual: Tensor | float, expected: Tensor | float) -> float:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    return float((actual - expected).abs().max() / expected.abs().max())


def _env_worker(rank: int, out_dir: str) -> None:
    Path(out_dir, f"env-{rank}").write_text(os.environ.get("SFTMIX_RANK_ENV_CHECK", "<unset>"))


@pytest.mark.slow
def test_ranks_get_the_callers_environment(tmp_path: Path, monkeypatch) -> None:
    """`spawn_ranks` forks from a server started once per pytest worker; each rank still sees
    the environment of its caller, a variable set after the server started included."""
    read = lambda: [(tmp_path / f"env-{r}").read_text() for r in range(WORLD)]  # noqa: E731
    spawn_ranks(_env_worker, (str(tmp_path),), WORLD)
    assert read() == ["<unset>"] * WORLD
    monkeypatch.setenv("SFTMIX_RANK_ENV_CHECK", "set after the server started")
    spawn_ranks(_env_worker, (str(tmp_path),), WORLD)
    assert read() == ["set after the server started"] * WORLD


@pytest.mark.slow
def test_loss_and_grads_invariant_to_workers_and_accumulation(tmp_path: Path) -> None:
    spawn_ranks(_ddp_worker, (str(tmp_path / "pg"), str(tmp_path)), WORLD)
    ddp = torch.load(tmp_path / "ddp.pt")
    for name in ("ntp", "sftmix"):
        ref_loss, ref_grad = run_single(name, micro_batches=1, global_counts=True)
        accum_loss, accum_grad = run_single(name, micro_batches=2, global_counts=True)
        ddp_loss, ddp_grad = ddp[(name, True)]
        assert_rel(accum_loss, ref_loss)
        assert_rel(accum_grad, ref_grad)
        assert_rel(ddp_loss, ref_loss)
        assert_rel(ddp_grad, ref_grad)

        # Per-rank / per-micro-batch means are off by far more than the tolerance on these
        # data, so the checks above can fail.
        naive_ddp_loss, naive_ddp_grad = ddp[(name, False)]
        naive_accum_loss, naive_accum_grad = run_single(name, micro_batches=2, global_counts=False)
        assert rel_diff(naive_ddp_loss, ref_loss) > 100 * TOL, name
        assert rel_diff(naive_ddp_grad, ref_grad) > 100 * TOL, name
        assert rel_diff(naive_accum_loss, ref_loss) > 100 * TOL, name
        assert rel_diff(naive_accum_grad, ref_grad) > 100 * TOL, name


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _llama_batch() -> dict[str, Tensor]:
    """Two pairs: rows 0, 1 confident, rows 2, 3 unconfident; unequal response lengths."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 101, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, :10] = -100
    labels[mask == 0] = -100
    return {"ids": ids, "mask": mask, "labels": labels, "lam": torch.tensor([0.3, 0.8])}


def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sftmix_ray.train.forward import CausalLMWithLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for shard_head in (False, True):
            wrapper = CausalLMWithLoss(_tiny_llama(), SFTMixLoss(mu=0.3, chunk_size=3))
            for layer in wrapper.model.model.layers:
                fully_shard(layer, mesh=mesh)
            if shard_head:  # the head as its own FSDP unit: gathered once per chunk, must fail
                fully_shard(wrapper.model.lm_head, mesh=mesh)
            fully_shard(wrapper, mesh=mesh)
            data = _llama_batch()
            rows = [rank, 2 + rank]  # this rank's pair
            counts = wrapper.loss.normalizer_counts(data["labels"][rows], data["lam"][[rank]])
            dist.all_reduce(counts)
            try:
                loss, _ = wrapper(
                    data["ids"][rows],
                    data["mask"][rows],
                    data["labels"][rows],
                    lam=data["lam"][[rank]],
                    normalizers=counts / WORLD,
                )
            except RuntimeError as error:
                results[shard_head] = str(error)
                continue
            loss.backward()  # FSDP2 averages the gradients over ranks
            value = loss.detach().clone()
            dist.all_reduce(value)
            full = {n: p.grad.full_tensor() for n, p in wrapper.model.named_parameters()}
            results[shard_head] = (float(value) / WORLD, full)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "fsdp.pt"))
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


@pytest.mark.slow
def test_wrapper_under_fsdp2_matches_one_process(tmp_path: Path) -> None:
    """FSDP2 shards the head's weight; the wrapper still sees it whole, recompute included."""
    from sftmix_ray.train.forward import CausalLMWithLoss

    spawn_ranks(_fsdp_worker, (str(tmp_path / "pg"), str(tmp_path)), WORLD)
    wrapper = CausalLMWithLoss(_tiny_llama(), SFTMixLoss(mu=0.3, chunk_size=3))
    data = _llama_batch()
    ref_loss, _ = wrapper(data["ids"], data["mask"], data["labels"], lam=data["lam"])
    ref_loss.backward()
    sharded = torch.load(tmp_path / "fsdp.pt")
    loss, grads = sharded[False]
    assert_rel(loss, float(ref_loss.detach()))
    for name, param in wrapper.model.named_parameters():
        assert_rel(grads[name], param.grad)
    # Unequal token counts per rank + a head gathered per call would hang: refused up front.
    assert "own FSDP unit" in sharded[True]


def _zero3_worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.strategies import skip_cpu_shm_comm_build

    skipped = skip_cpu_shm_comm_build()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_allow_untested_optimizer": True,
        # Threshold 0: even the tiny head is partitioned, as a real one would be.
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    try:
        results: dict[str, object] = {}
        for register in (True, False):
            wrapper = CausalLMWithLoss(_tiny_llama(), SFTMixLoss(mu=0.3, chunk_size=3))
            if register:
                wrapper.register_head_for_zero3()
            optimizer = torch.optim.SGD(wrapper.parameters(), lr=0.0)
            engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=config)
            data = _llama_batch()
            rows = [rank, 2 + rank]
            counts = wrapper.loss.normalizer_counts(data["labels"][rows], data["lam"][[rank]])
            dist.all_reduce(counts)
            try:
                loss, _ = engine(
                    data["ids"][rows],
                    data["mask"][rows],
                    data["labels"][rows],
                    lam=data["lam"][[rank]],
                    normalizers=counts / WORLD,
                )
            except RuntimeError as error:
                results["unregistered"] = str(error)
                continue
            engine.backward(loss)  # DeepSpeed averages the gradients over ranks
            value = loss.detach().clone()
            dist.all_reduce(value)
            full = {
                n: safe_get_full_grad(p).clone() for n, p in engine.module.model.named_parameters()
            }
            results["registered"] = (float(value) / WORLD, full)
        results["lora"] = _zero3_lora(rank, out_dir)
        results["masters"] = _zero3_bf16_masters(rank, out_dir)
        # The CPU backend came up without compiling DeepSpeed's shared-memory op.
        shm_op = repr(deepspeed.comm.comm.cdb.shm_comm_op)
        results["shm"] = (skipped, shm_op, skip_cpu_shm_comm_build())
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "zero3.pt"))
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def _lora_wrapper() -> nn.Module:
    """The tiny Llama with LoRA adapters (r 4 on every linear layer), as training builds it."""
    from sftmix_ray.config import LoraConfig
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.lora import apply_lora

    model = apply_lora(_tiny_llama(), LoraConfig(r=4), seed=0)
    return CausalLMWithLoss(model, SFTMixLoss(mu=0.3, chunk_size=3))


def _zero3_lora(rank: int, out_dir: str) -> dict[str, object]:
    """`DeepSpeedStrategy` (ZeRO-3) over a LoRA model: the loss, the adapters' full gradients,
    the adapter-only export, and an adapter-only checkpoint restored into a fresh strategy."""
    import dataclasses

    from deepspeed.utils import safe_get_full_grad

    from sftmix_ray.config import LoraConfig, TrainConfig
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.lora import apply_lora
    from sftmix_ray.train.strategies import DeepSpeedStrategy

    train = TrainConfig(
        strategy="deepspeed", deepspeed_stage=3, lora=LoraConfig(r=4),
        per_device_train_batch_size=2, learning_rate=1e-9,
    )  # fmt: skip
    # An adapter on the LM head itself is refused before DeepSpeed starts: the loss's
    # per-chunk calls of its submodules would differ across ranks (failing at step 2).
    head_lora = dataclasses.replace(train, lora=LoraConfig(r=4, target_modules=["lm_head"]))
    model = apply_lora(_tiny_llama(), head_lora.lora, seed=0)
    try:
        DeepSpeedStrategy(CausalLMWithLoss(model, NTPLoss()), head_lora, total_steps=4)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    strategy = DeepSpeedStrategy(_lora_wrapper(), train, total_steps=4)
    data = _llama_batch()
    rows = [rank, 2 + rank]
    counts = strategy.wrapper.loss.normalizer_counts(data["labels"][rows], data["lam"][[rank]])
    dist.all_reduce(counts)
    loss, _ = strategy.module(
        data["ids"][rows], data["mask"][rows], data["labels"][rows],
        lam=data["lam"][[rank]], normalizers=counts / WORLD,
    )  # fmt: skip
    strategy.module.backward(loss, scale_wrt_gas=False)
    value = loss.detach().clone()
    dist.all_reduce(value)
    grads = {
        n: safe_get_full_grad(p).clone()
        for n, p in strategy.wrapper.model.named_parameters()
        if p.requires_grad
    }
    exported = strategy.full_state_dict(trainable_only=True)
    strategy.save(Path(out_dir) / "zero3-lora")
    fresh = DeepSpeedStrategy(_lora_wrapper(), train, total_steps=4)
    with torch.no_grad():  # other adapter values, so the restore has something to do
        for name, param in fresh.module.named_parameters():
            if "lora_B" in name:
                param.ds_tensor.fill_(0.5) if hasattr(param, "ds_tensor") else param.fill_(0.5)
    before = fresh.full_state_dict(trainable_only=True)
    fresh.load(Path(out_dir) / "zero3-lora")
    restored = fresh.full_state_dict(trainable_only=True)
    return {"loss": float(value) / WORLD, "grads": grads, "exported": exported,
            "before": before, "restored": restored, "refused": refused}  # fmt: skip


def _zero3_bf16_masters(rank: int, out_dir: str) -> dict[str, object]:
    """ZeRO-3 with bf16 (a user's DeepSpeed JSON) trained 2 steps: the consolidated weights as
    a bf16 export takes them, and as an fp32 export does (`masters`)."""
    import json

    from sftmix_ray.config import TrainConfig
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.strategies import DeepSpeedStrategy

    config = Path(out_dir) / f"zero3-bf16-{rank}.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    train = TrainConfig(
        strategy="deepspeed", deepspeed_config=str(config), per_device_train_batch_size=2,
        learning_rate=1e-3, max_grad_norm=0.0,
    )  # fmt: skip
    strategy = DeepSpeedStrategy(CausalLMWithLoss(_tiny_llama(), NTPLoss()), train, 4)
    data, rows = _llama_batch(), [rank, 2 + rank]
    counts = strategy.wrapper.loss.normalizer_counts(data["labels"][rows])
    dist.all_reduce(counts)
    for _ in range(2):
        loss, _ = strategy.module(
            data["ids"][rows], data["mask"][rows], data["labels"][rows], normalizers=counts / WORLD
        )
        strategy.backward(loss)
        strategy.step()
    return {"copies": strategy.full_state_dict(), "masters": strategy.full_state_dict(masters=True)}


def _assert_masters(masters: dict, copies: dict, trained: list[str]) -> None:
    """`masters` are DeepSpeed's fp32 master weights of the bf16 `copies`: each copy is its
    master's rounding, and the masters hold what that rounding loses (values bf16 cannot hold
    in every entry that trained; the embedding's rows of tokens no batch held did not)."""
    assert set(masters) == set(copies)
    lost = []
    for key in trained:
        assert masters[key].dtype == torch.float32, key
        assert torch.equal(masters[key].to(torch.bfloat16), copies[key].to(torch.bfloat16)), key
        lost.append(float((masters[key] != masters[key].to(torch.bfloat16).float()).float().mean()))
    assert min(lost) > 0.2 and sorted(lost)[1] > 0.9, lost


@pytest.mark.slow
def test_wrapper_under_deepspeed_zero3_matches_one_process(tmp_path: Path) -> None:
    """ZeRO-3 gathers the registered head once per pass, whatever each rank's chunk count."""
    pytest.importorskip("deepspeed")
    from sftmix_ray.train.forward import CausalLMWithLoss

    spawn_ranks(_zero3_worker, (str(tmp_path / "pg"), str(tmp_path)), WORLD)
    wrapper = CausalLMWithLoss(_tiny_llama(), SFTMixLoss(mu=0.3, chunk_size=3))
    data = _llama_batch()
    ref_loss, _ = wrapper(data["ids"], data["mask"], data["labels"], lam=data["lam"])
    ref_loss.backward()
    results = torch.load(tmp_path / "zero3.pt")
    loss, grads = results["registered"]
    assert_rel(loss, float(ref_loss.detach()))
    for name, param in wrapper.model.named_parameters():
        assert_rel(grads[name], param.grad)
    assert "register_head_for_zero3" in results["unregistered"]
    # Skipped before the backend existed; once it is up, it is left alone.
    assert results["shm"] == (True, "None", False)
    # LoRA under ZeRO-3: the same loss and adapter gradients as one process; the export and
    # the resume checkpoint hold the adapters only, and a checkpoint restores them.
    lora = _lora_wrapper()
    ref_loss, _ = lora(data["ids"], data["mask"], data["labels"], lam=data["lam"])
    ref_loss.backward()
    got = results["lora"]
    assert_rel(got["loss"], float(ref_loss.detach()))
    trained = {n: p for n, p in lora.model.named_parameters() if p.requires_grad}
    assert got["grads"].keys() == trained.keys() and all("lora_" in n for n in trained)
    for name, param in trained.items():  # lora_A's are 0 at init (lora_B starts at 0)
        torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-5, atol=1e-8)
    assert max(float(g.abs().max()) for n, g in got["grads"].items() if "lora_B" in n) > 1e-4
    assert set(got["exported"]) == set(trained)
    for name, value in got["exported"].items():
        torch.testing.assert_close(value.float(), trained[name].detach())
    assert got["restored"].keys() == got["exported"].keys()
    changed = [n for n, v in got["before"].items() if not torch.equal(v, got["exported"][n])]
    assert changed and all("lora_B" in n for n in changed)  # the fresh one differed
    for name, value in got["restored"].items():
        torch.testing.assert_close(value, got["exported"][name])
    assert "LM head must be a plain linear layer" in got["refused"]
    assert "base_layer" in got["refused"] and "target_modules" in got["refused"]
    # ZeRO-3 with bf16: an fp32 export gathers the fp32 masters, not the bf16 partitions.
    trained = [n for n, _ in wrapper.model.named_parameters()]
    _assert_masters(results["masters"]["masters"], results["masters"]["copies"], trained)


def _global_loss(module: nn.Module, loss: SFTMixLoss, rank: int) -> float:
    """This rank's pair of `_llama_batch` through a wrapped module, as the loop normalizes it;
    the loss of the whole batch (a collective)."""
    data = _llama_batch()
    rows = [rank, 2 + rank]
    counts = loss.normalizer_counts(data["labels"][rows], data["lam"][[rank]])
    dist.all_reduce(counts)
    value, _ = module(
        data["ids"][rows], data["mask"][rows], data["labels"][rows],
        lam=data["lam"][[rank]], normalizers=counts / WORLD,
    )  # fmt: skip
    total = value.detach().clone()
    dist.all_reduce(total)
    return float(total) / WORLD


def _meta_init_worker(rank: int, init_file: str, out_dir: str, model_dir: str) -> None:
    """Both ranks build on the meta device; rank 0 alone loads the checkpoint."""
    from sftmix_ray.config import TrainConfig
    from sftmix_ray.modeling import load_model
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.meta_init import meta_model, rank_zero_weights
    from sftmix_ray.train.strategies import FSDPStrategy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = meta_model(model_dir, trust_remote_code=False, attn_implementation="sdpa")
        assert all(p.is_meta for p in model.parameters())
        source = load_model(model_dir) if rank == 0 else None
        weights = rank_zero_weights(source)
        del source
        wrapper = CausalLMWithLoss(model, SFTMixLoss(mu=0.3, chunk_size=3))
        train = TrainConfig(learning_rate=1e-5, warmup_ratio=0.0, lr_scheduler_type="constant")
        strategy = FSDPStrategy(wrapper, train, 1, weights=weights, device=torch.device("cpu"))
        local = sum(p.to_local().numel() for p in strategy.module.parameters())
        total = sum(p.numel() for p in strategy.module.parameters())
        value = _global_loss(strategy.module, wrapper.loss, rank)
        full = strategy.full_state_dict()  # a collective
        buffers = {n: b.clone() for n, b in wrapper.model.named_buffers()}
        torch.save(
            {"full": full, "buffers": buffers, "local": local, "total": total, "loss": value},
            os.path.join(out_dir, f"meta-{rank}.pt"),
        )  # fmt: skip
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


@pytest.mark.slow
def test_fsdp2_meta_init_loads_the_checkpoint_into_the_shards(tmp_path: Path) -> None:
    """FSDP2 without a full model per rank: meta device, shard, rank 0's weights broadcast.
    The shards hold exactly the checkpoint (and its non-persistent rotary buffers), each rank
    holds half of the parameters, and the loss equals the plain model's."""
    from safetensors.torch import load_file

    from sftmix_ray.train.forward import CausalLMWithLoss

    model = _tiny_llama()
    model.save_pretrained(tmp_path / "ckpt")
    spawn_args = (str(tmp_path / "pg"), str(tmp_path), str(tmp_path / "ckpt"))
    spawn_ranks(_meta_init_worker, spawn_args, WORLD)
    ranks = [torch.load(tmp_path / f"meta-{r}.pt") for r in range(WORLD)]
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    full = ranks[0]["full"]
    assert ranks[1]["full"] is None
    for name, tensor in saved.items():
        assert torch.equal(full[name], tensor), name
    for rank in ranks:  # rotary inv_freq is not in the checkpoint: broadcast from rank 0
        for name, buffer in model.named_buffers():
            assert torch.equal(rank["buffers"][name], buffer), name
        assert rank["local"] <= 0.55 * rank["total"]  # its own shard, not the whole model
    data = _llama_batch()
    ref, _ = CausalLMWithLoss(model, SFTMixLoss(mu=0.3, chunk_size=3))(
        data["ids"], data["mask"], data["labels"], lam=data["lam"]
    )
    assert_rel(ranks[0]["loss"], float(ref.detach()))


UNEVEN_ROWS = (1, 2, 4, 7)  # rows of each Linear's weight: fewer than, and not a multiple of, 3


def _uneven_layers() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(*(nn.Linear(5, rows) for rows in UNEVEN_ROWS))


def _uneven_scatter_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Three ranks shard layers of 1, 2, 4 and 7 rows (some shards short, some empty) on the
    meta device; rank 0's weights fill them; every rank gathers every parameter back."""
    from torch.distributed.fsdp import fully_shard

    from sftmix_ray.train.meta_init import RankZeroWeights, materialize_from_rank0

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    try:
        with torch.device("meta"):
            module = _uneven_layers()
        for layer in module:
            fully_shard(layer)
        fully_shard(module)
        source = _uneven_layers().state_dict() if rank == 0 else {}
        materialize_from_rank0(module, RankZeroWeights(state=source), torch.device("cpu"))
        rows = {n: p.to_local().shape[0] for n, p in module.named_parameters()}
        gathered = {n: p.full_tensor() for n, p in module.named_parameters()}  # collectives
        torch.save({"rows": rows, "full": gathered}, os.path.join(out_dir, f"uneven-{rank}.pt"))
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


@pytest.mark.slow
def test_rank0_weights_fill_uneven_and_empty_shards(tmp_path: Path) -> None:
    """The one scatter per parameter puts rank 0's rows where FSDP2's torch.chunk layout wants
    them on 3 ranks, also for a parameter of fewer rows than ranks (empty shards) and one whose
    rows do not divide (a short last shard): every rank's gathered tensors equal the source."""
    spawn_ranks(_uneven_scatter_worker, (str(tmp_path / "pg"), str(tmp_path)), 3)
    expected = _uneven_layers().state_dict()
    results = [torch.load(tmp_path / f"uneven-{r}.pt") for r in range(3)]
    # The layouts the test means to cover: 7 rows -> 3, 3, 1; 1 row -> 1, 0, 0.
    assert [r["rows"]["3.weight"] for r in results] == [3, 3, 1]
    assert [r["rows"]["0.weight"] for r in results] == [1, 0, 0]
    for result in results:
        assert set(result["full"]) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(result["full"][name], tensor), name


def _zero3_loading_worker(rank: int, init_file: str, out_dir: str, model_dir: str) -> None:
    """ZeRO-3 as the loop builds it: the model loaded partition by partition, then wrapped."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from sftmix_ray.config import TrainConfig
    from sftmix_ray.modeling import load_model
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.strategies import build_strategy, zero3_partitioned_loading

    train = TrainConfig(strategy="deepspeed", deepspeed_stage=3, per_device_train_batch_size=2)
    try:
        loading = zero3_partitioned_loading(train)
        model = load_model(model_dir)
        params = list(model.parameters())
        partitioned = all(hasattr(p, "ds_id") for p in params)
        local = sum(p.ds_tensor.numel() for p in params)
        total = sum(p.ds_numel for p in params)
        wrapper = CausalLMWithLoss(model, SFTMixLoss(mu=0.3, chunk_size=3))
        strategy = build_strategy("deepspeed", wrapper, train, 1)
        del loading
        value = _global_loss(strategy.module, wrapper.loss, rank)
        full = strategy.full_state_dict()  # a collective
        torch.save(
            {"partitioned": partitioned, "local": local, "total": total,
             "loss": value, "full": full},
            os.path.join(out_dir, f"zero3-load-{rank}.pt"),
        )  # fmt: skip
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


@pytest.mark.slow
def test_zero3_builds_the_model_partitioned_and_loads_the_checkpoint(tmp_path: Path) -> None:
    """Under ZeRO-3 `from_pretrained` runs inside `deepspeed.zero.Init`: no rank holds the
    whole model, the partitions hold the checkpoint, and the loss equals the plain model's."""
    from safetensors.torch import load_file

    from sftmix_ray.train.forward import CausalLMWithLoss

    model = _tiny_llama()
    model.save_pretrained(tmp_path / "ckpt")
    spawn_args = (str(tmp_path / "pg"), str(tmp_path), str(tmp_path / "ckpt"))
    spawn_ranks(_zero3_loading_worker, spawn_args, WORLD)
    ranks = [torch.load(tmp_path / f"zero3-load-{r}.pt") for r in range(WORLD)]
    for rank in ranks:
        assert rank["partitioned"] and rank["local"] <= 0.55 * rank["total"]
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(ranks[0]["full"][name], tensor), name
    data = _llama_batch()
    ref, _ = CausalLMWithLoss(model, SFTMixLoss(mu=0.3, chunk_size=3))(
        data["ids"], data["mask"], data["labels"], lam=data["lam"]
    )
    assert_rel(ranks[0]["loss"], float(ref.detach()))


def _perturbed_wrapper(seed: int) -> nn.Module:
    """The tiny Llama in the loss wrapper, its weights moved by `seed` (0: unchanged), so that a
    restore has something to overwrite."""
    from sftmix_ray.train.forward import CausalLMWithLoss

    model = _tiny_llama()
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * seed * torch.randn_like(param))
    return CausalLMWithLoss(model, SFTMixLoss(mu=0.3, chunk_size=3))


def _fsdp_async_strategy(seed: int):
    from sftmix_ray.config import TrainConfig
    from sftmix_ray.train.strategies import FSDPStrategy

    wrapper = _perturbed_wrapper(seed)
    train = TrainConfig(
        strategy="fsdp", async_checkpoint=True, learning_rate=1e-2, warmup_ratio=0.0,
        lr_scheduler_type="linear",
    )  # fmt: skip
    return FSDPStrategy(wrapper, train, 10, device=torch.device("cpu"))


def _full_state(strategy) -> dict[str, Tensor] | None:
    """Weights, Adam moments and the scheduler's step, gathered on rank 0 (a collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = dict(get_model_state_dict(strategy.module, options=options))
    optim = get_optimizer_state_dict(strategy.module, strategy.optimizer, options=options)
    for name, values in optim.get("state", {}).items():
        for key, value in values.items():
            state[f"optim/{name}/{key}"] = torch.as_tensor(value)
    state["scheduler/last_epoch"] = torch.tensor(strategy.scheduler.last_epoch)
    # A copy: Adam's step counts come back as the live tensors, which training goes on bumping.
    return {k: v.detach().clone() for k, v in state.items()} if dist.get_rank() == 0 else None


def _async_save_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = Path(out_dir)
        strategy = _fsdp_async_strategy(seed=0)

        def step() -> None:
            strategy.backward(_global_loss_tensor(strategy, rank))
            strategy.step()

        step()
        at_save = _full_state(strategy)
        (out / "async").mkdir(exist_ok=True)
        future = strategy.save_async(out / "async")
        for _ in range(2):  # training goes on while the save is written
            step()
        after = _full_state(strategy)
        future.result()
        results = {"at_save": at_save, "after": after}
        fresh = _fsdp_async_strategy(seed=1)
        results["fresh"] = _full_state(fresh)
        fresh.load(out / "async")
        results["restored"] = _full_state(fresh)
        if rank == 0:
            torch.save(results, out / "async.pt")
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def _global_loss_tensor(strategy, rank: int) -> Tensor:
    """This rank's pair of `_llama_batch` through the strategy's module (normalized as the
    loop does); the tensor to back-propagate."""
    data = _llama_batch()
    rows = [rank, 2 + rank]
    loss = strategy.wrapper.loss
    counts = loss.normalizer_counts(data["labels"][rows], data["lam"][[rank]])
    dist.all_reduce(counts)
    value, _ = strategy.module(
        data["ids"][rows], data["mask"][rows], data["labels"][rows],
        lam=data["lam"][[rank]], normalizers=counts / WORLD,
    )  # fmt: skip
    return value


@pytest.mark.slow
def test_fsdp2_async_save_holds_the_state_of_its_step(tmp_path: Path) -> None:
    """`train.async_checkpoint`: FSDP2 saves in the background on a gloo group of its own
    while training goes on; the checkpoint holds the weights, Adam moments and schedule of the
    step it was started at, not those of the steps trained while it was written."""
    spawn_ranks(_async_save_worker, (str(tmp_path / "pg"), str(tmp_path)), WORLD)
    results = torch.load(tmp_path / "async.pt")
    at_save, after = results["at_save"], results["after"]
    fresh, restored = results["fresh"], results["restored"]
    assert at_save.keys() == restored.keys() and any(k.startswith("optim/") for k in at_save)
    for name, value in at_save.items():
        assert torch.equal(restored[name], value), name
    weights = [k for k in at_save if not k.startswith(("optim/", "scheduler/"))]
    moved = [k for k in weights if not torch.equal(after[k], at_save[k])]
    assert len(moved) == len(weights), "training went on after the save started"
    assert not any(torch.equal(fresh[k], at_save[k]) for k in weights), "restore overwrote"
    assert int(restored["scheduler/last_epoch"]) == 1 and int(after["scheduler/last_epoch"]) == 3


STAGED = {"ddp": {"strategy": "ddp"}}
STAGED |= {f"zero{n}": {"strategy": "deepspeed", "deepspeed_stage": n} for n in (2, 3)}


def _staged_strategy(name: str, seed: int, background: bool):
    from sftmix_ray.config import TrainConfig
    from sftmix_ray.train.strategies import build_strategy, zero3_partitioned_loading

    train = TrainConfig(
        **STAGED[name], async_checkpoint=background, learning_rate=1e-2, warmup_ratio=0.0,
        lr_scheduler_type="linear", per_device_train_batch_size=2,
    )  # fmt: skip
    loading = zero3_partitioned_loading(train)  # ZeRO-3 builds partitioned, as the loop does
    wrapper = _perturbed_wrapper(seed)
    strategy = build_strategy(train.strategy, wrapper, train, 10)
    del loading
    return strategy


def _copy(state: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """A snapshot (DDP's full state dict holds the live weights, which training changes)."""
    return None if state is None else {k: v.detach().clone() for k, v in state.items()}


def _staged_save_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Per strategy: a background save at step 1 while steps 2-3 train, against a synchronous
    save of the same step 1 from a second run; each restored into a third strategy."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name in STAGED:
            out = Path(out_dir) / name
            (out / "background").mkdir(parents=True, exist_ok=True)
            (out / "sync").mkdir(exist_ok=True)

            def step(strategy) -> dict[str, Tensor] | None:
                strategy.backward(_global_loss_tensor(strategy, rank))
                strategy.step()
                return _copy(strategy.full_state_dict())  # a collective; rank 0's copy

            background = _staged_strategy(name, seed=0, background=True)
            at_save = step(background)
            future = background.save_async(out / "background")
            after = [step(background), step(background)]  # training goes on meanwhile
            future.result()
            sync = _staged_strategy(name, seed=0, background=False)
            step(sync)
            sync.save(out / "sync")
            sync_next = step(sync)
            restored = {}
            for source in ("background", "sync"):
                fresh = _staged_strategy(name, seed=1, background=False)
                before = _copy(fresh.full_state_dict())
                fresh.load(out / source)
                loaded = _copy(fresh.full_state_dict())
                restored[source] = {"before": before, "loaded": loaded, "next": step(fresh)}
            results[name] = {"at_save": at_save, "after": after, "sync_next": sync_next,
                             "restored": restored}  # fmt: skip
        if rank == 0:
            torch.save(results, Path(out_dir) / "staged.pt")
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


@pytest.mark.slow
def test_ddp_and_deepspeed_background_saves_hold_the_state_of_their_step(tmp_path: Path) -> None:
    """`train.async_checkpoint` under DDP and ZeRO-2/3: the state is staged in host memory at
    the save step and written by a thread while training goes on. Restored, the background
    save gives the weights of its step and, one step later, the same weights as a synchronous
    save of that step (so the same Adam moments and schedule), not those of the steps trained
    while it was written. The ranks' rows have different numbers of loss chunks: ZeRO-3 failed
    at its second step on that (its recorded module calls differed across ranks); all three
    strategies now train the same three steps."""
    spawn_ranks(_staged_save_worker, (str(tmp_path / "pg"), str(tmp_path)), WORLD)
    results = torch.load(tmp_path / "staged.pt")
    assert results.keys() == STAGED.keys()
    for name in ("zero2", "zero3"):  # the same trajectory as DDP (fp32; reduction order only)
        for step in (0, 1):
            for key, value in results["ddp"]["after"][step].items():
                torch.testing.assert_close(
                    results[name]["after"][step][key], value, rtol=1e-4, atol=1e-5
                )
    for name, result in results.items():
        at_save, after = result["at_save"], result["after"]
        background, sync = result["restored"]["background"], result["restored"]["sync"]
        assert at_save.keys() == background["loaded"].keys(), name
        for key, value in at_save.items():
            assert torch.equal(background["loaded"][key], value), (name, key)
            assert not torch.equal(background["before"][key], value), (name, key)
            assert not torch.equal(after[1][key], value), (name, key)  # training went on
            # Adam's moments and the schedule came back too: the next step is the same.
            assert torch.equal(background["next"][key], sync["next"][key]), (name, key)
            assert torch.equal(background["next"][key], result["sync_next"][key]), (name, key)
            # ... and the resumed run continues the trajectory the saving run took.
            torch.testing.assert_close(background["next"][key], after[0][key], rtol=0, atol=0)


def _deepspeed_accumulation_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Gradient norms of one optimizer step over 4 rows: in one micro-batch, then in two."""
    import json

    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    from sftmix_ray.config import TrainConfig
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.strategies import build_strategy

    data = _llama_batch()
    total = (data["labels"][:, 1:] != -100).sum().float().reshape(1)
    norms = {}
    try:
        for name, config in {
            "zero1-bf16": {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
                           "data_types": {"grad_accum_dtype": "fp32"}},
            "zero2": {"zero_optimization": {"stage": 2}},
        }.items():  # fmt: skip
            path = Path(out_dir) / f"{name}.json"
            path.write_text(json.dumps(config))
            for accumulation in (1, 2):
                train = TrainConfig(
                    strategy="deepspeed", deepspeed_config=str(path), max_grad_norm=0.0,
                    gradient_accumulation_steps=accumulation,
                    per_device_train_batch_size=4 // accumulation,
                )  # fmt: skip
                wrapper = CausalLMWithLoss(_tiny_llama(), NTPLoss(chunk_size=3))
                strategy = build_strategy("deepspeed", wrapper, train, 10)
                for rows in [[0, 1, 2, 3]] if accumulation == 1 else [[0, 1], [2, 3]]:
                    loss, _ = strategy.module(
                        data["ids"][rows], data["mask"][rows], data["labels"][rows],
                        normalizers=total,
                    )  # fmt: skip
                    strategy.backward(loss)
                norms[f"{name}/{accumulation}"] = strategy.step()
        torch.save(norms, Path(out_dir) / "norms.pt")
        torch.save(_bf16_loading(Path(out_dir), data, total), Path(out_dir) / "loading.pt")
    finally:
        dist.destroy_process_group()
    _exit_without_teardown()


def _bf16_loading(out_dir: Path, data: dict, total: torch.Tensor) -> dict:
    """ZeRO-2 with bf16 (a user's DeepSpeed JSON): the worker's model as `training_model`
    loads it (bf16) and as it loaded it before (fp32), each trained 3 steps."""
    import json

    from sftmix_ray.modeling import load_model
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.launch import build_spec
    from sftmix_ray.train.loop import training_model
    from sftmix_ray.train.strategies import build_strategy
    from tests.conftest import tiny_config

    _tiny_llama().save_pretrained(out_dir / "model")
    config = out_dir / "zero2-bf16.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    cfg = tiny_config(
        f"model.name_or_path={out_dir / 'model'}", "train.strategy=deepspeed",
        f"train.deepspeed_config={config}", "train.per_device_train_batch_size=4",
        "train.max_grad_norm=0",
    )  # fmt: skip
    spec = build_spec(cfg, out_dir / "out", "train")
    result: dict = {}
    for name, model in (
        ("bf16", training_model(spec)),
        ("fp32", load_model(str(out_dir / "model"))),
    ):
        result[f"{name}/dtype"] = next(model.parameters()).dtype
        strategy = build_strategy("deepspeed", CausalLMWithLoss(model, NTPLoss()), cfg.train, 10)
        losses = []
        for _ in range(3):
            loss, _ = strategy.module(data["ids"], data["mask"], data["labels"], normalizers=total)
            strategy.backward(loss)
            strategy.step()
            losses.append(float(loss.detach()))
        result[f"{name}/losses"] = losses
        result[f"{name}/state"] = strategy.full_state_dict()
    result["bf16/masters"] = strategy.full_state_dict(masters=True)  # an fp32 export's weights
    result["trained"] = [n.removeprefix("model.") for n, _ in strategy.wrapper.named_parameters()]
    return result


@pytest.mark.slow
def test_deepspeed_accumulation_does_not_divide_the_gradient_again(tmp_path: Path) -> None:
    """The loss is normalized over the whole accumulation window, so 2 micro-batches give the
    gradient of 1. Under BF16_Optimizer (ZeRO-1 with bf16, from a user's DeepSpeed JSON) the
    engine divided it by the accumulation steps a second time (norm 0.90 instead of 1.80).
    In the same process: under ZeRO-2 with bf16 the worker loads the model in bf16 (half the
    host memory per rank) and trains exactly as from the fp32 load it made before."""
    spawn_ranks(_deepspeed_accumulation_worker, (str(tmp_path / "pg"), str(tmp_path)), 1)
    norms = torch.load(tmp_path / "norms.pt")
    assert norms["zero2/2"] == pytest.approx(norms["zero2/1"], rel=1e-5)
    assert norms["zero1-bf16/2"] == pytest.approx(norms["zero1-bf16/1"], rel=2e-2)  # bf16
    loading = torch.load(tmp_path / "loading.pt")
    assert (loading["bf16/dtype"], loading["fp32/dtype"]) == (torch.bfloat16, torch.float32)
    assert loading["bf16/losses"] == loading["fp32/losses"]
    assert loading["bf16/losses"][2] < loading["bf16/losses"][0]  # it trains
    for key, value in loading["fp32/state"].items():
        assert torch.equal(loading["bf16/state"][key], value), key
    # An fp32 export of ZeRO-2 with bf16 takes the fp32 masters (it took the bf16 copies).
    _assert_masters(loading["bf16/masters"], loading["fp32/state"], loading["trained"])


def test_load_dtype_follows_the_deepspeed_precision(tmp_path: Path, monkeypatch) -> None:
    import json

    from sftmix_ray.config import TrainConfig
    from sftmix_ray.train.strategies import load_dtype

    fp16 = tmp_path / "fp16.json"
    fp16.write_text(json.dumps({"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # our config: bf16 on GPU
    cases = [
        (TrainConfig(strategy="deepspeed", deepspeed_stage=2, bf16=True), torch.bfloat16),
        (TrainConfig(strategy="deepspeed", deepspeed_stage=2, bf16=False), torch.float32),
        (TrainConfig(strategy="deepspeed", deepspeed_stage=3, bf16=True), torch.float32),
        (TrainConfig(strategy="deepspeed", deepspeed_config=str(fp16)), torch.float16),
        (TrainConfig(strategy="fsdp", bf16=True), torch.float32),
        (TrainConfig(strategy="ddp", bf16=True), torch.float32),
    ]
    assert [load_dtype(train) for train, _ in cases] == [dtype for _, dtype in cases]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU: bf16 off
    assert load_dtype(TrainConfig(strategy="deepspeed", bf16=True)) == torch.float32
