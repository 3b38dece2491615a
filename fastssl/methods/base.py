"""The pieces every method shares: the network (backbone + heads) and the Method interface.

A Method owns
* ``model``: an :class:`SSLNet` (backbone + projector [+ predictor] [+ prototypes]); the trainer
  wraps it in DDP and optimises its parameters;
* ``criterion``: its loss module from :mod:`fastssl.losses` (kept outside DDP so its state
  buffers, queues and u, are not broadcast every step; every rank updates them identically);
* ``momentum_model``: an EMA copy for momentum methods (SCE), else None;
and per-step hooks the trainer calls in this order:
``before_step`` -> ``compute_loss`` -> backward -> ``after_backward`` -> optimiser step ->
``after_step``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.models import MLP


def build_mlp(
    dims, *, bias=True, bn=True, last_bn=False, last_bn_affine=True, last_bias=None
) -> nn.Module:
    return MLP(list(dims), bias=bias, bn=bn, last_bn=last_bn and bn, last_bn_affine=last_bn_affine,
               last_bias=last_bias)


def _resolution_groups(views):
    """Index ranges of consecutive views with the same (H, W): they share one backbone call."""
    groups, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


def multicrop_features(backbone: nn.Module, views) -> torch.Tensor:
    """The backbone's flattened features of every view, stacked in view order: crops of one
    resolution go through the backbone in one call (SwAV's and DINO's multi-crop batching)."""
    feats = []
    for start, end in _resolution_groups(views):
        x = views[start] if end - start == 1 else torch.cat(views[start:end])
        feats.append(backbone(x).flatten(1))
    return torch.cat(feats) if len(feats) > 1 else feats[0]


class SSLNet(nn.Module):
    """Backbone + heads. ``forward(views)`` returns a dict of per-view lists:
    ``z`` (projector outputs), and ``p`` (predictor outputs) / ``scores`` (prototype scores of
    the L2-normalised z) when the net has them.

    Crops of one resolution go through the backbone together (SwAV's multi-crop batching; BN
    statistics per resolution group); the heads run once on all views.
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        predictor: nn.Module | None = None,
        prototypes: nn.Module | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.prototypes = prototypes

    def forward(self, views):
        feats = multicrop_features(self.backbone, views)
        batch = views[0].shape[0]
        z = self.projector(feats)
        out = {"z": list(z.split(batch))}
        if self.predictor is not None:
            out["p"] = list(self.predictor(z).split(batch))
        if self.prototypes is not None:
            out["embeddings"] = F.normalize(z.float(), dim=1)
            out["scores"] = list(self.prototypes(out["embeddings"].to(z.dtype)).split(batch))
        return out


@dataclass
class StepContext:
    step: int            # global optimisation step (0-based) being taken
    epoch: int
    total_steps: int
    steps_per_epoch: int


class Method:
    name = "base"
    # Method hyperparameters and their defaults (the presets override them).
    defaults: dict = {}
    # Head widths after the backbone feature dim (the presets override them).
    default_heads: dict = {"projector": [2048, 128], "bn": True}
    min_views = 2
    max_views: int | None = 2
    # Whether the loss module's state differs per rank under DDP (SwAV's queue holds each rank's
    # own embeddings); then every rank's state is checkpointed and restored to its own rank.
    # The other states are identical on every rank (SCE's queue and SogCLR's u are updated
    # with the gathered batch), so rank 0's copy is enough.
    loss_state_per_rank = False

    def __init__(self, backbone: nn.Module, feat_dim: int, *, args: dict | None = None,
                 heads: dict | None = None, num_samples: int = 0, batch_size: int = 0,
                 gather_distributed: bool = False):
        unknown = set(args or {}) - set(self.defaults)
        if unknown:
            raise ValueError(f"{self.name}: unknown method argument(s) {sorted(unknown)}; "
                             f"known: {sorted(self.defaults)}")
        self.args = {**self.defaults, **(args or {})}
        self.heads = {**self.default_heads, **(heads or {})}
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.gather_distributed = gather_distributed
        self.feat_dim = feat_dim
        self.model = self.build_model(backbone, feat_dim)
        self.criterion = self.build_criterion()
        self.momentum_model: nn.Module | None = None

    # --- construction -------------------------------------------------------------------------
    def build_model(self, backbone: nn.Module, feat_dim: int) -> SSLNet:
        raise NotImplementedError

    def build_criterion(self) -> nn.Module:
        raise NotImplementedError

    def check_views(self, n_views: int) -> None:
        if n_views < self.min_views or (self.max_views is not None and n_views > self.max_views):
            want = (f"{self.min_views}" if self.max_views == self.min_views else
                    f"{self.min_views}..{self.max_views or 'any'}")
            raise ValueError(
                f"{self.name}: needs {want} views per image, the crop recipe gives {n_views}"
            )

    def to(self, device) -> "Method":
        self.model.to(device)
        self.criterion.to(device)
        if self.momentum_model is not None:
            self.momentum_model.to(device)
        return self

    # --- per-step hooks -----------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        pass

    def compute_loss(
        self, model: nn.Module, views, index: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        raise NotImplementedError

    def after_backward(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass

    # --- state beyond model/optimiser -------------------------------------------------------------
    def momentum_state(self):
        return None if self.momentum_model is None else self.momentum_model.state_dict()

    def load_momentum_state(self, state) -> None:
        if self.momentum_model is not None and state is not None:
            self.momentum_model.load_state_dict(state)


def make_momentum_copy(net: SSLNet) -> SSLNet:
    """The EMA target network: backbone + projector copied, no predictor, no gradient."""
    target = SSLNet(copy.deepcopy(net.backbone), copy.deepcopy(net.projector))
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_t = m * theta_t + (1 - m) * theta_o over parameters only (buffers are not averaged)."""
    online_params = dict(online.named_parameters())
    t_params, o_params = [], []
    for name, p in target.named_parameters():
        t_params.append(p)
        o_params.append(online_params[name].detach())
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
