"""Where the time of the C++ symmetric contrastive schedule goes (issue 25).

    python -m bench.contrastive_profile --n 8192 --d 128 [--threads 1] [--blocks 128,256,384]

For 2N = 2n rows of dimension d, in one process with the providers interleaved (median of
--reps): the roofline sgemm (a square float32 at::mm), the 2N x 2N x D Gram by at::mm, fastssl's
gram_lse_forward, gram_lse_backward and both, and the tile GEMMs alone (the same upper-triangle
products through at::mm from Python: the GEMM share; the rest of the op's time is exp,
reductions, masking and threading). FLOPs counted as bench.compare.model_flop does: one Gram
(2 (2N)^2 D) for the forward, one for the backward, two for both. --blocks compares tile edges
(each candidate's forward+backward), the measurement behind block_config().
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fastssl import _C
from fastssl.backends.ext.contrastive import CppContrastive, block_config


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _tile_gemms(z, t, backward):
    """The schedule's products alone: each upper tile's Z_I Z_J^T (and, for the backward, the
    two half products H Z_J, H^T Z_I with H the tile)."""
    n = z.shape[0]
    buf = torch.empty(t, t)
    dz = torch.zeros_like(z)
    for i0 in range(0, n, t):
        for j0 in range(i0, n, t):
            zi, zj = z[i0:i0 + t], z[j0:j0 + t]
            x = buf[:zi.shape[0], :zj.shape[0]]
            torch.mm(zi, zj.T, out=x)
            if backward:
                dz[i0:i0 + t].addmm_(x, zj)
                if j0 != i0:
                    dz[j0:j0 + t].addmm_(x.T, zi)


def _row_block(z, sc, pc, scale, g):
    """The path before the symmetric schedule: lse_forward(z, z) and its one-pass backward."""
    lse, _, _, _ = CppContrastive.lse_forward(z, z, sc, pc, scale, z.shape[0], False, False,
                                              False)
    e = lse[:0]
    CppContrastive.lse_backward(z, z, sc, pc, scale, z.shape[0], False, lse, e, lse, g, e, g,
                                need_db=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192, help="rows per view (2N rows in all)")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--blocks", default="", help="tile edges to compare, e.g. 128,256,384")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    m = 2 * a.n
    z = torch.nn.functional.normalize(torch.randn(m, a.d, generator=g), dim=1)
    ar = torch.arange(a.n)
    sc, pc = torch.cat([ar, a.n + ar]), torch.cat([a.n + ar, ar])
    scale = 1.0 / a.temperature
    lse, _ = CppContrastive.gram_lse_forward(z, sc, pc, scale, False, False)
    gvec = torch.full((m,), 1.0 / m)
    sq = int(round((m * m * a.d) ** (1 / 3)))  # a square GEMM of the Gram's FLOPs
    sa, sb = torch.randn(sq, sq, generator=g), torch.randn(sq, sq, generator=g)
    gram = 2.0 * m * m * a.d
    t = block_config()["gram_tile"]
    cases = {
        "roofline sgemm": (lambda: torch.mm(sa, sb), 2.0 * sq ** 3),
        "Gram at::mm": (lambda: torch.mm(z, z.T), gram),
        "gram forward": (lambda: CppContrastive.gram_lse_forward(z, sc, pc, scale, False,
                                                                  False), gram),
        "gram backward": (lambda: CppContrastive.gram_lse_backward(z, sc, pc, scale, False,
                                                                    lse, gvec), gram),
        "gram forward+backward": (lambda: CppContrastive.gram_lse_backward(
            z, sc, pc, scale, False, CppContrastive.gram_lse_forward(
                z, sc, pc, scale, False, False)[0], gvec), 2 * gram),
        "row-block path forward+backward": (lambda: _row_block(z, sc, pc, scale, gvec),
                                            2 * gram),
        "tile GEMMs, forward": (lambda: _tile_gemms(z, t, False), gram / 2),
        "tile GEMMs, backward": (lambda: _tile_gemms(z, t, True), 1.5 * gram),
    }
    for cand in [int(b) for b in a.blocks.split(",") if b]:
        def fb(cand=cand):
            old = _C.contrastive_gram_block()  # 0: a query
            _C.contrastive_gram_block(cand)
            try:
                CppContrastive.gram_lse_backward(z, sc, pc, scale, False, lse, gvec)
                CppContrastive.gram_lse_forward(z, sc, pc, scale, False, False)
            finally:
                _C.contrastive_gram_block(old)
        cases[f"tile {cand}: forward+backward"] = (fb, 2 * gram)
    for fn, _f in cases.values():  # warm: first touch of buffers, MKL's setup
        fn()
    times = {k: [] for k in cases}
    for _ in range(a.reps):  # interleaved: a load change hits every provider alike
        for k, (fn, _f) in cases.items():
            times[k].append(_time(fn))
    print(f"2N = {m}, D = {a.d}, threads = {torch.get_num_threads()}, "
          f"block_config = {block_config()}, median of {a.reps}")
    roof = cases["roofline sgemm"][1] / statistics.median(times["roofline sgemm"]) / 1e9
    print(f"{'case':34s} {'ms':>9s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'% roof':>7s}")
    for k, (_fn, flop) in cases.items():
        ms = statistics.median(times[k]) * 1e3
        rate = flop / ms / 1e6
        print(f"{k:34s} {ms:9.1f} {flop / 1e9:8.2f} {rate:8.1f} {100 * rate / roof:6.1f}%")
    f_ms = statistics.median(times["gram forward"])
    b_ms = statistics.median(times["gram backward"])
    fg = statistics.median(times["tile GEMMs, forward"])
    bg = statistics.median(times["tile GEMMs, backward"])
    print(f"GEMM share: forward {100 * fg / f_ms:.0f}% (rest {1e3 * (f_ms - fg):.1f} ms: exp, "
          f"sums, masks, threads), backward {100 * bg / b_ms:.0f}% "
          f"(rest {1e3 * (b_ms - bg):.1f} ms)")


if __name__ == "__main__":
    main()
