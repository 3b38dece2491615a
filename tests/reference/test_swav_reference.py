"""fastssl.reference.swav against the upstream algorithm written as explicit loops, and the
closed-form facts of upstream's distributed_sinkhorn and swapped prediction
(facebookresearch/swav main_swav.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastssl import reference as R


def _cosine_scores(B, K, D=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    return (z @ c.T).to(dtype)


def _loop_sinkhorn(s, eps, iters):
    """Upstream distributed_sinkhorn (one process) with explicit Python loops, in float64."""
    s = np.asarray(s, dtype=np.float64)
    B, K = s.shape
    Q = np.empty((K, B))
    for k in range(K):
        for b in range(B):
            Q[k, b] = math.exp(s[b, k] / eps)
    Q /= sum(Q[k, b] for k in range(K) for b in range(B))
    for _ in range(iters):
        for k in range(K):
            r = sum(Q[k, b] for b in range(B))
            for b in range(B):
                Q[k, b] = Q[k, b] / r / K
        for b in range(B):
            c = sum(Q[k, b] for k in range(K))
            for k in range(K):
                Q[k, b] = Q[k, b] / c / B
    return (Q * B).T


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_sinkhorn_matches_explicit_loops(iters, eps):
    s = _cosine_scores(5, 7)
    got = R.sinkhorn(s, epsilon=eps, iterations=iters)
    np.testing.assert_allclose(
        got.numpy(), _loop_sinkhorn(s.numpy(), eps, iters), rtol=1e-10, atol=1e-13
    )


def test_sinkhorn_marginals():
    B, K = 64, 30
    s = _cosine_scores(B, K)
    errs = []
    for iters in (1, 3, 10, 50):
        codes = R.sinkhorn(s, epsilon=0.05, iterations=iters)
        # the last step normalises samples: every code sums to exactly 1
        torch.testing.assert_close(
            codes.sum(1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-12
        )
        assert (codes >= 0).all()
        errs.append((codes.sum(0) / (B / K) - 1).abs().max().item())
    # prototype masses approach B/K as the iterations go (3 iterations are still far at eps=0.05)
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4


def test_sinkhorn_constant_scores_give_uniform_codes():
    codes = R.sinkhorn(torch.full((6, 11), 0.3, dtype=torch.float64))
    torch.testing.assert_close(codes, torch.full((6, 11), 1 / 11, dtype=torch.float64))


def test_sinkhorn_overflows_in_float16_as_upstream():
    # |score| <= 1 and eps = 0.05: exp(20) = 4.9e8 does not fit float16 (spec §1.3)
    s = _cosine_scores(8, 10, dtype=torch.float16)
    s[0, 0] = 0.9
    assert not torch.isfinite(R.sinkhorn(s, epsilon=0.05)).all()


def test_swav_uniform_scores_is_log_k():
    # collapse value: ln(3000) = 8.006 (spec §1.4, §1.10)
    K = 3000
    views = [torch.zeros(4, K, dtype=torch.float64) for _ in range(4)]
    loss = R.swav(views, n_assign_crops=2)
    assert abs(loss.item() - math.log(K)) < 1e-9


def test_swav_matches_hand_written_loss():
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(5, 9, generator=g, dtype=torch.float64) * 0.3 for _ in range(3)]
    T, eps = 0.1, 0.05
    q = [torch.from_numpy(_loop_sinkhorn(views[i].numpy(), eps, 3)) for i in range(2)]
    total = 0.0
    for i in range(2):
        sub = 0.0
        for v in range(3):
            if v == i:
                continue
            lsm = views[v] / T - torch.logsumexp(views[v] / T, dim=1, keepdim=True)
            sub += -(q[i] * lsm).sum(1).mean().item()
        total += sub / 2
    got = R.swav(views, n_assign_crops=2, temperature=T, epsilon=eps)
    assert abs(got.item() - total / 2) < 1e-10


def test_swav_queue_scores_prepended():
    g = torch.Generator().manual_seed(4)
    views = [torch.randn(4, 6, generator=g, dtype=torch.float64) * 0.5 for _ in range(2)]
    queue = [torch.randn(8, 6, generator=g, dtype=torch.float64) * 0.5 for _ in range(2)]
    got = R.swav(views, n_assign_crops=2, queue_scores=queue)
    q0 = R.sinkhorn(torch.cat([queue[0], views[0]]))[-4:]
    q1 = R.sinkhorn(torch.cat([queue[1], views[1]]))[-4:]
    want = (-(q0 * F.log_softmax(views[1] / 0.1, 1)).sum(1).mean()
            - (q1 * F.log_softmax(views[0] / 0.1, 1)).sum(1).mean()) / 2
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(epsilon=0.0), ValueError, "epsilon"),
    (dict(iterations=-1), ValueError, "iterations"),
    (dict(iterations=1.5), TypeError, "iterations"),
])
def test_reference_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        R.sinkhorn(torch.randn(3, 4), **kwargs)
    with pytest.raises(ValueError, match="scores"):
        R.sinkhorn(torch.randn(3))
