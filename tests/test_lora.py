"""LoRA through peft: SFTMix with adapters trains only the adapters, on 1 worker and on 2 under
FSDP2 and ZeRO-3 (with gradient checkpointing) alike; the adapter and the merged model export
and reload to the same held-out loss; a LoRA run resumes from adapter-only checkpoints; with
`train.lora.merge=false` eval loads base + adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sftmix_ray.summary import read_summary
from sftmix_ray.train.loop import FAULT_ENV
from tests.conftest import tiny_config
from tests.test_train import losses, make_train_base, run_train

# Two steps (the fault-injected run dies after step 1 and resumes from its checkpoint).
LORA = ["train.lora.r=8", "train.lora.alpha=16", "train.max_steps=2"]
# Weights & Biases offline, under OUT/wandb; a credential in a URL the run config holds.
WANDB = [
    "train.report_to=tensorboard,wandb", "train.wandb_mode=offline",
    "train.wandb_project=sftmix-tests", "train.wandb_tags=lora,ci",
    "train.mlflow_tracking_uri=https://ci:hunter2@mlflow.invalid",
]  # fmt: skip
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def lora_base(prepared_out: Path, tmp_path_factory) -> Path:
    return make_train_base(prepared_out, tmp_path_factory.mktemp("lora_base"))


@pytest.fixture(scope="module")
def lora_one(lora_base: Path, tmp_path_factory) -> tuple[Path, list]:
    """One worker, LoRA on every linear layer, merged export: the reference trajectory.
    Logged to W&B (offline)."""
    keep = "train.keep_resume_checkpoints=true"  # its resume checkpoint is inspected below
    return run_train(lora_base, tmp_path_factory.mktemp("lora_one"), *LORA, *WANDB, keep)


def _heldout_nll(model, out: Path) -> float:
    """Token-weighted held-out response NLL, as training's eval_loss computes it."""
    import pyarrow.parquet as pq

    from sftmix_ray.evaluation import response_nll

    table = pq.read_table(out / "heldout")
    rows = table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    return response_nll(model.eval(), *rows)["response_nll"]


def test_lora_trains_only_the_adapters_and_exports_both_forms(lora_one):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, history = lora_one
    assert losses(history)[-1] < losses(history)[0], "training lowers the loss"
    summary = read_summary(out)["stages"]["train"]
    assert summary["adapter_dir"] == str((out / "adapter").resolve())
    # The adapter: LoRA weights only, over the base it names.
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter), list(adapter)
    assert {k.split(".")[-3] for k in adapter} == set(TARGETS)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base_model").resolve())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if ".lora_B." in k)
    # The merged model differs from the base in the adapted linear layers only.
    base = load_file(str(out / "base_model" / "model.safetensors"))
    merged = load_file(str(out / "model" / "model.safetensors"))
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    adapted = {k for k in base if k.split(".")[-2] in TARGETS}
    assert changed == adapted, sorted(changed ^ adapted)[:5]
    # Base + adapter (peft's own loader) and the merged model give the held-out loss that
    # training reported at its last step.
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out / "base_model"), out / "adapter"
    )
    merged_model = AutoModelForCausalLM.from_pretrained(out / "model")
    expected = history[-1]["eval_loss"]
    assert _heldout_nll(with_adapter, out) == pytest.approx(expected, rel=1e-5)
    assert _heldout_nll(merged_model, out) == pytest.approx(expected, rel=1e-5)
    base_nll = _heldout_nll(AutoModelForCausalLM.from_pretrained(out / "base_model"), out)
    assert abs(base_nll - expected) > 1e-3, "the adapter changed the held-out loss"
    # Resume checkpoints hold the adapter (trained) parameters only, not the frozen base.
    (run_dir,) = (out / "ray_storage").iterdir()
    saved = sorted(p for p in run_dir.iterdir() if p.is_dir())
    assert saved
    state = load_file(str(saved[-1] / "model.safetensors"))
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in state), list(state)
    assert len(state) == len(adapter)


