"""Search spaces for `sftmix-ray tune`: a small YAML format, validated against the Config.

A space file maps dotted config keys (the `--set` keys) to one domain each:

    mixup.alpha: {loguniform: [0.2, 1.0]}   # continuous, sampled on a log scale
    mixup.mu: {choice: [0.1, 0.2, 0.5]}     # categorical; the grid's axis under search=grid
    split.ratio: {grid: [0.3, 0.5, 0.7]}    # every value, whatever the search
    train.learning_rate: {uniform: [1e-4, 1e-3]}
    train.seed: {randint: [0, 100]}         # integers, upper bound excluded
    mixup.lambda_per: [pair, batch]         # a bare list is a choice
    train.warmup_ratio: 0.0                 # a bare value is fixed for every trial

Every key and every value a domain can take is checked with the Config's own validation before
any trial starts, so `split.ratio: {choice: [0, 0.5]}` fails at once, naming the key.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sftmix_ray.config import Config, config_from_dict, set_dotted
from sftmix_ray.errors import ConfigError

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
BUNDLED = ("default", "wide")  # tuning/<name>_space.yaml


@dataclass(frozen=True)
class Domain:
    """One swept config key: `kind` with its `values` (choice/grid) or `low`/`high` bounds."""

    key: str
    kind: str
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def discrete(self) -> bool:
        """Whether the domain lists its values (choice, grid, fixed)."""
        return self.kind in ("choice", "grid", "fixed")

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def probe_values(self) -> list[Any]:
        """Values that bound what the domain can produce (validated before any trial)."""
        if self.discrete:
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]

    def to_tune(self, search: str) -> Any:
        """The Ray Tune domain for `search` ("grid", "random" or "optuna")."""
        from ray import tune

        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "grid" or (self.kind == "choice" and search == "grid"):
            if search == "optuna":
                raise ConfigError(
                    f"search space key '{self.key}': grid values need tune.search=grid or "
                    "random (Optuna samples; write it as a choice)"
                )
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.randint(int(self.low), int(self.high))


def bundled_space_path(name: str) -> Path:
    """Path of a space file shipped in `tuning/` ("default" or "wide")."""
    return Path(__file__).resolve().parent / f"{name}_space.yaml"


def resolve_space_path(space: str | None) -> Path:
    """`tune.space` as a file: a path, or a bundled name; None means "default"."""
    if space is None or space in BUNDLED:
        path = bundled_space_path(space or "default")
    else:
        path = Path(space)
    if not path.is_file():
        hint = f" (or one of {', '.join(BUNDLED)})" if space not in BUNDLED else ""
        raise ConfigError(f"config key 'tune.space' = {space!r}: no such file {path}{hint}")
    return path


def _number(value: Any, key: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"search space key '{key}': {what} must be a number, got {value!r}")
    return float(value)


def parse_domain(key: str, spec: Any) -> Domain:
    """One entry of a space file as a Domain; errors name the key and what is wrong."""
    if isinstance(spec, list):
        spec = {"choice": spec}
    if not isinstance(spec, dict):
        return Domain(key, "fixed", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(
            f"search space key '{key}': expected one of {', '.join(KINDS)} "
            f"(e.g. {{choice: [0.1, 0.2]}}), got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search space key '{key}': {kind} takes a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return Domain(key, kind, tuple(args))
    if len(args) != 2:
        raise ConfigError(f"search space key '{key}': {kind} takes [low, high], got {args!r}")
    low, high = (_number(v, key, f"{kind} bound") for v in args)
    if not low < high:
        raise ConfigError(f"search space key '{key}': {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search space key '{key}': loguniform needs low > 0, got {args!r}")
    if kind == "randint" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"search space key '{key}': randint takes integer bounds, got {args!r}")
    return Domain(key, kind, low=low, high=high)


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """`base` (a Config as a dict) with `params` (dotted keys) applied, validated."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def _is_int_key(key: str) -> bool:
    """Whether the Config field at dotted `key` holds an integer (unknown keys: False)."""
    import dataclasses
    import typing

    node: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return False
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False
        node = hints[part]
    return node is int or int in typing.get_args(node)


def load_space(space: str | None, base: dict[str, Any]) -> list[Domain]:
    """Parse a space file and check every key and bound against the Config built on `base`."""
    path = resolve_space_path(space)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"search space {path} must map config keys to domains")
    domains = [parse_domain(str(key), spec) for key, spec in raw.items()]
    for domain in domains:
        if domain.key.startswith(("tune.", "ray.")):
            raise ConfigError(f"search space key '{domain.key}': the sweep's own settings")
        if domain.kind in ("uniform", "loguniform") and _is_int_key(domain.key):
            raise ConfigError(
                f"search space key '{domain.key}' takes integers: use randint or choice, "
                f"not {domain.kind}"
            )
        for value in domain.probe_values():
            try:
                apply_params(base, {domain.key: value})
            except ConfigError as exc:
                raise ConfigError(f"search space {path.name}: {exc}") from None
    return domains


def distinct_points(
    domains: list[Domain], num_samples: int, seed: int
) -> list[dict[str, Any]] | None:
    """For random search over a space whose every domain lists its values (choices, fixed
    values): `num_samples` different points, drawn with `seed`, or every point of the space
    when it has fewer. None when a domain is continuous or a grid (Tune draws those itself)."""
    import math
    import random

    if not domains or any(d.kind not in ("choice", "fixed") for d in domains):
        return None
    sizes = [len(d.values) for d in domains]
    total = math.prod(sizes)
    # Draw point numbers, not points: the product of many choices can be astronomically large.
    picked = random.Random(seed).sample(range(total), min(num_samples, total))
    points = []
    for number in picked:
        point = {}
        for domain, size in zip(reversed(domains), reversed(sizes)):  # mixed-radix digits
            number, digit = divmod(number, size)
            point[domain.key] = domain.values[digit]
        points.append({d.key: point[d.key] for d in domains})
    return points


def is_finite_number(value: Any) -> bool:
    """True for ints and finite floats (not bools): what can go on a numeric axis."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
