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

DIST_IDS = {"logistic": 0, "logistic_phi": 1, "gaussian": 2, "reciprocal": 3, "cauchy": 4,
            "optimal": 5}


@triton.jit
def _atan(x):
    # Cephes atan: range reduction to |t| <= 0.66, then a (4, 5) rational; double accurate.
    ax = tl.abs(x)
    big = ax > 2.414213562373095
    mid = (ax > 0.66) & (ax <= 2.414213562373095)
    t = tl.where(big, -1.0 / tl.maximum(ax, 1e-30), tl.where(mid, (ax - 1.0) / (ax + 1.0), ax))
    zero = ax * 0.0  # keeps the constants in the input's precision (a where of two literals is fp32)
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
    for w in range(0, n):
        tl.store(ws + (X + w) * B, tl.load(s_ptr + lanes * n + w, mask=m, other=0.0), mask=m)
    for c in range(0, C):
        ia = tl.load(net_ptr + c)
        ib = tl.load(net_ptr + C + c)
        dn = tl.load(net_ptr + 2 * C + c)
        dx = tl.load(net_ptr + 3 * C + c)
        xa = tl.load(ws + (X + ia) * B, mask=m, other=0.0)
        xb = tl.load(ws + (X + ib) * B, mask=m, other=0.0)
        d = xb - xa
        a, sl = _alpha_slope(d, s, lam, sb, DIST)
        tl.store(ws + (X + dn) * B, a * xa + (1.0 - a) * xb, mask=m)
        tl.store(ws + (X + dx) * B, (1.0 - a) * xa + a * xb, mask=m)
        tl.store(ws + (DD + c) * B, d, mask=m)
    for w in range(0, n):
        one = tl.where(m, 1.0, 0.0)
        tl.store(ws + (WP + w) * B, one * tl.where(w >= k, 1.0, 0.0), mask=m)
        tl.store(ws + (WN + w) * B, one * tl.where(w < k, 1.0, 0.0), mask=m)
    for i in range(0, C):
        c = C - 1 - i
        ia = tl.load(net_ptr + c)
        ib = tl.load(net_ptr + C + c)
        dn = tl.load(net_ptr + 2 * C + c)
        dx = tl.load(net_ptr + 3 * C + c)
        a, sl = _alpha_slope(tl.load(ws + (DD + c) * B, mask=m, other=0.0), s, lam, sb, DIST)
        pmin = tl.load(ws + (WP + dn) * B, mask=m, other=0.0)
        pmax = tl.load(ws + (WP + dx) * B, mask=m, other=0.0)
        nmin = tl.load(ws + (WN + dn) * B, mask=m, other=0.0)
        nmax = tl.load(ws + (WN + dx) * B, mask=m, other=0.0)
        if BACKWARD:
            tl.store(ws + (PP + 4 * c) * B, pmin, mask=m)
            tl.store(ws + (PP + 4 * c + 1) * B, pmax, mask=m)
            tl.store(ws + (PP + 4 * c + 2) * B, nmin, mask=m)
            tl.store(ws + (PP + 4 * c + 3) * B, nmax, mask=m)
        tl.store(ws + (WP + ia) * B, a * pmin + (1.0 - a) * pmax, mask=m)
        tl.store(ws + (WP + ib) * B, (1.0 - a) * pmin + a * pmax, mask=m)
        tl.store(ws + (WN + ia) * B, a * nmin + (1.0 - a) * nmax, mask=m)
        tl.store(ws + (WN + ib) * B, (1.0 - a) * nmin + a * nmax, mask=m)
    if BACKWARD:
        scale = tl.load(grow_ptr + lanes, mask=m, other=0.0) / (2.0 * n)
        for w in range(0, n):
            t = tl.where(w >= k, 1.0, 0.0)
            qp = tl.load(ws + (WP + w) * B, mask=m, other=0.5)
            qn = tl.load(ws + (WN + w) * B, mask=m, other=0.5)
            # torch.clip passes the gradient where 0 <= q <= 1; BCE's backward has EPSILON 1e-12
            gp = tl.where((qp >= 0.0) & (qp <= 1.0),
                          scale * (qp - t) / tl.maximum((1.0 - qp) * qp, 1e-12), 0.0)
            gn = tl.where((qn >= 0.0) & (qn <= 1.0),
                          scale * (qn - (1.0 - t)) / tl.maximum((1.0 - qn) * qn, 1e-12), 0.0)
            tl.store(ws + (WP + w) * B, gp, mask=m)
            tl.store(ws + (WN + w) * B, gn, mask=m)
        for c in range(0, C):
            ia = tl.load(net_ptr + c)
            ib = tl.load(net_ptr + C + c)
            dn = tl.load(net_ptr + 2 * C + c)
            dx = tl.load(net_ptr + 3 * C + c)
            a, sl = _alpha_slope(tl.load(ws + (DD + c) * B, mask=m, other=0.0), s, lam, sb, DIST)
            pa = tl.load(ws + (WP + ia) * B, mask=m, other=0.0)
            pb = tl.load(ws + (WP + ib) * B, mask=m, other=0.0)
            na = tl.load(ws + (WN + ia) * B, mask=m, other=0.0)
            nb = tl.load(ws + (WN + ib) * B, mask=m, other=0.0)
            ga = (pa - pb) * (tl.load(ws + (PP + 4 * c) * B, mask=m, other=0.0)
                              - tl.load(ws + (PP + 4 * c + 1) * B, mask=m, other=0.0)) \
                + (na - nb) * (tl.load(ws + (PP + 4 * c + 2) * B, mask=m, other=0.0)
                               - tl.load(ws + (PP + 4 * c + 3) * B, mask=m, other=0.0))
            tl.store(ws + (GA + c) * B, ga, mask=m)
            tl.store(ws + (WP + dn) * B, a * pa + (1.0 - a) * pb, mask=m)
            tl.store(ws + (WP + dx) * B, (1.0 - a) * pa + a * pb, mask=m)
            tl.store(ws + (WN + dn) * B, a * na + (1.0 - a) * nb, mask=m)
            tl.store(ws + (WN + dx) * B, (1.0 - a) * na + a * nb, mask=m)
        row = gs_ptr + lanes * n
        for w in range(0, n):
            tl.store(row + w, tl.zeros([BLOCK_B], dtype=gs_ptr.dtype.element_ty), mask=m)
        for i in range(0, C):
            c = C - 1 - i
            ia = tl.load(net_ptr + c)
            ib = tl.load(net_ptr + C + c)
            dn = tl.load(net_ptr + 2 * C + c)
            dx = tl.load(net_ptr + 3 * C + c)
            d = tl.load(ws + (DD + c) * B, mask=m, other=0.0)
            a, sl = _alpha_slope(d, s, lam, sb, DIST)
            lmin = tl.load(row + dn, mask=m, other=0.0)
            lmax = tl.load(row + dx, mask=m, other=0.0)
            gd = (tl.load(ws + (GA + c) * B, mask=m, other=0.0) - (lmin - lmax) * d) * sl
            tl.store(row + ia, a * lmin + (1.0 - a) * lmax - gd, mask=m)
            tl.store(row + ib, (1.0 - a) * lmin + a * lmax + gd, mask=m)
    else:
        total = tl.zeros([BLOCK_B], dtype=ws_ptr.dtype.element_ty)
        for w in range(0, n):
            t = tl.where(w >= k, 1.0, 0.0)
            qp = tl.minimum(tl.maximum(tl.load(ws + (WP + w) * B, mask=m, other=0.5), 0.0), 1.0)
            qn = tl.minimum(tl.maximum(tl.load(ws + (WN + w) * B, mask=m, other=0.5), 0.0), 1.0)
            total += -(t * tl.maximum(tl.log(qp), -100.0) + (1.0 - t) * tl.maximum(tl.log(1.0 - qp), -100.0))
            total += -((1.0 - t) * tl.maximum(tl.log(qn), -100.0) + t * tl.maximum(tl.log(1.0 - qn), -100.0))
        tl.store(loss_ptr + lanes, total / (2.0 * n), mask=m)


