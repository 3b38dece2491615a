"""DINO's projection head: an MLP to a bottleneck, L2 normalisation, then a weight-normalised
linear layer onto K prototypes (Caron et al. 2021, section 3.1 and appendix).

    DINOHead(2048, 65536)   # ResNet-50 recipe: 2048 -> 2048 -> 2048 -> 256, GELU, no BN,
                            # last layer 256 -> 65536 with weight norm, its norm g fixed at 1

The last layer is ``W = g * V / ||V||`` row by row (weight normalisation); with
``norm_last_layer`` g stays 1 (no gradient), so every prototype has unit norm and the logits are
cosines. Without it g is learned (less stable, as the DINO paper notes).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation per output row: ``W = g * v / ||v||``.

    Parameters ``weight_v`` (out, in) and ``weight_g`` (out, 1), g initialised to 1;
    ``learn_norm=False`` keeps g at 1 (requires_grad False), DINO's ``norm_last_layer``.
    """

    def __init__(self, in_features: int, out_features: int, *, learn_norm: bool = False):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=learn_norm)
        # nn.Linear's default initialisation of v (the direction is what matters)
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def weight(self) -> torch.Tensor:
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"learn_norm={self.weight_g.requires_grad}")


class DINOHead(nn.Module):
    """``mlp`` (Linear [-> BN] -> GELU, ..., Linear to ``bottleneck_dim``) -> L2 normalise ->
    ``last_layer`` (WeightNormLinear onto ``out_dim`` prototypes).

    ``hidden`` lists the widths after the input: ``[2048, 2048, 256]`` is DINO's 3-layer head
    (hidden 2048, bottleneck 256). The MLP's Linear weights are drawn from a normal of std 0.02
    truncated at +-2 (absolute), biases 0, as upstream.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden=(2048, 2048, 256), *, use_bn: bool = False,
                 norm_last_layer: bool = True):
        super().__init__()
        widths = [in_dim] + list(hidden)
        if len(widths) < 2 or any(isinstance(w, bool) or not isinstance(w, int) or w < 1
                                  for w in widths):
            raise ValueError(f"hidden: expected a non-empty list of positive ints after in_dim "
                             f"{in_dim!r}, got {list(hidden)!r}")
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(widths[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(widths[-1], out_dim, learn_norm=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # normalised in float32: the bottleneck's norm under bf16 autocast loses digits
        x = F.normalize(x.float(), dim=-1).to(x.dtype)
        return self.last_layer(x)
