"""fastssl.methods: one small class per SSL method (heads, loss module, per-step hooks)."""
from fastssl.methods.base import Method, SSLNet, StepContext
from fastssl.methods.auh import AUH
from fastssl.methods.dino import DINO
from fastssl.methods.groco import GroCo
from fastssl.methods.sce import SCE
from fastssl.methods.sfrik import SFRIK
from fastssl.methods.simclr import SimCLR
from fastssl.methods.sogclr import SogCLR
from fastssl.methods.swav import SwAV

METHODS = {cls.name: cls for cls in (SimCLR, GroCo, SCE, SogCLR, SFRIK, SwAV, AUH, DINO)}


def build_method(name: str, backbone, feat_dim: int, **kwargs) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name](backbone, feat_dim, **kwargs)


__all__ = ["Method", "SSLNet", "StepContext", "METHODS", "build_method",
           "AUH", "DINO", "GroCo", "SCE", "SFRIK", "SimCLR", "SogCLR", "SwAV"]
