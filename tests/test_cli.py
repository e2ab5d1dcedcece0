"""The real `sftmix-ray` console script: help, validate-data, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env

BIN = Path(sys.executable).with_name("sftmix-ray")
COMMANDS = [
    "prepare",
    "reference",
    "score",
    "split",
    "train",
    "eval",
    "tune",
    "pipeline",
    "validate-data",
    "show-config",
]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed console script; never raises on a non-zero exit."""
    env = cli_env(DS_ACCELERATOR="cpu", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_every_subcommand_has_help(capsys):
    # In-process `main`, as the console script runs it (one interpreter start instead of ten);
    # `train --help` through the console script itself is test_cli_stdout.py's.
    from sftmix_ray.cli import main

    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0, command
        out = capsys.readouterr().out
        assert out.startswith("usage: sftmix-ray " + command), out[:200]
        if command not in ("validate-data", "show-config"):
            for flag in ("--config", "--set", "--output-dir"):
                assert flag in out, (command, flag)


def test_show_config_lists_every_key_with_value_default_and_meaning():
    from sftmix_ray.config import Config

    result = run_cli("show-config", "--set", "mixup.alpha=0.3", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["key"]: row for row in json.loads(result.stdout)}

    def keys(section: object, prefix: str) -> set[str]:  # nested sections by dotted keys
        found = set()
        for name in section.__dataclass_fields__:
            value = getattr(section, name)
            nested = hasattr(value, "__dataclass_fields__")
            found |= keys(value, f"{prefix}{name}.") if nested else {prefix + name}
        return found

    expected = set().union(
        *(keys(getattr(Config(), s), f"{s}.") for s in Config.__dataclass_fields__)
    )
    assert "train.lora.r" in expected and "train.lora" not in expected
    assert set(rows) == expected and all(row["meaning"] for row in rows.values())
    alpha = rows["mixup.alpha"]
    assert (alpha["value"], alpha["default"]) == (0.3, 0.5) and "Beta" in alpha["meaning"]
    assert rows["train.report_to"]["value"] == ["tensorboard"]
    text = run_cli("show-config", "--set", "mixup.alpha=0.3")
    assert text.returncode == 0 and "mixup.alpha = 0.3   (default 0.5)" in text.stdout
    bad = run_cli("show-config", "--set", "mixup.alhpa=1")
    assert bad.returncode == 1 and "did you mean 'mixup.alpha'" in bad.stderr


def _corpus(tmp_path: Path) -> Path:
    rows = [
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Add 1 and 2", "input": "", "output": "3"},
        {"instruction": "No answer", "output": ""},
        {"instruction": 5, "output": "x"},
        None,
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_validate_data_json_contract(tmp_path):
    result = run_cli("validate-data", "--data", str(_corpus(tmp_path)), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["total"], report["valid"], report["rejected"]) == (5, 2, 3)
    assert report["total"] == report["valid"] + report["rejected"]
    assert [r["index"] for r in report["rejections"]] == [2, 3, 4]
    assert all(isinstance(r["reason"], str) and r["reason"] for r in report["rejections"])


def test_validate_data_text_report(tmp_path):
    result = run_cli("validate-data", "--data", str(_corpus(tmp_path)), "--format", "alpaca")
    assert result.returncode == 0
    assert "2" in result.stdout and "rejected" in result.stdout.lower()


def test_validate_data_unparseable_file_exits_1_without_traceback(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": ')
    result = run_cli("validate-data", "--data", str(bad))
    assert result.returncode == 1
    assert "broken.json" in result.stderr and "line 1" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    missing = run_cli("validate-data", "--data", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and "nope.jsonl" in missing.stderr


def test_config_error_exits_1_naming_key(tmp_path):
    result = run_cli("prepare", "--set", "mixup.alpha=0", "--output-dir", str(tmp_path))
    assert result.returncode == 1
    assert "mixup.alpha" in result.stderr and "Traceback" not in result.stderr
    typo = run_cli("train", "--set", "train.max_stpes=3", "--output-dir", str(tmp_path))
    assert typo.returncode == 1 and "did you mean 'train.max_steps'" in typo.stderr


def test_debug_shows_traceback(tmp_path):
    result = run_cli("prepare", "--set", "split.ratio=2", "--debug", "--output-dir", str(tmp_path))
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_stage_needing_missing_inputs_fails_clearly(tmp_path):
    """A stage that started Ray and failed: empty stdout, stderr ending with the one line."""
    result = run_cli("train", "--output-dir", str(tmp_path / "empty"))
    assert result.returncode == 1
    assert result.stdout == ""
    last = result.stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("sftmix-ray train: error: ") and "run `sftmix-ray prepare` first" in last


HOLD = """
import sys, time
from pathlib import Path
from sftmix_ray.out_lock import output_lock
with output_lock(Path(sys.argv[1]), "sftmix-ray train"):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_run_on_one_output_dir_is_refused_naming_the_first(tmp_path):
    """Two drivers on one OUT (Ctrl+C on `ray job submit` leaves its job running, and the
    command is submitted again): the second exits 1 naming the first, before it touches
    anything (its `prepare` used to clear the first one's parts in `OUT/.data.tmp`). The lock
    goes with its process, SIGKILL included: the next run is not blocked by a stale file."""
    import signal
    import socket

    out = tmp_path / "out"
    (out / ".data.tmp").mkdir(parents=True)
    part = out / ".data.tmp" / "part-00000.parquet"
    part.write_bytes(b"the first run's part")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=cli_env()
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        second = run_cli("prepare", "--output-dir", str(out))
        assert second.returncode == 1 and second.stdout == ""
        last = second.stderr.rstrip("\n").rsplit("\n", 1)[-1]
        expected = (
            f"sftmix-ray prepare: error: {out}: in use by another sftmix-ray run "
            f"(`sftmix-ray train`, pid {holder.pid} on {socket.gethostname()}, since "
        )
        assert last.startswith(expected), last
        assert part.read_bytes() == b"the first run's part" and not (out / "data").exists()
        assert "Traceback" not in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    after = run_cli("split", "--output-dir", str(out))  # the stage's own error, not the lock's
    assert after.returncode == 1
    assert "in use by another" not in after.stderr and "sftmix-ray split: error: " in after.stderr
