"""nn.Module wrappers of the sphere family (stateless: hyperparameters only)."""
from __future__ import annotations

import torch

from fastssl import functional as F
from fastssl._validation import check_nonnegative, check_positive, check_weights


class SFRIKLoss(torch.nn.Module):
    """SFRIK: sim_coeff * mse(x, y) + mmd_coeff * (mmd(x) + mmd(y)) / 2 on normalised x, y."""

    def __init__(self, weights=(1.0, 40.0, 40.0), sim_coeff=4000.0, mmd_coeff=1.0,
                 gather_distributed=False):
        super().__init__()
        self.weights = check_weights("weights", weights)
        self.sim_coeff = check_nonnegative("sim_coeff", sim_coeff)
        self.mmd_coeff = check_nonnegative("mmd_coeff", mmd_coeff)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return F.sfrik(z1, z2, weights=self.weights, sim_coeff=self.sim_coeff,
                       mmd_coeff=self.mmd_coeff, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"weights={self.weights}, sim_coeff={self.sim_coeff}, mmd_coeff={self.mmd_coeff}, "
                f"gather_distributed={self.gather_distributed}")


class AUHLoss(torch.nn.Module):
    """Alignment & uniformity: sim_coeff * mse + unif_coeff * mean over views of log-potential."""

    def __init__(self, sim_coeff=3000.0, unif_coeff=1.0, scale=2.5, gather_distributed=False):
        super().__init__()
        self.sim_coeff = check_nonnegative("sim_coeff", sim_coeff)
        self.unif_coeff = check_nonnegative("unif_coeff", unif_coeff)
        self.scale = check_positive("scale", scale)
        self.gather_distributed = bool(gather_distributed)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return F.auh(z1, z2, sim_coeff=self.sim_coeff, unif_coeff=self.unif_coeff,
                     scale=self.scale, gather_distributed=self.gather_distributed)

    def extra_repr(self) -> str:
        return (f"sim_coeff={self.sim_coeff}, unif_coeff={self.unif_coeff}, scale={self.scale}, "
                f"gather_distributed={self.gather_distributed}")