def test_wandb_run_holds_every_step_and_the_redacted_config(lora_one):
    from tests.wandb_offline import offline_runs

    out, history = lora_one
    (run,) = offline_runs(out / "wandb")
    summary = read_summary(out)["stages"]["train"]
    assert run["id"] == summary["wandb_run_id"] and run["id"].startswith(summary["run_name"])
    assert (run["project"], run["name"]) == ("sftmix-tests", "train-model")
    assert run["tags"] == ["lora", "ci"]
    logged = [h for h in run["history"] if "train/loss" in h]
    assert [h["_step"] for h in logged] == [h["step"] for h in history] == [1, 2]
    np.testing.assert_allclose([h["train/loss"] for h in logged], losses(history), rtol=1e-6)
    assert run["config"]["train.lora.r"] == "8" and run["config"]["mixup.mu"] == "0.2"
    assert run["config"]["train.mlflow_tracking_uri"] == "https://***@mlflow.invalid"
    for path in (out / "wandb").rglob("*"):
        assert not path.is_file() or b"hunter2" not in path.read_bytes(), path


def test_lora_two_workers_match_one(lora_one, lora_base, tmp_path, monkeypatch):
    """FSDP2 on 2 workers, with gradient checkpointing and a worker killed after step 1
    (resumed from an adapter-only DCP checkpoint), follows the 1-worker trajectory. (ZeRO-3
    with LoRA: `tests/test_loss_distributed.py`, loss, gradients, export and resume on gloo.)"""
    _, one = lora_one
    monkeypatch.setenv(FAULT_ENV, f"1:{tmp_path / 'fault-marker'}")
    extra = ["train.strategy=fsdp", "train.max_failures=1", "train.lora.merge=false", *WANDB]
    out, two = run_train(
        lora_base, tmp_path, *LORA, *extra, "train.num_workers=2",
        "train.per_device_train_batch_size=4", "train.gradient_checkpointing=true",
    )  # fmt: skip
    assert [h["step"] for h in two] == [1, 2]
    np.testing.assert_allclose(losses(two), losses(one), rtol=2e-4)
    np.testing.assert_allclose(losses(two, "mix"), losses(one, "mix"), rtol=2e-4)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-4)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(lora_one[0] / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=0, atol=1e-4)
    stage = read_summary(out)["stages"]["train"]
    assert (tmp_path / "fault-marker").exists() and stage["restarts"] == 1
    _assert_restart_logged_to_the_same_wandb_run(out, stage["wandb_run_id"])
    assert not (out / "model").exists(), "merge=false writes the adapter only"
    assert stage["model_dir"] is None
    _assert_eval_loads_base_plus_adapter(out, two[-1]["eval_loss"])


def _assert_restart_logged_to_the_same_wandb_run(out: Path, run_id: str) -> None:
    """One W&B run id for both worker-group starts. The killed worker's W&B helper died with
    it before writing anything; the restarted one replays the restored steps, then logs on."""
    from tests.wandb_offline import offline_runs

    runs = offline_runs(out / "wandb")
    assert len(runs) == 2 and {r["id"] for r in runs} == {run_id}
    assert [h["_step"] for h in runs[-1]["history"] if "train/loss" in h] == [1, 2]


def _assert_eval_loads_base_plus_adapter(out: Path, eval_loss: float) -> None:
    from sftmix_ray.pipeline import run_stage

    result = run_stage("eval", tiny_config(*LORA, "train.lora.merge=false"), out)
    metrics = result["models"]["sftmix"]
    assert metrics["response_nll"] == pytest.approx(eval_loss, rel=1e-5)
    assert json.loads((out / "eval.json").read_text())["sftmix"]["model"] == "adapter"