# ----------------------------------------------------------------------------------------------
# launchers (tensors already contiguous, float32 or float64, on one device)

_BLOCK_B = 64
_WS_BUDGET = 1 << 28  # bytes of scratch per launch of the P backward; larger batches are chunked


def _params(x: torch.Tensor, steepness: float, art_lambda: float, sigma_bwd: float):
    return torch.tensor([steepness, art_lambda, sigma_bwd], dtype=x.dtype, device=x.device)


def checkpoint_spacing(C: int, n: int) -> tuple[int, int]:
    """K comparators per segment (minimises S*n + 2K) and S = ceil(C / K) checkpoints."""
    K = max(1, math.ceil(math.sqrt(C * n / 2.0)))
    return K, (C + K - 1) // K


def soft_sort_forward(x, net, dist, steepness, art_lambda, sigma_bwd, want_p):
    B, n = x.shape
    C = net.shape[1]
    prm = _params(x, steepness, art_lambda, sigma_bwd)
    y = x.clone()
    d = torch.empty((B, C), dtype=x.dtype, device=x.device)
    if C > 0:
        _ss_values_kernel[(triton.cdiv(B, _BLOCK_B),)](y, d, net, prm, B, C, n, DIST=dist,
                                                       BLOCK_B=_BLOCK_B)
    if want_p:
        P = torch.empty((B, n, n), dtype=x.dtype, device=x.device)
        _ss_perm_kernel[(B,)](P, d, net, prm, C, n, DIST=dist,
                              BLOCK_R=triton.next_power_of_2(n))
    else:
        P = x.new_empty(0)
    return y, P, d


