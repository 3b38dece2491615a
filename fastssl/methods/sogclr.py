"""SogCLR: the GCL objective with the per-sample moving average u over the whole dataset.

u lives in the loss module (a buffer of size ``num_samples``, the loader's dataset size) and is
indexed by ``batch.index`` (global sample indices). Projector (SogCLR ``_build_mlp``):
Linear(no bias) - BN - ReLU - Linear(no bias) - BN(affine=False).
"""
from __future__ import annotations

from fastssl.losses import SogCLRLoss
from fastssl.methods.base import Method, SSLNet, build_mlp


class SogCLR(Method):
    name = "sogclr"
    defaults = {"gamma": 0.9, "temperature": 0.1}
    default_heads = {"projector": [2048, 128], "bn": True}

    def build_model(self, backbone, feat_dim):
        h = self.heads
        return SSLNet(backbone, build_mlp([feat_dim] + list(h["projector"]), bias=False, bn=h["bn"],
                                          last_bn=True, last_bn_affine=False))

    def build_criterion(self):
        if self.num_samples <= 0:
            raise ValueError("sogclr: needs the dataset size (num_samples > 0) for its u estimator")
        return SogCLRLoss(
            self.num_samples,
            gamma=self.args["gamma"],
            temperature=self.args["temperature"],
            gather_distributed=self.gather_distributed,
        )

    def compute_loss(self, model, views, index, ctx):
        z = model(views)["z"]
        return self.criterion(z[0], z[1], index)
