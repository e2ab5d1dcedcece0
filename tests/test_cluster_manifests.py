"""cluster/: KubeRay manifests, launcher config, runtime env and image stay valid and locked down.

Each file is checked by the tool that will consume it (the KubeRay CRD schemas, Ray's autoscaler
schema, Ray's runtime-env parser), without starting Ray or touching a cloud.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
PVC = CLUSTER / "kuberay" / "pvc.yaml"
SECRET_EXAMPLE = CLUSTER / "kuberay" / "secret.example.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
# The shared folder sits beside the checkout: repo at X/main, shared at X/shared.
VALIDATOR = Path(__file__).resolve().parents[2] / "shared" / "tools" / "validate_kuberay.py"

IMAGE = "ghcr.io/sftmix-ray/sftmix-ray:0.1.0"
SHARED_MOUNT = "/mnt/shared"
GPU = "nvidia.com/gpu"
# Hugging Face user access tokens look like hf_ followed by 30+ letters.
HF_TOKEN_LITERAL = re.compile(r"hf_[A-Za-z0-9]{30,}")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(manifest name, RayCluster spec) for the RayCluster and the RayJob's own cluster."""
    yield "raycluster", _load(RAYCLUSTER)["spec"]
    yield "rayjob", _load(RAYJOB)["spec"]["rayClusterSpec"]


