"""SimCLR: NT-Xent between two views (SFRIK repository's baseline: projector with biases,
BN + ReLU in the hidden layers, last Linear without bias)."""
from __future__ import annotations

from fastssl.losses import NTXentLoss
from fastssl.methods.base import Method, SSLNet, build_mlp


class SimCLR(Method):
    name = "simclr"
    defaults = {"temperature": 0.15}
    default_heads = {"projector": [2048, 128], "bn": True}

    def build_model(self, backbone, feat_dim):
        h = self.heads
        return SSLNet(
            backbone,
            build_mlp([feat_dim] + list(h["projector"]), bias=True, bn=h["bn"], last_bias=False),
        )

    def build_criterion(self):
        return NTXentLoss(
            temperature=self.args["temperature"], gather_distributed=self.gather_distributed
        )

    def compute_loss(self, model, views, index, ctx):
        z = model(views)["z"]
        return self.criterion(z[0], z[1])
