"""DINO: self-distillation with no labels (Caron et al. 2021), with DINOv2's options.

Student = backbone + DINO head (MLP -> L2 norm -> weight-normalised last layer onto K
prototypes) on every crop; teacher = an EMA copy of the student on the global crops only (the
first ``n_global_crops`` views of the crop recipe). The loss (:class:`fastssl.losses.DINOLoss`)
is the cross-entropy between the teacher's centred, sharpened softmax of each global crop and the
student's softmax of every other crop; the centre is an EMA (``center_momentum``) of the teacher's
batch means, or ``centering="sinkhorn_knopp"`` makes the targets by Sinkhorn-Knopp as DINOv2.
``koleo_weight`` > 0 adds DINOv2's KoLeo regulariser on the student's backbone features of each
global crop (summed over those crops, as DINOv2 sums it over its global crops).

The upstream training loop (facebookresearch/dino, main_dino.py) in the per-step hooks:

* teacher temperature: linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over
  ``warmup_teacher_temp_epochs`` epochs (inside the loss module, by epoch);
* after the backward: each parameter's gradient clipped to norm ``clip_grad`` (per parameter, as
  upstream's clip_gradients; 0 turns it off), then the last layer's gradient dropped during the
  first ``freeze_last_layer_epochs`` epochs, then ``weight_decay`` added to the gradient of the
  weights only (biases and norm parameters are not decayed, upstream's parameter groups), so
  the trainer's own weight decay stays 0 in the DINO presets. Under ``--amp fp16`` these act on
  the GradScaler's scaled gradients: use bf16 or float32 with clip_grad or weight_decay;
* after the optimiser step: teacher = m * teacher + (1 - m) * student over the parameters, with
  m rising from ``base_momentum`` to 1 on upstream's cosine (``dino_momentum``).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from fastssl.losses import DINOLoss, KoLeoLoss
from fastssl.methods.base import Method, ema_update, multicrop_features
from fastssl.models.dino_head import DINOHead


def dino_momentum(step: int, *, total_steps: int, base_momentum: float) -> float:
    """Upstream's teacher momentum at iteration ``step`` of ``total_steps``:
    1 - (1 - m0) * (1 + cos(pi * step / total_steps)) / 2 (m0 at step 0, towards 1)."""
    if total_steps <= 0:
        return base_momentum
    t = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base_momentum) * (1.0 + math.cos(math.pi * t)) / 2.0


class DINONet(nn.Module):
    """Backbone + DINO head. ``forward(views)`` returns ``{"scores": [...], "feats": [...]}``,
    per view the head's logits (B, K) and the backbone's pooled features (B, D). Views of one
    resolution share one backbone call (multi-crop batching); the head runs once on all views."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views):
        feats = multicrop_features(self.backbone, views)
        batch = views[0].shape[0]
        return {"scores": list(self.head(feats).split(batch)), "feats": list(feats.split(batch))}


