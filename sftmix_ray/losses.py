"""NTP and SFTMix losses over final hidden states, chunked so full-vocabulary logits never exist.

Every loss here takes the decoder's last hidden state (after the final norm) and the LM head
*module*, and calls the head chunk by chunk; see `sftmix_ray.loss_kernels.chunked_soft_ce`.
The naive formulas (materialized targets, full `log_softmax`) live in `tests/test_losses.py`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sftmix_ray.loss_kernels import IGNORE_INDEX, chunked_soft_ce

__all__ = [
    "IGNORE_INDEX",
    "NTPLoss",
    "SFTMixLoss",
    "build_loss",
    "chunked_soft_ce",
    "confidence_and_variability",
    "mixup_target_mass",
    "response_token_nll",
    "sftmix_mixup_loss",
]

Normalizers = Tensor | Sequence[float]


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
    """Per-row summed response-token NLL (fp32 `[B]`) and response-token count (long `[B]`)."""
    _check_batch(hidden, labels)
    # Hugging Face convention: the hidden state at t predicts the label at t + 1.
    shifted_labels = labels[:, 1:].to(hidden.device)
    mask = shifted_labels != IGNORE_INDEX
    n_tokens = mask.sum(dim=1)
    rows = mask.nonzero()[:, 0]
    targets = shifted_labels[mask].unsqueeze(1)
    weights = torch.ones(targets.shape, dtype=torch.float32, device=hidden.device)
    per_position = chunked_soft_ce(hidden[:, :-1][mask], lm_head, targets, weights, chunk_size)
    nll_sum = per_position.new_zeros(labels.shape[0]).index_add(0, rows, per_position)
    return nll_sum, n_tokens


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


def _mixup_targets(
    labels_conf: Tensor, labels_unconf: Tensor, lam: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shifted labels and target weights `lam*m_c`, `(1-lam)*m_u`, each `[b, L-1]`."""
    y_conf, y_unconf = labels_conf[:, 1:], labels_unconf[:, 1:]
    lam_pos = lam.unsqueeze(1)
    w_conf = lam_pos * (y_conf != IGNORE_INDEX)
    w_unconf = (1.0 - lam_pos) * (y_unconf != IGNORE_INDEX)
    return y_conf, y_unconf, w_conf, w_unconf


def mixup_target_mass(labels_conf: Tensor, labels_unconf: Tensor, lam: float | Tensor) -> Tensor:
    """`sum Y` of the Mixup targets (fp32 scalar): the count `L_mix` is divided by."""
    if labels_conf.shape != labels_unconf.shape or labels_conf.dim() != 2:
        raise ValueError(
            f"labels_conf and labels_unconf must both be [b, L]; got "
            f"{tuple(labels_conf.shape)} and {tuple(labels_unconf.shape)}"
        )
    lam_rows = _lambda_per_row(lam, labels_conf.shape[0], labels_conf.device)
    _, _, w_conf, w_unconf = _mixup_targets(labels_conf, labels_unconf, lam_rows)
    return (w_conf + w_unconf).sum()


