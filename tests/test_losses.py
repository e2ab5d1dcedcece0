"""The chunked losses against naive oracles (full logits, materialized Mixup targets)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sftmix_ray.losses import (
    NTPLoss,
    SFTMixLoss,
    build_loss,
    chunked_soft_ce,
    confidence_and_variability,
    mixup_target_mass,
    response_token_nll,
    sftmix_mixup_loss,
)

B, L, D, V = 3, 11, 32, 97
TOL = 1e-5


# ----------------------------------------------------------------------------- oracles


def naive_position_mixup_loss(
    h_conf: Tensor, h_unconf: Tensor, y_conf: Tensor, y_unconf: Tensor, lm_head: nn.Module, lam
) -> Tensor:
    """`align="position"` literally: materialize Y [b, L-1, V] and take a full log_softmax."""
    b = h_conf.shape[0]
    lam = torch.as_tensor(lam, dtype=torch.float32).expand(b).reshape(b, 1, 1)
    mixed = lam * h_conf + (1 - lam) * h_unconf
    log_probs = torch.log_softmax(lm_head(mixed[:, :-1]).float(), dim=-1)
    vocab = log_probs.shape[-1]
    y_c, y_u = y_conf[:, 1:], y_unconf[:, 1:]
    m_c, m_u = (y_c != -100).unsqueeze(-1), (y_u != -100).unsqueeze(-1)
    onehot_c = F.one_hot(y_c.clamp_min(0), vocab).float()
    onehot_u = F.one_hot(y_u.clamp_min(0), vocab).float()
    target = lam * onehot_c * m_c + (1 - lam) * onehot_u * m_u
    return -(target * log_probs).sum() / target.sum()


def naive_response_mixup_loss(
    h_conf: Tensor, h_unconf: Tensor, y_conf: Tensor, y_unconf: Tensor, lm_head: nn.Module, lam
) -> Tensor:
    """DESIGN's (the paper's) formula, pair by pair: the n-th response token of the confident
    row with the n-th of its partner, n < min(N_c, N_u); Y materialized, full log_softmax."""
    b = h_conf.shape[0]
    lam = torch.as_tensor(lam, dtype=torch.float32).expand(b)
    total, count = h_conf.sum() * 0.0 + lm_head.weight.sum() * 0.0, 0
    for i in range(b):
        pos_c = [t for t in range(h_conf.shape[1] - 1) if y_conf[i, t + 1] != -100]
        pos_u = [t for t in range(h_unconf.shape[1] - 1) if y_unconf[i, t + 1] != -100]
        n = min(len(pos_c), len(pos_u))
        if n == 0:
            continue
        pos_c, pos_u = pos_c[:n], pos_u[:n]
        mixed = lam[i] * h_conf[i, pos_c] + (1 - lam[i]) * h_unconf[i, pos_u]
        log_probs = torch.log_softmax(lm_head(mixed).float(), dim=-1)
        vocab = log_probs.shape[-1]
        target = lam[i] * F.one_hot(y_conf[i, [t + 1 for t in pos_c]], vocab).float()
        target = target + (1 - lam[i]) * F.one_hot(y_unconf[i, [t + 1 for t in pos_u]], vocab)
        total = total - (target * log_probs).sum()
        count += n
    return total / max(count, 1)


def naive_mixup_loss(h_conf, h_unconf, y_conf, y_unconf, lm_head, lam, align="response"):
    fn = naive_response_mixup_loss if align == "response" else naive_position_mixup_loss
    return fn(h_conf, h_unconf, y_conf, y_unconf, lm_head, lam)


def naive_ntp_loss(hidden: Tensor, labels: Tensor, lm_head: nn.Module) -> Tensor:
    """Hugging Face's loss: full logits, shift, token-mean cross-entropy."""
    logits = lm_head(hidden[:, :-1]).float()
    flat_logits = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat_logits, labels[:, 1:].reshape(-1), ignore_index=-100)


# ----------------------------------------------------------------------------- helpers


def assert_rel(actual: Tensor, expected: Tensor, tol: float = TOL) -> None:
    """Max abs error relative to the largest magnitude of `expected` is at most `tol`."""
    assert actual.shape == expected.shape
    scale = expected.detach().abs().max().clamp_min(1e-12)
    err = float((actual.detach() - expected.detach()).abs().max() / scale)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def make_head(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, V, bias=False)


def make_pairs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Confident rows: prompt then response to the end. Unconfident rows: shorter, right-padded."""
    g = torch.Generator().manual_seed(seed)
    h_c = torch.randn(B, L, D, generator=g).requires_grad_()
    h_u = torch.randn(B, L, D, generator=g).requires_grad_()
    y_c = torch.randint(0, V, (B, L), generator=g)
    y_u = torch.randint(0, V, (B, L), generator=g)
    for i, (prompt_c, prompt_u, length_u) in enumerate([(2, 1, 7), (3, 2, 5), (1, 4, 11)]):
        y_c[i, :prompt_c] = -100
        y_u[i, :prompt_u] = -100
        y_u[i, length_u:] = -100
    return h_c, h_u, y_c, y_u


def grads(loss: Tensor, *tensors: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, tensors))


class RecordingLinear(nn.Linear):
    """An LM head that records how many rows each call sees."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.rows.append(x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1])
        return super().forward(x)


LAMBDAS = {
    "per_pair": torch.tensor([0.3, 0.85, 0.05]),
    "per_batch": 0.37,
    "zero": 0.0,
    "one": 1.0,
}


# ----------------------------------------------------------------------------- Mixup


