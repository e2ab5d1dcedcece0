"""GPU smoke test: the real GPU code paths at reduced size, a few steps each (`make gpu-smoke`).

One JSON line per part on stdout (`part`, `ok`, peak GPU memory, step time, checks), and the
same lines in `--json FILE`. Parts:

- `losses`   the fused NTP and Mixup losses at Llama-3's 128256 vocabulary, bf16 hidden states,
             against the naive full-logit formulas (loss and gradients), with peak memory of each;
- `fsdp2`    `torchrun` FSDP2 bf16 (fp32 master weights) on every visible GPU, NCCL, gradient
             checkpointing on and off, a Llama-3-shaped model (hidden 4096, GQA 32/8, vocabulary
             128256, 2 layers) through the project's own wrapper, loss and FSDP strategy, then
             the full-state-dict HF export in bf16 and its reload;
- `generate` the eval stage's batched greedy generation with left padding on the GPU, against
             one-row-at-a-time generation.

- `pipeline` the Ray path (`sftmix-ray pipeline` on the demo corpus with a Llama-3-shaped
             model: Ray Train FSDP2 bf16 over NCCL on every visible GPU with checkpointing, the
             scorer on GPU actors, eval on a GPU), then `sftmix-ray train` under ZeRO-3 bf16,
             and the bf16 export reloaded; steps, tokens/s and peak GPU memory per run.

The first three need only torch with CUDA and transformers (no Ray, no DeepSpeed): run them
where only those are installed with `--parts losses,fsdp2,generate`. Without a GPU
the script says so and exits 0 without running anything (`--allow-cpu --small` runs the same
code on the CPU at toy sizes, which is how the test suite checks it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FULL = {"vocab": 128256, "hidden": 4096, "inter": 14336, "heads": 32, "kv": 8, "layers": 2}
SMALL = {"vocab": 1024, "hidden": 64, "inter": 128, "heads": 4, "kv": 2, "layers": 2}


def _device(allow_cpu: bool) -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu") if allow_cpu else None


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------- losses


def part_losses(device: torch.device, small: bool) -> dict[str, Any]:
    from sftmix_ray.losses import NTPLoss, sftmix_mixup_loss

    vocab, hidden = (SMALL if small else FULL)["vocab"], (SMALL if small else FULL)["hidden"]
    rows, length = (4, 64) if small else (4, 2048)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    head = nn.Linear(hidden, vocab, bias=False).to(device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * hidden**-0.5)
    h = torch.randn(rows, length, hidden, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    labels[:, : length // 4] = -100  # prompts
    labels[1, length // 2 :] = -100  # a shorter row (right padding)
    labels = labels.to(device)
    result: dict[str, Any] = {"vocab": vocab, "positions": rows * length, "dtype": str(dtype)}

    def run(fn):
        hh = h.clone().requires_grad_()
        head.weight.grad = None
        _reset_peak(device)
        base = _allocated(device)
        start = time.perf_counter()
        loss = fn(hh)
        loss.backward()
        _sync(device)
        seconds = time.perf_counter() - start
        peak = _peak_gib(device)
        above = None if peak is None else round(peak - base / 2**30, 3)
        return loss.detach(), hh.grad, head.weight.grad.clone(), seconds, above

    def compare(kind: str, naive, fused) -> None:
        """Time and measure both after a warm-up; relative errors of loss and gradients."""
        outs = {}
        for name, fn in ((f"naive_{kind}", naive), (f"fused_{kind}", fused)):
            run(fn)  # warm-up (kernels, allocator)
            outs[name] = out = run(fn)
            result[name] = {"loss": float(out[0]), "seconds": round(out[3], 4)}
            result[name]["peak_above_start_gib"] = out[4]
        a, b = outs[f"fused_{kind}"], outs[f"naive_{kind}"]
        result[f"{kind}_rel_err"] = {
            "loss": _rel(a[0], b[0]),
            "grad_h": _rel(a[1], b[1]),
            "grad_w": _rel(a[2], b[2]),
        }

    def fused_ntp(hh):
        return NTPLoss()(hh, labels, head)[0]

    def naive_ntp(hh):
        logits = head(hh[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, vocab), labels[:, 1:].reshape(-1))

    compare("ntp", naive_ntp, fused_ntp)
    if device.type == "cuda":
        result["fused_ntp_peak_over_naive"] = round(
            result["fused_ntp"]["peak_above_start_gib"]
            / result["naive_ntp"]["peak_above_start_gib"],
            3,
        )

    lam = torch.tensor([0.3, 0.9])
    conf, unconf = labels[:2], labels[2:]

    def fused_mix(hh):
        return sftmix_mixup_loss(hh[:2], hh[2:], conf, unconf, head, lam)

    def naive_mix(hh):  # the paper's formula pair by pair, targets materialized [n, V]
        total, count = hh.sum() * 0.0, 0
        for i in range(2):
            pos_c = (conf[i, 1:] != -100).nonzero().squeeze(1)
            pos_u = (unconf[i, 1:] != -100).nonzero().squeeze(1)
            n = min(len(pos_c), len(pos_u))
            pos_c, pos_u = pos_c[:n], pos_u[:n]
            lam_i = float(lam[i])
            mixed = lam_i * hh[i, pos_c].float() + (1 - lam_i) * hh[2 + i, pos_u].float()
            logp = torch.log_softmax(head(mixed.to(dtype)).float(), dim=-1)
            t = lam_i * F.one_hot(conf[i, pos_c + 1], vocab).float()
            t = t + (1 - lam_i) * F.one_hot(unconf[i, pos_u + 1], vocab).float()
            total = total - (t * logp).sum()
            count += n
        return total / count

    compare("mix", naive_mix, fused_mix)
    # bf16 matmuls of a chunk and of the whole batch round differently: 1e-2 on gradients.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errs = [*result["ntp_rel_err"].values(), *result["mix_rel_err"].values()]
    result["ok"] = all(e <= tol for e in errs)
    result["tolerance"] = tol
    return result


# -------------------------------------------------------------------------------------- fsdp2


def _llama(shape: dict[str, int], device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)


def fsdp_worker(small: bool, out_file: str) -> None:
    """One rank of the FSDP2 part (launched by torchrun)."""

    import torch.distributed as dist

    from sftmix_ray.config import TrainConfig
    from sftmix_ray.losses import SFTMixLoss
    from sftmix_ray.modeling import set_activation_checkpointing
    from sftmix_ray.train.collectives import all_reduce_sum
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.strategies import FSDPStrategy

    device = _device(allow_cpu=True)
    assert device is not None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Both backends: CPU tensors would go through gloo, device tensors through NCCL.
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = SMALL if small else FULL
    rows, length = (4, 64) if small else (4, 2048)
    model = _llama(shape, device)
    set_activation_checkpointing(model, True)
    model.train()
    loss = SFTMixLoss(alpha=0.5, mu=0.2, chunk_size=1024)
    wrapper = CausalLMWithLoss(model, loss)
    seen: dict[str, str] = {}

    def record(_module, args, kwargs):
        for key in ("lam", "normalizers"):
            if kwargs.get(key) is not None:
                seen[key] = str(kwargs[key].dtype)

    loss.register_forward_pre_hook(record, with_kwargs=True)
    train = TrainConfig(bf16=True, learning_rate=2e-6, weight_decay=0.1)
    # The same bf16 policy on the CPU.
    strategy = FSDPStrategy(wrapper, train, total_steps=10, bf16_on_cpu=device.type == "cpu")
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, shape["vocab"], (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 4] = -100
    labels_host = labels
    ids, labels = ids.to(device), labels.to(device)
    mask = torch.ones_like(ids)

    def step(i: int, update: bool = True) -> tuple[float, float, int]:
        """One step; returns the loss, its seconds and the bytes the forward kept for backward.

        `update=False` skips the optimizer (gradients are dropped), so two calls see the
        same weights: that is how checkpointing on and off are compared.
        """
        lam = loss.sample_lambda(rows // 2, seed=0, step=i, rank=rank)
        counts = loss.normalizer_counts(labels_host, lam)
        norms = all_reduce_sum(counts, device).float() / world
        _sync(device)
        before = _allocated(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value, metrics = strategy.module(ids, mask, labels, lam=lam, normalizers=norms)
        saved = _allocated(device) - before  # activations held for backward
        strategy.backward(value)
        if update:
            strategy.step()
        else:
            strategy.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        total = all_reduce_sum(metrics["loss"].reshape(1), device).tolist()  # a device metric
        return total[0] / world, time.perf_counter() - start, saved

    result: dict[str, Any] = {
        "world_size": world,
        "params": params,
        "tokens_per_step": rows * length,
    }
    step(0)  # warm-up: kernels, allocator, optimizer state

    probes = {}
    for on in (True, False):  # the same weights and batch: only checkpointing differs
        set_activation_checkpointing(model, on)
        probes[on] = step(1, update=False)
    for label, on in (("checkpointing_on", True), ("checkpointing_off", False)):
        set_activation_checkpointing(model, on)
        _reset_peak(device)
        base = _allocated(device)
        losses, times = [], []
        for i in range(2, 4):
            value, seconds, _ = step(i)
            losses.append(value)
            times.append(seconds)
        peak = _peak_gib(device)
        result[label] = {
            "loss_at_same_weights": round(probes[on][0], 6),
            "activations_gib": round(probes[on][2] / 2**30, 3),
            "losses": [round(v, 5) for v in losses],
            "step_seconds": round(min(times), 4),
            "peak_gib": peak,
            "peak_above_start_gib": None if peak is None else round(peak - base / 2**30, 3),
        }
    result["loss_inputs_dtype"] = seen
    finite = all(
        v == v and abs(v) < 1e4 for k in ("checkpointing_on", "checkpointing_off")
        for v in result[k]["losses"]
    )  # fmt: skip
    # The export: gather the full state dict (collective), rank 0 writes bf16 safetensors.
    start = time.perf_counter()
    state = strategy.full_state_dict()
    export_ok = True
    if rank == 0:
        from transformers import AutoModelForCausalLM

        assert state is not None
        # Removed afterwards: at full size the export is GBs, and /tmp outlives the run.
        with tempfile.TemporaryDirectory(prefix="gpu-smoke-export-") as target:
            cpu_model = _llama(shape, torch.device("meta"))
            cpu_model.load_state_dict(state, strict=True, assign=True)
            cpu_model.to(torch.bfloat16).save_pretrained(target, safe_serialization=True)
            reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
            key = "model.layers.0.mlp.down_proj.weight"  # compared while the files exist
            export_ok = bool(torch.equal(reloaded.state_dict()[key], state[key].to(torch.bfloat16)))
        result["export_seconds"] = round(time.perf_counter() - start, 2)
    dist.barrier()
    on, off = result["checkpointing_on"], result["checkpointing_off"]
    # Checkpointing recomputes the same bf16 forward: the same loss at the same weights.
    same = abs(on["loss_at_same_weights"] - off["loss_at_same_weights"]) <= 1e-3 * abs(
        off["loss_at_same_weights"]
    )
    less_memory = on["peak_gib"] is None or on["activations_gib"] < off["activations_gib"]
    result["ok"] = bool(
        finite and export_ok and same and less_memory
        and seen.get("lam") == "torch.float32" and seen.get("normalizers") == "torch.float32"
    )  # fmt: skip
    result["checks"] = {
        "finite": finite,
        "export_reloads_equal": export_ok,
        "checkpointing_same_losses": same,
        "checkpointing_saves_memory": less_memory,
    }
    if rank == 0:
        Path(out_file).write_text(json.dumps(result), encoding="utf-8")
    dist.destroy_process_group()


def part_fsdp2(device: torch.device, small: bool) -> dict[str, Any]:
    nproc = torch.cuda.device_count() if device.type == "cuda" else 2
    with tempfile.TemporaryDirectory() as tmp:
        out_file = str(Path(tmp) / "fsdp2.json")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", __file__, "--fsdp-worker", out_file,
            *(["--small"] if small else []),
        ]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not Path(out_file).exists():
            return {"ok": False, "error": proc.stderr[-3000:]}
        return json.loads(Path(out_file).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------- generate


def part_generate(device: torch.device, small: bool) -> dict[str, Any]:
    from sftmix_ray.evaluation import generate
    from sftmix_ray.modeling import train_tiny_tokenizer

    texts = [f"question {i}: what is {i} plus {i * 3}? answer {i * 4}." for i in range(400)]
    tokenizer = train_tiny_tokenizer(texts, 600)
    shape = dict(SMALL, vocab=len(tokenizer), layers=2)
    if not small:
        shape.update(hidden=512, inter=1536, heads=8, kv=4, layers=4)
    model = _llama(shape, device).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    prompts = [texts[i][: 10 + (i * 7) % 40] for i in range(32)]  # mixed lengths: padding
    result: dict[str, Any] = {"prompts": len(prompts), "max_new_tokens": 16}
    _reset_peak(device)
    start = time.perf_counter()
    batched = generate(model, tokenizer, prompts, 16, batch_size=16)
    _sync(device)
    result["batched_seconds"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    single = [generate(model, tokenizer, [p], 16, batch_size=1)[0] for p in prompts]
    _sync(device)
    result["one_by_one_seconds"] = round(time.perf_counter() - start, 3)
    result["peak_gib"] = _peak_gib(device)
    result["agree_fp32"] = sum(a == b for a, b in zip(batched, single)) / len(prompts)
    if device.type == "cuda":
        model.to(torch.bfloat16)
        bf16 = generate(model, tokenizer, prompts, 16, batch_size=16)
        result["agree_bf16_vs_fp32"] = sum(a == b for a, b in zip(bf16, batched)) / len(prompts)
    result["ok"] = result["agree_fp32"] == 1.0
    return result


# ----------------------------------------------------------------------------------- pipeline


def _smoke_model(target: Path, small: bool) -> Path:
    """A Llama-3-shaped model directory: 2 decoder layers of 8B's shape and the real 128256-row
    vocabulary (bf16 on disk), with a BPE tokenizer trained on the demo corpus (its ids are a
    prefix of the vocabulary). `small`: the toy shape at the tokenizer's own vocabulary."""
    from sftmix_ray.data.demo import generate_demo
    from sftmix_ray.modeling import train_tiny_tokenizer

    rows, _ = generate_demo(2000, 0)
    tokenizer = train_tiny_tokenizer((m["content"] for r in rows for m in r["messages"]), 1024)
    shape = dict(SMALL, vocab=len(tokenizer)) if small else dict(FULL)
    model = _llama(shape, torch.device("cpu"))
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.to(torch.float32 if small else torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _cli(args: list[str], sets: list[str], address: str | None) -> dict[str, Any]:
    """One `sftmix-ray` subcommand; its stdout is the result JSON (stderr kept on failure)."""
    command = [sys.executable, "-m", "sftmix_ray.cli", *args]
    command += [*(["--address", address] if address else []), *(f"--set={x}" for x in sets)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} exited {proc.returncode}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def _train_figures(out: Path) -> dict[str, Any]:
    """Steps, median tokens/s and peak GPU memory of the last training run in `out`."""
    history = json.loads((out / "logs" / "train-model-history.json").read_text())["history"]
    speeds = sorted(h["tokens_per_s"] for h in history[1:] or history)
    peaks = [h["gpu_peak_gib"] for h in history if "gpu_peak_gib" in h]
    return {
        "steps": len(history),
        "final_loss": history[-1]["loss"],
        "tokens_per_s": round(speeds[len(speeds) // 2], 1),
        "gpu_peak_gib": max(peaks) if peaks else None,
    }


def part_pipeline(device: torch.device, small: bool, address: str | None = None) -> dict[str, Any]:
    """The Ray path: `sftmix-ray pipeline` on the demo corpus with a Llama-3-shaped model,
    Ray Train FSDP2 over every visible GPU (NCCL, bf16, gradient checkpointing), the scorer on
    GPU actors and eval on a GPU; then `sftmix-ray train` again under DeepSpeed ZeRO-3 bf16, and
    the bf16 export reloaded. On the CPU (`--allow-cpu`, the tests) the same pipeline runs with
    FSDP2 on one gloo worker and ZeRO-3 is left to the suite's own tests."""
    from transformers import AutoModelForCausalLM

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    workers = max(1, gpus)
    with tempfile.TemporaryDirectory() as tmp:
        model = _smoke_model(Path(tmp) / "model", small)
        out = Path(tmp) / "out"
        rows, steps = (64, 2) if small else (128, 4)
        sets = [
            f"model.name_or_path={model}", f"data.demo_train_size={rows}",
            "data.demo_eval_size=8", "data.max_length=256", "data.num_workers=1",
            f"reference.max_steps={steps}", f"reference.num_checkpoints={1 if small else 2}",
            f"train.max_steps={steps}", "train.logging_steps=1",
            "train.per_device_train_batch_size=4", "train.gradient_checkpointing=true",
            "train.strategy=fsdp", f"train.num_workers={workers}", "eval.max_examples=8",
            "eval.max_new_tokens=4", f"score.num_actors={workers}", "train.progress_bar=false",
        ]  # fmt: skip
        if gpus:
            sets += ["train.use_gpu=true", "train.bf16=true", "score.num_gpus_per_actor=1"]
        else:
            sets += ["ray.num_cpus=2"]
        args = ["pipeline", "--config", str(REPO / "configs" / "quickstart.yaml")]
        done = _cli([*args, "--output-dir", str(out)], sets, address)["pipeline"]
        result: dict[str, Any] = {"gpus": gpus, "stages": sorted(done)}
        result["fsdp2"] = _train_figures(out)
        result["eval_response_nll"] = done["eval"]["models"]["sftmix"]["response_nll"]
        if gpus:
            zero3 = [*sets, "train.strategy=deepspeed", "train.deepspeed_stage=3"]
            _cli(["train", "--output-dir", str(out)], zero3, address)
            result["zero3"] = _train_figures(out)
        reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
        result["export_dtype"] = str(next(reloaded.parameters()).dtype)
        losses = [result[k]["final_loss"] for k in ("fsdp2", "zero3") if k in result]
        result["ok"] = all(map(math.isfinite, [*losses, result["eval_response_nll"]])) and (
            result["export_dtype"] == ("torch.bfloat16" if gpus else "torch.float32")
        )
        return result


PARTS = {
    "losses": part_losses, "fsdp2": part_fsdp2, "generate": part_generate,
    "pipeline": part_pipeline,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON lines here")
    parser.add_argument("--small", action="store_true", help="toy sizes")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (tests)")
    parser.add_argument("--address", help="pipeline part: join this Ray cluster (else a local one)")
    parser.add_argument("--fsdp-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fsdp_worker:
        fsdp_worker(args.small, args.fsdp_worker)
        return 0
    device = _device(args.allow_cpu)
    if device is None:
        print("gpu-smoke: no CUDA GPU visible; nothing was run", file=sys.stderr)
        return 0
    failed = False
    lines = []
    for name in args.parts.split(","):
        start = time.perf_counter()
        try:
            extra = {"address": args.address} if name == "pipeline" else {}
            result = PARTS[name](device, args.small, **extra)
        except Exception as exc:  # one part's failure must not hide the others' results
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result = {"part": name, "seconds": round(time.perf_counter() - start, 2), **result}
        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        result["torch"] = torch.__version__
        line = json.dumps(result)
        print(line, flush=True)
        lines.append(line)
        failed |= not result["ok"]
    if args.json:
        Path(args.json).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