def soft_sort_backward(gy, gP, d, net, dist, steepness, art_lambda, sigma_bwd, n):
    B, C = d.shape
    prm = _params(d, steepness, art_lambda, sigma_bwd)
    gx = gy.clone() if gy.numel() else torch.zeros((B, n), dtype=d.dtype, device=d.device)
    has_ga = gP.numel() > 0
    ga = d.new_empty(0)
    if has_ga and C > 0:
        ga = torch.empty((B, C), dtype=d.dtype, device=d.device)
        K, S = checkpoint_spacing(C, n)
        BR = triton.next_power_of_2(n)
        slots = S * n + 2 * n + 2 * K
        per_problem = slots * BR * d.element_size()
        chunk = max(1, min(B, _WS_BUDGET // per_problem))
        ws = torch.empty((chunk * slots * BR,), dtype=d.dtype, device=d.device)
        for b0 in range(0, B, chunk):
            nb = min(chunk, B - b0)
            _ss_bwd_perm_kernel[(nb,)](gP, d, ga, ws, net, prm, b0, C, n, K, S, DIST=dist,
                                       BLOCK_R=BR)
    if C > 0:
        _ss_bwd_values_kernel[(triton.cdiv(B, _BLOCK_B),)](gx, d, ga, net, prm, B, C, n,
                                                           DIST=dist, HAS_GA=has_ga and C > 0,
                                                           BLOCK_B=_BLOCK_B)
    return gx


def _groco_ws(B, n, C, dtype, device):
    return torch.empty(((3 * n + 6 * C) * B,), dtype=dtype, device=device)


def groco_rows_forward(sims, k, net, dist, steepness, art_lambda, sigma_bwd):
    B, n = sims.shape
    C = net.shape[1]
    prm = _params(sims, steepness, art_lambda, sigma_bwd)
    loss = torch.empty((B,), dtype=sims.dtype, device=sims.device)
    ws = _groco_ws(B, n, C, sims.dtype, sims.device)
    _groco_rows_kernel[(triton.cdiv(B, _BLOCK_B),)](sims, loss, loss, loss, ws, net, prm, B, C, n,
                                                    k, DIST=dist, BACKWARD=False,
                                                    BLOCK_B=_BLOCK_B)
    return loss


def groco_rows_backward(grow, sims, k, net, dist, steepness, art_lambda, sigma_bwd):
    B, n = sims.shape
    C = net.shape[1]
    prm = _params(sims, steepness, art_lambda, sigma_bwd)
    gs = torch.empty_like(sims)
    ws = _groco_ws(B, n, C, sims.dtype, sims.device)
    _groco_rows_kernel[(triton.cdiv(B, _BLOCK_B),)](sims, gs, grow, gs, ws, net, prm, B, C, n, k,
                                                    DIST=dist, BACKWARD=True, BLOCK_B=_BLOCK_B)
    return gs
