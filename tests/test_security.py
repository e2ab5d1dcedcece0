"""Secure defaults: no remote code, no pickle, safetensors only, secrets never written out,
the local dashboard on loopback. Static checks over the source plus the real save paths."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from sftmix_ray.config import redacted, save_config
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p for d in ("sftmix_ray", "tuning", "benchmarks") for p in (REPO / d).rglob("*.py")
)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def test_defaults_trust_no_remote_code_and_keep_the_dashboard_local():
    cfg = tiny_config()
    assert cfg.model.trust_remote_code is False
    assert cfg.ray.include_dashboard is False and cfg.ray.dashboard_host == "127.0.0.1"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_deserialization_or_remote_code(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not {"pickle", "dill", "marshal", "shelve"} & set(names), path
    for call, owner, name in _calls(tree):
        where = f"{path.relative_to(REPO)}:{call.lineno}"
        kwargs = {k.arg: k.value for k in call.keywords}
        if owner == "torch" and name == "load":
            flag = kwargs.get("weights_only")
            assert isinstance(flag, ast.Constant) and flag.value is True, where
        if owner == "yaml":
            assert name not in {"load", "unsafe_load", "full_load"}, f"{where}: yaml.{name}"
        bare = isinstance(call.func, ast.Name)
        assert not (bare and name in {"eval", "exec"}), f"{where}: {name}()"
        flag = kwargs.get("trust_remote_code")
        assert not (isinstance(flag, ast.Constant) and flag.value is True), where
        if name == "save_pretrained":
            flag = kwargs.get("safe_serialization")
            assert flag is None or (isinstance(flag, ast.Constant) and flag.value is True), where


def test_models_are_saved_as_safetensors_only(tmp_path):
    from sftmix_ray.modeling import load_model, materialize_tiny

    texts = [f"question {i} answer {i * 7}" for i in range(64)]
    target = materialize_tiny(tiny_config().model, texts, tmp_path / "m")
    names = {p.name for p in target.iterdir()}
    assert "model.safetensors" in names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))}
    assert load_model(str(target)).config.hidden_size == 64


def test_secrets_and_url_credentials_never_reach_saved_configs(tmp_path):
    cfg = tiny_config(
        "train.mlflow_tracking_uri=https://alice:s3cret-pass@mlflow.example.com",
        "train.storage_path=s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/runs",
    )
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "s3cret-pass" not in text and "wJalrXUtnFEMI" not in text and "alice" not in text
    saved = yaml.safe_load(text)
    assert saved["train"]["mlflow_tracking_uri"] == "https://***@mlflow.example.com"
    assert saved["train"]["storage_path"] == "s3://***@bucket/runs"
    assert redacted({"hf_token": "hf_abc", "n": {"password": "p", "k": 1}}) == {
        "hf_token": "***",
        "n": {"password": "***", "k": 1},
    }


def test_mlflow_params_are_redacted(tmp_path):
    from sftmix_ray.train.launch import mlflow_settings

    cfg = tiny_config("train.mlflow_tracking_uri=https://bob:hunter2@mlflow.example.com")
    settings = mlflow_settings(cfg, tmp_path, "key", "name")
    assert "hunter2" not in repr(settings["params"])
