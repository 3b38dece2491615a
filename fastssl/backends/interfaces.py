"""The kernel-level interface of each family: the methods every backend entry of
``fastssl.ops.<family>.TABLE`` implements, with these signatures (docs/design.md, "One
interface per family"). An entry that lacks a method does not define it (``choose(...,
method=...)`` then refuses that backend when it is forced); ``OPTIONAL`` lists the methods some
entries lack. ``tests/ops/test_backend_pattern.py`` checks every entry against its family's
interface: no method outside it, the same parameters, and every method not in ``OPTIONAL``.

The registered ops call these methods as ``TABLE[backend].method(...)``: no second dispatch by
backend name below the table.
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

Tensor = torch.Tensor


class ContrastiveKernels(Protocol):
    """Streaming log-sum-exp statistics of X = scale * a @ b.T (fastssl/ops/contrastive.py)."""

    def lse_forward(self, a: Tensor, b: Tensor, self_col: Tensor, pos_col: Tensor,
                    scale: float, split: int, exclude_pos: bool, weighted: bool,
                    col_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(lse0, lse1, wmean, col_lse) in the accumulation dtype."""

    def lse_backward(self, a: Tensor, b: Tensor, self_col: Tensor, pos_col: Tensor,
                     scale: float, split: int, exclude_pos: bool, lse0: Tensor, lse1: Tensor,
                     col_lse: Tensor, g0: Tensor, g1: Tensor, g_col: Tensor,
                     need_da: bool = True, need_db: bool = True
                     ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(da, db), recomputing the logits from the saved statistics."""

    def sce_forward(self, q: Tensor, k: Tensor, cols: Tensor, self_col: Tensor,
                    scale_s: float, scale_t: float) -> tuple[Tensor, Tensor, Tensor]:
        """SCE's (lse_s, lse_t, wmean)."""

    def sce_backward(self, q: Tensor, k: Tensor, cols: Tensor, self_col: Tensor,
                     scale_s: float, scale_t: float, lse_s: Tensor, lse_t: Tensor,
                     g_lse: Tensor, g_w: Tensor) -> Tensor:
        """dq, recomputed."""

    def lse_sum_forward(self, a: Tensor, b: Tensor, self_col: Tensor, pos_col: Tensor,
                        scale: float, exclude_pos: bool, subtract_pos: bool, need_da: bool,
                        need_db: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Same pass: (lse, pos, da, db, ce), the gradient of sum_i lse_i (minus the positive
        logits when subtract_pos) made with the value."""

    def sce_grad_forward(self, q: Tensor, k: Tensor, cols: Tensor, self_col: Tensor,
                         scale_s: float, scale_t: float
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Same pass: (lse_s, lse_t, wmean, u_s, u_t), u the per-row gradients in q."""

    def gram_lse_forward(self, z: Tensor, self_col: Tensor, pos_col: Tensor, scale: float,
                         exclude_pos: bool, weighted: bool, cross: int = 0
                         ) -> tuple[Tensor, Tensor]:
        """Symmetric schedule (issue 25): (lse, wmean) of the rows of X = scale * z @ z.T with
        symmetric masks (self_col[i] in (i, -1); pos_col[pos_col[i]] = i), each upper-triangle
        tile serving itself and its transpose; wmean empty unless weighted. Accumulation dtype.
        cross: 0, every pair; 0 < cross < M, only the pairs across it ((i < cross) != (j <
        cross)) are entries, the others masked (symmetric InfoNCE: z = [q; k], cross = B, the
        row and column log-sum-exps of q k^T); any other value a ValueError naming `cross`."""

    def gram_lse_backward(self, z: Tensor, self_col: Tensor, pos_col: Tensor, scale: float,
                          exclude_pos: bool, lse: Tensor, g: Tensor, cross: int = 0) -> Tensor:
        """Symmetric schedule: dz = scale * (G + G^T) z, G_ij = g_i softmax(X)_ij, each
        upper-triangle tile recomputed once for both its rows and its columns; cross as in
        the forward."""


class SphereKernels(Protocol):
    """Pair sums over the Gram of L2-normalised rows (fastssl/ops/sphere.py). y or b None: the
    symmetric sum over the rows of x (a) with themselves. rx, ry: the rows' inverse norms where
    the caller has them (the loss's mse term normalised the rows already), None: computed."""

    def series_forward(self, x: Tensor, y: Optional[Tensor], weights: Sequence[float],
                       dim: int, rx: Optional[Tensor] = None,
                       ry: Optional[Tensor] = None) -> Tensor:
        """sum_ij psi(<x̂_i, ŷ_j>), psi the Gegenbauer series of `weights` in dimension dim."""

    def series_grad_hat(self, a: Tensor, b: Optional[Tensor], weights: Sequence[float],
                        dim: int) -> tuple[Tensor, Tensor]:
        """(gradient in the normalised rows, inverse norms): the backward's first part."""

    def gauss_forward(self, x: Tensor, y: Optional[Tensor], scale: float,
                      diag_offset: int, rx: Optional[Tensor] = None,
                      ry: Optional[Tensor] = None) -> Tensor:
        """log sum_(i != j) exp(2 scale (<x̂_i, ŷ_j> - 1)) (the diagonal at diag_offset)."""

    def gauss_grad_hat(self, a: Tensor, b: Optional[Tensor], scale: float, diag_offset: int,
                       lse: Tensor) -> tuple[Tensor, Tensor]:
        """(gradient in the normalised rows, inverse norms) of gauss_forward."""

    def series_forward_grad(self, x: Tensor, y: Optional[Tensor], weights: Sequence[float],
                            dim: int, rx: Optional[Tensor] = None,
                            ry: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Same pass: (total, dx, dy)."""

    def gauss_forward_grad(self, x: Tensor, y: Optional[Tensor], scale: float,
                           diag_offset: int, rx: Optional[Tensor] = None,
                           ry: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Same pass: (lse, dx, dy)."""


class SortnetKernels(Protocol):
    """Sorting-network kernels (fastssl/ops/sortnet.py). `net` is the (4, C) int32 comparator
    table, `dist` the distribution's id, `sigma_bwd` gaussian's float32 1/steepness."""

    def soft_sort_forward(self, x: Tensor, net: Tensor, dist: int, steepness: float,
                          art_lambda: float, sigma_bwd: float, want_p: bool
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """(sorted, P or empty, saved per-comparator values)."""

    def soft_sort_backward(self, gy: Tensor, gP: Tensor, d: Tensor, net: Tensor, dist: int,
                           steepness: float, art_lambda: float, sigma_bwd: float,
                           n: int) -> Tensor:
        """dx from the saved values."""

    def groco_rows_forward(self, sims: Tensor, k: int, net: Tensor, dist: int,
                           steepness: float, art_lambda: float, sigma_bwd: float) -> Tensor:
        """GroCo's row losses of pre-ordered rows [negatives asc | positives asc]."""

    def groco_rows_backward(self, grow: Tensor, sims: Tensor, k: int, net: Tensor, dist: int,
                            steepness: float, art_lambda: float, sigma_bwd: float) -> Tensor:
        """d sims."""

    def groco_fused_forward(self, anchor: Tensor, negatives: Tensor, positives: Tensor,
                            self_offset: int, k: int, net: Tensor, dist: int, steepness: float,
                            art_lambda: float, sigma_bwd: float
                            ) -> tuple[Tensor, Tensor, Tensor]:
        """One anchor view fused (cosine, running top-k, network, BCE): (rows, sims, index)."""

    def groco_fused_backward(self, grow: Tensor, sims: Tensor, index: Tensor,
                             negatives: Tensor, positives: Tensor, k: int, net: Tensor,
                             dist: int, steepness: float, art_lambda: float,
                             sigma_bwd: float) -> Tensor:
        """d anchor."""

    def soft_sort(self, x: Tensor, network: str, steepness: float, distribution: str,
                  art_lambda: float, want_p: bool) -> tuple[Tensor, Optional[Tensor]]:
        """Without registered ops: (sorted, P or None) with autograd through PyTorch."""

    def groco_rows(self, sims: Tensor, k: int, network: str, distribution: str,
                   steepness: float) -> Tensor:
        """Without registered ops: groco_rows_forward with autograd through PyTorch."""


class SwavKernels(Protocol):
    """Sinkhorn-Knopp and the swapped-prediction cross-entropy (fastssl/ops/swav.py)."""

    def sinkhorn(self, scores: Tensor, epsilon: float, iterations: int,
                 distributed: bool) -> Tensor:
        """(B, K) codes in the accumulation dtype (all-reducing K-vectors when distributed)."""

    def cross_entropy(self, scores: Tensor, targets: Tensor, temperature: float,
                      compute_grad: bool, grad_scale: Optional[Tensor] = None
                      ) -> tuple[Tensor, Tensor]:
        """(-sum_b <targets_b, log_softmax(scores_b / T)>, its gradient in the scores times
        grad_scale, or empty without compute_grad)."""


class DinoKernels(Protocol):
    """DINO's teacher targets and KoLeo's nearest neighbour (fastssl/ops/dino.py); the student
    cross-entropy is the swav family's ``cross_entropy``."""

    def teacher_softmax(self, teacher: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
        """softmax((teacher - center) / teacher_temp) per row in the accumulation dtype."""

    def nearest_neighbor(self, x: Tensor, x_all: Tensor, offset: int) -> Tensor:
        """int64 (N,): for each row i of x the index in x_all of its largest inner product,
        row offset + i excluded; the first index among ties."""


INTERFACES = {"contrastive": ContrastiveKernels, "sphere": SphereKernels,
              "sortnet": SortnetKernels, "swav": SwavKernels, "dino": DinoKernels}

# Methods that some entries lack: the same-pass forwards (the Triton kernels stream a second
# pass instead), the fused GroCo view (C++ only), the autograd forms (torch only, which has no
# explicit kernels), swav's cross-entropy (no hand-written CUDA kernel).
OPTIONAL = {
    "contrastive": {"lse_sum_forward", "sce_grad_forward", "gram_lse_forward",
                    "gram_lse_backward"},
    "sphere": {"series_forward_grad", "gauss_forward_grad"},
    "sortnet": {"soft_sort_forward", "soft_sort_backward", "groco_rows_forward",
                "groco_rows_backward", "groco_fused_forward", "groco_fused_backward",
                "soft_sort", "groco_rows"},
    "swav": {"cross_entropy"},
    "dino": set(),
}


def interface_methods(family: str) -> tuple[str, ...]:
    """The method names of `family`'s interface, in declaration order."""
    proto = INTERFACES[family]
    return tuple(n for n, v in vars(proto).items() if callable(v) and not n.startswith("_"))
