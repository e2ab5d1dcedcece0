"""Scoring model-side: a checkpoint's mean response NLL per row, and the work items that
spread the `score` stage over an actor pool (`sftmix_ray.scoring` runs the stage).

`Scorer` sorts rows by length into token-budget micro-batches and computes target-only NLL in
chunks (never a `[B, L, V]` log-softmax); `ScoreItems` is its Ray Data form, which reads its
rows from OUT and swaps weights when the checkpoint changes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftmix_ray.losses import IGNORE_INDEX, NTPLoss, response_token_nll


def token_budget_batches(
    lengths: np.ndarray, batch_tokens: int, overhead_tokens: int | None = None
) -> list[np.ndarray]:
    """Row indices of micro-batches of length-sorted rows, each at most `batch_tokens` padded.

    Of all such splits (a row longer than the budget goes alone) this takes the one with the
    fewest padded tokens plus `overhead_tokens` (default: budget / 8) per micro-batch, the
    fixed cost of a forward: rows of different lengths share a micro-batch only when their
    padding costs less than another forward would.
    """
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = np.asarray(lengths, dtype=np.int64)[order]
    overhead = batch_tokens // 8 if overhead_tokens is None else overhead_tokens
    cost, start = np.zeros(len(order) + 1), np.zeros(len(order) + 1, dtype=np.int64)
    for end in range(1, len(order) + 1):  # rows [i, end) padded to the longest, row end - 1
        longest = int(sorted_lengths[end - 1])
        first = np.arange(max(0, end - max(1, batch_tokens // longest)), end)
        total = cost[first] + (end - first) * longest + overhead
        best = int(np.argmin(total))
        cost[end], start[end] = total[best], first[best]
    batches, end = [], len(order)
    while end > 0:
        batches.append(order[start[end] : end])
        end = int(start[end])
    return batches[::-1]


def rows_per_batch(n_rows: int, num_actors: int) -> int:
    """Rows per scorer call: about 4 per actor to keep the pool busy, 32 to 1024 to sort well."""
    return int(min(1024, max(32, math.ceil(n_rows / (4 * num_actors)))))


def scorer_precision(on_gpu: bool, bf16_on_gpu: bool) -> str:
    """The dtype name scorers compute in: bf16 only on a GPU and only when asked (a CPU's bf16
    matmuls are slow and less exact); fp32 otherwise."""
    return "bfloat16" if on_gpu and bf16_on_gpu else "float32"


class Scorer:
    """Mean response NLL of each row of a token table under one checkpoint (`load` swaps it)."""

    def __init__(
        self,
        model_path: str,
        *,
        batch_tokens: int,
        chunk_size: int = 0,
        chunk_mb: float = 128.0,
        num_threads: int = 0,
        trust_remote_code: bool = False,
        attn_implementation: str | None = "sdpa",
        bf16_on_gpu: bool = False,
    ) -> None:
        import ray
        import torch

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, scorer_precision(self.device.type == "cuda", bf16_on_gpu))
        self.trust_remote_code, self.attn_implementation = trust_remote_code, attn_implementation
        self.batch_tokens = batch_tokens
        self.loss = NTPLoss(chunk_size, chunk_mb)  # its chunking: fixed, or by bytes
        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id()
        self.name = in_actor or "local"  # counts the actors that did the work
        self.model_path = ""
        self.load(model_path)

    def load(self, model_path: str) -> None:
        """Score with `model_path`'s weights from now on (the previous model freed first)."""
        import gc

        import torch

        from sftmix_ray.modeling import load_model
        from sftmix_ray.train.forward import CausalLMWithLoss

        if model_path == self.model_path:
            return
        self.__dict__.pop("decoder", None)  # free the previous weights before loading the next
        self.__dict__.pop("head", None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        # Straight onto the device (`device_map`), not through host memory first: the actors
        # of a node load at once, and again at every checkpoint (8 x 16 GB of host memory at
        # 8B in bf16, 8 x 28 GB at 14B, beside the object store).
        model = load_model(
            model_path, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation, device_map=self.device,
        )  # fmt: skip
        # The training wrapper knows each model's decoder body and logit scaling/soft-capping.
        wrapper = CausalLMWithLoss(model.eval(), self.loss)
        self.decoder, self.head = wrapper.decoder(), wrapper.output_head()
        self.chunk_size = self.loss.positions(self.head)
        self.model_path = model_path

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.score(batch)

    def score(self, batch: pa.Table) -> pa.Table:
        """`example_id`, `nll` (mean over response tokens), `n_response_tokens`, `n_tokens`."""
        import torch

        ids_col = batch.column("input_ids").combine_chunks()
        offsets = ids_col.offsets.to_numpy()
        flat_ids = ids_col.values.to_numpy(zero_copy_only=False)
        flat_labels = batch.column("labels").combine_chunks().values.to_numpy(zero_copy_only=False)
        lengths = np.diff(offsets)
        nll = np.full(batch.num_rows, np.nan)
        n_response = np.zeros(batch.num_rows, dtype=np.int64)
        for rows in token_budget_batches(lengths, self.batch_tokens):
            shape = (len(rows), int(lengths[rows].max()))
            input_ids, mask = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
            labels = np.full(shape, IGNORE_INDEX, np.int64)
            for j, r in enumerate(rows):  # right padding: positions of real tokens unchanged
                lo, n = offsets[r], lengths[r]
                input_ids[j, :n], labels[j, :n] = flat_ids[lo : lo + n], flat_labels[lo : lo + n]
                mask[j, :n] = 1
            with torch.inference_mode():
                out = self.decoder(
                    input_ids=torch.from_numpy(input_ids).to(self.device),
                    # Equal lengths need no mask: SDPA then takes its plain causal path.
                    attention_mask=None if mask.all() else torch.from_numpy(mask).to(self.device),
                    use_cache=False,
                )
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                # Target log-probs only, chunk by chunk, in fp32: never a [B, L, V] log-softmax.
                nll_sum, counts = response_token_nll(
                    hidden, torch.from_numpy(labels), self.head, self.chunk_size
                )
            n_response[rows] = counts.cpu().numpy()
            with np.errstate(invalid="ignore", divide="ignore"):  # no response tokens -> NaN
                nll[rows] = nll_sum.double().cpu().numpy() / n_response[rows]
        return pa.table(
            {
                "example_id": batch.column("example_id").combine_chunks().cast(pa.int64()),
                "nll": pa.array(nll, pa.float64()),
                "n_response_tokens": pa.array(n_response, pa.int64()),
                "n_tokens": pa.array(lengths, pa.int64()),
                "scorer": pa.array([self.name] * batch.num_rows, pa.string()),
            }
        )


class ScoreItems(Scorer):
    """Ray Data callable class: scores work items (checkpoint, file, row group, row slice).

    It reads each item's rows itself from OUT (a shared path), so no rows pass through the
    driver; a restarted actor (Ray Data retries the item) loads the item's checkpoint again.
    """

    _group: tuple[tuple[str, int], pa.Table] | None = None  # the last row group read

    def _row_group(self, file: str, group: int) -> pa.Table:
        """A row group of OUT/data, read once for the consecutive slices taken from it."""
        if self._group is None or self._group[0] != (file, group):
            table = pq.ParquetFile(file).read_row_group(
                group, columns=["example_id", "input_ids", "labels"]
            )
            self._group = ((file, group), table)
        return self._group[1]

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        parts = []
        for i in range(len(batch["checkpoint"])):
            self.load(str(batch["checkpoint"][i]))
            table = self._row_group(str(batch["file"][i]), int(batch["row_group"][i]))
            lo, hi = int(batch["lo"][i]), int(batch["hi"][i])
            scored = self.score(table.slice(lo, hi - lo))
            for name in ("step", "batch"):
                value = pa.array([int(batch[name][i])] * scored.num_rows, pa.int64())
                scored = scored.append_column(name, value)
            parts.append(scored)
        return pa.concat_tables(parts)


def score_items(data_dir: Path, checkpoints: list[tuple[int, Path]], rows: int) -> list[dict]:
    """Work items in checkpoint order: each checkpoint over every row of `data_dir`, in slices
    of at most `rows` rows of one row group (the driver reads Parquet footers only)."""
    slices: list[tuple[str, int, int, int]] = []
    for file in sorted(data_dir.glob("*.parquet")):
        meta = pq.ParquetFile(file).metadata
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            slices.extend((str(file), group, lo, min(n, lo + rows)) for lo in range(0, n, rows))
    items = []
    for step, path in checkpoints:
        for k, (f, g, lo, hi) in enumerate(slices):
            item = {"checkpoint": str(path), "step": step, "batch": k, "file": f}
            items.append({**item, "row_group": g, "lo": lo, "hi": hi})
    return items