ALIGNS = ["response", "position"]


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("lam_name", list(LAMBDAS))
def test_mixup_loss_and_grads_match_oracle(lam_name: str, chunk_size: int, align: str) -> None:
    lam = LAMBDAS[lam_name]
    head = make_head()
    h_c, h_u, y_c, y_u = make_pairs()
    expected = naive_mixup_loss(h_c, h_u, y_c, y_u, head, lam, align)
    expected_grads = grads(expected, h_c, h_u, head.weight)
    actual = sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, lam, chunk_size=chunk_size, align=align)
    actual_grads = grads(actual, h_c, h_u, head.weight)
    assert_rel(actual, expected)
    for a, e in zip(actual_grads, expected_grads, strict=True):
        assert_rel(a, e)
    # lam = 1 trains only on the confident side, lam = 0 only on the unconfident one.
    if lam_name == "one":
        assert float(actual_grads[1].abs().max()) == 0.0
    if lam_name == "zero":
        assert float(actual_grads[0].abs().max()) == 0.0


def test_mixup_is_independent_of_chunk_size() -> None:
    head = make_head()
    h_c, h_u, y_c, y_u = make_pairs(seed=3)
    lam = LAMBDAS["per_pair"]
    with torch.no_grad():
        values = [
            float(sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, lam, chunk_size=c))
            for c in (1, 7, 1000)
        ]
    assert max(values) - min(values) <= 1e-6 * abs(values[0])


def test_mixup_with_a_shorter_side_differs_from_equal_lengths() -> None:
    """Padding on one side really changes the targets: the test data exercises it."""
    head = make_head()
    h_c, h_u, y_c, y_u = make_pairs()
    lam = LAMBDAS["per_pair"]
    y_u_full = y_u.clone()
    y_u_full[y_u_full == -100] = 5
    padded = sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, lam)
    full = sftmix_mixup_loss(h_c, h_u, y_c, y_u_full, head, lam)
    assert abs(float(padded.detach()) - float(full.detach())) > 1e-3
    assert_rel(padded, naive_mixup_loss(h_c, h_u, y_c, y_u, head, lam))


@pytest.mark.parametrize("align", ALIGNS)
def test_all_ignored_pair_contributes_nothing(align: str) -> None:
    head = make_head()
    h_c, h_u, y_c, y_u = make_pairs()
    lam = LAMBDAS["per_pair"]
    y_c2, y_u2 = y_c.clone(), y_u.clone()
    y_c2[1], y_u2[1] = -100, -100
    with_dead_row = sftmix_mixup_loss(h_c, h_u, y_c2, y_u2, head, lam, align=align)
    keep = [0, 2]
    without = sftmix_mixup_loss(
        h_c[keep], h_u[keep], y_c[keep], y_u[keep], head, lam[keep], align=align
    )
    assert_rel(with_dead_row, without)
    assert_rel(with_dead_row, naive_mixup_loss(h_c, h_u, y_c2, y_u2, head, lam, align))
    g_c, g_u = grads(with_dead_row, h_c, h_u)
    assert float(g_c[1].abs().max()) == 0.0 and float(g_u[1].abs().max()) == 0.0


def test_all_ignored_batch_is_zero_with_a_gradient_path() -> None:
    head = make_head()
    h_c, h_u, _, _ = make_pairs()
    ignored = torch.full((B, L), -100)
    loss = sftmix_mixup_loss(h_c, h_u, ignored, ignored, head, 0.4)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    for tensor in (h_c.grad, h_u.grad, head.weight.grad):
        assert tensor is not None and torch.isfinite(tensor).all()
        assert float(tensor.abs().max()) == 0.0


@pytest.mark.parametrize("align", ALIGNS)
def test_mixup_normalizer_replaces_sum_y(align: str) -> None:
    head = make_head()
    h_c, h_u, y_c, y_u = make_pairs()
    lam = LAMBDAS["per_pair"]
    mass = mixup_target_mass(y_c, y_u, lam, align=align)
    default = sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, lam, align=align)
    doubled = sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, lam, normalizer=2 * mass, align=align)
    assert_rel(doubled, default / 2)
    n_c = (y_c[:, 1:] != -100).sum(1).float()
    n_u = (y_u[:, 1:] != -100).sum(1).float()
    if align == "position":
        # lam * (#confident targets) + (1 - lam) * (#unconfident targets) per pair.
        assert_rel(mass, (lam * n_c + (1 - lam) * n_u).sum())
    else:  # every mixed position carries mass 1: the number of mixed positions
        assert float(mass) == float(torch.minimum(n_c, n_u).sum())


def test_tied_embeddings() -> None:
    """Gradients reach a weight shared by the embedding and the LM head through both uses."""
    torch.manual_seed(0)
    embed = nn.Embedding(V, D)
    head = nn.Linear(D, V, bias=False)
    head.weight = embed.weight
    proj = nn.Linear(D, D)
    _, _, y_c, y_u = make_pairs()
    ids = torch.randint(0, V, (2 * B, L), generator=torch.Generator().manual_seed(1))

    def losses(fast: bool) -> tuple[Tensor, Tensor]:
        hidden = torch.tanh(proj(embed(ids)))
        lam = LAMBDAS["per_pair"]
        if fast:
            return sftmix_mixup_loss(hidden[:B], hidden[B:], y_c, y_u, head, lam, chunk_size=4)
        return naive_mixup_loss(hidden[:B], hidden[B:], y_c, y_u, head, lam)

    actual, expected = losses(True), losses(False)
    assert_rel(actual, expected)
    actual_grad, expected_grad = grads(actual, embed.weight)[0], grads(expected, embed.weight)[0]
    assert_rel(actual_grad, expected_grad)


