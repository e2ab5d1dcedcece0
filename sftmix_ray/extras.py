"""Optional dependencies: import one, or fail naming the feature and the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from sftmix_ray.errors import SftmixError

# module -> the extra of `pyproject.toml` that installs it
EXTRAS = {"peft": "lora", "bitsandbytes": "qlora", "wandb": "wandb", "lm_eval": "eval"}


def require(module: str, feature: str) -> ModuleType:
    """`import module`, or an error saying that `feature` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module)
        hint = f"pip install 'sftmix-ray[{extra}]'" if extra else f"pip install {module}"
        raise SftmixError(
            f"{feature} needs the Python package '{module}', which is not installed where this "
            f"runs ({exc}): {hint} (on a cluster: in the image, or the job's runtime_env)"
        ) from None
