"""Drop-in for open_clip's ``ClipLoss`` (open_clip_torch 3.3.0): ``from
fastssl.compat.open_clip import ClipLoss`` instead of ``from open_clip.loss import ClipLoss``."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastssl import distributed as dist_utils
from fastssl import functional

__all__ = ["ClipLoss"]


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class ClipLoss(nn.Module):
    """open_clip 3.3.0's ``ClipLoss(local_loss=False, gather_with_grad=False,
    cache_labels=False, rank=0, world_size=1, use_horovod=False)``, ``forward(image_features,
    text_features, logit_scale, logit_bias=None, output_dict=False)``: the symmetric
    cross-entropy of ``logit_scale * image_features @ text_features.T`` against the diagonal,
    on :func:`fastssl.functional.info_nce` (``symmetric=True, normalize=False``,
    ``temperature = 1 / logit_scale``; no N x N matrix). The features are used as given (the
    open_clip model normalises them); ``logit_scale`` is the multiplier (the model's
    ``logit_scale.exp()``), a float or a 0-dim (or one-element) tensor, whose gradient is
    exact. Returns a 0-dim tensor, or ``{"contrastive_loss": loss}`` with ``output_dict``.

    With ``world_size > 1`` (torch.distributed initialised with that world size and rank), as
    open_clip after DDP's gradient average:

    * ``gather_with_grad=True``: the loss over the global batch (``local_loss=False``, the
      same value on every rank) or each rank's rows against every rank's columns
      (``local_loss=True``, a per-rank value); the parameters get the exact global gradient.
    * ``gather_with_grad=False, local_loss=False``: the global value, the features' gradient
      only through the rank's own features, as open_clip (1/W of the exact gradient after
      DDP's average); ``logit_scale``'s gradient after the average is the exact one, as
      open_clip's.

    ``cache_labels`` has no effect (no labels are built). ``logit_bias`` (a scalar, open_clip's
    argument for SigLIP-style models) shifts every logit alike, which the cross-entropy
    ignores: its gradient is 0, as open_clip's.

    Refused (``ValueError`` at construction): ``use_horovod=True`` (fastssl gathers with
    torch.distributed only) and ``local_loss=True, gather_with_grad=False`` with
    ``world_size > 1`` (the gradient would miss every other rank's terms: use
    ``gather_with_grad=True``).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod: fastssl.compat.open_clip.ClipLoss gathers with "
                             "torch.distributed only; use use_horovod=False (torchrun/DDP)")
        if world_size > 1 and local_loss and not gather_with_grad:
            raise ValueError("local_loss=True with gather_with_grad=False: not supported (each "
                             "rank's gradient misses the other ranks' terms); use "
                             "gather_with_grad=True, which gives the exact gradient")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        # open_clip's cache state (unused: no labels are built)
        self.prev_num_logits = 0
        self.labels = {}

    def _check_process_group(self) -> None:
        if not dist_utils.is_distributed():
            raise ValueError(f"world_size: {self.world_size} given, but torch.distributed is "
                             "not initialised with more than one process")
        if dist_utils.world_size() != self.world_size or dist_utils.rank() != self.rank:
            raise ValueError(f"rank, world_size: ({self.rank}, {self.world_size}) given, but "
                             f"torch.distributed has rank {dist_utils.rank()} of "
                             f"{dist_utils.world_size()}")

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        if isinstance(logit_scale, Tensor):
            if logit_scale.numel() != 1:
                raise ValueError(f"logit_scale: expected a scalar, got shape "
                                 f"{tuple(logit_scale.shape)}")
            temperature = 1.0 / logit_scale.reshape(())
        elif isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
            if logit_scale <= 0:
                raise ValueError(f"logit_scale: expected a value > 0, got {logit_scale}")
            temperature = 1.0 / float(logit_scale)
        else:
            raise TypeError(f"logit_scale: expected a float or a scalar tensor, got "
                            f"{type(logit_scale).__name__}")
        gather = self.world_size > 1
        if gather:
            self._check_process_group()
        if gather and not self.gather_with_grad:
            # open_clip: the other ranks' features come without gradient, so each rank's
            # feature gradient is its own part only, 1/W of the exact one fastssl gives
            w = 1.0 / self.world_size
            image_features = _ScaleGrad.apply(image_features, w)
            text_features = _ScaleGrad.apply(text_features, w)
        if gather and self.local_loss:
            with dist_utils.per_rank_values():
                loss = functional.info_nce(image_features, text_features, temperature,
                                           symmetric=True, normalize=False,
                                           gather_distributed=True)
        else:
            loss = functional.info_nce(image_features, text_features, temperature,
                                       symmetric=True, normalize=False,
                                       gather_distributed=gather)
        if logit_bias is not None:
            if isinstance(logit_bias, Tensor):
                if logit_bias.numel() != 1:
                    raise ValueError(f"logit_bias: expected a scalar, got shape "
                                     f"{tuple(logit_bias.shape)}")
                loss = loss + 0.0 * logit_bias.reshape(()).to(loss.dtype)  # its zero gradient
            elif not isinstance(logit_bias, (int, float)) or isinstance(logit_bias, bool):
                raise TypeError(f"logit_bias: expected a float, a scalar tensor or None, got "
                                f"{type(logit_bias).__name__}")
        return {"contrastive_loss": loss} if output_dict else loss
