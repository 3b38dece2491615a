"""SCE: online branch (backbone, projector, predictor) against an EMA target (backbone, projector);
symmetric two-crop loss with a queue of target keys inside the loss module.

Both directions go through the loss in one call: q = [q_2; q_1] against k = [k_1; k_2] gives the
mean of the two terms (upstream's sum / 2) and enqueues both crops' keys once, as upstream
enqueues cat(k_global_1, k_global_2) after the step.
"""
from __future__ import annotations

import torch

from fastssl.losses import SCELoss
from fastssl.methods.base import Method, SSLNet, build_mlp, ema_update, make_momentum_copy
from fastssl.optim import cosine_momentum


class SCE(Method):
    name = "sce"
    defaults = {"queue_size": 65536, "coeff": 0.5, "temperature": 0.1, "temperature_m": 0.07,
                "use_keys": False, "base_momentum": 0.99}
    default_heads = {"projector": [4096, 4096, 256], "predictor": [4096, 256], "bn": True}

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.momentum_model = make_momentum_copy(self.model)
        self.current_momentum = self.args["base_momentum"]

    def build_model(self, backbone, feat_dim):
        h = self.heads
        proj = list(h["projector"])
        projector = build_mlp(
            [feat_dim] + proj, bias=False, bn=h["bn"], last_bn=True, last_bn_affine=False
        )
        predictor = build_mlp([proj[-1]] + list(h["predictor"]), bias=False, bn=h["bn"])
        return SSLNet(backbone, projector, predictor)

    def build_criterion(self):
        a = self.args
        return SCELoss(self.heads["projector"][-1], queue_size=a["queue_size"], coeff=a["coeff"],
                       temperature=a["temperature"], temperature_m=a["temperature_m"],
                       use_keys=a["use_keys"], gather_distributed=self.gather_distributed)

    def compute_loss(self, model, views, index, ctx):
        q = model(views)["p"]
        with torch.no_grad():
            k = self.momentum_model(views)["z"]
        return self.criterion(torch.cat([q[1], q[0]]), torch.cat([k[0], k[1]]).detach())

    def after_step(self, ctx):
        # The momentum used after step t follows the cosine schedule from m0 towards 1.
        self.current_momentum = cosine_momentum(ctx.step, total_steps=ctx.total_steps,
                                                base_momentum=self.args["base_momentum"])
        ema_update(self.momentum_model, self.model, self.current_momentum)