def _ray_pods() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(manifest, role, pod spec) of every Ray head and worker pod."""
    for name, spec in _cluster_specs():
        yield name, "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield name, f"worker:{group['groupName']}", group["template"]["spec"]


def _all_pods() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every pod either manifest creates, the RayJob's submitter included."""
    yield from _ray_pods()
    yield "rayjob", "submitter", _load(RAYJOB)["spec"]["submitterPodTemplate"]["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


# --- (a) the operator's CRD schemas ------------------------------------------------------------


def _inject_unknown_field(raycluster: dict[str, Any]) -> dict[str, Any]:
    """A copy with a field KubeRay does not know, deep inside a worker container."""
    broken = copy.deepcopy(raycluster)
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpuCount"] = 8
    return broken


@pytest.fixture(scope="module")
def validator_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the validator on the manifests and on a broken copy, both at once."""
    if not VALIDATOR.exists():
        pytest.skip(f"{VALIDATOR} not found (the shared folder sits beside the checkout)")
    # One broken document is enough to show the check can fail, and keeps this test fast: the
    # validator parses the whole CRD (1-1.4 MB of YAML) once per document.
    broken = tmp_path_factory.mktemp("broken") / RAYCLUSTER.name
    broken.write_text(yaml.safe_dump(_inject_unknown_field(_load(RAYCLUSTER))))
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(VALIDATOR), *map(str, paths)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, paths in (("good", (RAYCLUSTER, RAYJOB)), ("broken", (broken,)))
    }
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        results[name] = (proc.returncode, out)
    return results


def test_kuberay_manifests_pass_the_crd_schemas(validator_runs: dict[str, Any]) -> None:
    rc, out = validator_runs["good"]
    assert rc == 0, out
    assert "2 KubeRay documents checked, 0 invalid" in out


def test_validator_rejects_an_unknown_field(validator_runs: dict[str, Any]) -> None:
    rc, out = validator_runs["broken"]
    assert rc == 1, out
    assert "1 KubeRay documents checked, 1 invalid" in out
    assert "'gpuCount' was unexpected" in out, out


# --- (b) security and topology invariants ------------------------------------------------------


def test_every_container_runs_unprivileged() -> None:
    seen = 0
    for manifest, role, pod in _all_pods():
        assert pod.get("automountServiceAccountToken") is False, (manifest, role)
        for container in _containers(pod):
            where = (manifest, role, container["name"])
            ctx = container.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True, where
            assert ctx.get("runAsUser", 1000) != 0, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), where
            assert not ctx.get("privileged", False), where
            assert container["image"] == IMAGE, where
            seen += 1
    assert seen == 5  # 2 x (head + GPU worker) + the RayJob submitter


def test_hf_token_comes_from_a_secret_never_a_literal() -> None:
    for manifest, role, pod in _ray_pods():
        for container in _containers(pod):
            env = {e["name"]: e for e in container.get("env", [])}
            token = env.get("HF_TOKEN")
            assert token is not None, (manifest, role)
            assert "value" not in token, (manifest, role)
            ref = token["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "sftmix-hf-token", "key": "HF_TOKEN"}, (manifest, role)
    secret = _load(SECRET_EXAMPLE)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "sftmix-hf-token"
    assert secret["stringData"]["HF_TOKEN"] == "REPLACE_WITH_YOUR_HF_TOKEN"
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file():
            assert not HF_TOKEN_LITERAL.search(path.read_text()), path
    assert "HF_TOKEN" not in (_load(RUNTIME_ENV).get("env_vars") or {})


def test_wandb_key_comes_from_an_optional_secret() -> None:
    """W&B's API key reaches every Ray pod from a Secret that may be absent (runs without
    W&B start as before), never as a literal, and never through the runtime env."""
    for manifest, role, pod in _ray_pods():
        for container in _containers(pod):
            key = {e["name"]: e for e in container.get("env", [])}.get("WANDB_API_KEY")
            assert key is not None and "value" not in key, (manifest, role)
            ref = key["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "sftmix-wandb", "key": "WANDB_API_KEY", "optional": True}
    secret = _load(CLUSTER / "kuberay" / "wandb-secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "sftmix-wandb"
    assert secret["stringData"] == {"WANDB_API_KEY": "REPLACE_WITH_YOUR_WANDB_API_KEY"}
    assert "WANDB_API_KEY" not in (_load(RUNTIME_ENV).get("env_vars") or {})


def test_head_has_no_gpu_and_workers_request_and_limit_them() -> None:
    for manifest, spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0", manifest
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", manifest
        for container in head["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert GPU not in resources.get(kind, {}), (manifest, container["name"])
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            where = (manifest, group["groupName"])
            resources = pod["containers"][0]["resources"]
            assert int(resources["requests"].get(GPU, 0)) >= 1, where
            assert resources["requests"][GPU] == resources["limits"].get(GPU), where
            assert resources["requests"]["memory"] == resources["limits"]["memory"], where
            assert any(t["key"] == GPU for t in pod["tolerations"]), where


def test_ray_pods_share_one_rwx_volume_and_a_memory_dev_shm() -> None:
    pvc = _load(PVC)
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for manifest, role, pod in _ray_pods():
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        shared = volumes[mounts[SHARED_MOUNT]]
        assert shared["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", (manifest, role)


def test_rayjob_cleans_up_and_writes_to_shared_storage() -> None:
    spec = _load(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    entrypoint = spec["entrypoint"].split()
    assert entrypoint[:2] == ["sftmix-ray", "pipeline"]
    assert entrypoint[entrypoint.index("--output-dir") + 1].startswith(SHARED_MOUNT + "/")
    storage = [a for a in entrypoint if a.startswith("train.storage_path=")]
    assert storage and storage[0].split("=", 1)[1].startswith(SHARED_MOUNT + "/")


def test_ray_version_matches_the_image() -> None:
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert pinned
    for manifest, spec in _cluster_specs():
        assert spec["rayVersion"] == pinned.group(1), manifest


def test_dockerfile_installs_the_tested_versions() -> None:
    """The image's Python is the suite's, and every pip install is held to constraints.txt,
    torch (PyPI's CUDA build of the pinned version) included; Ray agrees with the pin."""
    import sys

    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=python:(\d+\.\d+)-", text, re.MULTILINE)
    assert base and base.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.search(r"^COPY .*\bconstraints\.txt\b.* \./$", text, re.MULTILINE)
    installs = [line for line in text.splitlines() if re.search(r"\bpip install -", line)]
    assert len(installs) == 2 and all("-c constraints.txt" in line for line in installs)
    assert "torch==$(sed -n 's/^torch==//p' constraints.txt)" in text
    pins = dict(
        line.split("==", 1)
        for line in (CLUSTER.parent / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.MULTILINE)
    assert ray_version and pins["ray"] == ray_version.group(1)
    assert pins["torch"].split("+")[0] == pins["torch"], "the pin names no local (CPU) build"


def test_dockerfile_runs_as_uid_1000_without_secrets() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER 1000(:1000)?$", text, re.MULTILINE)
    assert re.search(r"^ENV DS_BUILD_OPS=0", text, re.MULTILINE)
    assert "--no-cache-dir" in text
    # The image has every optional feature (LoRA, QLoRA, W&B, MLflow, lm-eval, Optuna).
    import tomllib

    extras = re.search(r'"\.\[([\w,-]+)\]"', text)
    assert extras, "the image installs the project with its extras"
    pyproject = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())
    declared = pyproject["project"]["optional-dependencies"]
    assert set(extras.group(1).split(",")) == set(declared) - {"dev"}  # every extra
    assert re.search(r"apt-get install .*\bwget\b", text)  # KubeRay's default probes run it
    copied = re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE)
    assert not any(src.strip() in {".", "cluster", "./cluster"} for src in copied), copied
    assert not re.search(r"^(ENV|ARG)\s+\S*(TOKEN|SECRET|PASSWORD)", text, re.MULTILINE)


# --- (c) the runtime env, as `ray job submit` parses it ----------------------------------------