def test_bf16_is_close_to_fp32() -> None:
    head = make_head()
    h_c, h_u, y_c, y_u = make_pairs()
    lam = LAMBDAS["per_pair"]
    expected = naive_mixup_loss(h_c, h_u, y_c, y_u, head, lam)
    head_bf16 = make_head().to(torch.bfloat16)
    actual = sftmix_mixup_loss(
        h_c.detach().bfloat16(), h_u.detach().bfloat16(), y_c, y_u, head_bf16, lam
    )
    assert actual.dtype == torch.float32
    assert_rel(actual, expected, tol=2e-2)


def test_response_alignment_multi_turn_different_lengths_and_an_empty_side() -> None:
    """Rows of different lengths, responses in two turns with a user turn between them, and a
    pair whose unconfident row has no response at all (it mixes nothing)."""
    head = make_head(seed=4)
    g = torch.Generator().manual_seed(4)
    h_c = torch.randn(3, 14, D, generator=g).requires_grad_()
    h_u = torch.randn(3, 9, D, generator=g).requires_grad_()
    y_c = torch.full((3, 14), -100)
    y_u = torch.full((3, 9), -100)
    y_c[0, 3:6], y_c[0, 9:13] = torch.arange(3), torch.arange(10, 14)  # two turns: 7 tokens
    y_u[0, 2:4], y_u[0, 6:9] = torch.tensor([40, 41]), torch.tensor([50, 51, 52])  # 5 tokens
    y_c[1, 2:5] = torch.tensor([7, 8, 9])  # 3 tokens, partner has 6
    y_u[1, 1:7] = torch.arange(20, 26)
    y_c[2, 1:12] = torch.arange(60, 71)  # partner has no response: nothing mixed
    lam = torch.tensor([0.2, 0.7, 0.9])
    for chunk in (1, 4, 100):
        actual = sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, lam, chunk_size=chunk)
        expected = naive_mixup_loss(h_c, h_u, y_c, y_u, head, lam)
        assert_rel(actual, expected)
        for a, e in zip(
            grads(actual, h_c, h_u, head.weight), grads(expected, h_c, h_u, head.weight)
        ):
            assert_rel(a, e)
    # 5 + 3 + 0 mixed positions; the empty pair's rows get no gradient.
    assert float(mixup_target_mass(y_c, y_u, lam)) == 8.0
    g_c, g_u = grads(sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, lam), h_c, h_u)
    assert float(g_c[2].abs().max()) == 0.0 and float(g_u[2].abs().max()) == 0.0
    # The confident row's 6th and 7th response tokens have no partner: no gradient there.
    assert float(g_c[0, 10:].abs().max()) == 0.0 and float(g_c[0, 8].abs().max()) > 0.0


def test_mixup_rejects_bad_inputs() -> None:
    head = make_head()
    h_c, h_u, y_c, y_u = make_pairs()
    with pytest.raises(ValueError, match="one shape"):
        sftmix_mixup_loss(h_c, h_u[:, :-1], y_c, y_u[:, :-1], head, 0.5, align="position")
    with pytest.raises(ValueError, match="align must be"):
        sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, 0.5, align="token")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, 1.5)
    with pytest.raises(ValueError, match=r"\[3\] tensor"):
        sftmix_mixup_loss(h_c, h_u, y_c, y_u, head, torch.tensor([0.5, 0.5]))


# ----------------------------------------------------------------------------- kernel


def test_kernel_never_sees_more_than_a_chunk_and_zero_weights_cost_nothing() -> None:
    torch.manual_seed(0)
    head = RecordingLinear(D, V, bias=False)
    n, chunk = 300, 16
    hidden = torch.randn(n, D, requires_grad=True)
    targets = torch.randint(0, V, (n, 2))
    weights = torch.rand(n, 2)
    weights[::3] = 0.0  # a third of the positions are padding
    targets[::3] = -100
    targets[1::5, 1] = targets[1::5, 0]  # both targets the same token: their terms add up
    per_position = chunked_soft_ce(hidden, head, targets, weights, chunk_size=chunk)
    assert max(head.rows) <= chunk and sum(head.rows) == n
    per_position.sum().backward()
    # Backward recomputes each chunk's logits instead of keeping N x V of them.
    assert max(head.rows) <= chunk and sum(head.rows) == 2 * n
    # Zero-weight positions (the -100 targets among them) add nothing, not even a gradient.
    assert float(per_position.detach()[::3].abs().max()) == 0.0
    assert float(hidden.grad[::3].abs().max()) == 0.0

    # Per-position value: sum_k w_k * (lse - z[t_k]) with one lse for both targets.
    logits = F.linear(hidden, head.weight)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    safe = targets.clamp_min(0)
    expected = (weights * (lse - logits.gather(1, safe))).sum(1)
    assert_rel(per_position, expected)
    # Gradients of a non-uniform upstream gradient, against autograd on the formula.
    upstream = torch.linspace(-1.0, 2.0, n)
    actual = grads(
        (chunked_soft_ce(hidden, head, targets, weights, chunk) * upstream).sum(),
        hidden,
        head.weight,
    )
    wanted = grads((expected * upstream).sum(), hidden, head.weight)
    for a, e in zip(actual, wanted, strict=True):
        assert_rel(a, e)


