"""Held-out metrics: response NLL and perplexity, and exact match by greedy generation."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from sftmix_ray.config import Config, exports_adapter_only, trains_ntp_baseline
from sftmix_ray.errors import SftmixError
from sftmix_ray.io_utils import atomic_write_json
from sftmix_ray.layout import RunDir
from sftmix_ray.modeling import resolve_model_path

log = logging.getLogger(__name__)


@torch.inference_mode()
def response_nll(model: Any, input_ids: list, labels: list, batch_size: int = 16) -> dict:
    """Token-weighted mean response NLL and perplexity over the held-out rows.

    Logits come from the model's own head transform (Gemma's soft-capping, Cohere's and
    Granite's scaling), exactly as in training and scoring.
    """
    from sftmix_ray.batching import collate
    from sftmix_ray.losses import NTPLoss, response_token_nll
    from sftmix_ray.train.forward import CausalLMWithLoss

    adapter = CausalLMWithLoss(model, NTPLoss())
    head = adapter.output_head()
    total, count = 0.0, 0
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        batch = collate([input_ids[i] for i in part], [labels[i] for i in part], 0, model.device)
        hidden = adapter.decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        nll_sum, n_tokens = response_token_nll(hidden, batch["labels_host"], head)
        total += float(nll_sum.sum())
        count += int(n_tokens.sum())
    mean = total / max(count, 1)
    return {"response_nll": mean, "perplexity": math.exp(mean), "response_tokens": count}


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    *,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Completions of `prompts`, greedy (`temperature` 0) or sampled (seeded per batch),
    batched with left padding (prompts of similar length share a batch); the answers come
    back in the prompts' order."""
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, i in enumerate(part):
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - n :] = 1
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            torch.manual_seed(seed + start)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
            **sampling,
        )
        for row, i in enumerate(part):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


def exact_match(
    model: Any, tokenizer: Any, rows: list[dict], max_new_tokens: int, batch_size: int = 16
) -> dict:
    """Share of rows whose greedy answer to the last user turn equals the reference answer."""
    from sftmix_ray.modeling import chat_template_of

    prompts = [
        tokenizer.apply_chat_template(
            # Without formats.py's training marks, as the prompt was rendered in training.
            [{k: v for k, v in m.items() if k != "train"} for m in row["messages"][:-1]],
            tools=row.get("tools"),
            chat_template=chat_template_of(tokenizer, tools=bool(row.get("tools"))),
            tokenize=False,
            add_generation_prompt=True,
        )
        for row in rows
    ]
    answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    correct = 0
    samples = []
    for row, answer in zip(rows, answers):
        hit = answer == row["answer"].strip()
        correct += hit
        if len(samples) < 5:
            samples.append({"expected": row["answer"], "generated": answer, "correct": hit})
    return {
        "exact_match": correct / len(rows) if rows else float("nan"),
        "exact_match_rows": len(rows),
        "samples": samples,
    }


def load_for_eval(
    model_dir: str, base: str | None, dtype: torch.dtype, attn_implementation: str | None
) -> Any:
    """A trained model for inference: an HF model directory, or a LoRA adapter directory put
    on `base` (and merged in memory)."""
    from sftmix_ray.modeling import load_model
    from sftmix_ray.train.lora import is_adapter_dir, load_with_adapter

    if is_adapter_dir(Path(model_dir)):
        return load_with_adapter(
            Path(model_dir), base, dtype=dtype, attn_implementation=attn_implementation
        )
    return load_model(model_dir, dtype=dtype, attn_implementation=attn_implementation)


