"""nn.Module wrappers of the sphere family (stateless: hyperparameters only)."""
from __future__ import annotations

import torch

from fastssl import functional
from fastssl._validation import check_flag, check_nonnegative, check_positive, check_weights


class SFRIKLoss(torch.nn.Module):
    """SFRIK as a module: sim_coeff * mse(x, y) + mmd_coeff * (mmd(x) + mmd(y)) / 2
    on the normalised views; see :func:`fastssl.functional.sfrik`.

    Args:
        weights: non-empty sequence of finite floats (Gegenbauer weights, degree 1..K).
        sim_coeff, mmd_coeff: finite floats >= 0.
        gather_distributed: bool, as in the functional loss (gather across ranks, global-batch
            value, DDP-exact gradient).

    ``forward(z1, z2)``: (B, D) raw embeddings, D >= 2. Returns a 0-dim float32 tensor
    (float64 for float64).

    Example::

        >>> loss = fastssl.losses.SFRIKLoss(weights=(1.0, 40.0, 40.0))(z1, z2)
    """

    def __init__(self, weights=(1.0, 40.0, 40.0), sim_coeff=4000.0, mmd_coeff=1.0,
                 gather_distributed=False):
        super().__init__()
        self.weights = check_weights("weights", weights)
        self.sim_coeff = check_nonnegative("sim_coeff", sim_coeff)
        self.mmd_coeff = check_nonnegative("mmd_coeff", mmd_coeff)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return functional.sfrik(z1, z2, weights=self.weights, sim_coeff=self.sim_coeff,
                       mmd_coeff=self.mmd_coeff, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, sim_coeff={self.sim_coeff}, mmd_coeff={self.mmd_coeff}, "
                f"gather_distributed={self.gather_distributed}")


class AUHLoss(torch.nn.Module):
    """Alignment & uniformity as a module: sim_coeff * mse + unif_coeff * the mean over
    the two views of the log Gaussian potential; see :func:`fastssl.functional.auh`.

    Args:
        sim_coeff, unif_coeff: finite floats >= 0. scale: float > 0.
        gather_distributed: bool, as in the functional loss (gather across ranks, global-batch
            value, DDP-exact gradient).

    ``forward(z1, z2)``: (B, D) raw embeddings. Returns a 0-dim float32 tensor (float64 for
    float64).

    Example::

        >>> loss = fastssl.losses.AUHLoss(scale=2.5)(z1, z2)
    """

    def __init__(self, sim_coeff=3000.0, unif_coeff=1.0, scale=2.5, gather_distributed=False):
        super().__init__()
        self.sim_coeff = check_nonnegative("sim_coeff", sim_coeff)
        self.unif_coeff = check_nonnegative("unif_coeff", unif_coeff)
        self.scale = check_positive("scale", scale)
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return functional.auh(z1, z2, sim_coeff=self.sim_coeff, unif_coeff=self.unif_coeff,
                     scale=self.scale, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"sim_coeff={self.sim_coeff}, unif_coeff={self.unif_coeff}, scale={self.scale}, "
                f"gather_distributed={self.gather_distributed}")
