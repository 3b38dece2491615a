"""GroCo (learning by sorting): every view is the anchor in turn; the first ``n_pos_views`` views
are the positives. Projector (RegularProjection): [Linear(no bias) - BN - ReLU] x 2, then
Linear(bias, bias frozen) - BN(affine=False). Optimiser: plain SGD (no LARS), see the presets.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fastssl.losses import GroCoLoss
from fastssl.methods.base import Method, SSLNet, build_mlp


class GroCo(Method):
    name = "groco"
    defaults = {"topk_neg": 10, "steepness": 1.0, "n_pos_views": None}
    default_heads = {"projector": [2048, 2048, 2048], "bn": True}
    max_views = None

    def build_model(self, backbone, feat_dim):
        h = self.heads
        projector = build_mlp(
            [feat_dim] + list(h["projector"]),
            bias=False,
            bn=h["bn"],
            last_bn=True,
            last_bn_affine=False,
            last_bias=True,
        )
        last_linear = [m for m in projector.modules() if isinstance(m, nn.Linear)][-1]
        if last_linear.bias is not None:
            last_linear.bias.requires_grad_(False)   # upstream freezes the last bias
        return SSLNet(backbone, projector)

    def build_criterion(self):
        a = self.args
        return GroCoLoss(
            topk_neg=a["topk_neg"],
            steepness=a["steepness"],
            n_pos_views=a["n_pos_views"],
            gather_distributed=self.gather_distributed,
        )

    def compute_loss(self, model, views, index, ctx):
        z = model(views)["z"]
        # GroCo computes its loss in float32, outside autocast (upstream casts with .float()).
        with torch.autocast(z[0].device.type, enabled=False):
            return self.criterion([v.float() for v in z])
