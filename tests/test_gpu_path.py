"""The parts of the GPU path that a CPU can show: train mode and checkpointing, FSDP2 precision
and gradient sync, DeepSpeed's bf16 settings, collectives, batched generation, gpu-smoke."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from sftmix_ray.config import TrainConfig
from sftmix_ray.losses import SFTMixLoss
from sftmix_ray.train.collectives import all_reduce_sum
from sftmix_ray.train.forward import CausalLMWithLoss
from sftmix_ray.train.launch import build_spec
from sftmix_ray.train.loop import training_model
from sftmix_ray.train.spec import RunSpec
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64


def _tiny_dir(tmp_path: Path, dropout: float = 0.0) -> Path:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, attention_dropout=dropout,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _spec(path: Path, checkpointing: bool) -> RunSpec:
    """The run spec the driver builds for a model directory (eager attention)."""
    cfg = tiny_config(
        f"model.name_or_path={path}", "model.attn_implementation=eager",
        f"train.gradient_checkpointing={checkpointing}",
    )  # fmt: skip
    return build_spec(cfg, path.parent / "out", "train")


def _batch(rows: int = 4, length: int = 12) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, torch.ones_like(ids), labels


def _saved_bytes_and_attention_calls(model) -> tuple[int, int]:
    """Bytes autograd keeps for backward in one forward, and self-attention calls in a step."""
    saved, calls = [0], []

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    ids, mask, labels = _batch(rows=4, length=64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = CausalLMWithLoss(model, SFTMixLoss(mu=0.0))(ids, mask, labels)
    loss.backward()
    return saved[0], len(calls)


def test_training_model_is_in_train_mode_and_checkpointing_recomputes(tmp_path):
    """The worker's model trains in train mode, so checkpointed layers run again in backward
    and keep a fraction of the activations; without `train()` checkpointing did nothing."""
    import warnings

    path = _tiny_dir(tmp_path)
    plain = training_model(_spec(path, False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointed = training_model(_spec(path, True))
    # transformers 5's own name: its `gradient_checkpointing_*` aliases go in v6.
    assert not [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    assert checkpointed.training and all(m.training for m in checkpointed.modules())
    saved_plain, calls_plain = _saved_bytes_and_attention_calls(plain)
    saved_ckpt, calls_ckpt = _saved_bytes_and_attention_calls(checkpointed)
    assert calls_plain == 1 and calls_ckpt == 2, "checkpointing recomputes attention in backward"
    assert saved_ckpt < 0.5 * saved_plain, (saved_ckpt, saved_plain)


def test_dropout_is_on_in_training_and_off_in_eval(tmp_path):
    model = training_model(_spec(_tiny_dir(tmp_path, dropout=0.5), False))
    # model.attn_implementation reaches the training model (eager: attention dropout explicit).
    assert model.config._attn_implementation == "eager"
    wrapper = CausalLMWithLoss(model, SFTMixLoss(mu=0.0))
    ids, mask, labels = _batch()
    torch.manual_seed(0)
    train_a = float(wrapper(ids, mask, labels)[0].detach())
    train_b = float(wrapper(ids, mask, labels)[0].detach())
    wrapper.eval()
    with torch.no_grad():
        eval_a, eval_b = (float(wrapper(ids, mask, labels)[0]) for _ in range(2))
    assert abs(train_a - train_b) > 1e-4, "dropout draws differ between two train forwards"
    assert eval_a == eval_b and abs(eval_a - train_a) > 1e-4


def _single_rank_group(tmp_path: Path) -> None:
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)


@pytest.fixture
def single_rank(tmp_path):
    _single_rank_group(tmp_path)
    yield
    dist.destroy_process_group()


def _fsdp(tmp_path: Path, **train_overrides):
    from sftmix_ray.train.strategies import FSDPStrategy

    model = training_model(_spec(_tiny_dir(tmp_path), False))
    loss = SFTMixLoss(alpha=0.5, mu=0.2)
    seen: dict[str, torch.dtype] = {}

    def record(_module, _args, kwargs):
        seen.update(
            {k: v.dtype for k, v in kwargs.items() if k in ("lam", "normalizers") and v is not None}
        )

    loss.register_forward_pre_hook(record, with_kwargs=True)
    train = TrainConfig(bf16=True, **train_overrides)
    strategy = FSDPStrategy(CausalLMWithLoss(model, loss), train, total_steps=4, bf16_on_cpu=True)
    return strategy, loss, seen


def test_fsdp_bf16_keeps_lambda_and_normalizers_fp32(tmp_path, single_rank):
    """The root FSDP2 unit does not cast the Mixup weights and normalizers to bf16."""
    strategy, loss, seen = _fsdp(tmp_path)
    ids, mask, labels = _batch()
    lam = torch.tensor([0.9991, 0.0004])  # 0.9991 is 1.0 in bf16
    norms = loss.normalizer_counts(labels, lam)
    value, metrics = strategy.module(ids, mask, labels, lam=lam, normalizers=norms)
    assert seen == {"lam": torch.float32, "normalizers": torch.float32}
    assert float(metrics["lambda_mean"]) == pytest.approx(float(lam.mean()), rel=1e-6)
    # The decoder did compute in bf16 (the policy is on), only the loss inputs stayed fp32.
    layer = strategy.wrapper.model.model.layers[0]
    assert layer.mlp.down_proj.weight.dtype == torch.float32  # fp32 master (sharded) weights
    assert torch.isfinite(value)


@pytest.mark.parametrize("defer", [False, True])
def test_fsdp_gradient_sync_every_micro_batch_unless_deferred(tmp_path, single_rank, defer):
    """By default each micro-batch reduce-scatters, leaving only sharded gradients."""
    strategy, _, _ = _fsdp(tmp_path, fsdp_defer_grad_sync=defer)
    ids, mask, labels = _batch()
    lam = torch.tensor([0.5, 0.5])
    with strategy.no_sync(False):  # the first of two micro-batches
        value, _ = strategy.module(ids, mask, labels, lam=lam)
    strategy.backward(value)
    has_sharded_grads = all(p.grad is not None for p in strategy.module.parameters())
    assert has_sharded_grads is (not defer)


def test_deepspeed_bf16_accumulates_fp32_and_overlaps_on_gpu(monkeypatch):
    from sftmix_ray.train.strategies import deepspeed_config

    train = TrainConfig(bf16=True, deepspeed_stage=3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = deepspeed_config(train)
    assert config["bf16"] == {"enabled": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert config["zero_optimization"]["overlap_comm"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = deepspeed_config(train)
    assert "data_types" not in cpu and cpu["zero_optimization"]["overlap_comm"] is False


def test_all_reduce_sum_moves_host_values_to_the_device(tmp_path, single_rank):
    total = all_reduce_sum([1.5, 2.0], torch.device("cpu"))
    assert total.dtype == torch.float64 and total.tolist() == [1.5, 2.0]
    assert total.device.type == "cpu"


def test_batched_left_padded_generation_equals_one_by_one(tmp_path):
    from sftmix_ray.evaluation import generate
    from sftmix_ray.modeling import train_tiny_tokenizer

    texts = [f"q {i}: {i} plus {i * 3} is {i * 4}." for i in range(200)]
    tokenizer = train_tiny_tokenizer(texts, 300)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompts = [texts[i][: 5 + (i * 7) % 20] for i in range(12)]
    batched = generate(model, tokenizer, prompts, 8, batch_size=5)
    single = [generate(model, tokenizer, [p], 8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1, "the prompts get different answers"


@pytest.mark.slow
def test_gpu_smoke_runs_every_part_on_cpu_at_toy_size(tmp_path):
    """`benchmarks/gpu_smoke.py` through its entry point: losses vs the naive formulas, FSDP2
    over 2 gloo ranks under torchrun with the bf16 policy and checkpointing, the HF export and
    reload, batched generation. On a machine without a GPU the default run does nothing."""
    script = REPO / "benchmarks" / "gpu_smoke.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    idle = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert idle.returncode == 0 and idle.stdout == "" and "no CUDA GPU" in idle.stderr
    out = tmp_path / "smoke.jsonl"
    scratch = tmp_path / "scratch"  # the ranks' temp dir (TMPDIR)
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), "--allow-cpu", "--small", "--json", str(out),
         "--parts", "losses,fsdp2,generate"],  # pipeline: the test below
        capture_output=True, text=True, env={**env, "TMPDIR": str(scratch)}, timeout=400,
    )  # fmt: skip
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    parts = {line["part"]: line for line in lines}
    assert set(parts) == {"losses", "fsdp2", "generate"}
    assert all(line["ok"] for line in lines)
    assert parts["losses"]["ntp_rel_err"]["loss"] <= 1e-5
    assert parts["fsdp2"]["world_size"] == 2
    # The export was written, reloaded equal and removed (GBs at full size; it was left).
    assert parts["fsdp2"]["checks"]["export_reloads_equal"]
    assert not list(scratch.glob("gpu-smoke-export-*"))
    assert parts["fsdp2"]["loss_inputs_dtype"] == {
        "lam": "torch.float32",
        "normalizers": "torch.float32",
    }


def test_gpu_smoke_pipeline_part_runs_the_ray_path_on_cpu(ray_local, tmp_path):
    """`gpu_smoke.py --parts pipeline` (joined to the session's cluster): the whole
    `sftmix-ray pipeline` with a base model given as a local HF directory (a Llama-shaped model
    and a tokenizer of its own, not the tiny preset), FSDP2 training, the export reloaded. On a
    GPU the same part runs NCCL, bf16, GPU scorer actors and eval, and ZeRO-3 (not run here)."""
    script = REPO / "benchmarks" / "gpu_smoke.py"
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, str(script), "--allow-cpu", "--small", "--parts", "pipeline",
         "--address", address, "--json", str(tmp_path / "smoke.jsonl")],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    (line,) = [json.loads(x) for x in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert line["part"] == "pipeline" and line["ok"] and line["gpus"] == 0
    assert line["stages"] == ["eval", "prepare", "reference", "report", "score", "split", "train"]
    assert line["fsdp2"]["steps"] == 2 and line["fsdp2"]["gpu_peak_gib"] is None
    assert math.isfinite(line["eval_response_nll"]) and line["export_dtype"] == "torch.float32"
    assert "zero3" not in line  # GPU only


def test_host_labels_survive_fsdp2s_move_of_inputs_to_the_device():
    """FSDP2's root moves every tensor argument to its device before forward (on CUDA) with
    `torch.distributed.utils._to_kwargs`; labels and Mixup weights wrapped in `OnHost` come
    through on the host (the losses then build their indices without a device sync)."""
    from torch.distributed.utils import _to_kwargs

    from sftmix_ray.train.forward import OnHost

    labels, lam, ids = torch.zeros(2, 5, dtype=torch.long), torch.rand(1), torch.ones(2, 5)
    args, kwargs = _to_kwargs(
        (ids, OnHost(labels)), {"lam": OnHost(lam)}, torch.device("meta"), False
    )
    assert args[0][0].device.type == "meta"  # a plain tensor argument is moved
    assert args[0][1].tensor is labels and kwargs[0]["lam"].tensor is lam
