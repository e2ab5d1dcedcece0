"""Pipeline bookkeeping: which stages a config change reruns, and --force validation.

The whole pipeline end to end (interrupted in each stage, resumed, finished by `ray job submit`,
rerun: skip, --force eval) is test_job_submit.py's.
"""

from __future__ import annotations

import pytest

from sftmix_ray.errors import ConfigError
from tests.conftest import tiny_config

RUN = ["eval.max_examples=8", "eval.max_new_tokens=4"]


def test_changed_config_reruns_from_the_first_affected_stage():
    from sftmix_ray.pipeline import stage_fingerprint

    a, b = tiny_config(*RUN), tiny_config(*RUN, "split.ratio=0.3")
    same = [
        s
        for s in ("prepare", "reference", "score")
        if stage_fingerprint(a, s) == stage_fingerprint(b, s)
    ]
    assert same == ["prepare", "reference", "score"]
    assert stage_fingerprint(a, "split") != stage_fingerprint(b, "split")
    assert stage_fingerprint(a, "eval") != stage_fingerprint(b, "eval")


def test_force_unknown_stage_is_a_clear_error(tmp_path):
    from sftmix_ray.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="--force 'trian' is not a stage"):
        run_pipeline(tiny_config(), tmp_path, force="trian")