def test_lora_resume_state_is_the_adapter_and_its_optimizer(tmp_path):
    """Single process: a LoRA strategy saves only trained parameters, and a fresh one restores
    them and the optimizer exactly (the base weights come from the model itself)."""
    from sftmix_ray.config import LoraConfig, ModelConfig, TrainConfig
    from sftmix_ray.losses import NTPLoss
    from sftmix_ray.modeling import build_tiny_model
    from sftmix_ray.train.forward import CausalLMWithLoss
    from sftmix_ray.train.lora import apply_lora
    from sftmix_ray.train.strategies import build_strategy

    train = TrainConfig(lora=LoraConfig(r=4), learning_rate=0.01)

    def strategy():
        model = apply_lora(build_tiny_model(ModelConfig(), 300, 0, 1), train.lora, seed=0)
        return build_strategy("ddp", CausalLMWithLoss(model, NTPLoss()), train, 10)

    first = strategy()
    ids = torch.randint(2, 300, (2, 12))
    for _ in range(2):
        loss, _ = first.module(ids, None, ids.clone(), normalizers=torch.tensor([24.0]))
        first.backward(loss)
        first.step()
    first.save(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    second = strategy()
    second.load(tmp_path)
    restored = second.wrapper.state_dict()
    for name, value in first.wrapper.state_dict().items():
        assert torch.equal(value, restored[name]), name
    opt_a, opt_b = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for k in opt_a["state"]:
        assert torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])


def test_lora_settings_are_checked():
    from sftmix_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.lora\.load_in_4bit"):
        tiny_config(*LORA, "train.lora.load_in_4bit=true")  # no GPU
    with pytest.raises(ConfigError, match=r"train\.lora\.dropout"):
        tiny_config(*LORA, "train.lora.dropout=1.5")
    with pytest.raises(ConfigError, match=r"did you mean 'train\.lora\.alpha'"):
        tiny_config("train.lora.alhpa=8")


def test_a_missing_extra_is_named(monkeypatch):
    import sys

    from sftmix_ray.errors import SftmixError
    from sftmix_ray.extras import require

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(SftmixError, match=r"train\.lora\.r > 0.*pip install 'sftmix-ray\[lora\]'"):
        require("peft", "train.lora.r > 0 (LoRA)")


def test_lora_run_layout_and_what_reruns(tmp_path):
    """Reference checkpoints stay merged HF models (no adapter); `merge=false` exports the
    adapter alone; LoRA settings change the training fingerprint only when LoRA is on."""
    from sftmix_ray.stages import training_reads
    from sftmix_ray.train.launch import build_spec

    (tmp_path / "base_model").mkdir()
    (tmp_path / "base_model" / "config.json").write_text("{}")
    ref = build_spec(tiny_config(*LORA), tmp_path, "reference")
    assert ref.adapter_export is None and ref.final_export is None
    assert ref.train.lora.r == 8 and ref.export_count == 2
    adapter_only = build_spec(tiny_config(*LORA, "train.lora.merge=false"), tmp_path, "train")
    assert adapter_only.final_export is None
    assert adapter_only.adapter_export == str(tmp_path.resolve() / "adapter")
    ntp = build_spec(tiny_config(*LORA), tmp_path, "train", export_name="model_ntp")
    assert ntp.adapter_export == str(tmp_path.resolve() / "adapter_ntp")
    assert ntp.final_export == str(tmp_path.resolve() / "model_ntp")
    off, on = training_reads(tiny_config(), "train"), training_reads(tiny_config(*LORA), "train")
    assert not [k for k in off if "lora" in k]
    assert on["train.lora.r"] == 8 and on["train.lora.target_modules"] == ["all-linear"]
    off_alpha = training_reads(tiny_config("train.lora.alpha=4"), "train")
    assert off_alpha == off, "LoRA settings are not read while LoRA is off"


REPO = Path(__file__).resolve().parents[1]


