"""The benchmark harness through its entry points: ratios judged, statistics exact, JSON whole.

Speed is never asserted here; memory is, because the dispatch-mode tracker counts tensor bytes
deterministically.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_run_py_losses_group_writes_judged_ratios(tmp_path):
    out = tmp_path / "run.json"
    only = "fused_ntp_peak_mem_over_naive,mixup_loss_peak_mem_over_fused_ntp"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--only", only, "--repeats", "1",
         "--json", str(out), "--check"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert set(result["ratios"]) == set(only.split(",")) and not result["errors"]
    assert result["passed"] is True and result["mode"] == "quick"
    assert result["machine"]["cpu_count"] >= 1 and len(result["machine"]["load_average_after"]) == 3
    fused = result["ratios"]["fused_ntp_peak_mem_over_naive"]
    # Chunks of 256 of 1024 positions: logits for a quarter of them live at once, plus fp32
    # gradients of the head; the naive loss holds all 1024 x 32000 logits and their gradient.
    assert 0.1 < fused["median"] <= 0.30 and fused["passes_bar"] is True
    assert fused["bar"] == "<= 0.3" and fused["runs"] == [round(fused["median"], 4)]
    peak = fused["details"]["peak_bytes"]
    assert peak["naive_ntp@32000"][0] >= 1024 * 32000 * 4  # at least the logits themselves
    mixup = result["ratios"]["mixup_loss_peak_mem_over_fused_ntp"]
    assert 0.9 < mixup["median"] <= 1.10
    assert f"{result['ratios']['fused_ntp_peak_mem_over_naive']['median']:.3f}" in done.stdout


def test_run_py_rejects_an_unknown_ratio(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--only", "speedup", "--json", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown ratio(s) speedup" in done.stderr and "sftmix_over_ntp_step_time" in done.stderr
    assert not (tmp_path / "x").exists()


def test_goal_judges_target_and_bar():
    from _common import Goal, stats

    goal = Goal(">=", 2.0, 1.5)
    assert goal.judge(1.7) == {
        "target": ">= 2.0", "bar": ">= 1.5", "meets_target": False, "passes_bar": True
    }  # fmt: skip
    assert goal.judge(1.49)["passes_bar"] is False and goal.judge(2.0)["meets_target"] is True
    assert stats([3.0, 1.0, 2.0, 10.0]) == {
        "median": 2.5, "min": 1.0, "max": 10.0, "runs": [3.0, 1.0, 2.0, 10.0]
    }  # fmt: skip


def test_step_time_model_has_llama3_8b_lm_head_share():
    from step_time import BODY, LLAMA3_8B, head_share, theoretical_ratio, vocab_for_share

    reference = head_share(LLAMA3_8B, 128256, 2048)
    assert 0.06 < reference < 0.08  # the LM head is about 7% of Llama-3-8B's forward FLOPs
    vocab = vocab_for_share(BODY, reference, 256)
    assert vocab % 64 == 0 and head_share(BODY, vocab, 256) == pytest.approx(reference, rel=0.01)
    # SFTMix adds half the head's cost: 1 + 0.5 * head / (body + head) in step FLOPs.
    assert 1.02 < theoretical_ratio(BODY, vocab, 256) < 1.06


def test_quality_study_paired_statistics_are_exact():
    pytest.importorskip("ray")
    from quality_study import paired, summarize

    # All three seeds improve: only the two all-same-sign flips reach |sum| = 6, so p = 2/8.
    better = paired([-1.0, -2.0, -3.0], lower_is_better=True)
    assert better["wins"] == 3 and better["sign_flip_p"] == pytest.approx(0.25)
    assert better["mean"] == pytest.approx(-2.0) and better["std"] == pytest.approx(1.0)
    assert better["t"] == pytest.approx(-2.0 / (1.0 / math.sqrt(3)))
    mixed = paired([0.5, -0.5, 0.1], lower_is_better=True)
    assert mixed["wins"] == 1 and mixed["sign_flip_p"] == pytest.approx(1.0)
    higher = paired([0.02, 0.01], lower_is_better=False)
    assert higher["wins"] == 2 and higher["sign_flip_p"] == pytest.approx(0.5)
    assert summarize([4.0]) == {"mean": 4.0, "std": 0.0, "values": [4.0]}
