"""One module that runs a Hugging Face causal LM's decoder and the training loss together."""

from __future__ import annotations

from torch import Tensor, nn

from sftmix_ray.loss_kernels import LinearHead, LogitTransform, has_hooks
from sftmix_ray.losses import NTPLoss, SFTMixLoss


class _HeadCall(nn.Module):
    """The LM head followed by the logit scaling/soft-capping some models apply after it;
    with `hooks=False`, the head's `forward` without its module hooks (ZeRO-3, see below)."""

    lm_head: nn.Module

    def __init__(
        self, lm_head: nn.Module, scale: float, softcap: float | None, hooks: bool = True
    ) -> None:
        super().__init__()
        # Not registered as a submodule: the head already belongs to the wrapped model, and a
        # second path to it would duplicate its weight in the state dict.
        object.__setattr__(self, "lm_head", lm_head)
        self.scale, self.softcap, self.hooks = scale, softcap, hooks

    def forward(self, hidden: Tensor) -> Tensor:
        """Logits exactly as the model's own forward computes them."""
        logits = self.lm_head(hidden) if self.hooks else self.lm_head.forward(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = (logits.float() / self.softcap).tanh() * self.softcap
        return logits

    def linear_head(self) -> LinearHead | None:
        """The head as the loss reads it (see `loss_kernels.linear_head`): its weight and this
        transform when it is a plain `nn.Linear` whose hooks, if any, are meant to be skipped."""
        head = self.lm_head
        if type(head) is not nn.Linear or (self.hooks and has_hooks(head)):
            return None
        return LinearHead(head.weight, head.bias, LogitTransform(self.scale, self.softcap))


def _logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """The `(scale, softcap)` a model applies to `lm_head` outputs before its own loss."""
    config = getattr(model, "config", None)
    scale = 1.0
    # Cohere multiplies by `logit_scale`; Granite divides by `logits_scaling`.
    logit_scale = getattr(model, "logit_scale", None)
    if isinstance(logit_scale, (int, float)):
        scale *= float(logit_scale)
    logits_scaling = getattr(config, "logits_scaling", None)
    if isinstance(logits_scaling, (int, float)) and logits_scaling != 1:
        scale /= float(logits_scaling)
    # Gemma 2/3 soft-cap the final logits.
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


class OnHost:
    """A tensor that stays on the host through a strategy's forward: the labels and the Mixup
    weights, from which the losses build their indices and weights without a device sync
    (`losses.response_token_nll`).

    FSDP2's root moves every tensor argument to the GPU before forward, and reading it back
    would wait for the device; a plain object is passed through as it is (DDP without
    `device_ids` and DeepSpeed move nothing either).
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class CausalLMWithLoss(nn.Module):
    """A causal LM whose forward returns the training loss without materializing all logits.

    `forward(input_ids, attention_mask, labels, lam, normalizers)` runs the decoder body, then
    the loss on the final (post-norm) hidden states, calling the LM head as a module chunk by
    chunk. Both happen inside this module's forward, so a strategy that wraps *this* module
    (DDP, FSDP2 `fully_shard` on each decoder layer and then on the wrapper, DeepSpeed ZeRO-3)
    has the head's weight gathered whenever the loss uses it. The training loop must therefore
    call the wrapper (`loss, metrics = wrapped(input_ids, attention_mask, labels, lam=lam,
    normalizers=normalizers)`) and never call the loss on a head or weight captured outside;
    `lam` comes from `loss.sample_lambda(...)` and `normalizers` from the all-reduced
    `loss.normalizer_counts(...)` (see `NTPLoss`). Save `wrapper.model`, the plain HF model.

    The loss calls the head once per chunk, and the number of chunks depends on each rank's
    data. A strategy that gathers the head's weight on *every call* would then issue different
    numbers of collectives on different ranks and hang. Hence: under FSDP2, shard the head with
    the wrapper (the root `fully_shard`), never as its own unit (checked at forward); under
    ZeRO-3, call `register_head_for_zero3()` before `deepspeed.initialize`, so DeepSpeed gathers
    the head once per forward/backward of the wrapper (checked at forward).
    """

    def __init__(self, model: nn.Module, loss: NTPLoss | SFTMixLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def register_head_for_zero3(self) -> None:
        """Make DeepSpeed ZeRO-3 gather the LM head for the wrapper's whole forward/backward."""
        from deepspeed.runtime.zero import register_external_parameter

        head = self._raw_head()
        inner = [name for name, _ in head.named_children()]
        if inner:
            raise ValueError(
                f"under DeepSpeed ZeRO-3 the LM head must be a plain linear layer, but "
                f"{type(head).__name__} calls submodules ({', '.join(inner[:4])}): the loss "
                "calls the head once per chunk, a number that differs across ranks, and "
                "DeepSpeed rejects ranks whose module calls differ. A LoRA adapter on the "
                "head is the usual cause: leave it out of train.lora.target_modules, or train "
                "with train.strategy=fsdp or deepspeed_stage=2"
            )
        for param in head.parameters():
            register_external_parameter(self, param)

    def _raw_head(self) -> nn.Module:
        """The model's LM head module, as `get_output_embeddings()` returns it."""
        get_head = getattr(self.model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if not isinstance(head, nn.Module):
            raise TypeError(f"{type(self.model).__name__} has no output embeddings (LM head)")
        return head

    def _check_head_gathering(self, head: nn.Module) -> bool:
        """Raise if a strategy would gather the head once per chunk (a hang across ranks);
        return whether DeepSpeed ZeRO-3 partitions it (then it is gathered with the wrapper)."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(head, FSDPModule):
            raise RuntimeError(
                "the LM head is its own FSDP unit; the chunked loss calls it a data-dependent "
                "number of times per rank, which desynchronizes FSDP's all-gathers. Shard it "
                "with the root: fully_shard(CausalLMWithLoss) and not fully_shard(lm_head)"
            )
        external = getattr(self, "_external_params", {})
        partitioned = False
        for param in head.parameters():
            if hasattr(param, "ds_id") and id(param) not in external:
                raise RuntimeError(
                    "the LM head is partitioned by DeepSpeed ZeRO-3 but not registered with the "
                    "wrapper; call CausalLMWithLoss.register_head_for_zero3() before "
                    "deepspeed.initialize, or ranks with different token counts will hang"
                )
            partitioned = partitioned or hasattr(param, "ds_id")
        return partitioned

    def decoder(self) -> nn.Module:
        """The decoder body: embeddings, layers and final norm, without the LM head."""
        get_decoder = getattr(self.model, "get_decoder", None)
        body = get_decoder() if callable(get_decoder) else None
        if body is None:
            body = getattr(self.model, "base_model", None)
        if not isinstance(body, nn.Module) or body is self.model:
            raise TypeError(f"{type(self.model).__name__} exposes no decoder body (get_decoder)")
        return body

    def output_head(self) -> nn.Module:
        """The LM head module (`get_output_embeddings()`), plus any logit scaling/capping."""
        head = self._raw_head()
        # Under ZeRO-3 the head is called without its module hooks: DeepSpeed records every
        # submodule call of the first step and, at the second, checks that all ranks made the
        # same calls; the loss calls the head once per chunk, a number that follows each rank's
        # data, so ranks with different token counts failed there ("Detected a disagreement
        # on list length"). The wrapper's own hooks gather the head's weight (registered as
        # its external parameter), so the head's hooks have nothing to add.
        zero3 = self._check_head_gathering(head)
        scale, softcap = _logit_transform(self.model)
        if scale != 1.0 or softcap is not None or zero3:
            return _HeadCall(head, scale, softcap, hooks=not zero3)
        return head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        labels: Tensor | OnHost,
        lam: Tensor | OnHost | None = None,
        normalizers: Tensor | None = None,
        loss: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return `(loss, metrics)` for one batch.

        `labels` and `lam` on the host (`OnHost` in training) keep the losses free of device
        syncs.
        `loss` overrides the training loss for this call (e.g. NTP for held-out evaluation),
        still inside this module's forward so sharded weights are gathered.
        """
        if isinstance(labels, OnHost):
            labels = labels.tensor
        if isinstance(lam, OnHost):
            lam = lam.tensor
        head = self.output_head()  # checks how the head is sharded before any collective
        outputs = self.decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        loss_fn = self.loss if loss is None else loss
        return loss_fn(hidden, labels, head, lam=lam, normalizers=normalizers)
