"""OUT/report.md: the key numbers from summary.json, eval.json and the training logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftmix_ray.layout import RunDir
from sftmix_ray.report import write_report
from sftmix_ray.summary import update_stage

LOSS_PLOT = RunDir.LOSS_PLOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(out: Path, name: str, losses: list[float], evals: dict[int, float]) -> None:
    rows = []
    for step, loss in enumerate(losses, start=1):
        row = {"step": float(step), "loss": loss}
        if step in evals:
            row["eval_loss"] = evals[step]
        rows.append(row)
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / f"{name}-history.json").write_text(json.dumps({"history": rows}))


def test_report_quotes_the_run(tmp_path: Path):
    counts = {"input": 210, "rejected": 10, "written": 200, "truncated": 3, "tokens": 9000}
    update_stage(tmp_path, "prepare", status="completed", seconds=1.5, train=counts)
    update_stage(tmp_path, "score", status="completed", scored=200, tokens_per_s=1234.5)
    update_stage(
        tmp_path, "split", status="completed", ratio=0.5, confident=100, unconfident=100,
        mean_confidence_confident=0.61, mean_confidence_unconfident=0.22,
    )  # fmt: skip
    update_stage(tmp_path, "train", status="completed", steps=3, restarts=1, metrics={"loss": 2.5})
    update_stage(tmp_path, "eval", status="completed", seconds=2.0)  # sorts first in the JSON
    _history(tmp_path, "reference-model", [6.0, 5.5, 5.0], {})
    _history(tmp_path, "train-model", [5.0, 4.0, 3.0], {3: 3.2})
    (tmp_path / "eval.json").write_text(
        json.dumps({"sftmix": {"response_nll": 2.94, "perplexity": 18.9, "exact_match": 0.03}})
    )
    text = write_report(tmp_path).read_text()
    assert "- train: 210 rows read, 10 rejected, 200 written (3 truncated), 9000 tokens" in text
    assert "scored examples: 200 (1234 tokens/s)" in text
    assert "100 confident (mean confidence 0.61), 100 unconfident (mean 0.22)" in text
    assert "steps 3, restarts 1, final loss 2.5" in text
    assert "| sftmix | 2.94 | 18.9 | 0.03 |" in text
    assert f"![loss curves]({LOSS_PLOT})" in text and "(cartography.png)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    table = [line.split(" | ")[0].lstrip("| ") for line in rows]
    assert table[1:6] == ["prepare", "score", "split", "train", "eval"]  # pipeline order
    png = (tmp_path / LOSS_PLOT).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000


def test_report_of_a_partial_run_lists_only_what_ran(tmp_path: Path):
    update_stage(tmp_path, "prepare", status="failed", error="boom")
    text = write_report(tmp_path).read_text()
    assert "| prepare | failed |" in text
    assert "Held-out evaluation" not in text and not (tmp_path / LOSS_PLOT).exists()


def test_eval_without_a_held_out_split_skips_its_metrics_and_says_so(ray_local, tmp_path, capsys):
    """A corpus given without data.eval_path or data.eval_fraction has no OUT/heldout: `eval`
    (the pipeline's last stage) skips the held-out metrics with the reason, as peers skip
    evaluation without a validation set, instead of failing after training; an earlier run's
    eval.json is not left for the report to show."""
    from sftmix_ray.cli import main
    from sftmix_ray.config import ModelConfig
    from sftmix_ray.modeling import materialize_tiny
    from tests.conftest import TINY_OVERRIDES

    out = tmp_path / "out"
    run = RunDir(out)
    materialize_tiny(
        ModelConfig(tiny_hidden_size=64, tiny_num_layers=1), ["a b c"] * 5, run.model()
    )
    run.eval_file.write_text(json.dumps({"sftmix": {"response_nll": 9.0, "perplexity": 1.0}}))
    stale = {"models": {"sftmix": {"response_nll": 9.0}}, "lm_eval": {"t": 1}, "answers": {"a": 1}}
    update_stage(out, "eval", status="completed", **stale)  # an earlier run's results
    sets = [f"--set={o}" for o in TINY_OVERRIDES if not o.startswith("ray.")]
    assert main(["eval", "--output-dir", str(out), *sets]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "data.eval_fraction" in result["eval"]["heldout_skipped"]
    assert not run.eval_file.exists()
    recorded = json.loads(run.summary.read_text())["stages"]["eval"]
    assert recorded["models"] == {} and recorded["lm_eval"] is None and recorded["answers"] is None
    report = write_report(out).read_text()
    assert "## Held-out evaluation\n\nSkipped: no held-out split" in report
    assert "9.0" not in report


def test_eval_reads_the_exports_its_config_trains_not_what_out_holds(tmp_path):
    """OUT keeps an earlier config's exports: `model_ntp/` after `eval.compare_ntp` was
    turned off, a merged `model/` beside the adapter of a run that no longer merges. Eval
    evaluated and reported them as this run's; it now takes the exports the config trains,
    and says which one is missing."""
    from sftmix_ray.config import load_config
    from sftmix_ray.evaluation import trained_models
    from sftmix_ray.train.lora import ADAPTER_CONFIG

    run = RunDir(tmp_path / "out")
    for name in (RunDir.MODEL, RunDir.NTP_MODEL):
        run.model(name).mkdir(parents=True)
        (run.model(name) / "config.json").write_text("{}")
    run.adapter().mkdir(parents=True)
    (run.adapter() / ADAPTER_CONFIG).write_text("{}")

    def found(*sets: str) -> dict:
        return {
            k: (kind, p.name)
            for k, (kind, p) in trained_models(load_config(None, list(sets)), run).items()
        }

    assert found() == {"sftmix": ("model", "model")}  # model_ntp/ is an earlier config's
    assert found("eval.compare_ntp=true") == {
        "sftmix": ("model", "model"), "ntp": ("model", "model_ntp"),
    }  # fmt: skip
    assert found("eval.compare_ntp=true", "mixup.mu=0") == {"sftmix": ("model", "model")}
    assert found("train.lora.r=8") == {"sftmix": ("model", "model")}  # merged: the model
    lora = ["train.lora.r=8", "train.lora.merge=false", "eval.compare_ntp=true"]
    assert found(*lora) == {"sftmix": ("adapter", "adapter")}  # not the old merged model


@pytest.mark.slow
def test_eval_names_a_baseline_its_config_asks_for_that_is_missing(tmp_path, capsys):
    """Through the stage (it starts Ray): the NTP baseline `eval.compare_ntp` asks for is
    named when it is missing, not silently left out of the comparison."""
    from sftmix_ray.cli import main
    from sftmix_ray.train.lora import ADAPTER_CONFIG
    from tests.conftest import TINY_OVERRIDES

    run = RunDir(tmp_path / "out")
    run.adapter().mkdir(parents=True)
    (run.adapter() / ADAPTER_CONFIG).write_text("{}")
    lora = ["train.lora.r=8", "train.lora.merge=false", "eval.compare_ntp=true"]
    sets = [f"--set={o}" for o in [*TINY_OVERRIDES, *lora] if not o.startswith("ray.")]
    assert main(["eval", "--output-dir", str(run.root), *sets]) == 1
    last = capsys.readouterr().err.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.endswith(
        f"eval.compare_ntp is set but the NTP baseline ({run.adapter(RunDir.NTP_MODEL)}) does "
        "not exist; run `sftmix-ray train` again"
    ), last


def test_json_outputs_are_strict_and_the_report_reads_their_nulls(tmp_path: Path):
    """Non-finite values (a skipped step's loss and norm, no rows to match) are written as
    null, never Python's `NaN` literal, and the report shows them as nan."""
    import math

    from sftmix_ray.io_utils import atomic_write_json, strict_json

    def strict(path: Path) -> dict:
        def refuse(constant: str) -> None:
            raise AssertionError(f"{path.name}: {constant} is not JSON")

        return json.loads(path.read_text(), parse_constant=refuse)

    nan, inf = float("nan"), float("inf")
    # The CLI's stdout results go through the same function as the files.
    assert strict_json({"train": {"metrics": {"loss": nan, "n": [inf, 1.5]}}}) == (
        '{"train": {"metrics": {"loss": null, "n": [null, 1.5]}}}'
    )
    rows = [{"step": 1.0, "loss": 3.0}, {"step": 2.0, "loss": nan, "grad_norm": -inf}]
    rows.append({"step": 3.0, "loss": 2.5, "pair": (1.0, nan)})
    (tmp_path / "logs").mkdir()
    atomic_write_json(tmp_path / "logs" / "train-model-history.json", {"history": rows})
    history = strict(tmp_path / "logs" / "train-model-history.json")["history"]
    assert history[1] == {"step": 2.0, "loss": None, "grad_norm": None}
    assert history[2]["pair"] == [1.0, None] and math.isnan(rows[1]["loss"])  # input untouched
    update_stage(tmp_path, "train", status="completed", steps=3, metrics={"loss": nan})
    assert strict(tmp_path / "summary.json")["stages"]["train"]["metrics"] == {"loss": None}
    atomic_write_json(
        tmp_path / "eval.json",
        {"sftmix": {"response_nll": 2.0, "perplexity": 7.39, "exact_match": nan}},
    )
    report = write_report(tmp_path).read_text()
    assert "final loss nan" in report and "| sftmix | 2 | 7.39 | nan |" in report
    assert (tmp_path / LOSS_PLOT).read_bytes().startswith(PNG_MAGIC)
