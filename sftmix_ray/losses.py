"""NTP and SFTMix losses over final hidden states, chunked so full-vocabulary logits never exist.

Every loss here takes the decoder's last hidden state (after the final norm) and the LM head
*module*, and calls the head chunk by chunk; see `sftmix_ray.loss_kernels.chunked_soft_ce`.
The naive formulas (materialized targets, full `log_softmax`) live in `tests/test_losses.py`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from sftmix_ray.labels import IGNORE_INDEX
from sftmix_ray.loss_kernels import (
    DEFAULT_CHUNK_MB,
    chunk_positions,
    chunked_soft_ce,
    head_vocab,
)

__all__ = [
    "IGNORE_INDEX",
    "NTPLoss",
    "SFTMixLoss",
    "build_loss",
    "chunked_soft_ce",
    "confidence_and_variability",
    "mixup_target_mass",
    "response_pairs",
    "response_token_nll",
    "sftmix_mixup_loss",
]

Normalizers = Tensor | Sequence[float]
# A loss's metrics: detached 0-dim tensors on the loss's device (the host reads them once per
# optimizer step, after the all-reduce; a `float()` here would sync the device every call).
Metrics = dict[str, Tensor]


class LossInputs(NamedTuple):
    """What a loss's `forward` receives, as its `compute` reads it."""

    hidden: Tensor
    labels: Tensor
    lm_head: nn.Module
    lam: Tensor | None
    normalizers: Normalizers | None


def _check_batch(hidden: Tensor, labels: Tensor, what: str = "hidden") -> None:
    """Raise unless `hidden` is `[B, L, d]` and `labels` is `[B, L]`."""
    if hidden.dim() != 3 or labels.dim() != 2 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"{what} must be [B, L, d] with labels [B, L]; got {tuple(hidden.shape)} and "
            f"labels {tuple(labels.shape)}"
        )


