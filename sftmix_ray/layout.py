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

    @classmethod
    def of(cls, out: RunDir | Path | str) -> RunDir:
        """`out` as a RunDir (stages also take a bare path)."""
        return out if isinstance(out, RunDir) else cls(Path(out))

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @property
    def loss_plot(self) -> Path:
        return self.root / self.LOSS_PLOT

    @property
    def cartography(self) -> Path:
        """The confidence/variability map drawn by split."""
        return self.root / self.CARTOGRAPHY

    @property
    def eval_file(self) -> Path:
        return self.root / self.EVAL

    @property
    def base_model(self) -> Path:
        return self.root / self.BASE_MODEL

    @property
    def data(self) -> Path:
        return self.root / self.DATA

    @property
    def heldout(self) -> Path:
        return self.root / self.HELDOUT

    def rejections(self, part: str) -> Path:
        """JSON Lines of every row of `part` ("train" or "heldout") that prepare rejected."""
        return self.root / self.REJECTIONS / f"{part}.jsonl"

    @property
    def reference(self) -> Path:
        return self.root / self.REFERENCE

    def reference_checkpoint(self, step: int) -> Path:
        return self.reference / f"checkpoint-{step}"

    @property
    def scores_dir(self) -> Path:
        return self.root / self.SCORES

    @property
    def scores(self) -> Path:
        return self.scores_dir / "scores.parquet"

    @property
    def checkpoint_scores_dir(self) -> Path:
        return self.root / self.WORK / "scores"

    def checkpoint_scores(self, step: int | str) -> Path:
        """NLL per example under reference checkpoint `step` (an intermediate of score)."""
        return self.checkpoint_scores_dir / f"checkpoint-{step}.parquet"

    @property
    def split_dir(self) -> Path:
        return self.root / self.SPLIT

    def split_file(self, side: str) -> Path:
        """The example ids of the "confident" or "unconfident" half."""
        return self.split_dir / f"{side}.parquet"

    def model(self, name: str = MODEL) -> Path:
        """An exported HF model: "model" (SFTMix) or "model_ntp" (the NTP baseline)."""
        return self.root / name

    def adapter(self, model_name: str = MODEL) -> Path:
        """The LoRA adapter of an exported model: "adapter" (SFTMix) or "adapter_ntp"."""
        return self.root / model_name.replace(self.MODEL, self.ADAPTER, 1)

    @property
    def answers(self) -> Path:
        return self.root / self.ANSWERS

    def alpaca_eval_answers(self, model_key: str) -> Path:
        """AlpacaEval model outputs of "sftmix" (alpaca_eval.json) or "ntp" (..._ntp.json)."""
        suffix = "" if model_key == "sftmix" else f"_{model_key}"
        return self.answers / f"alpaca_eval{suffix}.json"

    def mt_bench_answers(self, model_id: str) -> Path:
        """FastChat's layout: one JSON Lines file per model id."""
        return self.answers / "mt_bench" / f"{model_id}.jsonl"

    @property
    def answer_settings(self) -> Path:
        """How the answers were generated: chat template, sampling, models."""
        return self.answers / "settings.json"

    @property
    def wandb(self) -> Path:
        return self.root / self.WANDB

    @property
    def reference_data(self) -> Path:
        """The corpus retokenized for a reference model with another tokenizer."""
        return self.root / self.WORK / "reference_data"

    @property
    def prepare_work(self) -> Path:
        """Files `prepare` writes to read the corpus in chunks, and its unfinished outputs."""
        return self.root / self.WORK / "prepare"

    @property
    def logs(self) -> Path:
        return self.root / self.LOGS

    def history(self, mode: str, export_name: str) -> Path:
        return self.logs / f"{mode}-{export_name}-history.json"

    def starts(self, mode: str, export_name: str) -> Path:
        return self.logs / f"{mode}-{export_name}-starts.json"

    def tensorboard(self, mode: str, export_name: str) -> Path:
        return self.logs / "tensorboard" / f"{mode}-{export_name}"

    @property
    def mlruns(self) -> Path:
        return self.root / self.MLRUNS

    @property
    def ray_storage(self) -> Path:
        return self.root / self.RAY_STORAGE

    @property
    def tune(self) -> Path:
        return self.root / self.TUNE

    @property
    def trials(self) -> Path:
        return self.tune / "trials"

    def trial(self, trial_id: str) -> RunDir:
        """The run directory of one Tune trial (its inputs linked from this run)."""
        return RunDir(self.trials / trial_id)