def evaluate_model(
    model_dir: str,
    heldout_dir: str | None,
    eval_cfg: dict,
    bf16: bool = False,
    attn_implementation: str | None = "sdpa",
    base: str | None = None,
    questions: list[Any] | None = None,
    seed: int = 0,
) -> dict:
    """All held-out metrics of one HF model directory (or LoRA adapter over `base`), on the GPU
    Ray assigned when there is one (in bf16 when `bf16`), else on the CPU in fp32 (none
    without a held-out split: `heldout_dir` None); then the lm-eval tasks and the answers to
    `questions` (`answers.Question`) the config asks for."""
    from sftmix_ray.modeling import load_tokenizer

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if (bf16 and on_gpu) else torch.float32
    model = load_for_eval(model_dir, base, dtype, attn_implementation)
    model = model.to("cuda" if on_gpu else "cpu").eval()
    tokenizer = load_tokenizer(model_dir)
    result = {} if heldout_dir is None else heldout_metrics(model, tokenizer, heldout_dir, eval_cfg)
    if eval_cfg["lm_eval_tasks"]:
        from sftmix_ray.lm_eval_run import run_lm_eval

        result["lm_eval"] = run_lm_eval(model, tokenizer, eval_cfg, seed)
    if questions:
        from sftmix_ray.answers import answer_questions
        from sftmix_ray.modeling import chat_template_of

        result["answers"] = answer_questions(
            model, tokenizer, questions,
            temperature=eval_cfg["answer_temperature"],
            per_category=eval_cfg["answer_mt_bench_temperatures"],
            max_new_tokens=eval_cfg["answer_max_new_tokens"],
            batch_size=eval_cfg["answer_batch_size"], seed=seed,
        )  # fmt: skip
        result["chat_template"] = chat_template_of(tokenizer)
    return result


def heldout_metrics(model: Any, tokenizer: Any, heldout_dir: str, eval_cfg: dict) -> dict:
    """Response NLL and perplexity on the held-out split, and exact match where it has answers."""
    import pyarrow.dataset as pads

    from sftmix_ray.data.text_rows import is_text_row

    # The first rows only, and only the columns read here: a 100k-row held-out set read whole
    # was GBs in each eval task for 200 rows.
    held_out = pads.dataset(heldout_dir, format="parquet")
    wanted = ["input_ids", "labels", "messages_json", "answer", "tools_json"]
    columns = [c for c in wanted if c in held_out.schema.names]
    table = held_out.head(eval_cfg["max_examples"], columns=columns)
    result = response_nll(
        model, table.column("input_ids").to_pylist(), table.column("labels").to_pylist()
    )
    if eval_cfg["exact_match"]:
        tools = (
            table.column("tools_json").to_pylist()
            if "tools_json" in table.column_names  # prepared before tool calling: none
            else [None] * table.num_rows
        )
        rows = [
            {"messages": messages, "answer": a, "tools": json.loads(t) if t else None}
            for m, a, t in zip(
                table.column("messages_json").to_pylist(),
                table.column("answer").to_pylist(),
                tools,
            )
            # A text row has no turns to prompt with (format text): its NLL is measured above.
            if a is not None and not is_text_row(messages := json.loads(m))
        ]
        if rows:
            result.update(exact_match(model, tokenizer, rows, eval_cfg["max_new_tokens"]))
    return result


# Hugging Face's offline switches: set on the driver, they also hold in the eval task (which
# may run on a node whose environment does not set them).
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def trained_models(cfg: Config, run: RunDir) -> dict[str, tuple[str, Path]]:
    """The models this config's `train` exports, those that exist: key -> ("model", HF
    directory) or ("adapter", LoRA adapter directory, when `train.lora.merge` is false).

    Read from the config, not from what OUT holds: an earlier config's export stays there
    (`model_ntp/` after `eval.compare_ntp` was turned off, a merged `model/` beside the
    adapter of a run without merging) and was evaluated and reported as this run's."""
    from sftmix_ray.train.lora import is_adapter_dir

    names = [("sftmix", RunDir.MODEL)]
    if trains_ntp_baseline(cfg):
        names.append(("ntp", RunDir.NTP_MODEL))
    adapter_only = exports_adapter_only(cfg)
    found = {}
    for key, name in names:
        if adapter_only and is_adapter_dir(run.adapter(name)):
            found[key] = ("adapter", run.adapter(name))
        elif not adapter_only and (run.model(name) / "config.json").exists():
            found[key] = ("model", run.model(name))
    return found