def sftmix_mixup_loss(
    hidden_conf: Tensor,
    hidden_unconf: Tensor,
    labels_conf: Tensor,
    labels_unconf: Tensor,
    lm_head: nn.Module,
    lam: float | Tensor,
    *,
    chunk_size: int = 1024,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """SFTMix's `L_mix`: CE of mixed hidden states against mixed one-hot targets, over `sum Y`."""
    _check_batch(hidden_conf, labels_conf, "hidden_conf")
    _check_batch(hidden_unconf, labels_unconf, "hidden_unconf")
    if hidden_conf.shape != hidden_unconf.shape:
        raise ValueError(
            f"confident and unconfident hidden states must have one shape (pad to one length); "
            f"got {tuple(hidden_conf.shape)} and {tuple(hidden_unconf.shape)}"
        )
    device = hidden_conf.device
    lam_rows = _lambda_per_row(lam, hidden_conf.shape[0], device)
    y_conf, y_unconf, w_conf, w_unconf = _mixup_targets(
        labels_conf.to(device), labels_unconf.to(device), lam_rows
    )
    # Mix only positions with some target mass: the rest cost nothing, not even the mixing.
    keep = (w_conf != 0) | (w_unconf != 0)
    lam_keep = lam_rows.unsqueeze(1).expand_as(keep)[keep].unsqueeze(1)
    # Mix in fp32 so bf16 hidden states are rounded once, after mixing.
    mixed = lam_keep * hidden_conf[:, :-1][keep].float()
    mixed = mixed + (1.0 - lam_keep) * hidden_unconf[:, :-1][keep].float()
    targets = torch.stack([y_conf[keep], y_unconf[keep]], dim=1)
    weights = torch.stack([w_conf[keep], w_unconf[keep]], dim=1)
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


class NTPLoss(nn.Module):
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

    name = "ntp"

    def __init__(self, chunk_size: int = 1024) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def sample_lambda(
        self, batch_pairs: int, *, seed: int, step: int, rank: int, micro: int = 0
    ) -> Tensor | None:
        """NTP mixes nothing: always `None`."""
        return None

    def normalizer_counts(self, labels: Tensor, lam: Tensor | None = None) -> Tensor:
        """Local counts `[n_response_tokens]` (fp32) that the loss divides by."""
        return (labels[:, 1:] != IGNORE_INDEX).sum().float().reshape(1)

    def forward(
        self,
        hidden: Tensor,
        labels: Tensor,
        lm_head: nn.Module,
        *,
        lam: Tensor | None = None,
        normalizers: Normalizers | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Return `(loss, metrics)`; see the class docstring for `normalizers`."""
        nll_sum, n_tokens = response_token_nll(hidden, labels, lm_head, self.chunk_size)
        if normalizers is None:
            normalizers = n_tokens.sum().float().reshape(1)
        norm = _as_normalizers(normalizers, 1, hidden.device)
        loss = _safe_div(nll_sum.sum(), norm[0])
        value = float(loss.detach())
        return loss, {"loss": value, "ntp": value, "n_tokens": float(n_tokens.sum())}


class SFTMixLoss(nn.Module):
    """SFTMix: `L_ntp` over all `2b` rows plus `mu * L_mix` over (confident, unconfident) pairs.

    `hidden`/`labels` hold `2b` rows: rows `0..b-1` confident, rows `b..2b-1` unconfident, row
    `i` paired with row `b + i`. `lam` comes from `sample_lambda`. `normalizer_counts` returns
    `[n_response_tokens of all 2b rows, sum Y of the Mixup targets]`; the normalization
    contract is the one of `NTPLoss` (sum over micro-batches, all-reduce, divide by world size).
    With `mu == 0` the Mixup forward is skipped and the loss equals `NTPLoss` exactly.
    """

    name = "sftmix"

    def __init__(
        self,
        alpha: float = 0.5,
        mu: float = 0.2,
        lambda_per: str = "pair",
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"mixup alpha must be > 0, got {alpha}")
        if not mu >= 0:
            raise ValueError(f"mixup mu must be >= 0, got {mu}")
        if lambda_per not in ("pair", "batch"):
            raise ValueError(f"lambda_per must be 'pair' or 'batch', got {lambda_per!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.alpha, self.mu, self.lambda_per, self.chunk_size = alpha, mu, lambda_per, chunk_size

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
            mass = mixup_target_mass(labels[:b], labels[b:], lam).to(labels.device)
        return torch.stack([n_tokens, mass])

    def forward(
        self,
        hidden: Tensor,
        labels: Tensor,
        lm_head: nn.Module,
        *,
        lam: Tensor | None = None,
        normalizers: Normalizers | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Return `(loss, metrics)` with metrics `loss`, `ntp`, `mix`, `lambda_mean`."""
        b = self._pairs(labels)
        if normalizers is None:
            normalizers = self.normalizer_counts(labels, lam)
        norm = _as_normalizers(normalizers, 2, hidden.device)
        nll_sum, n_tokens = response_token_nll(hidden, labels, lm_head, self.chunk_size)
        ntp = _safe_div(nll_sum.sum(), norm[0])
        if self.mu == 0:
            loss, mix = ntp, torch.zeros((), device=hidden.device)
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
                chunk_size=self.chunk_size,
                normalizer=norm[1],
            )
            loss = ntp + self.mu * mix
        lambda_mean = (
            float(torch.as_tensor(lam).float().mean()) if lam is not None else float("nan")
        )
        metrics = {
            "loss": float(loss.detach()),
            "ntp": float(ntp.detach()),
            "mix": float(mix.detach()),
            "lambda_mean": lambda_mean,
            "n_tokens": float(n_tokens.sum()),
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


def confidence_and_variability(nll: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per example, mean and population std over checkpoints of `exp(-nll)` (`nll` is `[N, T]`)."""
    nll = np.asarray(nll, dtype=np.float64)
    if nll.ndim != 2 or nll.shape[1] == 0:
        raise ValueError(
            f"nll must be [examples, checkpoints] with >= 1 checkpoint, got {nll.shape}"
        )
    inverse_perplexity = np.exp(-nll)
    return inverse_perplexity.mean(axis=1), inverse_perplexity.std(axis=1, ddof=0)
