"""The run directory: every path under OUT is named here, and only here.

    OUT/
      config.yaml  summary.json  report.md  eval.json          the run's record
      loss_curves.png  cartography.png                           its plots
      base_model/                     the tiny preset, materialized by prepare (tokenizer too)
      data/  heldout/                 tokenized corpus (Parquet shards; one dataset each)
      rejections/{train,heldout}.jsonl   every rejected row with its reason
      reference/checkpoint-<step>/    the reference run's HF checkpoints (scored)
      scores/scores.parquet           confidence per example (a one-file dataset)
      split/{confident,unconfident}.parquet
      model/  model_ntp/              the trained HF models (model_ntp: NTP baseline)
      adapter/  adapter_ntp/          their LoRA adapters (train.lora.r > 0)
      answers/                        answers for AlpacaEval and MT-Bench (eval.questions)
      wandb/                          Weights & Biases runs (train.report_to: wandb)
      logs/                           histories, worker-group starts, TensorBoard
      mlruns/  ray_storage/           MLflow store; Ray Train checkpoints (train.storage_path)
      tune/                           Ray Tune: ray/ (the experiment), trials/<id>/ (each
                                      trial's own run directory), results.{csv,parquet}
      work/                           intermediates a rerun reuses, never results:
        scores/checkpoint-<step>.parquet   NLL per example for one reference checkpoint
        reference_data/{data,heldout}/      corpus in a smaller reference model's tokenizer
        prepare/                            the demo corpus as JSON Lines, JSON arrays and Hub
                                            datasets rewritten so they can be cut into chunks

Results and intermediates are apart: `pyarrow.dataset.dataset(OUT/<results dir>)` reads every
results directory above as one dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class _Under:
    """A fixed path under a run's root: `RunDir(out).data` is `out / "data"`."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, run: RunDir, owner: type | None = None) -> Path:
        return run.root.joinpath(*self.parts)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run under `root` (OUT)."""

    root: Path

    CONFIG = "config.yaml"
    SUMMARY = "summary.json"
    REPORT = "report.md"
    LOSS_PLOT = "loss_curves.png"
    CARTOGRAPHY = "cartography.png"
    EVAL = "eval.json"
    BASE_MODEL = "base_model"
    DATA = "data"
    HELDOUT = "heldout"
    REJECTIONS = "rejections"
    REFERENCE = "reference"
    SCORES = "scores"
    SPLIT = "split"
    MODEL = "model"
    NTP_MODEL = "model_ntp"
    ADAPTER = "adapter"
    ANSWERS = "answers"
    WANDB = "wandb"
    LOGS = "logs"
    MLRUNS = "mlruns"
    RAY_STORAGE = "ray_storage"
    TUNE = "tune"
    WORK = "work"

    config = _Under(CONFIG)
    summary = _Under(SUMMARY)
    report = _Under(REPORT)
    loss_plot = _Under(LOSS_PLOT)
    cartography = _Under(CARTOGRAPHY)  # the confidence/variability map split draws
    eval_file = _Under(EVAL)
    base_model = _Under(BASE_MODEL)
    data = _Under(DATA)
    heldout = _Under(HELDOUT)
    reference = _Under(REFERENCE)
    scores_dir = _Under(SCORES)
    scores = _Under(SCORES, "scores.parquet")
    checkpoint_scores_dir = _Under(WORK, "scores")
    split_dir = _Under(SPLIT)
    answers = _Under(ANSWERS)
    # how the answers were generated: chat template, sampling, models
    answer_settings = _Under(ANSWERS, "settings.json")
    wandb = _Under(WANDB)
    # the corpus retokenized for a reference model with another tokenizer
    reference_data = _Under(WORK, "reference_data")
    # what prepare writes to read the corpus in chunks, and its unfinished outputs
    prepare_work = _Under(WORK, "prepare")
    logs = _Under(LOGS)
    mlruns = _Under(MLRUNS)
    ray_storage = _Under(RAY_STORAGE)
    tune = _Under(TUNE)
    trials = _Under(TUNE, "trials")

    @classmethod
    def of(cls, out: RunDir | Path | str) -> RunDir:
        """`out` as a RunDir (stages also take a bare path)."""
        return out if isinstance(out, RunDir) else cls(Path(out))

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def __fspath__(self) -> str:
        return str(self.root)

    def rejections(self, part: str) -> Path:
        """JSON Lines of every row of `part` ("train" or "heldout") that prepare rejected."""
        return self.root / self.REJECTIONS / f"{part}.jsonl"

    def reference_checkpoint(self, step: int) -> Path:
        return self.reference / f"checkpoint-{step}"

    def checkpoint_scores(self, step: int | str) -> Path:
        """NLL per example under reference checkpoint `step` (an intermediate of score)."""
        return self.checkpoint_scores_dir / f"checkpoint-{step}.parquet"

    def split_file(self, side: str) -> Path:
        """The example ids of the "confident" or "unconfident" half."""
        return self.split_dir / f"{side}.parquet"

    def model(self, name: str = MODEL) -> Path:
        """An exported HF model: "model" (SFTMix) or "model_ntp" (the NTP baseline)."""
        return self.root / name

    def adapter(self, model_name: str = MODEL) -> Path:
        """The LoRA adapter of an exported model: "adapter" (SFTMix) or "adapter_ntp"."""
        return self.root / model_name.replace(self.MODEL, self.ADAPTER, 1)

    def alpaca_eval_answers(self, model_key: str) -> Path:
        """AlpacaEval model outputs of "sftmix" (alpaca_eval.json) or "ntp" (..._ntp.json)."""
        suffix = "" if model_key == "sftmix" else f"_{model_key}"
        return self.answers / f"alpaca_eval{suffix}.json"

    def mt_bench_answers(self, model_id: str) -> Path:
        """FastChat's layout: one JSON Lines file per model id."""
        return self.answers / "mt_bench" / f"{model_id}.jsonl"

    def history(self, mode: str, export_name: str) -> Path:
        return self.logs / f"{mode}-{export_name}-history.json"

    def starts(self, mode: str, export_name: str) -> Path:
        return self.logs / f"{mode}-{export_name}-starts.json"

    def tensorboard(self, mode: str, export_name: str) -> Path:
        return self.logs / "tensorboard" / f"{mode}-{export_name}"

    def trial(self, trial_id: str) -> RunDir:
        """The run directory of one Tune trial (its inputs linked from this run)."""
        return RunDir(self.trials / trial_id)
