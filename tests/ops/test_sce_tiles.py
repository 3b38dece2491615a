"""The column-tiled C++ SCE kernel (issue 25, csrc/contrastive_cpu.cpp sce_grad_cpu): row blocks
walk the columns in tiles with running per-row statistics (max, sum of exp, the r x D
accumulators rescaled when a row's max grows). Checked at sizes with several row blocks and
several column tiles (the tile is 512 columns), with the columns ordered so that each row's max
arrives in a late tile (every earlier tile's sums must be rescaled) or in the first one, against
fastssl.reference's SCE (loss and q-gradient, float64 and float32) and the recompute op."""
import pytest
import torch
import torch.nn.functional as F
from conftest import backend_params

import fastssl
from fastssl import reference
from fastssl.ops import contrastive as ops

CPP = pytest.mark.parametrize("backend,device", [p for p in backend_params("cpp")
                                                 if p.values[1] == "cpu"])
TILE = 512  # kSceTile in csrc/contrastive_cpu.cpp


def _late_max(b, kq, d, order, seed):
    """q, k, queue with the queue ordered by its alignment to q's common direction: "late" puts
    every row's largest logits in the last tile, "early" in the first one."""
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    q = F.normalize(v + 0.4 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(v + 0.4 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(kq, d, generator=g, dtype=torch.float64), dim=1)
    key = queue @ v
    queue = queue[key.argsort(descending=(order == "early"))]
    return q, k, queue


def _loss_and_grad(fn, q, k, queue, use_keys, **kw):
    q = q.detach().clone().requires_grad_(True)
    loss = fn(q, k, queue, coeff=0.5, temperature=0.1, temperature_m=0.07, use_keys=use_keys, **kw)
    loss.backward()
    return loss.detach(), q.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_keys", [False, True])
@pytest.mark.parametrize("order", ["late", "early"])
@CPP
def test_sce_tiled_matches_reference(order, use_keys, dtype, backend, device):
    b, kq, d = 300, 1400, 8  # 3-4 column tiles (the last one partial), several row blocks
    q, k, queue = _late_max(b, kq, d, order, seed=1)
    x = (q @ queue.T) / 0.1
    tile_max = torch.stack([x[:, j:j + TILE].amax(1) for j in range(0, kq, TILE)], 1)
    if order == "late":  # the running max grows between tiles (by > 2 logits for most rows)
        assert (tile_max[:, -1] - tile_max[:, 0] > 2).float().mean() > 0.9
    got = _loss_and_grad(fastssl.functional.sce.fused, q.to(dtype), k.to(dtype),
                         queue.to(dtype), use_keys, backend=backend)
    ref = _loss_and_grad(reference.sce, q, k, queue, use_keys)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for x_got, x_ref in zip(got, ref):
        assert x_got.dtype == dtype
        torch.testing.assert_close(x_got.double(), x_ref, **tol)


def _stats(q, k, cols, self_col, same_pass, backend, w_lse, w_w):
    q = q.detach().clone().requires_grad_(True)
    lse_s, lse_t, wmean, u_s, u_t = ops.sce_stats(q, k, cols, self_col, 10.0, 1 / 0.07,
                                                  same_pass, backend)
    (w_lse * lse_s + w_w * wmean).sum().backward()
    return lse_s.detach(), lse_t, wmean.detach(), q.grad


@pytest.mark.parametrize("order", ["late", "early"])
@CPP
def test_sce_tiled_masks_in_every_tile(order, backend, device):
    """The teacher's masked column anywhere (every tile, -1 for some rows), against the
    recompute op (itself checked against the reference in test_contrastive_ops.py)."""
    m, c, d = 260, 1700, 8
    q, k, cols = _late_max(m, c, d, order, seed=2)
    g = torch.Generator().manual_seed(3)
    self_col = torch.randint(-1, c, (m,), generator=g)
    w_lse, w_w = torch.randn(m, generator=g, dtype=torch.float64), torch.rand(m, generator=g,
                                                                               dtype=torch.float64)
    got = _stats(q, k, cols, self_col, True, backend, w_lse, w_w)
    ref = _stats(q, k, cols, self_col, False, "torch", w_lse, w_w)
    for x, y in zip(got, ref):
        torch.testing.assert_close(x, y)


@CPP
def test_sce_tiled_teacher_row_all_masked(backend, device):
    """One column, masked in some teacher rows: lse_t -inf, wmean 0, u_t 0 there; the student
    side is the single logit."""
    m, d = 40, 5
    g = torch.Generator().manual_seed(4)
    q, k, cols = (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
                  for n in (m, m, 1))
    self_col = torch.where(torch.arange(m) % 3 == 0, 0, -1)
    lse_s, lse_t, wmean, u_s, u_t = ops.sce_stats(q, k, cols, self_col, 10.0, 1 / 0.07, True,
                                                  backend)
    masked = self_col == 0
    assert (lse_t[masked] == float("-inf")).all() and (wmean[masked] == 0).all()
    assert (u_t[masked] == 0).all()
    x = 10.0 * (q @ cols.T)[:, 0]
    torch.testing.assert_close(lse_s, x)
    torch.testing.assert_close(lse_t[~masked], (k @ cols.T)[~masked, 0] / 0.07)
    torch.testing.assert_close(wmean[~masked], x[~masked])
    torch.testing.assert_close(u_s, 10.0 * cols.expand(m, d))
    torch.testing.assert_close(u_t[~masked], 10.0 * cols.expand(int((~masked).sum()), d))


@CPP
def test_sce_tiled_is_deterministic(backend, device):
    q, k, cols = (t.float() for t in _late_max(300, 1300, 16, "late", seed=5))
    self_col = torch.randint(-1, 1300, (300,), generator=torch.Generator().manual_seed(6))
    first = ops.sce_stats(q, k, cols, self_col, 10.0, 1 / 0.07, True, backend)
    for _ in range(2):
        again = ops.sce_stats(q, k, cols, self_col, 10.0, 1 / 0.07, True, backend)
        assert all(torch.equal(x, y) for x, y in zip(first, again))


@CPP
def test_sce_tiled_float32_wide_logits(backend, device):
    """float32 (the fused AVX2 exp, where the CPU has it) with logits spanning more than exp's
    float32 range (scale 100: entries below max - 87 are 0), against the float64 op."""
    q, k, cols = _late_max(200, 1300, 8, "late", seed=7)
    self_col = torch.randint(-1, 1300, (200,), generator=torch.Generator().manual_seed(8))
    got = ops.sce_stats(q.float(), k.float(), cols.float(), self_col, 100.0, 100.0, True, backend)
    ref = ops.sce_stats(q, k, cols, self_col, 100.0, 100.0, True, backend)
    for x, y in zip(got, ref):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=2e-4)