def _safe_div(total: Tensor, denominator: Tensor) -> Tensor:
    """`total / denominator`, or `total` (which is then 0) when there is nothing to count."""
    # A zero count means every position was ignored, so `total` is an exact 0 with a grad path.
    return total / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def response_token_nll(
    hidden: Tensor, labels: Tensor, lm_head: nn.Module, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Per-row summed response-token NLL (fp32 `[B]`, on `hidden`'s device) and response-token
    count (long `[B]`, on `labels`' device).

    Which positions are scored is read from `labels` where they live: labels on the host (as
    the training loop, the scorer and eval pass them) cost no device sync; only index tensors
    travel to the device.
    """
    _check_batch(hidden, labels)
    # Hugging Face convention: the hidden state at t predicts the label at t + 1.
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    n_tokens = mask.sum(dim=1)
    rows, cols = mask.nonzero(as_tuple=True)
    device = hidden.device
    targets = _to(shifted[rows, cols].unsqueeze(1), device)
    rows, cols = _to(rows, device), _to(cols, device)
    weights = torch.ones(targets.shape, dtype=torch.float32, device=device)
    per_position = chunked_soft_ce(hidden[rows, cols], lm_head, targets, weights, chunk_size)
    nll_sum = per_position.new_zeros(labels.shape[0]).index_add(0, rows, per_position)
    return nll_sum, n_tokens


def _to(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`; from the host without waiting for the copy (pinned when CUDA)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class ChunkedLoss(nn.Module):
    """A loss whose log-sum-exps run `positions(head)` positions at a time: `chunk_size` when
    > 0, else as many as `chunk_mb` of fp32 logits hold at the head's vocabulary size."""

    def __init__(self, chunk_size: int = 0, chunk_mb: float = DEFAULT_CHUNK_MB) -> None:
        super().__init__()
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0: from chunk_mb), got {chunk_size}")
        if not chunk_mb > 0:
            raise ValueError(f"chunk_mb must be > 0, got {chunk_mb}")
        self.chunk_size, self.chunk_mb = chunk_size, chunk_mb

    def positions(self, lm_head: nn.Module) -> int:
        """Positions per log-sum-exp chunk for this head."""
        return chunk_positions(self.chunk_size, self.chunk_mb, head_vocab(lm_head))

    def forward(
        self,
        hidden: Tensor,
        labels: Tensor,
        lm_head: nn.Module,
        *,
        lam: Tensor | None = None,
        normalizers: Normalizers | None = None,
    ) -> tuple[Tensor, Metrics]:
        """`(loss, metrics)` of a batch: `hidden` the last hidden states of its rows, `labels`
        with IGNORE_INDEX outside the responses, `lm_head` the model's head, `lam` the Mixup
        weights (`sample_lambda`; None for NTP), `normalizers` as in `NTPLoss`'s normalization
        contract (None: this batch's own counts). The one signature every loss keeps."""
        return self.compute(LossInputs(hidden, labels, lm_head, lam, normalizers))

    def compute(self, batch: LossInputs) -> tuple[Tensor, Metrics]:
        raise NotImplementedError


def _lambda_per_row(lam: float | Tensor, batch: int, device: torch.device) -> Tensor:
    """Mixing weights as an fp32 `[batch]` tensor, checked to lie in [0, 1]."""
    if isinstance(lam, numbers.Real):
        if not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        return torch.full((batch,), float(lam), dtype=torch.float32, device=device)
    lam = torch.as_tensor(lam)
    if lam.dim() == 0:
        lam = lam.expand(batch)
    if lam.shape != (batch,):
        raise ValueError(f"lam must be a float or a [{batch}] tensor, got {tuple(lam.shape)}")
    # Checking a device tensor would force a sync every step; lam is drawn on the host anyway.
    if lam.device.type == "cpu" and bool(((lam < 0) | (lam > 1)).any()):
        raise ValueError(f"lam must lie in [0, 1], got {lam.tolist()}")
    return lam.to(device=device, dtype=torch.float32)


ALIGNS = ("response", "position")


def _check_align(align: str) -> None:
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")


def _mixup_targets(
    labels_conf: Tensor, labels_unconf: Tensor, lam: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Position alignment: shifted labels and target weights `lam*m_c`, `(1-lam)*m_u`."""
    y_conf, y_unconf = labels_conf[:, 1:], labels_unconf[:, 1:]
    lam_pos = lam.unsqueeze(1)
    w_conf = lam_pos * (y_conf != IGNORE_INDEX)
    w_unconf = (1.0 - lam_pos) * (y_unconf != IGNORE_INDEX)
    return y_conf, y_unconf, w_conf, w_unconf


def response_pairs(labels_conf: Tensor, labels_unconf: Tensor) -> tuple[Tensor, Tensor]:
    """Response alignment: `[M, 2]` (row, position) indices of the confident and unconfident
    hidden states that are mixed, in matching order.

    Position `t` of a row holds a response token when `labels[t + 1]` is supervised (the
    hidden state at t predicts the label at t + 1). The n-th response position of confident
    row i is paired with the n-th of unconfident row i, in order across turns, for
    n < min(N_c, N_u). Computed from the labels alone, so callers can do it on the host.
    """
    mask_c = labels_conf[:, 1:] != IGNORE_INDEX
    mask_u = labels_unconf[:, 1:] != IGNORE_INDEX
    n = torch.minimum(mask_c.sum(dim=1), mask_u.sum(dim=1)).unsqueeze(1)
    rank_c = mask_c.long().cumsum(dim=1) - 1
    rank_u = mask_u.long().cumsum(dim=1) - 1
    # nonzero() lists positions row by row, left to right: the n-th kept confident position
    # of a row lines up with its n-th kept unconfident one.
    return (mask_c & (rank_c < n)).nonzero(), (mask_u & (rank_u < n)).nonzero()


def mixup_target_mass(
    labels_conf: Tensor, labels_unconf: Tensor, lam: float | Tensor, *, align: str = "response"
) -> Tensor:
    """`sum Y` of the Mixup targets (fp32 scalar): the count `L_mix` is divided by.

    With `align="response"` every mixed position carries target mass lam + (1 - lam) = 1, so
    this is the number of mixed positions, `sum_i min(N_c,i, N_u,i)`.
    """
    _check_align(align)
    if labels_conf.shape[0] != labels_unconf.shape[0] or labels_conf.dim() != 2:
        raise ValueError(
            f"labels_conf and labels_unconf must both be [b, L]; got "
            f"{tuple(labels_conf.shape)} and {tuple(labels_unconf.shape)}"
        )
    lam_rows = _lambda_per_row(lam, labels_conf.shape[0], labels_conf.device)
    if align == "response":
        mask_c = labels_conf[:, 1:] != IGNORE_INDEX
        mask_u = labels_unconf[:, 1:] != IGNORE_INDEX
        return torch.minimum(mask_c.sum(dim=1), mask_u.sum(dim=1)).sum().float()
    if labels_conf.shape != labels_unconf.shape:
        raise ValueError("align='position' needs confident and unconfident rows of one length")
    _, _, w_conf, w_unconf = _mixup_targets(labels_conf, labels_unconf, lam_rows)
    return (w_conf + w_unconf).sum()


def _position_mix(
    hidden_conf: Tensor, hidden_unconf: Tensor, labels_conf: Tensor, labels_unconf: Tensor,
    lam_rows: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Mixed hidden states (fp32), targets and weights at equal absolute positions."""
    if hidden_conf.shape != hidden_unconf.shape:
        raise ValueError(
            f"align='position' needs confident and unconfident hidden states of one shape; "
            f"got {tuple(hidden_conf.shape)} and {tuple(hidden_unconf.shape)}"
        )
    y_conf, y_unconf, w_conf, w_unconf = _mixup_targets(labels_conf, labels_unconf, lam_rows)
    # Mix only positions with some target mass: the rest cost nothing, not even the mixing.
    # Indices come from the labels and lambdas where they live (the host: no device sync).
    rows, cols = ((w_conf != 0) | (w_unconf != 0)).nonzero(as_tuple=True)
    device = hidden_conf.device
    targets = _to(torch.stack([y_conf[rows, cols], y_unconf[rows, cols]], dim=1), device)
    weights = _to(torch.stack([w_conf[rows, cols], w_unconf[rows, cols]], dim=1), device)
    rows, cols = _to(rows, device), _to(cols, device)
    lam_keep = _to(lam_rows, device)[rows].unsqueeze(1)
    mixed = lam_keep * hidden_conf[rows, cols].float()
    mixed = mixed + (1.0 - lam_keep) * hidden_unconf[rows, cols].float()
    return mixed, targets, weights


def _response_mix(
    hidden_conf: Tensor, hidden_unconf: Tensor, labels_conf: Tensor, labels_unconf: Tensor,
    lam_rows: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Mixed hidden states (fp32), targets and weights of the n-th response tokens."""
    if (
        hidden_conf.shape[0] != hidden_unconf.shape[0]
        or hidden_conf.shape[2:] != (hidden_unconf.shape[2:])
    ):
        raise ValueError(
            f"hidden_conf and hidden_unconf must be [b, L_c, d] and [b, L_u, d]; got "
            f"{tuple(hidden_conf.shape)} and {tuple(hidden_unconf.shape)}"
        )
    # Indices come from the labels where they live (the host: no device sync).
    idx_c, idx_u = response_pairs(labels_conf, labels_unconf)
    rows_c, pos_c, rows_u, pos_u = idx_c[:, 0], idx_c[:, 1], idx_u[:, 0], idx_u[:, 1]
    device = hidden_conf.device
    targets = torch.stack([labels_conf[rows_c, pos_c + 1], labels_unconf[rows_u, pos_u + 1]], dim=1)
    lam_pos = lam_rows[rows_c].unsqueeze(1)
    weights = _to(torch.cat([lam_pos, 1.0 - lam_pos], dim=1), device)
    targets = _to(targets, device)
    rows_c, pos_c, rows_u, pos_u = (_to(t, device) for t in (rows_c, pos_c, rows_u, pos_u))
    lam_dev = weights[:, :1]
    mixed = lam_dev * hidden_conf[rows_c, pos_c].float()
    mixed = mixed + (1.0 - lam_dev) * hidden_unconf[rows_u, pos_u].float()
    return mixed, targets, weights


def sftmix_mixup_loss(
    hidden_conf: Tensor,
    hidden_unconf: Tensor,
    labels_conf: Tensor,
    labels_unconf: Tensor,
    lm_head: nn.Module,
    lam: float | Tensor,
    *,
    align: str = "response",
    chunk_size: int = 1024,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """SFTMix's `L_mix`: CE of mixed hidden states against mixed one-hot targets, over `sum Y`.

    `align="response"` (the paper's): the n-th response token of confident row i is mixed
    with the n-th response token of unconfident row i, for n < min(N_c, N_u), in order across
    turns; `align="position"`: equal absolute positions of the padded batch, one-sided
    targets where only one row is supervised. `normalizer` replaces the local `sum Y` (the
    training loop passes the global one).
    """
    _check_align(align)
    _check_batch(hidden_conf, labels_conf, "hidden_conf")
    _check_batch(hidden_unconf, labels_unconf, "hidden_unconf")
    device = hidden_conf.device
    if labels_unconf.device != labels_conf.device:
        labels_unconf = labels_unconf.to(labels_conf.device)
    # Weights and indices are built beside the labels (the host in training) and then moved.
    lam_rows = _lambda_per_row(lam, hidden_conf.shape[0], labels_conf.device)
    mix = _response_mix if align == "response" else _position_mix
    mixed, targets, weights = mix(hidden_conf, hidden_unconf, labels_conf, labels_unconf, lam_rows)
    # Mixed in fp32, so bf16 hidden states are rounded once, after mixing.
    total = chunked_soft_ce(mixed.to(hidden_conf.dtype), lm_head, targets, weights, chunk_size)
    if normalizer is None:
        denominator = weights.sum()
    else:
        denominator = torch.as_tensor(normalizer, dtype=torch.float32, device=device)
    return _safe_div(total.sum(), denominator)


def _as_normalizers(normalizers: Normalizers, size: int, device: torch.device) -> Tensor:
    """Normalizers as an fp32 `[size]` tensor on `device`."""
    out = torch.as_tensor(normalizers, dtype=torch.float32).to(device).reshape(-1)
    if out.numel() != size:
        raise ValueError(f"expected {size} normalizers, got {out.numel()}")
    return out


class NTPLoss(ChunkedLoss):
    """Token-mean next-token cross-entropy over response tokens.

    Normalization contract (so that the loss and its gradients do not change with the number of
    workers or with gradient accumulation): before the first forward of an optimizer step, the
    training loop computes `normalizer_counts(labels, lam)` for every micro-batch of the step,
    sums them over micro-batches and all-reduces (SUM) over ranks, and passes
    `normalizers = global_counts / world_size` to every call. Each call then returns
    `local_sum / normalizers`; DDP/FSDP average gradients over ranks and micro-batch gradients
    add up, so the step's gradient is that of `global_sum / global_count`. The logged loss of
    the step is the sum over micro-batches of the returned values, averaged over ranks.
    Without `normalizers` the local counts are used (one worker, no accumulation).
    """

    def sample_lambda(
        self, batch_pairs: int, *, seed: int, step: int, rank: int, micro: int = 0
    ) -> Tensor | None:
        """NTP mixes nothing: always `None`."""
        return None

    def normalizer_counts(self, labels: Tensor, lam: Tensor | None = None) -> Tensor:
        """Local counts `[n_response_tokens]` (fp32) that the loss divides by."""
        return (labels[:, 1:] != IGNORE_INDEX).sum().float().reshape(1)

    def compute(self, batch: LossInputs) -> tuple[Tensor, Metrics]:
        """`(loss, metrics)` with metrics `loss`, `ntp`, `n_tokens`."""
        hidden, labels, lm_head, _, normalizers = batch
        nll_sum, n_tokens = response_token_nll(hidden, labels, lm_head, self.positions(lm_head))
        if normalizers is None:
            normalizers = n_tokens.sum().float().reshape(1)
        norm = _as_normalizers(normalizers, 1, hidden.device)
        loss = _safe_div(nll_sum.sum(), norm[0])
        value = loss.detach()
        return loss, {"loss": value, "ntp": value, "n_tokens": n_tokens.sum().float()}


class SFTMixLoss(ChunkedLoss):
    """SFTMix: `ntp_weight * L_ntp` over all `2b` rows plus `mu * L_mix` over (confident,
    unconfident) pairs (`ntp_weight=0` is the paper's "Mixup only" ablation).

    `hidden`/`labels` hold `2b` rows: rows `0..b-1` confident, rows `b..2b-1` unconfident, row
    `i` paired with row `b + i`. `lam` comes from `sample_lambda`. `normalizer_counts` returns
    `[n_response_tokens of all 2b rows, sum Y of the Mixup targets]`; the normalization
    contract is the one of `NTPLoss` (sum over micro-batches, all-reduce, divide by world size).
    With `mu == 0` the Mixup forward is skipped and the loss equals `NTPLoss` exactly.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        mu: float = 0.2,
        lambda_per: str = "pair",
        chunk_size: int = 0,
        align: str = "response",
        ntp_weight: float = 1.0,
        chunk_mb: float = DEFAULT_CHUNK_MB,
    ) -> None:
        super().__init__(chunk_size, chunk_mb)
        _check_align(align)
        if not ntp_weight >= 0:
            raise ValueError(f"ntp_weight must be >= 0, got {ntp_weight}")
        self.align, self.ntp_weight = align, ntp_weight
        if not alpha > 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        if not mu >= 0:
            raise ValueError(f"mixup mu must be >= 0, got {mu}")
        if lambda_per not in ("pair", "batch"):
            raise ValueError(f"lambda_per must be 'pair' or 'batch', got {lambda_per!r}")
        self.alpha, self.mu, self.lambda_per = alpha, mu, lambda_per

    def sample_lambda(
        self, batch_pairs: int, *, seed: int, step: int, rank: int, micro: int = 0
    ) -> Tensor:
        """Draw `[batch_pairs]` mixing weights from Beta(alpha, alpha), reproducibly."""
        # Seeding by (seed, step, rank, micro) makes a resumed or re-run step draw the same
        # weights while ranks and micro-batches draw independent ones.
        rng = np.random.default_rng([seed, step, rank, micro])
        if self.lambda_per == "pair":
            draws = rng.beta(self.alpha, self.alpha, size=batch_pairs)
        else:
            draws = np.full(batch_pairs, rng.beta(self.alpha, self.alpha))
        return torch.as_tensor(draws, dtype=torch.float32)

    def _pairs(self, labels: Tensor) -> int:
        """Number of pairs `b` in a `2b`-row batch."""
        if labels.dim() != 2 or labels.shape[0] % 2:
            raise ValueError(
                f"SFTMixLoss wants 2b rows (b confident, then b unconfident); got labels "
                f"{tuple(labels.shape)}"
            )
        return labels.shape[0] // 2

    def normalizer_counts(self, labels: Tensor, lam: Tensor | None = None) -> Tensor:
        """Local counts `[n_response_tokens, sum_Y]` (fp32) that the two terms divide by."""
        b = self._pairs(labels)
        n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum().float()
        if lam is None:
            if self.mu > 0:
                raise ValueError("SFTMixLoss with mu > 0 needs lam (see sample_lambda)")
            mass = torch.zeros((), dtype=torch.float32, device=labels.device)
        else:
            mass = mixup_target_mass(labels[:b], labels[b:], lam, align=self.align)
            mass = mass.to(labels.device)
        return torch.stack([n_tokens, mass])

    def compute(self, batch: LossInputs) -> tuple[Tensor, Metrics]:
        """`(loss, metrics)` with metrics `loss`, `ntp`, `mix`, `lambda_mean`."""
        hidden, labels, lm_head, lam, normalizers = batch
        b = self._pairs(labels)
        if normalizers is None:
            normalizers = self.normalizer_counts(labels, lam)
        norm = _as_normalizers(normalizers, 2, hidden.device)
        chunk = self.positions(lm_head)
        nll_sum, n_tokens = response_token_nll(hidden, labels, lm_head, chunk)
        ntp = _safe_div(nll_sum.sum(), norm[0])
        if self.mu == 0:
            loss, mix = self.ntp_weight * ntp, torch.zeros((), device=hidden.device)
        else:
            if lam is None:
                raise ValueError("SFTMixLoss with mu > 0 needs lam (see sample_lambda)")
            mix = sftmix_mixup_loss(
                hidden[:b],
                hidden[b:],
                labels[:b],
                labels[b:],
                lm_head,
                lam,
                align=self.align,
                chunk_size=chunk,
                normalizer=norm[1],
            )
            loss = self.ntp_weight * ntp + self.mu * mix
        # lam is drawn on the host: its mean costs no device sync.
        nan = torch.tensor(float("nan"))
        lam_mean = torch.as_tensor(lam).float().mean() if lam is not None else nan
        metrics: Metrics = {
            "loss": loss.detach(),
            "ntp": ntp.detach(),
            "mix": mix.detach(),
            "lambda_mean": lam_mean,
            "n_tokens": n_tokens.sum().float(),
        }
        return loss, metrics


LOSSES: dict[str, type[NTPLoss] | type[SFTMixLoss]] = {"ntp": NTPLoss, "sftmix": SFTMixLoss}


def build_loss(name: str, **kwargs: Any) -> NTPLoss | SFTMixLoss:
    """Build the loss registered under `name` (`ntp` or `sftmix`) with `kwargs`."""
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
    return cls(**kwargs)


CONFIDENCE_MEASURES = ("neg_mean_perplexity", "mean_inverse_perplexity")


def confidence_and_variability(
    nll: np.ndarray, measure: str = "neg_mean_perplexity"
) -> tuple[np.ndarray, np.ndarray]:
    """Per example, the confidence and its variability over checkpoints (`nll` is `[N, C]`).

    `neg_mean_perplexity` (the paper's): `-(1/C) sum_c exp(nll_c)`, variability the population
    std of `exp(nll_c)`. `mean_inverse_perplexity` (Dataset Cartography): mean and population
    std of `exp(-nll_c)`. Higher confidence is more confident under both.
    """
    if measure not in CONFIDENCE_MEASURES:
        raise ValueError(
            f"confidence measure must be one of {CONFIDENCE_MEASURES}, got {measure!r}"
        )
    nll = np.asarray(nll, dtype=np.float64)
    if nll.ndim != 2 or nll.shape[1] == 0:
        raise ValueError(
            f"nll must be [examples, checkpoints] with >= 1 checkpoint, got {nll.shape}"
        )
    if measure == "neg_mean_perplexity":
        perplexity = np.exp(nll)
        return -perplexity.mean(axis=1), perplexity.std(axis=1, ddof=0)
    inverse_perplexity = np.exp(-nll)
    return inverse_perplexity.mean(axis=1), inverse_perplexity.std(axis=1, ddof=0)
