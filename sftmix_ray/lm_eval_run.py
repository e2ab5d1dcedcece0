"""lm-eval-harness tasks on a model already loaded for evaluation (merged LoRA included)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftmix_ray.extras import require

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _working_dir(path: str | None) -> Iterator[None]:
    """Run inside `path`, so that relative `dataset_path` / `data_files` in task YAMLs resolve
    against the task directory (the eval task's process does nothing else meanwhile)."""
    if path is None:
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_lm_eval(model: Any, tokenizer: Any, eval_cfg: dict[str, Any], seed: int) -> dict:
    """`{task: {metric: value}}` of `eval.lm_eval_tasks` (lm-eval's `metric,filter` names)."""
    require("lm_eval", "eval.lm_eval_tasks")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include = eval_cfg["lm_eval_include_path"]
    include = str(Path(include).resolve()) if include else None
    manager = TaskManager(include_path=include) if include else TaskManager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=eval_cfg["lm_eval_batch_size"])
    with _working_dir(include):
        out = simple_evaluate(
            model=lm,
            tasks=list(eval_cfg["lm_eval_tasks"]),
            num_fewshot=eval_cfg["lm_eval_num_fewshot"],
            limit=eval_cfg["lm_eval_limit"],
            apply_chat_template=eval_cfg["lm_eval_chat_template"],
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            verbosity="WARNING",
        )
    if out is None:  # lm-eval returns None on ranks other than its rank 0
        raise RuntimeError("lm-eval returned no results")
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
    return results
