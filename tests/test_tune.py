"""`sftmix-ray tune` on a real local Ray cluster: Tuner -> trial driver -> TorchTrainer (Train V2).

One tiny prepared and scored OUT is built once; each sweep trains in a copy.
Trials are 2 optimizer steps of the tiny model, evaluated on the held-out set at every step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from sftmix_ray.config import load_config
from sftmix_ray.errors import ConfigError, SftmixError
from sftmix_ray.split import confident_count
from sftmix_ray.summary import read_summary
from tests.conftest import TINY_OVERRIDES, cli_env, result_json, sftmix_command, tiny_config
from tuning.results import best_row
from tuning.space import load_space, parse_domain
from tuning.sweep import (
    _check_same_sweep,
    _scheduler,
    _search_alg,
    expected_trials,
    run_tune,
    sweep_identity,
)
from tuning.trial import ATTEMPTS_FILE

# Two optimizer steps, a held-out eval after each (so Tune sees intermediate results).
SWEEP = ["train.max_steps=2", "train.eval_steps=1", "score.num_actors=1"]
DEFAULT_SPACE = yaml.safe_load(
    (Path(__file__).parents[1] / "tuning" / "default_space.yaml").read_text()
)
SWEPT = list(DEFAULT_SPACE)  # mixup.alpha, mixup.mu, split.ratio
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRIALS = 2  # run side by side (tune.max_concurrent_trials=2)


def _copy_base(base: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("data", "heldout", "base_model", "scores"):
        shutil.copytree(base / name, target / name)
    return target


def _cli(*args: str, last: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`sftmix-ray ARGS` with the tiny sweep's overrides, then `last`'s (which win)."""
    sets = [f"--set={item}" for item in [*TINY_OVERRIDES, *SWEEP, *last]]
    return subprocess.run(
        [*sftmix_command(), *args, *sets],
        capture_output=True, text=True, timeout=600, env=cli_env(),
    )  # fmt: skip


def _history(trial_dir: Path) -> list[dict]:
    return json.loads((trial_dir / "logs" / "train-model-history.json").read_text())["history"]


def _attempts(trial_dir: Path) -> list[float]:
    path = trial_dir / ATTEMPTS_FILE
    return [a["started"] for a in json.loads(path.read_text())] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# A 2-trial Optuna sweep through the CLI (continuous alpha and mu, the default space's split
# ratios), then training with its best config

# The default space's keys; alpha and mu drawn from ranges, so Optuna's two points differ.
SPACE = {
    "mixup.alpha": {"loguniform": [0.2, 1.0]},
    "mixup.mu": {"uniform": [0.05, 0.5]},
    "split.ratio": DEFAULT_SPACE["split.ratio"],
}


@pytest.fixture(scope="module")
def cli_sweep(scored_base: Path, ray_local, tmp_path_factory) -> tuple[Path, dict, float]:
    pytest.importorskip("optuna")
    out = _copy_base(scored_base, tmp_path_factory.mktemp("tune_cli"))
    space = tmp_path_factory.mktemp("tune_cli_space") / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    address = ray_local.get_runtime_context().gcs_address
    start = time.time()
    proc = _cli(
        "tune", "--output-dir", str(out), "--address", address, "--set", f"tune.space={space}",
        "--set", "tune.search=optuna", "--set", "tune.seed=7",
        "--set", f"tune.num_samples={TRIALS}", "--set", "tune.max_concurrent_trials=2",
        # By epochs: 0.1 of an epoch is 2 steps at the base ratio 0.5 (100 pairs / 4 per
        # step = 25 per epoch), 3 at 0.3 or 0.7 (140 rows on the larger side).
        last=("train.max_steps=0", "train.num_train_epochs=0.1"),
    )  # fmt: skip
    # stdout is the summary alone: Tune's progress report went to stderr.
    summary = result_json(proc)
    return out, summary["tune"], time.time() - start


