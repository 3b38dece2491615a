"""Projector / predictor MLPs: Linear -> BN -> ReLU stacks.

Examples (the upstream heads):
  SwAV projector        MLP([2048, 2048, 128])
  SimCLR / SogCLR       MLP([2048, 2048, 128], bias=False, last_bn=True, last_bn_affine=False)
  SCE projector         MLP([2048, 4096, 4096, 256], bias=False, last_bn=True, last_bn_affine=False)
  SCE predictor         MLP([256, 4096, 256], bias=False)
  GroCo projector       MLP([2048, 2048, 2048, 2048], bias=False, last_bias=True, last_bn=True,
                            last_bn_affine=False)  (the trainer freezes the last bias)
  VICReg-style (SFRIK)  MLP([2048, 8192, 8192, 8192], last_bias=False)
"""
from __future__ import annotations

from torch import nn

__all__ = ["MLP"]


def MLP(dims: list[int], *, bias: bool = True, bn: bool = True, last_bn: bool = False,
        last_bn_affine: bool = True, last_bias: bool | None = None) -> nn.Sequential:
    """Linear layers of widths ``dims[0] -> dims[1] -> ... -> dims[-1]``.

    Every hidden Linear is followed by BatchNorm1d (if ``bn``) and ReLU; the last Linear is
    followed by BatchNorm1d(affine=last_bn_affine) only if ``last_bn``. ``bias`` is the bias of the
    hidden Linears; ``last_bias`` that of the last one (None: same as ``bias``).
    """
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__len__"):
        raise TypeError(f"dims: expected a list of ints, got {type(dims).__name__}")
    dims = list(dims)
    if len(dims) < 2:
        raise ValueError(f"dims: expected at least 2 widths (input and output), got {dims}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"dims: expected positive ints, got {dims}")
    last_bias = bias if last_bias is None else last_bias
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        if bn:
            layers.append(nn.BatchNorm1d(dims[i + 1]))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
    return nn.Sequential(*layers)
