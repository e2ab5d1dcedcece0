"""Saving an HF model (the exports of every run, the tiny preset) does not import DeepSpeed
unless the process already has it, and loads back to the same weights."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sftmix_ray.config import ModelConfig
from sftmix_ray.modeling import _deepspeed_probe_only_once_imported, load_tokenizer
from sftmix_ray.modeling import materialize_tiny, save_hf

out = Path(sys.argv[1])
cfg = ModelConfig(tiny_hidden_size=32, tiny_num_layers=1, tiny_vocab_size=300)
texts = [f"row {i}: the quick brown fox jumps over the lazy dog" for i in range(50)]
base = materialize_tiny(cfg, texts, out / "base")
after_tiny = "deepspeed" in sys.modules
model = AutoModelForCausalLM.from_pretrained(base)
with torch.no_grad():
    next(model.parameters()).add_(1.0)  # an export differs from the base
save_hf(model, load_tokenizer(str(base)), out / "export")
after_export = "deepspeed" in sys.modules
reloaded = AutoModelForCausalLM.from_pretrained(out / "export")
diff = max(
    (a - b).abs().max().item()
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values())
)

import deepspeed  # noqa: E402,F401  once imported, a DeepSpeedEngine is unwrapped as before
from accelerate.utils import other

with _deepspeed_probe_only_once_imported():
    inside = other.is_deepspeed_available()
restored = other.is_deepspeed_available.__name__
print(json.dumps({"after_tiny": after_tiny, "after_export": after_export, "diff": diff,
                  "inside": inside, "restored": restored}))
"""


def test_export_imports_no_deepspeed_and_reloads_the_same_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["after_tiny"] is False and result["after_export"] is False
    assert result["diff"] == 0.0
    assert result["inside"] is True and result["restored"] == "is_deepspeed_available"