def run_eval(cfg: Config, out_dir: Path | RunDir) -> dict[str, Any]:
    """Evaluate OUT/model (and OUT/model_ntp when present) on OUT/heldout -> OUT/eval.json."""
    import dataclasses

    import ray

    run = RunDir.of(out_dir)
    models = trained_models(cfg, run)
    export = run.adapter if exports_adapter_only(cfg) else run.model
    if "sftmix" not in models:
        raise SftmixError(f"{export()} does not exist; run `sftmix-ray train` first")
    if trains_ntp_baseline(cfg) and "ntp" not in models:
        raise SftmixError(
            f"eval.compare_ntp is set but the NTP baseline ({export(RunDir.NTP_MODEL)}) does "
            "not exist; run `sftmix-ray train` again"
        )
    # Without a held-out split (a corpus given without data.eval_path or data.eval_fraction),
    # the held-out metrics are skipped, as TRL, Axolotl and LLaMA-Factory skip evaluation
    # without a validation set: a pipeline must not train for hours and then fail here.
    heldout: Path | None = run.heldout if run.heldout.exists() else None
    skipped = None
    if heldout is None:
        skipped = (
            f"no held-out split ({run.heldout} does not exist): held-out metrics skipped; set "
            "data.eval_fraction (e.g. 0.02) or data.eval_path to measure them"
        )
        log.warning("eval: %s", skipped)
        if not (cfg.eval.lm_eval_tasks or cfg.eval.questions):
            run.eval_file.unlink(missing_ok=True)  # no earlier run's results in the report
            return {"heldout_skipped": skipped, "models": {}, "lm_eval": None, "answers": None}
    task = ray.remote(num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)(evaluate_model)
    offline = {k: os.environ[k] for k in OFFLINE_ENV if k in os.environ}
    if offline:  # the driver's offline mode holds where the models load and lm-eval runs
        task = task.options(runtime_env={"env_vars": offline})
    eval_cfg = dataclasses.asdict(cfg.eval)
    base = resolve_model_path(cfg.model.name_or_path, run)  # under a LoRA adapter
    layout, questions = None, None
    if cfg.eval.questions:
        from sftmix_ray.answers import read_questions

        layout, questions = read_questions(cfg.eval.questions)  # bad files fail before Ray work
    refs = {
        k: task.remote(
            str(path), str(heldout) if heldout else None, eval_cfg, cfg.train.bf16,
            cfg.model.attn_implementation,
            base, questions, cfg.train.seed,
        )
        for k, (_, path) in models.items()
    }  # fmt: skip
    results = {k: {"model": models[k][0], **ray.get(ref)} for k, ref in refs.items()}
    answers = None
    if questions is not None and layout is not None:
        answers = write_answers(cfg, run, layout, questions, results)
    atomic_write_json(run.eval_file, results)
    summary: dict[str, Any] = {
        "models": {
            k: {m: v for m, v in r.items() if m not in ("samples", "lm_eval")}
            for k, r in results.items()
        }
    }
    lm_eval = {k: r["lm_eval"] for k, r in results.items() if "lm_eval" in r}
    # Every key set, None when absent: summary.json merges a stage's keys into its old entry.
    summary["lm_eval"] = lm_eval or None
    summary["answers"] = answers or None
    summary["heldout_skipped"] = skipped  # None when measured (summary.json merges keys)
    return summary


def write_answers(
    cfg: Config, run: RunDir, layout: str, questions: list[Any], results: dict[str, dict]
) -> dict[str, list[str]]:
    """Write each model's answers (popped from `results`) in the layouts asked for, and how
    they were generated; returns the files written per model."""
    from sftmix_ray.answers import alpaca_eval_outputs, mt_bench_answers
    from sftmix_ray.io_utils import atomic_write_text

    formats: list[str] = list(cfg.eval.answer_formats) or [layout]
    written: dict[str, list[str]] = {}
    model_ids = {}
    template = None
    for key, result in results.items():
        answers = result.pop("answers")
        template = result.pop("chat_template")
        model_id = cfg.eval.answer_model_id + ("" if key == "sftmix" else f"-{key}")
        model_ids[key] = model_id
        files = written.setdefault(key, [])
        if "alpaca_eval" in formats:
            path = run.alpaca_eval_answers(key)
            atomic_write_json(path, alpaca_eval_outputs(questions, answers, model_id))
            files.append(str(path))
        if "mt_bench" in formats:
            path = run.mt_bench_answers(model_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = mt_bench_answers(questions, answers, model_id)
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            atomic_write_text(path, text)
            files.append(str(path))
    settings = {
        "questions": str(Path(cfg.eval.questions or "").resolve()),
        "questions_layout": layout,
        "answer_formats": formats,
        "model_ids": model_ids,
        "chat_template": template,
        "temperature": cfg.eval.answer_temperature,
        "mt_bench_category_temperatures": cfg.eval.answer_mt_bench_temperatures,
        "max_new_tokens": cfg.eval.answer_max_new_tokens,
        "seed": cfg.train.seed,
        "do_sample": cfg.eval.answer_temperature > 0 or cfg.eval.answer_mt_bench_temperatures,
    }
    atomic_write_json(run.answer_settings, settings)
    return written
