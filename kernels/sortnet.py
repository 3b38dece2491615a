"""Triton kernels for the sortnet family: diffsort-compatible soft sort and the GroCo row loss.

The network is a (4, C) int32 tensor of comparators in execution order (wire a, wire b, soft-min
destination, soft-max destination); every problem runs the same comparator sequence, so the
control flow is uniform and only the data differ per lane.

* values / value backward / GroCo rows: one lane per problem, BLOCK_B problems per program.
* P forward / P backward: one program per problem, one lane per row of P (rows of P are
  independent sweeps of e_r through the network). The P backward recomputes each row's forward
  from checkpoints every K comparators and reduces dL/dalpha over the rows with tl.sum.

Per-lane state lives in a global scratch laid out [slot][lane], so a lane only ever reads what it
wrote itself (same element, same thread). The transcendental helpers avoid libdevice so that the
kernels also run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import check_range, check_tensor, launch, target

DIST_IDS = {"logistic": 0, "logistic_phi": 1, "gaussian": 2, "reciprocal": 3, "cauchy": 4,
            "optimal": 5}


@triton.jit
def _atan(x):
    # Cephes atan: range reduction to |t| <= 0.66, then a (4, 5) rational; double accurate.
    ax = tl.abs(x)
    big = ax > 2.414213562373095
    mid = (ax > 0.66) & (ax <= 2.414213562373095)
    t = tl.where(big, -1.0 / tl.maximum(ax, 1e-30), tl.where(mid, (ax - 1.0) / (ax + 1.0), ax))
    # keeps the constants in the input's precision (a where of two literals is fp32)
    zero = ax * 0.0
    base = tl.where(big, zero + 1.5707963267948966, tl.where(mid, zero + 0.7853981633974483, zero))
    z = t * t
    p = (((-8.750608600031904122785E-1 * z - 1.615753718733365076637E1) * z
          - 7.500855792314704667340E1) * z - 1.228866684490136173410E2) * z \
        - 6.485021904942025371773E1
    q = ((((z + 2.485846490142306297962E1) * z + 1.650270098316988542046E2) * z
          + 4.328810604912902668951E2) * z + 4.853903996359136964868E2) * z \
        + 1.945506571482613964425E2
    r = base + (t * (z * p / q) + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _alpha_slope(d, s, lam, sb, DIST: tl.constexpr):
    """diffsort's alpha = f(d) (d = b - a) and dalpha/dd."""
    if DIST == 0:  # logistic
        a = 1.0 / (1.0 + tl.exp(-(d * s)))
        sl = s * a * (1.0 - a)
    elif DIST == 1:  # logistic_phi (ART): sigmoid(s d / (|d| + 1e-10)^lambda)
        ad = tl.abs(d) + 1e-10
        den = tl.exp2(tl.log2(ad) * lam)
        a = 1.0 / (1.0 + tl.exp(-(d * s / den)))
        sl = a * (1.0 - a) * (s / den) * (1.0 - lam * tl.abs(d) / ad)
    elif DIST == 2:  # gaussian; the slope uses diffsort's float32-stored sigma (sb)
        a = 0.5 + 0.5 * tl.erf(d / (1.0 / s) / 1.4142135623730951)
        z = d / sb
        sl = 1.0 / sb / 2.5066282746310002 * tl.exp(-0.5 * z * z)
    elif DIST == 3:  # reciprocal
        v = s * d
        den = 2.0 + tl.abs(v)
        a = 0.5 * (v / den + 1.0)
        sl = s / (den * den)
    elif DIST == 4:  # cauchy
        v = s * d
        a = _atan(v) / 3.141592653589793 + 0.5
        sl = s / (3.141592653589793 * (1.0 + v * v))
    else:  # optimal
        v = s * d
        av = tl.abs(v)
        side = tl.where(v > 0.25, 1.0, 0.0) - tl.where(v < -0.25, 1.0, 0.0)
        a = tl.minimum(tl.maximum(v, -0.25), 0.25) + 0.5 + side * (0.25 - 1.0 / 16.0 / (av + 1e-10))
        e = av + 1e-10
        sl = tl.where(av <= 0.25, s, s / (16.0 * e * e))
    return a, sl


