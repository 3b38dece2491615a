"""SwAV: projector -> L2 normalisation -> prototypes; swapped prediction with Sinkhorn codes.

Hooks: the prototypes are re-normalised before every step (explicit projection, as upstream);
their gradient is dropped for the first ``freeze_prototypes_iters`` iterations; the queue of
past embeddings (inside the loss module) is used from ``epoch_queue_starts`` on.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.losses import SwAVLoss
from fastssl.methods.base import Method, SSLNet, build_mlp
from fastssl import distributed as D


class SwAV(Method):
    name = "swav"
    defaults = {"temperature": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3, "n_assign_crops": 2,
                "n_prototypes": 3000, "queue_length": 0, "epoch_queue_starts": 15,
                "freeze_prototypes_iters": 313}
    default_heads = {"projector": [2048, 128], "bn": True}
    max_views = None
    loss_state_per_rank = True    # the queue is per rank, as upstream

    def build_model(self, backbone, feat_dim):
        h = self.heads
        proj = list(h["projector"])
        projector = build_mlp([feat_dim] + proj, bias=True, bn=h["bn"])
        prototypes = nn.Linear(proj[-1], self.args["n_prototypes"], bias=False)
        return SSLNet(backbone, projector, prototypes=prototypes)

    def queue_length(self) -> int:
        q = int(self.args["queue_length"])
        global_batch = self.batch_size
        if q and global_batch:
            q -= q % global_batch    # whole batches only, as upstream
        return q

    def build_criterion(self):
        # Before epoch_queue_starts the same loss runs without a queue; the queued module (whose
        # state is checkpointed) is first fed at that epoch, so it fills from there, as upstream.
        self.criterion_no_queue = self._loss(0)
        return self._loss(self.queue_length() // max(D.world_size(), 1))

    def _loss(self, queue_length):
        a = self.args
        return SwAVLoss(
            temperature=a["temperature"],
            epsilon=a["epsilon"],
            sinkhorn_iterations=a["sinkhorn_iterations"],
            n_assign_crops=a["n_assign_crops"],
            queue_length=queue_length,
            gather_distributed=self.gather_distributed,
        )

    def before_step(self, ctx):
        with torch.no_grad():
            w = self.model.prototypes.weight
            w.copy_(F.normalize(w, dim=1, p=2))

    def compute_loss(self, model, views, index, ctx):
        out = model(views)
        # Sinkhorn's exp(s / eps) needs float32 scores: loss outside autocast.
        scores = [s.float() for s in out["scores"]]
        use_queue = self.queue_length() > 0 and ctx.epoch >= self.args["epoch_queue_starts"]
        with torch.autocast(scores[0].device.type, enabled=False):
            if not use_queue:
                return self.criterion_no_queue(scores)
            # The queue stores normalised embeddings and rescores them with the current prototypes.
            return self.criterion(scores, embeddings=out["embeddings"].detach(),
                                  prototypes=self.model.prototypes.weight.detach().float())

    def after_backward(self, ctx):
        if ctx.step < self.args["freeze_prototypes_iters"]:
            self.model.prototypes.weight.grad = None