def test_runtime_env_is_accepted_by_ray() -> None:
    from ray._private.runtime_env.packaging import _get_excludes
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    # Exactly what `ray job submit --runtime-env FILE --working-dir .` builds, then validates.
    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=str(REPO))
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    parsed = RuntimeEnv(**env)
    assert parsed.working_dir() == str(REPO)
    assert "pip" not in env and "conda" not in env  # dependencies come from the image
    assert all(isinstance(v, str) for v in parsed.env_vars().values())

    excluded = _get_excludes(REPO, env["excludes"])
    secrets = ("cluster/kuberay/secret.yaml", "cluster/kuberay/my-hf-secret.yaml", "prod.env")
    for path in (".venv", ".git", "out", "sftmix_ray/__pycache__", ".env", *secrets):
        assert excluded(REPO / path), path
    for path in ("sftmix_ray", "configs/quickstart.yaml", "pyproject.toml"):
        assert not excluded(REPO / path), path

    with pytest.raises(TypeError):
        RuntimeEnv(**{**env, "env_vars": {"RAY_TRAIN_V2_ENABLED": 1}})


def test_rayjob_runtime_env_matches_the_submit_one() -> None:
    from ray.runtime_env import RuntimeEnv

    job_env = yaml.safe_load(_load(RAYJOB)["spec"]["runtimeEnvYAML"])
    # /app exists only in the image (its WORKDIR), so the path itself is checked by text.
    assert job_env.pop("working_dir") == "/app"
    assert re.search(r"^WORKDIR /app$", DOCKERFILE.read_text(), re.MULTILINE)
    RuntimeEnv(**job_env)
    assert job_env["env_vars"] == _load(RUNTIME_ENV)["env_vars"]


# --- (d) the cluster launcher config, as `ray up` checks it ------------------------------------


def test_launcher_config_passes_the_autoscaler_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(LAUNCHER)
    # `ray up` fills in the provider defaults, then validates (commands._bootstrap_config).
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)

    assert config["docker"]["image"] == IMAGE
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(n["resources"]["GPU"] >= 1 for n in workers)
    assert all(n["max_workers"] >= n.get("min_workers", 0) for n in workers)
    assert any(SHARED_MOUNT in cmd for cmd in config["initialization_commands"])
    # The nvidia runtime shows GPUs only to containers that ask (our base image does not set
    # NVIDIA_VISIBLE_DEVICES); secrets come from an env file on the host, never this file.
    assert "-e NVIDIA_VISIBLE_DEVICES=all" in config["docker"]["worker_run_options"]
    env_file = "--env-file /etc/sftmix/secrets.env"
    assert env_file in config["docker"]["run_options"]
    assert any("/etc/sftmix/secrets.env" in cmd for cmd in config["initialization_commands"])
    assert not HF_TOKEN_LITERAL.search(LAUNCHER.read_text())


def test_launcher_schema_rejects_an_unknown_field() -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(LAUNCHER)
    raw["available_node_types"]["gpu_worker"]["gpu_count"] = 4
    with pytest.raises(jsonschema.ValidationError, match="gpu_count"):
        validate_config(prepare_config(raw))


def test_gpu_processes_get_expandable_cuda_segments(monkeypatch) -> None:
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reaches every GPU process: the GPU
    worker pods, the job runtime env, and the Ray Train workers of a GPU run (a user's own
    value kept); CPU runs leave it alone."""
    from sftmix_ray.train.launch import _worker_env
    from tests.conftest import tiny_config

    setting = "expandable_segments:True"
    for manifest, spec in _cluster_specs():
        for group in spec["workerGroupSpecs"]:
            env = {
                e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]
            }
            assert env["PYTORCH_CUDA_ALLOC_CONF"] == setting, (manifest, group["groupName"])
    assert _load(RUNTIME_ENV)["env_vars"]["PYTORCH_CUDA_ALLOC_CONF"] == setting
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert _worker_env(tiny_config("train.use_gpu=true"))["PYTORCH_CUDA_ALLOC_CONF"] == setting
    assert "PYTORCH_CUDA_ALLOC_CONF" not in _worker_env(tiny_config())
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert _worker_env(tiny_config("train.use_gpu=true"))["PYTORCH_CUDA_ALLOC_CONF"] == (
        "max_split_size_mb:512"
    )


def test_gpu_workers_keep_the_token_cache_on_a_sized_volume() -> None:
    """The training workers' token cache ($SFTMIX_TOKEN_CACHE) is a disk emptyDir of the GPU
    worker pods, larger than the cache's default budget (train.token_cache_gb): the kubelet
    evicts a pod whose emptyDir outgrows its sizeLimit."""
    from sftmix_ray.config import TrainConfig

    gib = {"Gi": 1, "Ti": 1024}
    for manifest, spec in _cluster_specs():
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            volume = {v["name"]: v for v in pod["volumes"]}[mounts[env["SFTMIX_TOKEN_CACHE"]]]
            assert "medium" not in volume["emptyDir"], (manifest, "node disk, not memory")
            size = re.fullmatch(r"(\d+)(Gi|Ti)", volume["emptyDir"]["sizeLimit"])
            assert size, volume
            limit_gib = int(size.group(1)) * gib[size.group(2)]
            assert limit_gib > 1.2 * TrainConfig().token_cache_gb, manifest