@triton.jit
def _ss_values_kernel(y_ptr, d_ptr, net_ptr, prm_ptr, B, C, n, DIST: tl.constexpr,
                      BLOCK_B: tl.constexpr):
    lanes = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m = lanes < B
    s = tl.load(prm_ptr)
    lam = tl.load(prm_ptr + 1)
    sb = tl.load(prm_ptr + 2)
    row = y_ptr + lanes * n
    for c in range(0, C):
        ia = tl.load(net_ptr + c)
        ib = tl.load(net_ptr + C + c)
        dn = tl.load(net_ptr + 2 * C + c)
        dx = tl.load(net_ptr + 3 * C + c)
        xa = tl.load(row + ia, mask=m, other=0.0)
        xb = tl.load(row + ib, mask=m, other=0.0)
        d = xb - xa
        a, sl = _alpha_slope(d, s, lam, sb, DIST)
        tl.store(row + dn, a * xa + (1.0 - a) * xb, mask=m)
        tl.store(row + dx, (1.0 - a) * xa + a * xb, mask=m)
        tl.store(d_ptr + lanes * C + c, d, mask=m)


@triton.jit
def _ss_perm_kernel(p_ptr, d_ptr, net_ptr, prm_ptr, C, n, DIST: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_R)
    m = rows < n
    s = tl.load(prm_ptr)
    lam = tl.load(prm_ptr + 1)
    sb = tl.load(prm_ptr + 2)
    n = tl.cast(n, tl.int64)  # b * n * n passes 2**31 at B = 2048 problems of n = 1024
    base = p_ptr + b * n * n + rows * n
    for w in range(0, n):
        tl.store(base + w, tl.where(rows == w, 1.0, 0.0).to(p_ptr.dtype.element_ty), mask=m)
    for c in range(0, C):
        ia = tl.load(net_ptr + c)
        ib = tl.load(net_ptr + C + c)
        dn = tl.load(net_ptr + 2 * C + c)
        dx = tl.load(net_ptr + 3 * C + c)
        a, sl = _alpha_slope(tl.load(d_ptr + b * C + c), s, lam, sb, DIST)
        ua = tl.load(base + ia, mask=m, other=0.0)
        ub = tl.load(base + ib, mask=m, other=0.0)
        tl.store(base + dn, a * ua + (1.0 - a) * ub, mask=m)
        tl.store(base + dx, (1.0 - a) * ua + a * ub, mask=m)