@pytest.mark.parametrize("block", [16384, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("scale", "softcap"), [(1.0, None), (0.5, None), (1.0, 3.0), (2.0, 3.0)])
def test_linear_head_kernel_matches_the_formula(
    monkeypatch, block: int, bias: bool, scale: float, softcap
) -> None:
    """A plain `nn.Linear` head (bare or behind the model's logit transform) is read as a
    weight: the loss runs the matmuls itself, in tiles of positions x vocabulary blocks
    (one block, or three of 33/33/31 rows); values and the gradients of hidden states, weight
    and bias equal autograd on the formula."""
    from sftmix_ray import loss_kernels
    from sftmix_ray.loss_kernels import linear_head
    from sftmix_ray.train.forward import _HeadCall

    monkeypatch.setattr(loss_kernels, "VOCAB_BLOCK", block)
    torch.manual_seed(1)
    inner = nn.Linear(D, V, bias=bias)
    head = inner if (scale, softcap) == (1.0, None) else _HeadCall(inner, scale, softcap)
    found = linear_head(head)
    assert found is not None and found.weight is inner.weight
    n = 90
    hidden = torch.randn(n, D, requires_grad=True)
    targets, weights = torch.randint(0, V, (n, 2)), torch.rand(n, 2)
    weights[::4] = 0.0
    targets[::4] = -100
    targets[1::5, 1] = targets[1::5, 0]
    targets[2::7, 0], targets[3::7, 1] = 32, 33  # either side of a block boundary
    upstream = torch.linspace(-1.0, 2.0, n)
    params = [hidden, inner.weight] + ([inner.bias] if bias else [])
    actual = chunked_soft_ce(hidden, head, targets, weights, chunk_size=16)
    logits = F.linear(hidden, inner.weight, inner.bias) * scale
    if softcap is not None:
        logits = (logits / softcap).tanh() * softcap
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    expected = (weights * (lse - logits.gather(1, targets.clamp_min(0)))).sum(1)
    assert_rel(actual, expected)
    got = grads((actual * upstream).sum(), *params)
    wanted = grads((expected * upstream).sum(), *params)
    for a, e in zip(got, wanted, strict=True):
        assert_rel(a, e)
    assert float(got[0][::4].abs().max()) == 0.0  # zero-weight positions: no gradient


def test_heads_with_hooks_or_wrappers_are_called_as_modules() -> None:
    from sftmix_ray.loss_kernels import linear_head
    from sftmix_ray.train.forward import _HeadCall

    calls: list[int] = []
    hooked = nn.Linear(D, V, bias=False)
    hooked.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    assert linear_head(hooked) is None and linear_head(RecordingLinear(D, V)) is None
    assert linear_head(_HeadCall(hooked, 1.0, None)) is None  # its hooks must run
    # ZeRO-3's head call skips the module hooks on purpose (the wrapper gathers the weight).
    assert linear_head(_HeadCall(hooked, 1.0, None, hooks=False)) is not None
    assert linear_head(nn.Sequential(nn.Linear(D, V))) is None
    hidden = torch.randn(40, D, requires_grad=True)
    chunked_soft_ce(hidden, hooked, torch.zeros(40, 1, dtype=torch.long), torch.ones(40, 1), 16)
    assert calls == [16, 16, 8]


@pytest.mark.parametrize("block", [16384, 256])
def test_bf16_head_gradient_is_summed_over_chunks_in_fp32(monkeypatch, block: int) -> None:
    """bf16 weights and hidden states, 64 position chunks (in one vocabulary block, or in
    eight, as at a 128k vocabulary): the head's weight gradient keeps the precision of one
    whole matmul (the module path summed the chunks in bf16). The hidden states' gradient
    pays for the blocks instead: each block's product is rounded to bf16 before the fp32 sum."""
    from sftmix_ray import loss_kernels

    monkeypatch.setattr(loss_kernels, "VOCAB_BLOCK", block)
    torch.manual_seed(0)
    n, vocab, dim, chunk = 4096, 2048, 64, 64
    weight64 = torch.randn(vocab, dim, dtype=torch.float64) * 0.05
    hidden64 = torch.randn(n, dim, dtype=torch.float64)
    targets, weights = torch.randint(0, vocab, (n, 1)), torch.ones(n, 1)
    w = weight64.to(torch.bfloat16).double().requires_grad_()
    h = hidden64.to(torch.bfloat16).double().requires_grad_()
    z = h @ w.t()
    (torch.logsumexp(z, -1) - z.gather(1, targets).squeeze(1)).sum().backward()

    def relative_errors(head: nn.Linear, chunk_size: int) -> tuple[float, float]:
        head.weight.data = weight64.to(torch.bfloat16)
        hidden = hidden64.to(torch.bfloat16).requires_grad_()
        chunked_soft_ce(hidden, head, targets, weights, chunk_size).sum().backward()
        assert head.weight.grad.dtype == torch.bfloat16
        return tuple(  # type: ignore[return-value]
            float((got.double() - want).norm() / want.norm())
            for got, want in ((head.weight.grad, w.grad), (hidden.grad, h.grad))
        )

    def plain() -> nn.Linear:
        return nn.Linear(dim, vocab, bias=False).to(torch.bfloat16)

    def module() -> nn.Linear:
        return RecordingLinear(dim, vocab, bias=False).to(torch.bfloat16)

    one_matmul, _ = relative_errors(plain(), n)
    fused, fused_hidden = relative_errors(plain(), chunk)
    by_module, module_hidden = relative_errors(module(), chunk)
    assert 0 < one_matmul < 0.004
    assert fused < 1.5 * one_matmul, (fused, one_matmul)
    assert by_module > 3 * fused, (by_module, fused)
    # Measured: 0.174% on the module path and in one block, 0.240% in eight blocks.
    limit = 1.0 if block >= vocab else 1.6
    assert fused_hidden <= limit * module_hidden * (1 + 1e-6), (fused_hidden, module_hidden)


def test_linear_head_kernel_under_autocast_keeps_fp32_weights() -> None:
    """DDP's bf16 path: fp32 parameters under autocast. The matmuls run in bf16 in forward
    and in the recomputation; the gradients come back fp32, close to the module path's."""
    torch.manual_seed(2)
    head = nn.Linear(D, V, bias=True)
    module = RecordingLinear(D, V, bias=True)
    module.load_state_dict(head.state_dict())
    hidden = torch.randn(50, D, requires_grad=True)
    targets, weights = torch.randint(0, V, (50, 1)), torch.ones(50, 1)
    results = []
    for h in (head, module):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_soft_ce(hidden, h, targets, weights, chunk_size=16).sum()
        results.append([loss, *grads(loss, hidden, h.weight, h.bias)])
    assert [t.dtype for t in results[0]] == [torch.float32] * 4
    for a, e in zip(*results, strict=True):
        assert_rel(a, e, tol=2e-2)
    fp32 = chunked_soft_ce(hidden.detach(), head, targets, weights, chunk_size=16).sum().detach()
    assert float(abs(results[0][0].detach() - fp32) / fp32) > 1e-5  # autocast: really bf16


def test_kernel_without_grad_does_not_checkpoint() -> None:
    head = make_head()
    hidden = torch.randn(20, D)
    with torch.no_grad():
        out = chunked_soft_ce(hidden, head, torch.zeros(20, 1, dtype=torch.long), torch.ones(20, 1))
    assert out.shape == (20,) and not out.requires_grad


# ----------------------------------------------------------------------------- NTP


def make_batch(rows: int = 2 * B, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, L, D, generator=g).requires_grad_()
    labels = torch.randint(0, V, (rows, L), generator=g)
    for i in range(rows):
        labels[i, : 1 + i % 4] = -100
        labels[i, L - (i % 3) :] = -100
    return hidden, labels


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_ntp_matches_cross_entropy(chunk_size: int) -> None:
    head = make_head()
    hidden, labels = make_batch()
    expected = naive_ntp_loss(hidden, labels, head)
    expected_grads = grads(expected, hidden, head.weight)
    actual, metrics = NTPLoss(chunk_size=chunk_size)(hidden, labels, head)
    assert_rel(actual, expected)
    for a, e in zip(grads(actual, hidden, head.weight), expected_grads, strict=True):
        assert_rel(a, e)
    assert float(metrics["loss"]) == pytest.approx(float(expected.detach()), rel=TOL)
    assert float(metrics["n_tokens"]) == float((labels[:, 1:] != -100).sum())


def test_ntp_normalizers_and_counts() -> None:
    head = make_head()
    hidden, labels = make_batch()
    loss_fn = NTPLoss()
    counts = loss_fn.normalizer_counts(labels)
    assert counts.dtype == torch.float32 and counts.tolist() == [(labels[:, 1:] != -100).sum()]
    default, _ = loss_fn(hidden, labels, head)
    halved, _ = loss_fn(hidden, labels, head, normalizers=2 * counts)
    assert_rel(halved, default / 2)
    assert loss_fn.sample_lambda(3, seed=0, step=0, rank=0) is None


def test_response_token_nll_per_row() -> None:
    head = make_head()
    hidden, labels = make_batch()
    nll_sum, n_tokens = response_token_nll(hidden, labels, head, chunk_size=5)
    logits = head(hidden[:, :-1])
    per_token = F.cross_entropy(
        logits.reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(labels.shape[0], L - 1)
    assert_rel(nll_sum, per_token.sum(1))
    assert n_tokens.dtype == torch.long
    assert n_tokens.tolist() == (labels[:, 1:] != -100).sum(1).tolist()


def test_ntp_all_ignored_batch_is_zero_with_grad() -> None:
    head = make_head()
    hidden, labels = make_batch()
    loss, _ = NTPLoss()(hidden, torch.full_like(labels, -100), head)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert head.weight.grad is not None and float(head.weight.grad.abs().max()) == 0.0


# ----------------------------------------------------------------------------- SFTMixLoss


def test_sftmix_with_mu_zero_is_exactly_ntp() -> None:
    head = make_head()
    hidden, labels = make_batch()
    recorder, plain = RecordingLinear(D, V, bias=False), RecordingLinear(D, V, bias=False)
    recorder.weight = plain.weight = head.weight  # both through the module path
    ntp, _ = NTPLoss(chunk_size=4)(hidden, labels, plain)
    sftmix = SFTMixLoss(mu=0.0, chunk_size=4)
    lam = sftmix.sample_lambda(B, seed=0, step=0, rank=0)
    mixed, metrics = sftmix(hidden, labels, recorder, lam=lam)
    assert torch.equal(mixed, ntp)
    g_ntp = grads(ntp, hidden, head.weight)
    g_mix = grads(mixed, hidden, head.weight)
    assert all(torch.equal(a, b) for a, b in zip(g_ntp, g_mix, strict=True))
    # The Mixup forward is skipped: the head only ever saw the NTP positions.
    assert sum(recorder.rows) == 2 * int((labels[:, 1:] != -100).sum())
    assert float(metrics["mix"]) == 0.0


@pytest.mark.parametrize("lambda_per", ["pair", "batch"])
def test_sftmix_loss_matches_oracle(lambda_per: str) -> None:
    head = make_head()
    h_c, h_u, y_c, y_u = make_pairs()
    hidden = torch.cat([h_c, h_u]).detach().requires_grad_()
    labels = torch.cat([y_c, y_u])
    loss_fn = build_loss("sftmix", alpha=0.5, mu=0.2, lambda_per=lambda_per, chunk_size=7)
    lam = loss_fn.sample_lambda(B, seed=1, step=2, rank=0)
    expected = naive_ntp_loss(hidden, labels, head) + 0.2 * naive_mixup_loss(
        hidden[:B], hidden[B:], y_c, y_u, head, lam
    )
    actual, metrics = loss_fn(hidden, labels, head, lam=lam)
    assert_rel(actual, expected)
    for a, e in zip(
        grads(actual, hidden, head.weight), grads(expected, hidden, head.weight), strict=True
    ):
        assert_rel(a, e)
    assert set(metrics) >= {"loss", "ntp", "mix", "lambda_mean"}
    # Detached 0-dim tensors, not floats: reading them would sync the device every forward.
    for key in ("loss", "ntp", "mix", "n_tokens"):
        value = metrics[key]
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert float(metrics["loss"]) == pytest.approx(
        float(metrics["ntp"]) + 0.2 * float(metrics["mix"]), rel=1e-6
    )
    assert float(metrics["lambda_mean"]) == pytest.approx(float(lam.mean()))
    counts = loss_fn.normalizer_counts(labels, lam)
    assert counts.shape == (2,) and counts.dtype == torch.float32
    assert float(counts[0]) == float((labels[:, 1:] != -100).sum())
    assert_rel(counts[1], mixup_target_mass(y_c, y_u, lam))


@pytest.mark.parametrize(
    ("mu", "ntp_weight", "align"),
    [(1.0, 1.0, "response"), (0.2, 0.0, "response"), (0.2, 1.0, "position")],
    ids=["equal_weight", "mixup_only", "position_aligned"],
)
def test_ablation_losses_match_oracle(mu: float, ntp_weight: float, align: str) -> None:
    """The paper's ablation rows as settings: NTP + Mixup with equal weight, Mixup only, and
    the position-aligned variant, each against the naive formulas."""
    head = make_head()
    h_c, h_u, y_c, y_u = make_pairs(seed=5)
    hidden = torch.cat([h_c, h_u]).detach().requires_grad_()
    labels = torch.cat([y_c, y_u])
    loss_fn = build_loss("sftmix", mu=mu, ntp_weight=ntp_weight, align=align, chunk_size=4)
    lam = loss_fn.sample_lambda(B, seed=3, step=0, rank=0)
    mix = naive_mixup_loss(hidden[:B], hidden[B:], y_c, y_u, head, lam, align)
    expected = ntp_weight * naive_ntp_loss(hidden, labels, head) + mu * mix
    actual, metrics = loss_fn(hidden, labels, head, lam=lam)
    assert_rel(actual, expected)
    for a, e in zip(grads(actual, hidden, head.weight), grads(expected, hidden, head.weight)):
        assert_rel(a, e)
    assert float(metrics["loss"]) == pytest.approx(
        ntp_weight * float(metrics["ntp"]) + mu * float(metrics["mix"])
    )
    assert_rel(
        loss_fn.normalizer_counts(labels, lam)[1], mixup_target_mass(y_c, y_u, lam, align=align)
    )


def test_lambda_is_reproducible_per_step_and_rank() -> None:
    loss_fn = SFTMixLoss(alpha=0.5, lambda_per="pair")
    a = loss_fn.sample_lambda(8, seed=7, step=3, rank=0)
    assert torch.equal(a, loss_fn.sample_lambda(8, seed=7, step=3, rank=0))
    assert not torch.equal(a, loss_fn.sample_lambda(8, seed=7, step=3, rank=1))
    assert not torch.equal(a, loss_fn.sample_lambda(8, seed=7, step=4, rank=0))
    assert not torch.equal(a, loss_fn.sample_lambda(8, seed=7, step=3, rank=0, micro=1))
    assert a.shape == (8,) and a.dtype == torch.float32
    assert bool(((a >= 0) & (a <= 1)).all()) and len(set(a.tolist())) == 8
    per_batch = SFTMixLoss(lambda_per="batch").sample_lambda(8, seed=7, step=3, rank=0)
    assert len(set(per_batch.tolist())) == 1
    # Beta(0.5, 0.5) is U-shaped: most draws sit near 0 or 1, and the mean is 1/2.
    draws = SFTMixLoss(alpha=0.5).sample_lambda(20000, seed=0, step=0, rank=0)
    assert abs(float(draws.mean()) - 0.5) < 0.02
    assert float(((draws < 0.1) | (draws > 0.9)).float().mean()) > 0.35


def test_build_loss_and_config_errors() -> None:
    assert isinstance(build_loss("ntp"), NTPLoss)
    assert build_loss("sftmix", mu=0.5).mu == 0.5
    with pytest.raises(ValueError, match=r"unknown loss 'mixup'.*ntp.*sftmix"):
        build_loss("mixup")
    with pytest.raises(ValueError, match="alpha"):
        SFTMixLoss(alpha=0.0)
    with pytest.raises(ValueError, match="lambda_per"):
        SFTMixLoss(lambda_per="token")
    hidden, labels = make_batch(rows=5)
    with pytest.raises(ValueError, match="2b rows"):
        SFTMixLoss()(hidden, labels, make_head(), lam=torch.full((2,), 0.5))
    hidden, labels = make_batch()
    with pytest.raises(ValueError, match="needs lam"):
        SFTMixLoss(mu=0.2)(hidden, labels, make_head())


# ----------------------------------------------------------------------------- confidence


def test_confidence_and_variability_by_hand() -> None:
    nll = np.array([[0.0, math.log(2), math.log(4)], [1.0, 1.0, 1.0]])
    confidence, variability = confidence_and_variability(nll, "mean_inverse_perplexity")
    # Row 0: exp(-nll) = 1, 1/2, 1/4; mean 7/12; population variance 1/3*sum (p - 7/12)^2.
    mean0 = 7 / 12
    std0 = math.sqrt(((1 - mean0) ** 2 + (0.5 - mean0) ** 2 + (0.25 - mean0) ** 2) / 3)
    np.testing.assert_allclose(confidence, [mean0, math.exp(-1)], rtol=1e-12)
    np.testing.assert_allclose(variability, [std0, 0.0], rtol=1e-12, atol=1e-15)
    # The paper's default: minus the mean perplexity; row 0: perplexities 1, 2, 4.
    confidence, variability = confidence_and_variability(nll)
    np.testing.assert_allclose(confidence, [-7 / 3, -math.e], rtol=1e-12)
    std_ppl = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3)
    np.testing.assert_allclose(variability, [std_ppl, 0.0], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="checkpoints"):
        confidence_and_variability(np.zeros(3))
    with pytest.raises(ValueError, match="measure"):
        confidence_and_variability(nll, "entropy")


def test_the_two_measures_rank_examples_differently() -> None:
    """Perplexities [2, 20] vs [8, 8]: mean perplexity 11 vs 8 (the second is more confident),
    mean inverse perplexity 0.275 vs 0.125 (the first is)."""
    nll = np.log(np.array([[2.0, 20.0], [8.0, 8.0]]))
    paper, _ = confidence_and_variability(nll, "neg_mean_perplexity")
    cartography, _ = confidence_and_variability(nll, "mean_inverse_perplexity")
    assert paper[1] > paper[0] and cartography[0] > cartography[1]


# ----------------------------------------------------------------------------- HF wrapper


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def lm_batch(vocab: int = 101) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (4, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def test_wrapper_matches_hugging_face_loss() -> None:
    from sftmix_ray.train.forward import CausalLMWithLoss

    model = tiny_llama()
    wrapper = CausalLMWithLoss(model, NTPLoss(chunk_size=5))
    assert wrapper.model is model
    input_ids, attention_mask, labels = lm_batch()
    expected = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    params = [p for p in model.parameters()]
    expected_grads = grads(expected, *params)
    actual, metrics = wrapper(input_ids, attention_mask, labels)
    assert_rel(actual, expected)
    for a, e in zip(grads(actual, *params), expected_grads, strict=True):
        assert_rel(a, e)
    assert float(metrics["loss"]) == pytest.approx(float(expected.detach()), rel=TOL)


def test_wrapper_loss_override_for_evaluation() -> None:
    from sftmix_ray.train.forward import CausalLMWithLoss

    model = tiny_llama()
    wrapper = CausalLMWithLoss(model, SFTMixLoss(mu=0.3))
    input_ids, attention_mask, labels = lm_batch()
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        actual, _ = wrapper(input_ids, attention_mask, labels, loss=NTPLoss())
    assert_rel(actual, expected)


def test_wrapper_sftmix_uses_post_norm_hidden_states() -> None:
    from sftmix_ray.train.forward import CausalLMWithLoss

    model = tiny_llama()
    loss_fn = SFTMixLoss(mu=0.3, chunk_size=4)
    wrapper = CausalLMWithLoss(model, loss_fn)
    input_ids, attention_mask, labels = lm_batch()
    lam = loss_fn.sample_lambda(2, seed=0, step=0, rank=0)
    hidden = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    last = hidden.hidden_states[-1]  # HF's last entry is after the final norm
    head = model.get_output_embeddings()
    expected = naive_ntp_loss(last, labels, head) + 0.3 * naive_mixup_loss(
        last[:2], last[2:], labels[:2], labels[2:], head, lam
    )
    actual, _ = wrapper(input_ids, attention_mask, labels, lam=lam)
    assert_rel(actual, expected)


def test_wrapper_applies_gemma_soft_capping_with_tied_head() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from sftmix_ray.train.forward import CausalLMWithLoss

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=2.0,  # small, so capping changes the loss a lot
    )
    model = Gemma2ForCausalLM(config).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    input_ids, attention_mask, labels = lm_batch()
    expected = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    actual, _ = CausalLMWithLoss(model, NTPLoss(chunk_size=5))(input_ids, attention_mask, labels)
    assert_rel(actual, expected)
    shared = model.get_input_embeddings().weight
    assert_rel(grads(actual, shared)[0], grads(expected, shared)[0])


def test_eval_and_scoring_use_the_models_own_logits_gemma_soft_capping(tmp_path) -> None:
    """The scorer (per-row NLL) and evaluation (token-weighted NLL) read a Gemma-2 model's
    soft-capped logits, as `transformers` computes them, through the one adapter."""
    import pyarrow as pa
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from sftmix_ray.evaluation import response_nll
    from sftmix_ray.scorer import Scorer

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        final_logit_softcapping=2.0, attn_implementation="eager",
    )  # fmt: skip
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # large logits, so that capping them at 2 changes the NLL
        model.get_output_embeddings().weight.mul_(40.0)
    model.save_pretrained(tmp_path / "gemma")
    input_ids, attention_mask, labels = lm_batch()
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits.float()
        raw = model.get_output_embeddings()(
            model.model(input_ids, attention_mask=attention_mask).last_hidden_state
        ).float()  # the head without the capping
    targets = labels[:, 1:]

    def per_row(scores: Tensor) -> Tensor:
        nll = F.cross_entropy(scores[:, :-1].transpose(1, 2), targets, reduction="none")
        return nll.sum(1) / (targets != -100).sum(1)

    expected, uncapped = per_row(logits), per_row(raw)
    assert float((expected - uncapped).abs().max()) > 0.05  # the capping matters here
    rows = [attention_mask[r].bool() for r in range(len(input_ids))]
    ids = [input_ids[r][m].tolist() for r, m in enumerate(rows)]
    labs = [labels[r][m].tolist() for r, m in enumerate(rows)]

    scorer = Scorer(str(tmp_path / "gemma"), batch_tokens=64, chunk_size=5,
                    attn_implementation="eager")  # fmt: skip
    table = pa.table({"example_id": pa.array(range(len(ids)), pa.int64()),
                      "input_ids": ids, "labels": labs})  # fmt: skip
    scored = torch.tensor(scorer(table).column("nll").to_numpy())
    assert_rel(scored, expected.double(), tol=1e-5)

    counts = (targets != -100).sum(1)
    weighted = float((expected * counts).sum() / counts.sum())
    result = response_nll(model, ids, labs, batch_size=3)  # two batches, right-padded
    assert result["response_tokens"] == int(counts.sum())
    assert abs(result["response_nll"] - weighted) <= 1e-5 * weighted


