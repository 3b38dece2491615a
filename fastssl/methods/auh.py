"""AUH (alignment & uniformity, as in the SFRIK repository): same projector as SFRIK."""
from __future__ import annotations

from fastssl.losses import AUHLoss
from fastssl.methods.base import Method, SSLNet, build_mlp


class AUH(Method):
    name = "auh"
    defaults = {"sim_coeff": 3000.0, "unif_coeff": 1.0, "scale": 2.5}
    default_heads = {"projector": [8192, 8192, 8192], "bn": True}

    def build_model(self, backbone, feat_dim):
        h = self.heads
        return SSLNet(
            backbone,
            build_mlp([feat_dim] + list(h["projector"]), bias=True, bn=h["bn"], last_bias=False),
        )

    def build_criterion(self):
        a = self.args
        return AUHLoss(sim_coeff=a["sim_coeff"], unif_coeff=a["unif_coeff"], scale=a["scale"],
                       gather_distributed=self.gather_distributed)

    def compute_loss(self, model, views, index, ctx):
        z = model(views)["z"]
        return self.criterion(z[0], z[1])