@triton.jit
def _ss_bwd_perm_kernel(gp_ptr, d_ptr, ga_ptr, ws_ptr, net_ptr, prm_ptr, b0, C, n, K, S,
                        DIST: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = b0 + pid
    rows = tl.arange(0, BLOCK_R)
    m = rows < n
    s = tl.load(prm_ptr)
    lam = tl.load(prm_ptr + 1)
    sb = tl.load(prm_ptr + 2)
    n = tl.cast(n, tl.int64)  # scratch and gradient offsets in 64 bits
    K = tl.cast(K, tl.int64)
    slots = S * n + 2 * n + 2 * K
    ws = ws_ptr + pid * slots * BLOCK_R + rows
    U = S * n
    G = S * n + n
    PR = S * n + 2 * n
    zero = tl.zeros([BLOCK_R], dtype=ws_ptr.dtype.element_ty)
    for w in range(0, n):
        tl.store(ws + (U + w) * BLOCK_R, tl.where(rows == w, 1.0, 0.0).to(ws_ptr.dtype.element_ty))
    # forward of every row with a checkpoint at the start of each segment of K comparators
    for sg in range(0, S):
        for w in range(0, n):
            tl.store(ws + (sg * n + w) * BLOCK_R, tl.load(ws + (U + w) * BLOCK_R))
        c0 = sg * K
        c1 = tl.minimum(C, c0 + K)
        for c in range(c0, c1):
            ia = tl.load(net_ptr + c)
            ib = tl.load(net_ptr + C + c)
            dn = tl.load(net_ptr + 2 * C + c)
            dx = tl.load(net_ptr + 3 * C + c)
            a, sl = _alpha_slope(tl.load(d_ptr + b * C + c), s, lam, sb, DIST)
            ua = tl.load(ws + (U + ia) * BLOCK_R)
            ub = tl.load(ws + (U + ib) * BLOCK_R)
            tl.store(ws + (U + dn) * BLOCK_R, a * ua + (1.0 - a) * ub)
            tl.store(ws + (U + dx) * BLOCK_R, (1.0 - a) * ua + a * ub)
    for w in range(0, n):
        g0 = tl.load(gp_ptr + b * n * n + rows * n + w, mask=m, other=0.0)
        tl.store(ws + (G + w) * BLOCK_R, g0.to(ws_ptr.dtype.element_ty) + zero)
    # reverse, segment by segment: recompute the segment's row states, then sweep back
    for sr in range(0, S):
        sg = S - 1 - sr
        c0 = sg * K
        c1 = tl.minimum(C, c0 + K)
        for w in range(0, n):
            tl.store(ws + (U + w) * BLOCK_R, tl.load(ws + (sg * n + w) * BLOCK_R))
        for c in range(c0, c1):
            ia = tl.load(net_ptr + c)
            ib = tl.load(net_ptr + C + c)
            dn = tl.load(net_ptr + 2 * C + c)
            dx = tl.load(net_ptr + 3 * C + c)
            a, sl = _alpha_slope(tl.load(d_ptr + b * C + c), s, lam, sb, DIST)
            ua = tl.load(ws + (U + ia) * BLOCK_R)
            ub = tl.load(ws + (U + ib) * BLOCK_R)
            tl.store(ws + (PR + 2 * (c - c0)) * BLOCK_R, ua)
            tl.store(ws + (PR + 2 * (c - c0) + 1) * BLOCK_R, ub)
            tl.store(ws + (U + dn) * BLOCK_R, a * ua + (1.0 - a) * ub)
            tl.store(ws + (U + dx) * BLOCK_R, (1.0 - a) * ua + a * ub)
        for i in range(0, c1 - c0):
            c = c1 - 1 - i
            ia = tl.load(net_ptr + c)
            ib = tl.load(net_ptr + C + c)
            dn = tl.load(net_ptr + 2 * C + c)
            dx = tl.load(net_ptr + 3 * C + c)
            a, sl = _alpha_slope(tl.load(d_ptr + b * C + c), s, lam, sb, DIST)
            ua = tl.load(ws + (PR + 2 * (c - c0)) * BLOCK_R)
            ub = tl.load(ws + (PR + 2 * (c - c0) + 1) * BLOCK_R)
            gmin = tl.load(ws + (G + dn) * BLOCK_R)
            gmax = tl.load(ws + (G + dx) * BLOCK_R)
            contrib = tl.where(m, (gmin - gmax) * (ua - ub), 0.0)
            tl.store(ga_ptr + b * C + c, tl.sum(contrib, axis=0))
            tl.store(ws + (G + ia) * BLOCK_R, a * gmin + (1.0 - a) * gmax)
            tl.store(ws + (G + ib) * BLOCK_R, (1.0 - a) * gmin + a * gmax)


@triton.jit
def _ss_bwd_values_kernel(gx_ptr, d_ptr, ga_ptr, net_ptr, prm_ptr, B, C, n, DIST: tl.constexpr,
                          HAS_GA: tl.constexpr, BLOCK_B: tl.constexpr):
    lanes = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m = lanes < B
    s = tl.load(prm_ptr)
    lam = tl.load(prm_ptr + 1)
    sb = tl.load(prm_ptr + 2)
    row = gx_ptr + lanes * n
    for i in range(0, C):
        c = C - 1 - i
        ia = tl.load(net_ptr + c)
        ib = tl.load(net_ptr + C + c)
        dn = tl.load(net_ptr + 2 * C + c)
        dx = tl.load(net_ptr + 3 * C + c)
        d = tl.load(d_ptr + lanes * C + c, mask=m, other=0.0)
        a, sl = _alpha_slope(d, s, lam, sb, DIST)
        lmin = tl.load(row + dn, mask=m, other=0.0)
        lmax = tl.load(row + dx, mask=m, other=0.0)
        g = -(lmin - lmax) * d
        if HAS_GA:
            g += tl.load(ga_ptr + lanes * C + c, mask=m, other=0.0)
        gd = g * sl
        tl.store(row + ia, a * lmin + (1.0 - a) * lmax - gd, mask=m)
        tl.store(row + ib, (1.0 - a) * lmin + a * lmax + gd, mask=m)


@triton.jit
def _groco_rows_kernel(s_ptr, loss_ptr, grow_ptr, gs_ptr, ws_ptr, net_ptr, prm_ptr, B, C, n, k,
                       DIST: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_B: tl.constexpr):
    """GroCo row loss (and its backward into the row) for pre-ordered rows [negs asc | pos asc].

    q_pos = P 1[c >= k] and q_neg = P 1[c < k] are vectors swept backwards through the network
    (P is never formed); loss = sum_r (BCE(q_pos) + BCE(q_neg)) / (2n), torch's clamps.
    """
    lanes = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    m = lanes < B
    s = tl.load(prm_ptr)
    lam = tl.load(prm_ptr + 1)
    sb = tl.load(prm_ptr + 2)
    # scratch slots, each a row of B lanes
    X = 0
    DD = n
    WP = n + C
    WN = 2 * n + C
    PP = 3 * n + C
    GA = 3 * n + 5 * C
    ws = ws_ptr + lanes
    # The scratch is (3n + 6C) x B values: its slot offsets pass 2**31 at large B x C.
    Bw = tl.cast(B, tl.int64)
    for w in range(0, n):
        tl.store(ws + (X + w) * Bw, tl.load(s_ptr + lanes * n + w, mask=m, other=0.0), mask=m)
    for c in range(0, C):
        ia = tl.load(net_ptr + c)
        ib = tl.load(net_ptr + C + c)
        dn = tl.load(net_ptr + 2 * C + c)
        dx = tl.load(net_ptr + 3 * C + c)
        xa = tl.load(ws + (X + ia) * Bw, mask=m, other=0.0)
        xb = tl.load(ws + (X + ib) * Bw, mask=m, other=0.0)
        d = xb - xa
        a, sl = _alpha_slope(d, s, lam, sb, DIST)
        tl.store(ws + (X + dn) * Bw, a * xa + (1.0 - a) * xb, mask=m)
        tl.store(ws + (X + dx) * Bw, (1.0 - a) * xa + a * xb, mask=m)
        tl.store(ws + (DD + c) * Bw, d, mask=m)
    for w in range(0, n):
        one = tl.where(m, 1.0, 0.0)
        tl.store(ws + (WP + w) * Bw, one * tl.where(w >= k, 1.0, 0.0), mask=m)
        tl.store(ws + (WN + w) * Bw, one * tl.where(w < k, 1.0, 0.0), mask=m)
    for i in range(0, C):
        c = C - 1 - i
        ia = tl.load(net_ptr + c)
        ib = tl.load(net_ptr + C + c)
        dn = tl.load(net_ptr + 2 * C + c)
        dx = tl.load(net_ptr + 3 * C + c)
        a, sl = _alpha_slope(tl.load(ws + (DD + c) * Bw, mask=m, other=0.0), s, lam, sb, DIST)
        pmin = tl.load(ws + (WP + dn) * Bw, mask=m, other=0.0)
        pmax = tl.load(ws + (WP + dx) * Bw, mask=m, other=0.0)
        nmin = tl.load(ws + (WN + dn) * Bw, mask=m, other=0.0)
        nmax = tl.load(ws + (WN + dx) * Bw, mask=m, other=0.0)
        if BACKWARD:
            tl.store(ws + (PP + 4 * c) * Bw, pmin, mask=m)
            tl.store(ws + (PP + 4 * c + 1) * Bw, pmax, mask=m)
            tl.store(ws + (PP + 4 * c + 2) * Bw, nmin, mask=m)
            tl.store(ws + (PP + 4 * c + 3) * Bw, nmax, mask=m)
        tl.store(ws + (WP + ia) * Bw, a * pmin + (1.0 - a) * pmax, mask=m)
        tl.store(ws + (WP + ib) * Bw, (1.0 - a) * pmin + a * pmax, mask=m)
        tl.store(ws + (WN + ia) * Bw, a * nmin + (1.0 - a) * nmax, mask=m)
        tl.store(ws + (WN + ib) * Bw, (1.0 - a) * nmin + a * nmax, mask=m)
    if BACKWARD:
        scale = tl.load(grow_ptr + lanes, mask=m, other=0.0) / (2.0 * n)
        for w in range(0, n):
            t = tl.where(w >= k, 1.0, 0.0)
            qp = tl.load(ws + (WP + w) * Bw, mask=m, other=0.5)
            qn = tl.load(ws + (WN + w) * Bw, mask=m, other=0.5)
            # torch.clip passes the gradient where 0 <= q <= 1; BCE's backward has EPSILON 1e-12
            gp = tl.where((qp >= 0.0) & (qp <= 1.0),
                          scale * (qp - t) / tl.maximum((1.0 - qp) * qp, 1e-12), 0.0)
            gn = tl.where((qn >= 0.0) & (qn <= 1.0),
                          scale * (qn - (1.0 - t)) / tl.maximum((1.0 - qn) * qn, 1e-12), 0.0)
            tl.store(ws + (WP + w) * Bw, gp, mask=m)
            tl.store(ws + (WN + w) * Bw, gn, mask=m)
        for c in range(0, C):
            ia = tl.load(net_ptr + c)
            ib = tl.load(net_ptr + C + c)
            dn = tl.load(net_ptr + 2 * C + c)
            dx = tl.load(net_ptr + 3 * C + c)
            a, sl = _alpha_slope(tl.load(ws + (DD + c) * Bw, mask=m, other=0.0), s, lam, sb, DIST)
            pa = tl.load(ws + (WP + ia) * Bw, mask=m, other=0.0)
            pb = tl.load(ws + (WP + ib) * Bw, mask=m, other=0.0)
            na = tl.load(ws + (WN + ia) * Bw, mask=m, other=0.0)
            nb = tl.load(ws + (WN + ib) * Bw, mask=m, other=0.0)
            ga = (pa - pb) * (tl.load(ws + (PP + 4 * c) * Bw, mask=m, other=0.0)
                              - tl.load(ws + (PP + 4 * c + 1) * Bw, mask=m, other=0.0)) \
                + (na - nb) * (tl.load(ws + (PP + 4 * c + 2) * Bw, mask=m, other=0.0)
                               - tl.load(ws + (PP + 4 * c + 3) * Bw, mask=m, other=0.0))
            tl.store(ws + (GA + c) * Bw, ga, mask=m)
            tl.store(ws + (WP + dn) * Bw, a * pa + (1.0 - a) * pb, mask=m)
            tl.store(ws + (WP + dx) * Bw, (1.0 - a) * pa + a * pb, mask=m)
            tl.store(ws + (WN + dn) * Bw, a * na + (1.0 - a) * nb, mask=m)
            tl.store(ws + (WN + dx) * Bw, (1.0 - a) * na + a * nb, mask=m)
        row = gs_ptr + lanes * n
        for w in range(0, n):
            tl.store(row + w, tl.zeros([BLOCK_B], dtype=gs_ptr.dtype.element_ty), mask=m)
        for i in range(0, C):
            c = C - 1 - i
            ia = tl.load(net_ptr + c)
            ib = tl.load(net_ptr + C + c)
            dn = tl.load(net_ptr + 2 * C + c)
            dx = tl.load(net_ptr + 3 * C + c)
            d = tl.load(ws + (DD + c) * Bw, mask=m, other=0.0)
            a, sl = _alpha_slope(d, s, lam, sb, DIST)
            lmin = tl.load(row + dn, mask=m, other=0.0)
            lmax = tl.load(row + dx, mask=m, other=0.0)
            gd = (tl.load(ws + (GA + c) * Bw, mask=m, other=0.0) - (lmin - lmax) * d) * sl
            tl.store(row + ia, a * lmin + (1.0 - a) * lmax - gd, mask=m)
            tl.store(row + ib, (1.0 - a) * lmin + a * lmax + gd, mask=m)
    else:
        total = tl.zeros([BLOCK_B], dtype=ws_ptr.dtype.element_ty)
        for w in range(0, n):
            t = tl.where(w >= k, 1.0, 0.0)
            qp = tl.minimum(tl.maximum(tl.load(ws + (WP + w) * Bw, mask=m, other=0.5), 0.0), 1.0)
            qn = tl.minimum(tl.maximum(tl.load(ws + (WN + w) * Bw, mask=m, other=0.5), 0.0), 1.0)
            total += -(
                t * tl.maximum(tl.log(qp), -100.0)
                + (1.0 - t) * tl.maximum(tl.log(1.0 - qp), -100.0)
            )
            total += -(
                (1.0 - t) * tl.maximum(tl.log(qn), -100.0)
                + t * tl.maximum(tl.log(1.0 - qn), -100.0)
            )
        tl.store(loss_ptr + lanes, total / (2.0 * n), mask=m)


# ----------------------------------------------------------------------------------------------
# configuration and launchers (tensors float32 or float64, on one device)

KERNELS = ("lanes", "rows")


# P backward on one warp at n <= 32 for these (see config); the others take two.
_ONE_WARP_DISTS = (DIST_IDS["logistic_phi"], DIST_IDS["gaussian"], DIST_IDS["cauchy"])


def config(kernel: str, n: int, cc: int | None, dist: int | None = None,
           dtype: torch.dtype = torch.float32) -> dict:
    """Launch configuration of this family for compute capability ``cc`` (None: the CPU
    interpreter). "lanes": one problem per lane (values, value backward, GroCo rows), BLOCK_B
    problems per program; "rows": one problem per program, one lane per row of P
    (P forward / backward), BLOCK_R = next power of two of n. Also the scratch budget of one
    P-backward launch (larger batches are cut into launches of that size). ``dist``: the
    distribution id, which picks the warps of the "rows" kernels at n <= 32; ``dtype``: the
    inputs' (float64 has its own "rows" configuration at n <= 32)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    gpu = cc is not None
    if kernel == "lanes":
        # 64 lanes on 2 warps: one lane per thread (4 warps would run every lane twice).
        return dict(BLOCK_B=64, num_warps=2 if gpu else 4, num_stages=1)
    block_r = triton.next_power_of_2(n)
    # Warps from Triton's own ptxas run (bench/results/static, triton 3.6 and 3.9), 0 spills:
    # at n <= 32 the erf / pow distributions (and cauchy) on one warp, one row per lane (on two,
    # triton 3.9's ptxas kept 8 bytes on the stack on sm_80), the others on two (on one, 24
    # bytes); at most 4 warps above (8 warps at n = 1024 spilled 12-24 bytes: sm_90 with 3.9,
    # sm_80 with 3.6).
    if not gpu:
        warps = 4
    elif block_r <= 32 and dtype == torch.float64:
        warps = 1
    elif block_r <= 32:
        warps = 1 if dist in _ONE_WARP_DISTS else 2
    else:
        warps = max(2, min(4, block_r // 128))
    # A GPU has the memory for wider P-backward launches (fewer, fuller grids).
    out = dict(BLOCK_R=block_r, num_warps=warps, num_stages=1,
               ws_budget=(1 << 30) if gpu else (1 << 28))
    if gpu and block_r <= 32 and dtype == torch.float64:
        # float64 at n <= 32: ptxas held these kernels at 40-80 registers and spilled 4-32
        # bytes at every warp count (1-8) for some distribution, target or triton version
        # (Triton's own ptxas run). One warp with a 128-register ceiling: 90-100 used, 0 spills.
        out["maxnreg"] = 128
    return out


_DTYPES = (torch.float32, torch.float64)


def _params(x: torch.Tensor, steepness: float, art_lambda: float, sigma_bwd: float):
    return torch.tensor([steepness, art_lambda, sigma_bwd], dtype=x.dtype, device=x.device)


def _check_net(net, n: int, device) -> int:
    """The (4, C) int32 comparator table; its entries are wire numbers in [0, n) (built by the
    ops from a network name; checked here on its shape, dtype and device)."""
    check_tensor("net", net, dim=2, dtypes=(torch.int32,), device=device)
    if net.shape[0] != 4:
        raise ValueError(f"net must have shape (4, C), got {tuple(net.shape)}")
    return net.shape[1]


def _check_dist(dist: int) -> None:
    check_range("dist", dist, 0, len(DIST_IDS) - 1)


def checkpoint_spacing(C: int, n: int) -> tuple[int, int]:
    """K comparators per segment (minimises S*n + 2K) and S = ceil(C / K) checkpoints."""
    K = max(1, math.ceil(math.sqrt(C * n / 2.0)))
    return K, (C + K - 1) // K


def soft_sort_forward(x, net, dist, steepness, art_lambda, sigma_bwd, want_p):
    check_tensor("x", x, dim=2, dtypes=_DTYPES)
    _check_dist(dist)
    x = x.contiguous()
    B, n = x.shape
    C = _check_net(net, n, x.device)
    net = net.contiguous()
    cc = target(x.device)
    prm = _params(x, steepness, art_lambda, sigma_bwd)
    y = x.clone()
    d = torch.empty((B, C), dtype=x.dtype, device=x.device)
    if C > 0 and B > 0:
        cfg = config("lanes", n, cc)
        launch(_ss_values_kernel, (triton.cdiv(B, cfg["BLOCK_B"]),), y, d, net, prm, B, C, n,
               DIST=dist, **cfg)
    if want_p:
        P = torch.empty((B, n, n), dtype=x.dtype, device=x.device)
        if B > 0:
            cfg = config("rows", n, cc, dist, x.dtype)
            cfg.pop("ws_budget")
            launch(_ss_perm_kernel, (B,), P, d, net, prm, C, n, DIST=dist, **cfg)
    else:
        P = x.new_empty(0)
    return y, P, d


def soft_sort_backward(gy, gP, d, net, dist, steepness, art_lambda, sigma_bwd, n):
    check_tensor("d", d, dim=2, dtypes=_DTYPES)
    _check_dist(dist)
    B, C = d.shape
    if _check_net(net, n, d.device) != C:
        raise ValueError(f"net must have the {C} comparators of d, got shape {tuple(net.shape)}")
    if gy.numel():
        check_tensor("gy", gy, dtypes=(d.dtype,), device=d.device, shape=(B, n))
    if gP.numel():
        check_tensor("gP", gP, dtypes=(d.dtype,), device=d.device, shape=(B, n, n))
    d, net = d.contiguous(), net.contiguous()
    gP = gP.contiguous()
    cc = target(d.device)
    prm = _params(d, steepness, art_lambda, sigma_bwd)
    gx = gy.contiguous().clone() if gy.numel() else torch.zeros((B, n), dtype=d.dtype,
                                                                device=d.device)
    has_ga = gP.numel() > 0
    ga = d.new_empty(0)
    if has_ga and C > 0 and B > 0:
        ga = torch.empty((B, C), dtype=d.dtype, device=d.device)
        K, S = checkpoint_spacing(C, n)
        cfg = config("rows", n, cc, dist, d.dtype)
        budget = cfg.pop("ws_budget")
        BR = cfg["BLOCK_R"]
        slots = S * n + 2 * n + 2 * K
        per_problem = slots * BR * d.element_size()
        chunk = max(1, min(B, budget // per_problem))
        ws = torch.empty((chunk * slots * BR,), dtype=d.dtype, device=d.device)
        for b0 in range(0, B, chunk):
            nb = min(chunk, B - b0)
            launch(_ss_bwd_perm_kernel, (nb,), gP, d, ga, ws, net, prm, b0, C, n, K, S,
                   DIST=dist, **cfg)
    if C > 0 and B > 0:
        cfg = config("lanes", n, cc)
        launch(_ss_bwd_values_kernel, (triton.cdiv(B, cfg["BLOCK_B"]),), gx, d, ga, net, prm,
               B, C, n, DIST=dist, HAS_GA=has_ga and C > 0, **cfg)
    return gx


def _groco_ws(B, n, C, dtype, device):
    return torch.empty(((3 * n + 6 * C) * B,), dtype=dtype, device=device)


def _check_groco(sims, k, net, dist):
    check_tensor("sims", sims, dim=2, dtypes=_DTYPES)
    _check_dist(dist)
    B, n = sims.shape
    check_range("k", k, 0, n)
    return _check_net(net, n, sims.device)


def groco_rows_forward(sims, k, net, dist, steepness, art_lambda, sigma_bwd):
    C = _check_groco(sims, k, net, dist)
    sims, net = sims.contiguous(), net.contiguous()
    B, n = sims.shape
    prm = _params(sims, steepness, art_lambda, sigma_bwd)
    loss = torch.empty((B,), dtype=sims.dtype, device=sims.device)
    if B == 0:
        return loss
    ws = _groco_ws(B, n, C, sims.dtype, sims.device)
    cfg = config("lanes", n, target(sims.device))
    launch(_groco_rows_kernel, (triton.cdiv(B, cfg["BLOCK_B"]),), sims, loss, loss, loss, ws,
           net, prm, B, C, n, k, DIST=dist, BACKWARD=False, **cfg)
    return loss


def groco_rows_backward(grow, sims, k, net, dist, steepness, art_lambda, sigma_bwd):
    C = _check_groco(sims, k, net, dist)
    B, n = sims.shape
    check_tensor("grow", grow, dtypes=(sims.dtype,), device=sims.device, shape=(B,))
    sims, net, grow = sims.contiguous(), net.contiguous(), grow.contiguous()
    prm = _params(sims, steepness, art_lambda, sigma_bwd)
    gs = torch.empty_like(sims)
    if B == 0:
        return gs
    ws = _groco_ws(B, n, C, sims.dtype, sims.device)
    cfg = config("lanes", n, target(sims.device))
    launch(_groco_rows_kernel, (triton.cdiv(B, cfg["BLOCK_B"]),), sims, gs, grow, gs, ws, net,
           prm, B, C, n, k, DIST=dist, BACKWARD=True, **cfg)
    return gs


class TritonSortnet:
    """The triton entry of the family's table (fastssl/backends/interfaces.py): the launches
    above."""
    soft_sort_forward = staticmethod(soft_sort_forward)
    soft_sort_backward = staticmethod(soft_sort_backward)
    groco_rows_forward = staticmethod(groco_rows_forward)
    groco_rows_backward = staticmethod(groco_rows_backward)