def test_loss_chunks_are_sized_by_a_byte_budget_of_fp32_logits(monkeypatch):
    """By default a chunk holds `chunk_mb` of fp32 logits whatever the vocabulary (261 rows at
    Llama-3's 128256, 1048 at 32000); a fixed `chunk_size` still wins; sharded heads count
    their full vocabulary."""
    import sftmix_ray.losses as losses_module
    from sftmix_ray.loss_kernels import chunk_positions, head_vocab
    from sftmix_ray.train.forward import _HeadCall

    assert chunk_positions(0, 128.0, 128256) == 261
    assert chunk_positions(0, 128.0, 32000) == 1048
    assert chunk_positions(0, 1e-6, 32000) == 1 and chunk_positions(7, 128.0, 32000) == 7
    head = torch.nn.Linear(8, 500, bias=False)
    assert head_vocab(head) == 500 and head_vocab(_HeadCall(head, 2.0, None)) == 500

    class ZeroThreeHead(torch.nn.Module):  # a partitioned weight: empty, full shape aside
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(0))
            self.weight.ds_shape = torch.Size([700, 8])

    assert head_vocab(ZeroThreeHead()) == 700
    seen: list[int] = []
    kernel = losses_module.chunked_soft_ce

    def spy(hidden, lm_head, targets, weights, chunk_size=1024):
        seen.append(chunk_size)
        return kernel(hidden, lm_head, targets, weights, chunk_size)

    monkeypatch.setattr(losses_module, "chunked_soft_ce", spy)
    hidden, labels = torch.randn(2, 40, 8), torch.randint(0, 500, (2, 40))
    budget = 500 * 4 * 16 / 2**20  # 16 rows of 500 fp32 logits
    by_bytes, _ = NTPLoss(chunk_mb=budget)(hidden, labels, head)
    fixed, _ = NTPLoss(chunk_size=5)(hidden, labels, head)
    assert seen == [16, 5]
    torch.testing.assert_close(by_bytes, fixed)
    assert NTPLoss().chunk_size == 0 and NTPLoss().chunk_mb == 128.0
    with pytest.raises(ValueError, match="chunk_mb"):
        NTPLoss(chunk_mb=0)