def _own_accuracy(model_dir: Path, task_file: Path) -> float:
    """The demo lm-eval task's accuracy computed here: the choice whose continuation
    (" " + choice after "Question: ...\\nAnswer:") has the highest summed log-likelihood."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [json.loads(line) for line in task_file.read_text().splitlines()]
    hits = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            whole = tok(context + " " + choice).input_ids
            n_context = len(tok(context).input_ids)
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(n_context, len(whole))))
        hits += int(np.argmax(scores) == doc["answer"])
    return hits / len(docs)


def test_eval_runs_lm_eval_and_writes_benchmark_answers(lora_one, ray_local, tmp_path):
    """`sftmix-ray eval` (joined to the session's cluster, HF_HUB_OFFLINE=1 on the driver,
    which the eval task inherits; run from another directory) runs the repo's lm-eval task
    and answers MT-Bench-style questions in both layouts."""
    import subprocess

    from sftmix_ray.report import write_report
    from tests.conftest import TINY_OVERRIDES, cli_env, result_json, sftmix_command

    out = tmp_path / "out"
    shutil.copytree(lora_one[0], out, ignore=shutil.ignore_patterns("ray_storage", "wandb"))
    task_dir = REPO / "configs" / "lm_eval"
    questions = REPO / "configs" / "questions" / "mt_bench_demo.jsonl"
    sets = [
        *TINY_OVERRIDES, *LORA, "eval.max_examples=4",
        "eval.lm_eval_tasks=sftmix_demo_arith", f"eval.lm_eval_include_path={task_dir}",
        f"eval.questions={questions}", "eval.answer_formats=alpaca_eval,mt_bench",
        "eval.answer_max_new_tokens=6", "eval.answer_mt_bench_temperatures=true",
    ]  # fmt: skip
    env = cli_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    address = ray_local.get_runtime_context().gcs_address
    command = [*sftmix_command(), "eval", "--output-dir", str(out), "--address", address]
    proc = subprocess.run(
        [*command, *(f"--set={s}" for s in sets)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    result = result_json(proc)["eval"]
    accuracy = result["lm_eval"]["sftmix"]["sftmix_demo_arith"]["acc,none"]
    assert accuracy == pytest.approx(
        _own_accuracy(out / "model", task_dir / "sftmix_demo_arith.jsonl")
    )
    stored = json.loads((out / "eval.json").read_text())["sftmix"]
    assert stored["lm_eval"]["sftmix_demo_arith"]["sample_len"] == 24
    # Answers: FastChat's MT-Bench layout and AlpacaEval's, every turn answered.
    rows = [json.loads(line) for line in (out / "answers" / "mt_bench" / "sftmix-ray.jsonl")
            .read_text().splitlines()]  # fmt: skip
    assert [r["question_id"] for r in rows] == [81, 111, 121, 131]
    assert [len(r["choices"][0]["turns"]) for r in rows] == [2, 2, 1, 2]
    assert {r["model_id"] for r in rows} == {"sftmix-ray"} and all(r["answer_id"] for r in rows)
    alpaca = json.loads((out / "answers" / "alpaca_eval.json").read_text())
    assert [a["output"] for a in alpaca] == [r["choices"][0]["turns"][0] for r in rows]
    assert alpaca[0]["instruction"] == "Write a two-line poem about GPUs."
    assert {a["generator"] for a in alpaca} == {"sftmix-ray"}
    settings = json.loads((out / "answers" / "settings.json").read_text())
    assert settings["mt_bench_category_temperatures"] is True and settings["max_new_tokens"] == 6
    assert "<|im_start|>" in settings["chat_template"]
    assert result["answers"]["sftmix"] == [
        str(out.resolve() / "answers" / "alpaca_eval.json"),
        str(out.resolve() / "answers" / "mt_bench" / "sftmix-ray.jsonl"),
    ]
    report = write_report(out).read_text()
    assert "## lm-eval-harness" in report and "| sftmix_demo_arith | acc,none |" in report
