"""stdout of the real console script is the result and nothing else, whatever Ray prints.

Every Python process of these runs prints from a thread and at exit (`cli_env` in conftest),
and Ray's log deduplication is on (its default), so Ray forwards the workers' lines to the
driver, folds the repeats and prints its deduplication notice while shutting down. `prepare`
(with Ray Data's progress bars on) and `eval` join the session's cluster below; the other
subcommands are checked the same way where they run (`score`, `split`: test_scoring.py;
`reference`: test_cross_tokenizer.py; `tune`: test_tune.py; `pipeline`: test_job_submit.py).
`train` starts its own local cluster in test_train.py (checkpoints in S3), so there the whole
shutdown happens in the CLI process itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES, cli_env, result_json, sftmix_command


def _run(*args: str) -> subprocess.CompletedProcess:
    sets = [f"--set={item}" for item in TINY_OVERRIDES]
    env = cli_env(RAY_DEDUP_LOGS="1", RAY_DATA_DISABLE_PROGRESS_BARS="0")
    return subprocess.run(
        [*sftmix_command(), *args, *sets], capture_output=True, text=True, timeout=300, env=env
    )


def test_prepare_joined_to_a_cluster_prints_only_json(ray_local, tmp_path: Path):
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    prepare = _run("prepare", "--output-dir", str(out), "--address", address)
    result = result_json(prepare)["prepare"]["train"]
    assert result["written"] == 200 and result["rejected"] == 0
    # The noise happened (workers' lines reached the driver), and all of it went to stderr.
    assert "noisy-process" in prepare.stderr
    assert "noisy-process" not in prepare.stdout


@pytest.mark.slow
def test_eval_joined_to_a_cluster_prints_only_json(prepared_out: Path, ray_local, tmp_path: Path):
    out = tmp_path / "out"
    for name in ("data", "heldout", "base_model"):
        shutil.copytree(prepared_out / name, out / name)
    shutil.copytree(out / "base_model", out / "model")
    address = ray_local.get_runtime_context().gcs_address
    evaluation = _run(
        "eval", "--output-dir", str(out), "--address", address, "--set=eval.max_examples=4"
    )
    models = result_json(evaluation)["eval"]["models"]
    assert models["sftmix"]["response_tokens"] > 0
    assert "noisy-process" in evaluation.stderr  # the driver's own threads printed
    assert json.loads((out / "eval.json").read_text())["sftmix"]["response_tokens"] > 0


def test_validate_data_json_is_the_only_stdout(tmp_path: Path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{oops\n")
    proc = subprocess.run(
        [*sftmix_command(), "validate-data", "--data", str(corpus), "--json"],
        capture_output=True, text=True, timeout=60, env=cli_env(),
    )  # fmt: skip
    # A JSONL line that does not parse makes the file unreadable: exit 1, nothing on stdout.
    assert proc.returncode == 1 and proc.stdout == ""
    last = proc.stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("sftmix-ray validate-data: error: ") and "c.jsonl" in last
    corpus.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    ok = subprocess.run(
        [*sftmix_command(), "validate-data", "--data", str(corpus), "--json"],
        capture_output=True, text=True, timeout=60, env=cli_env(),
    )  # fmt: skip
    report = result_json(ok)
    assert report["total"] == report["valid"] == 1 and report["rejected"] == 0


def test_console_script_points_stdout_away_before_anything_heavy():
    # Everything the console script imports before `main` runs with the real stdout. Once,
    # importing `sftmix_ray.cli` loaded torch (1.8 s; 3-4 s on a slow host), and a worker's or
    # library's print in that time reached stdout ahead of the JSON. The parser (`--help`)
    # needs no torch either: `sftmix-ray --help` took 2.7 s.
    probe = (
        "import sys; heavy = set(sys.argv[1:]); import sftmix_ray.cli as cli; "
        "print(sorted(heavy & set(sys.modules))); cli.build_parser(); "
        "print(sorted(heavy & set(sys.modules)))"
    )
    heavy = ["torch", "ray", "transformers", "deepspeed", "pyarrow", "numpy", "yaml"]
    proc = subprocess.run(
        [sys.executable, "-c", probe, *heavy], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "['yaml']"]  # the parser: the stages' configs


def test_help_and_usage_errors_through_the_console_script():
    # `--help` is the result (stdout, exit 0); a usage error's line ends stderr (exit 2), with
    # nothing after it although the process has an at-exit hook that prints (cli_env).
    proc = subprocess.run(
        [*sftmix_command(), "train", "--help"],
        capture_output=True, text=True, timeout=60, env=cli_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: sftmix-ray train ") and proc.stdout.endswith("\n")
    assert "--output-dir" in proc.stdout and "noisy-process" not in proc.stdout
    usage = subprocess.run(
        [*sftmix_command(), "train", "--no-such-flag"],
        capture_output=True, text=True, timeout=60, env=cli_env(),
    )  # fmt: skip
    assert usage.returncode == 2 and usage.stdout == ""
    assert usage.stderr.rstrip("\n").endswith("unrecognized arguments: --no-such-flag")