class DINO(Method):
    name = "dino"
    # The ResNet-50 recipe of DINO's README (the 100-epoch SGD run); DINOv2's choices are
    # centering="sinkhorn_knopp" and koleo_weight=0.1.
    defaults = {"n_prototypes": 65536, "norm_last_layer": True, "n_global_crops": 2,
                "student_temp": 0.1, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
                "warmup_teacher_temp_epochs": 0, "center_momentum": 0.9, "centering": "softmax",
                "sinkhorn_iterations": 3, "base_momentum": 0.996, "freeze_last_layer_epochs": 1,
                "clip_grad": 3.0, "weight_decay": 1e-4, "koleo_weight": 0.0}
    # hidden widths of the head's MLP, the last one the bottleneck; no BN (use_bn_in_head False)
    default_heads = {"projector": [2048, 2048, 256], "bn": False}
    min_views = 3
    max_views = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        a = self.args
        for key in ("n_global_crops", "freeze_last_layer_epochs", "warmup_teacher_temp_epochs"):
            if isinstance(a[key], bool) or not isinstance(a[key], int) or a[key] < 0:
                raise ValueError(f"dino: {key} must be an integer >= 0, got {a[key]!r}")
        if a["n_global_crops"] < 1:
            raise ValueError(f"dino: n_global_crops must be >= 1, got {a['n_global_crops']}")
        for key in ("clip_grad", "weight_decay", "koleo_weight"):
            if not (isinstance(a[key], (int, float)) and math.isfinite(a[key]) and a[key] >= 0):
                raise ValueError(f"dino: {key} must be a finite number >= 0, got {a[key]!r}")
        if not 0.0 <= a["base_momentum"] <= 1.0:
            raise ValueError(f"dino: base_momentum must be in [0, 1], got {a['base_momentum']!r}")
        self.min_views = a["n_global_crops"] + 1
        self.koleo = KoLeoLoss(gather_distributed=self.gather_distributed)
        # the teacher starts as the student's copy and is never optimised
        self.momentum_model = copy.deepcopy(self.model)
        for p in self.momentum_model.parameters():
            p.requires_grad_(False)
        self.current_momentum = a["base_momentum"]

    def build_model(self, backbone, feat_dim):
        head = DINOHead(feat_dim, self.args["n_prototypes"], list(self.heads["projector"]),
                        use_bn=self.heads["bn"], norm_last_layer=self.args["norm_last_layer"])
        return DINONet(backbone, head)

    def build_criterion(self):
        a = self.args
        return DINOLoss(a["n_prototypes"], student_temp=a["student_temp"],
                        teacher_temp=a["teacher_temp"],
                        warmup_teacher_temp=a["warmup_teacher_temp"],
                        warmup_teacher_temp_epochs=a["warmup_teacher_temp_epochs"],
                        center_momentum=a["center_momentum"], centering=a["centering"],
                        sinkhorn_iterations=a["sinkhorn_iterations"],
                        gather_distributed=self.gather_distributed)

    def compute_loss(self, model, views, index, ctx):
        n_global = self.args["n_global_crops"]
        out = model(views)
        with torch.no_grad():
            teacher = self.momentum_model(views[:n_global])["scores"]
        # the targets' softmax at teacher_temp 0.04 wants float32 logits: loss outside autocast
        student = [s.float() for s in out["scores"]]
        teacher = [t.float() for t in teacher]
        with torch.autocast(student[0].device.type, enabled=False):
            loss = self.criterion(student, teacher, epoch=ctx.epoch)
            if self.args["koleo_weight"] > 0:
                koleo = sum(self.koleo(f.float()) for f in out["feats"][:n_global])
                loss = loss + self.args["koleo_weight"] * koleo
        return loss

    def after_backward(self, ctx):
        a = self.args
        params = [p for p in self.model.parameters() if p.grad is not None]
        if a["clip_grad"] > 0 and params:
            # per parameter, as upstream: g *= min(1, clip / (|g| + 1e-6)), without a host sync
            norms = torch._foreach_norm([p.grad for p in params])
            scale = [torch.clamp(a["clip_grad"] / (n + 1e-6), max=1.0) for n in norms]
            torch._foreach_mul_([p.grad for p in params], scale)
        if ctx.epoch < a["freeze_last_layer_epochs"]:
            for p in self.model.head.last_layer.parameters():
                p.grad = None
        decayed = [p for p in self.model.parameters() if p.grad is not None and p.ndim > 1]
        if a["weight_decay"] > 0 and decayed:
            torch._foreach_add_([p.grad for p in decayed], decayed, alpha=a["weight_decay"])

    def after_step(self, ctx):
        self.current_momentum = dino_momentum(ctx.step, total_steps=ctx.total_steps,
                                              base_momentum=self.args["base_momentum"])
        ema_update(self.momentum_model, self.model, self.current_momentum)