@pytest.mark.slow
def test_sweep_writes_table_best_config_and_plot(cli_sweep):
    out, result, _ = cli_sweep
    table = pd.read_csv(out / "tune" / "results.csv")
    parquet = pd.read_parquet(out / "tune" / "results.parquet")
    assert list(parquet.columns) == list(table.columns)
    assert parquet["trial_id"].tolist() == table["trial_id"].tolist()
    assert len(table) == TRIALS and table["trial_id"].is_unique
    assert set(table["status"]) == {"TERMINATED"} and table["completed_training"].all()
    assert {*SWEPT, "eval_loss", "status", "error", "attempts"} <= set(table.columns)
    assert list(SPACE) == SWEPT
    assert (
        table["mixup.alpha"].between(0.2, 1.0).all() and table["mixup.mu"].between(0.05, 0.5).all()
    )
    assert set(table["split.ratio"]) <= set(SPACE["split.ratio"]["choice"])
    assert table["mixup.alpha"].nunique() == TRIALS, "Optuna proposed different points"
    # Every trial trained the base ratio's 2 steps, whatever its own ratio (this seed draws
    # 0.7 twice: 3 steps per 0.1 epoch), so the trials compare ratios, not budgets.
    assert result["train_max_steps_pinned"] == 2 and (table["split.ratio"] != 0.5).any()
    assert (table["step"] == 2).all() and (table["reports"] == 2).all()  # eval at steps 1 and 2
    n = pq.read_table(out / "data", columns=["example_id"]).num_rows
    for _, row in table.iterrows():
        trial = Path(row["trial_dir"])
        assert trial.parent == out / "tune" / "trials"
        # What Tune recorded is the trial's own held-out loss after its last step, trained
        # with the parameters Optuna proposed.
        assert row["eval_loss"] == pytest.approx(_history(trial)[-1]["eval_loss"], rel=1e-6)
        saved = yaml.safe_load((trial / "config.yaml").read_text())
        assert saved["mixup"]["alpha"] == pytest.approx(row["mixup.alpha"], rel=1e-9)
        assert saved["mixup"]["mu"] == pytest.approx(row["mixup.mu"], rel=1e-9)
        # Its own split, recomputed from OUT/scores with its ratio; its own model and storage.
        confident = pq.read_table(trial / "split" / "confident.parquet").num_rows
        assert confident == confident_count(n, row["split.ratio"])
        assert (trial / "model" / "config.json").exists() and (trial / "ray_storage").is_dir()
    assert len({Path(d).resolve() for d in table["trial_dir"]}) == TRIALS
    assert not (out / "split").exists()  # the sweep never touched OUT's own split
    # Finished trials keep their exports, not their resume checkpoints (one save each, at the
    # end): nothing resumes a finished trial.
    assert result["resume_checkpoints_removed"] == TRIALS
    assert not list((out / "tune" / "trials").glob("*/ray_storage/*"))

    best = table.loc[table["eval_loss"].idxmin()]
    assert result["best"]["trial_id"] == best["trial_id"]
    cfg = load_config(out / "tune" / "best_config.yaml")
    chosen = (cfg.mixup.alpha, cfg.mixup.mu, cfg.split.ratio)
    assert chosen == pytest.approx(tuple(best[k] for k in SWEPT), rel=1e-12)
    assert cfg.train.max_steps == 2 and cfg.model.tiny_hidden_size == 64  # the full config
    png = (out / "tune" / "metric_vs_params.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    stage = read_summary(out)["stages"]["tune"]
    assert stage["status"] == "completed" and stage["terminated"] == TRIALS


@pytest.mark.slow
def test_best_config_trains_and_reproduces_the_best_trial(cli_sweep):
    from sftmix_ray.pipeline import run_stage

    out, result, _ = cli_sweep
    cfg = load_config(out / "tune" / "best_config.yaml")  # what `--config` does
    # A split made for another ratio is refused before any worker starts...
    run_stage("split", load_config(out / "tune" / "best_config.yaml", ["split.ratio=0.123"]), out)
    with pytest.raises(SftmixError, match=r"made with split.ratio=0.123 but this config has"):
        run_stage("train", cfg, out)
    # ...and the swept ratio's split (what result["next"] says to run) trains.
    run_stage("split", cfg, out)
    assert result["next"].startswith("sftmix-ray split --config")
    trained = run_stage("train", cfg, out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["mixup"] == cfg.to_dict()["mixup"] and saved["split"] == cfg.to_dict()["split"]
    assert (out / "model" / "config.json").exists() and trained["steps"] == 2
    # Same config, data, split and seed as the best trial: the same held-out loss.
    best_loss = result["best"]["eval_loss"]
    assert trained["metrics"]["eval_loss"] == pytest.approx(best_loss, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Spaces and settings that cannot work fail before any trial starts (no Ray needed)


def test_bundled_spaces_load_and_validate():
    base = tiny_config().to_dict()
    default = load_space(None, base)
    assert [d.key for d in default] == SWEPT and all(d.kind == "choice" for d in default)
    wide = {d.key: d for d in load_space("wide", base)}
    assert wide["mixup.alpha"].kind == "loguniform" and wide["split.ratio"].kind == "uniform"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("split.ratio: {choice: [0.0, 0.5]}", "split.ratio"),
        ("mixup.alfa: {choice: [0.5]}", "did you mean 'mixup.alpha'"),
        ("mixup.alpha: {loguniform: [0, 1]}", "low > 0"),
        ("mixup.mu: {uniform: [0.5, 0.1]}", "low < high"),
        ("mixup.mu: {normal: [0, 1]}", "expected one of choice"),
        ("mixup.lambda_per: [pair, token]", "mixup.lambda_per"),
        ("tune.num_samples: [1, 2]", "the sweep's own settings"),
        ("train.seed: {uniform: [0, 10]}", "takes integers: use randint"),
    ],
)
def test_bad_spaces_fail_naming_the_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_space(str(path), tiny_config().to_dict())


def test_grid_and_optuna_domains():
    domain = parse_domain("mixup.mu", {"choice": [0.1, 0.2]})
    assert domain.to_tune("grid") == {"grid_search": [0.1, 0.2]}
    assert domain.to_tune("random").categories == [0.1, 0.2]
    with pytest.raises(ConfigError, match="Optuna"):
        parse_domain("mixup.mu", {"grid": [0.1]}).to_tune("optuna")


def test_optuna_without_the_package_is_a_clear_error():
    pytest.importorskip("ray.tune.search.optuna")
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'sftmix-ray\[optuna\]'"):
            _search_alg(tiny_config("tune.search=optuna"), None)
    else:
        assert _search_alg(tiny_config("tune.search=optuna"), None) is not None


def test_missing_inputs_and_a_different_sweep_are_refused(tmp_path):
    with pytest.raises(SftmixError, match="run `sftmix-ray prepare` first"):
        run_tune(tiny_config(), tmp_path)
    cfg = tiny_config()
    domains = load_space(None, cfg.to_dict())
    (tmp_path / "sweep.json").write_text(json.dumps({"identity": sweep_identity(cfg, domains)}))
    _check_same_sweep(tmp_path, sweep_identity(cfg, domains))  # same sweep: resumable
    other = tiny_config("mixup.lambda_per=batch", "tune.num_samples=5")
    with pytest.raises(ConfigError, match="config_sha, num_samples"):
        _check_same_sweep(tmp_path, sweep_identity(other, load_space(None, other.to_dict())))


def test_best_row_ignores_unfinished_and_nan_trials():
    rows = [
        {"trial_id": "a", "status": "TERMINATED", "eval_loss": 2.0},
        {"trial_id": "b", "status": "ERROR", "eval_loss": 1.0},
        {"trial_id": "c", "status": "TERMINATED", "eval_loss": float("nan")},
        {"trial_id": "d", "status": "TERMINATED", "eval_loss": 1.5},
        {"trial_id": "e", "status": "PENDING", "eval_loss": None},
        # Stopped by ASHA at an early rung (TERMINATED too): no model, metric not comparable.
        {"trial_id": "f", "status": "TERMINATED", "eval_loss": 0.5, "completed_training": False},
    ]
    assert best_row(rows, "eval_loss", "min")["trial_id"] == "d"
    assert best_row(rows, "eval_loss", "max")["trial_id"] == "a"
    assert best_row(rows[1:2], "eval_loss", "min") is None
    assert np.isnan(rows[2]["eval_loss"])


def test_random_search_over_choices_draws_different_points():
    from tuning.space import distinct_points

    domains = load_space(None, tiny_config().to_dict())  # 3 x 3 x 3 choices
    points = distinct_points(domains, 20, seed=0)
    assert len(points) == 20 and len({tuple(sorted(p.items())) for p in points}) == 20
    assert points == distinct_points(domains, 20, seed=0)  # seeded: a rerun draws the same
    assert points != distinct_points(domains, 20, seed=1)
    assert len(distinct_points(domains, 100, seed=0)) == 27  # never more than the space holds
    continuous = [parse_domain("mixup.alpha", {"uniform": [0.1, 1.0]}), *domains[1:]]
    assert distinct_points(continuous, 3, seed=0) is None  # Tune samples continuous spaces
    # 12 keys of 10 choices: 1e12 points, drawn without listing them.
    huge = [parse_domain(f"train.seed_{i}", {"choice": list(range(10))}) for i in range(12)]
    drawn = distinct_points(huge, 5, seed=0)
    assert len({tuple(p.values()) for p in drawn}) == 5 and all(len(p) == 12 for p in drawn)


def test_asha_counts_optimizer_steps_and_grid_counts_trials(tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    asha = _scheduler(
        tiny_config("tune.scheduler=asha", "train.eval_steps=5", "train.max_steps=50"),
        tmp_path / "asha_state.json",
    )
    assert isinstance(asha, ASHAScheduler)
    # Rungs at grace_period * reduction_factor**k optimizer steps, below max_t.
    assert (asha._time_attr, asha._max_t) == ("step", 50)
    assert sorted(m for m, _ in asha._brackets[0]._rungs) == [5, 20]
    cfg = tiny_config("tune.search=grid", "tune.num_samples=2")
    assert expected_trials(cfg, load_space(None, cfg.to_dict())) == 2 * 27
    cfg = tiny_config("tune.search=random", "tune.num_samples=4")
    assert expected_trials(cfg, load_space(None, cfg.to_dict())) == 4
    # The default space is all choices: random search draws different points, all 27 at most.
    cfg = tiny_config("tune.search=random", "tune.num_samples=40")
    assert expected_trials(cfg, load_space(None, cfg.to_dict())) == 27


def test_cli_reports_a_bad_space_without_a_traceback(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("split.ratio: {grid: [0.5, 1.5]}\n")
    proc = _cli("tune", "--output-dir", str(tmp_path), "--set", f"tune.space={space}")
    assert proc.returncode == 1
    assert "split.ratio" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_recomputes_a_split_made_for_another_config(tmp_path):
    """A sweep reuses OUT/split only if its recorded fingerprint is this config's: a split made
    with another confidence measure (or corpus, or reference run) was reused when only the
    ratio was compared, and every trial trained on it."""
    from sftmix_ray.layout import RunDir
    from sftmix_ray.pipeline import completion_record
    from sftmix_ray.summary import update_stage
    from tuning.sweep import _split_is_current

    cfg = tiny_config()
    RunDir(tmp_path).split_dir.mkdir(parents=True)
    for stage in ("prepare", "reference", "score", "split"):
        update_stage(tmp_path, stage, status="completed", **completion_record(cfg, stage))
    assert _split_is_current(tmp_path, cfg)
    assert not _split_is_current(tmp_path, tiny_config("score.confidence=mean_inverse_perplexity"))
    assert not _split_is_current(tmp_path, tiny_config("split.ratio=0.3"))
    assert not _split_is_current(tmp_path, tiny_config("data.max_length=64"))
    assert _split_is_current(tmp_path, tiny_config("mixup.alpha=0.9"))  # trains only
    # Scores being redone (a score stage cut short) leave no split to reuse.
    update_stage(tmp_path, "score", status="interrupted")
    assert not _split_is_current(tmp_path, cfg)