@pytest.mark.parametrize("align", ["response", "position"])
def test_losses_never_wait_for_the_device_when_labels_are_on_the_host(align: str) -> None:
    """`meta` tensors have no data: any op that would read a device tensor on the host (a
    `nonzero`, boolean-mask indexing, `.item()`, a shape that depends on values) raises on
    them. With the labels on the host, as the training loop passes them, NTP and SFTMix run
    forward and backward on meta hidden states and a meta head: no host-device sync per
    micro-batch (they synced at least six times before)."""
    b, length = 2, 12
    labels = torch.randint(0, V, (2 * b, length))
    for row, prompt in enumerate([3, 5, 2, 7]):
        labels[row, :prompt] = -100
    labels[1, 9:] = -100  # a shorter response (right padding)
    head = nn.Linear(D, V, bias=False, device="meta")
    hidden = torch.randn(2 * b, length, D, device="meta", requires_grad=True)
    sftmix = SFTMixLoss(mu=0.2, chunk_size=5, align=align)
    lam = sftmix.sample_lambda(b, seed=0, step=0, rank=0)
    normalizers = sftmix.normalizer_counts(labels, lam)  # host counts, all-reduced in training
    loss, metrics = sftmix(hidden, labels, head, lam=lam, normalizers=normalizers)
    loss.backward()
    assert loss.device.type == "meta" and hidden.grad is not None
    assert hidden.grad.shape == hidden.shape and head.weight.grad is not None
    assert metrics["n_tokens"].device.type == "cpu"  # counted on the host copy
    ntp, _ = NTPLoss(chunk_size=5)(hidden, labels, head)
    ntp.backward()


def test_only_scored_positions_reach_the_head() -> None:
    """Padding and prompt positions never reach the LM head: the NTP term sees the supervised
    positions, the Mixup term the mixed pairs (sum_i min(N_c,i, N_u,i))."""
    b, length = 2, 12
    labels = torch.randint(0, V, (2 * b, length))
    for row, prompt in enumerate([3, 5, 2, 7]):
        labels[row, :prompt] = -100
    head = RecordingLinear(D, V, bias=False)
    hidden = torch.randn(2 * b, length, D)
    loss = SFTMixLoss(mu=0.2, chunk_size=100)
    loss(hidden, labels, head, lam=loss.sample_lambda(b, seed=0, step=0, rank=0))
    supervised = (labels[:, 1:] != -100).sum(dim=1)
    mixed = torch.minimum(supervised[:b], supervised[b:]).sum()
    assert head.rows == [int(supervised.sum()), int(mixed)]
