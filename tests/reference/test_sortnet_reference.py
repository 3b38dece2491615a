"""fastssl.reference.sortnet against the closed-form vectors and invariants of diffsort
and the GroCo loss (learning_by_sorting/losses/groco.py)."""
import pytest
import torch

from fastssl.reference.sortnet import groco_rows as _groco_rows_reference
from fastssl.reference import groco, soft_sort

DISTS = ["cauchy", "reciprocal", "logistic", "logistic_phi", "gaussian", "optimal"]

# TV-A: alpha = P[0, 0] for x = [0, d], s = 1, lambda = 0.25
TV_A = {
    -2.0: [0.1475836, 0.2500000, 0.1192029, 0.1568582, 0.0227501, 0.0312500],
    -0.5: [0.3524164, 0.4000000, 0.3775407, 0.3555793, 0.3085375, 0.1250000],
    -0.1: [0.4682745, 0.4761905, 0.4750208, 0.4556598, 0.4601722, 0.4000000],
    0.0: [0.5] * 6,
    0.1: [0.5317255, 0.5238095, 0.5249792, 0.5443402, 0.5398278, 0.6000000],
    0.5: [0.6475836, 0.6000000, 0.6224593, 0.6444207, 0.6914625, 0.8750000],
    2.0: [0.8524164, 0.7500000, 0.8807971, 0.8431418, 0.9772499, 0.9687500],
}

TIES = {
    ("odd_even", 11): ([2, 2, 20, 20, 90, 90, 240, 240, 420, 420, 504], 2 ** 11),
    ("odd_even", 12): ([14, 14, 78, 78, 286, 286, 715, 715, 1287, 1287, 1716, 1716], 2 ** 12),
    ("odd_even", 13): ([28, 28, 158, 158, 596, 596, 1562, 1562, 3014, 3014, 4422, 4422, 5016],
                       2 ** 13),
    ("bitonic", 11): ([64, 64, 64] + [104] * 8, 2 ** 10),
    ("bitonic", 12): ([128] * 4 + [192] * 8, 2 ** 10),
    ("bitonic", 13): ([192] * 5 + [264] * 8, 2 ** 10),
}


@pytest.mark.parametrize("d", sorted(TV_A))
def test_tv_a_single_comparator(d):
    for dist, expected in zip(DISTS, TV_A[d]):
        x = torch.tensor([[0.0, d]], dtype=torch.float64)
        _, P = soft_sort(x, steepness=1.0, distribution=dist)
        a = expected
        torch.testing.assert_close(
            P[0],
            torch.tensor([[a, 1 - a], [1 - a, a]], dtype=torch.float64),
            atol=6e-8,
            rtol=0,
            msg=dist,
        )


def test_tv_b():
    _, P = soft_sort(torch.tensor([[0.2, -0.3]]), steepness=1.0)
    torch.testing.assert_close(P[0], torch.tensor([[0.3524164, 0.6475836], [0.6475836, 0.3524164]]),
                               atol=1e-7, rtol=0)


@pytest.mark.parametrize("key", sorted(TIES))
def test_ties_are_exact_dyadics(key):
    network, n = key
    counts, scale = TIES[key]
    for dist in DISTS:
        _, P = soft_sort(torch.full((1, n), 0.3, dtype=torch.float64), network=network,
                         steepness=7.0, distribution=dist)
        q = P[0, :, 10:].sum(-1) * scale
        assert q.tolist() == [float(c) for c in counts], (network, n, dist)


