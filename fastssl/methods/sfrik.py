"""SFRIK: sim_coeff * MSE + MMD with the Gegenbauer kernel. Projector (valeoai/sfrik
``Projector``): Linear(bias) - BN - ReLU per hidden layer, last Linear without bias, no last BN."""
from __future__ import annotations

from fastssl.losses import SFRIKLoss
from fastssl.methods.base import Method, SSLNet, build_mlp


class SFRIK(Method):
    name = "sfrik"
    defaults = {"weights": (1.0, 40.0, 40.0), "sim_coeff": 4000.0, "mmd_coeff": 1.0}
    default_heads = {"projector": [8192, 8192, 32768], "bn": True}

    def build_model(self, backbone, feat_dim):
        h = self.heads
        return SSLNet(
            backbone,
            build_mlp([feat_dim] + list(h["projector"]), bias=True, bn=h["bn"], last_bias=False),
        )

    def build_criterion(self):
        a = self.args
        return SFRIKLoss(
            weights=tuple(a["weights"]),
            sim_coeff=a["sim_coeff"],
            mmd_coeff=a["mmd_coeff"],
            gather_distributed=self.gather_distributed,
        )

    def compute_loss(self, model, views, index, ctx):
        z = model(views)["z"]
        return self.criterion(z[0], z[1])