def test_tv_c_rows():
    negs = torch.linspace(-0.5, 0.4, 10, dtype=torch.float64)
    expect = {
        0.8: (0.187448665, 0.2797397, -2.134479e-02),
        0.0: (0.203970554, 0.2429477, -0.022003719),
        -0.6: (0.219470979, 0.2121913, -0.030407174),
    }
    for pos, (loss, q10, g10) in expect.items():
        s = torch.cat([negs, torch.tensor([pos], dtype=torch.float64)])[None].requires_grad_(True)
        row = _groco_rows_reference(s, 10, "odd_even", "cauchy", 1.0)
        (g,) = torch.autograd.grad(row.sum(), s)
        _, P = soft_sort(s.detach(), steepness=1.0)
        assert abs(row.item() - loss) < 2e-9
        assert abs(P[0, 10, 10:].sum().item() - q10) < 1e-7
        assert abs(g[0, 10].item() - g10) < 1e-8
    s = torch.cat([negs, torch.tensor([0.8], dtype=torch.float64)])[None].requires_grad_(True)
    (g,) = torch.autograd.grad(_groco_rows_reference(s, 10, "odd_even", "cauchy", 1.0).sum(), s)
    q = soft_sort(s.detach(), steepness=1.0)[1][0, :, 10:].sum(-1)
    torch.testing.assert_close(
        q,
        torch.tensor(
            [
                0.0003301,
                0.0003748,
                0.0049457,
                0.0054939,
                0.0307931,
                0.0333899,
                0.1042637,
                0.1101528,
                0.2122539,
                0.2182625,
                0.2797397,
            ],
            dtype=torch.float64,
        ),
        atol=1e-7,
        rtol=0,
    )
    torch.testing.assert_close(
        g[0],
        torch.tensor(
            [
                1.6163e-05,
                2.0846e-05,
                2.9843e-04,
                3.67491e-04,
                1.98505e-03,
                2.299864e-03,
                5.521492e-03,
                5.822375e-03,
                3.102849e-03,
                1.91023e-03,
                -2.134479e-02,
            ],
            dtype=torch.float64,
        ),
        atol=1e-8,
        rtol=1e-4,
    )


def test_tv_c_bounds():
    for negv, posv, loss in [(-1.0, 1.0, 0.1469718), (0.0, 0.0, 0.2019829), (1.0, -1.0, 0.2643331)]:
        s = torch.tensor([[negv] * 10 + [posv]], dtype=torch.float64)
        assert abs(_groco_rows_reference(s, 10, "odd_even", "cauchy", 1.0).item() - loss) < 1e-7


def test_tv_e_two_views():
    g = torch.Generator().manual_seed(1234)
    views = [torch.randn(16, 8, generator=g) for _ in range(2)]
    assert abs(groco(views).item() - 0.2071934) < 1e-6


@pytest.mark.parametrize("network", ["odd_even", "bitonic"])
@pytest.mark.parametrize("n", [3, 5, 11, 16])
def test_invariants(network, n):
    torch.manual_seed(n)
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    y, P = soft_sort(x, network=network, steepness=3.0)
    torch.testing.assert_close(P.sum(1), torch.ones(4, n, dtype=torch.float64))
    torch.testing.assert_close(P.sum(2), torch.ones(4, n, dtype=torch.float64))
    assert P.min() >= 0 and P.max() <= 1
    torch.testing.assert_close(y, (x.unsqueeze(1) @ P).squeeze(1))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.ones_like(g))
    _, P2 = soft_sort(x.detach() + 3.5, network=network, steepness=3.0)
    torch.testing.assert_close(P2, P.detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("network", ["odd_even", "bitonic"])
def test_hard_limit(network):
    x = torch.tensor([[0.3, -0.1, 0.9, 0.5, 0.2]], dtype=torch.float64)
    _, P = soft_sort(x, network=network, steepness=1e6)
    hard = torch.nn.functional.one_hot(x.argsort(1).argsort(1), 5).to(P.dtype)
    assert (P - hard).abs().max() < 1e-4


def test_groco_bad_inputs():
    v = [torch.randn(8, 4), torch.randn(8, 4)]
    with pytest.raises(ValueError, match="topk_neg"):
        groco(v, topk_neg=8)
    groco(v, topk_neg=7)  # B = topk_neg + 1 is enough
    with pytest.raises(ValueError, match="network"):
        groco(v, topk_neg=3, network="bubble")
    with pytest.raises(ValueError, match="distribution"):
        groco(v, topk_neg=3, distribution="laplace")
    with pytest.raises(ValueError, match="steepness"):
        groco(v, topk_neg=3, steepness=0.0)
    with pytest.raises(ValueError, match="views"):
        groco([v[0]], topk_neg=3)
    with pytest.raises(ValueError, match="views\\[1\\]"):
        groco([v[0], torch.randn(7, 4)], topk_neg=3)
    with pytest.raises(TypeError):
        groco([v[0].long(), v[1].long()], topk_neg=3)
