"""fastssl's native modules never accept a call they would get wrong (issue 24): lightly's list
form given to SwAVLoss raises a TypeError naming the argument and the compat class (the old
code returned a loss that ignored the low-resolution crops and the queue); sinkhorn_iterations
= 0 is the normalisation only (the old code raised); nt_xent / info_nce take normalize=False
(inputs used as given; the old code always normalised, changing the gradients of unit-norm
features)."""
import pytest
import torch
import torch.nn.functional as F

from fastssl import functional, losses, reference


def _crops(n, b=6, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, k, generator=g) for _ in range(n)]


@pytest.mark.parametrize("queue_length", [0, 12])
def test_swav_lightly_list_form_refused(queue_length):
    high, low, queue = _crops(2), _crops(4, seed=1), _crops(2, seed=2)
    loss = losses.SwAVLoss(queue_length=queue_length)
    with pytest.raises(
        TypeError, match=r"(embeddings|prototypes).*fastssl\.compat\.lightly\.SwaVLoss"
    ):
        loss(high, low)
    with pytest.raises(TypeError, match=r"prototypes.*fastssl\.compat\.lightly\.SwaVLoss"):
        loss(high, low, queue)


def test_swav_wrong_argument_types_named():
    high = _crops(2)
    with pytest.raises(TypeError, match="prototypes"):
        losses.SwAVLoss(queue_length=12)(high, embeddings=high, prototypes="weights")
    with pytest.raises(TypeError, match="embeddings"):
        losses.SwAVLoss(queue_length=12)(high, embeddings=3.0, prototypes=torch.randn(5, 5))
    with pytest.raises(TypeError, match="scores"):
        losses.SwAVLoss()(torch.randn(6, 5))


def test_swav_native_form_equals_lightly_form():
    from fastssl.compat.lightly import SwaVLoss
    high, low = _crops(2), _crops(3, seed=3)
    native = losses.SwAVLoss(n_assign_crops=2)(high + low)
    torch.testing.assert_close(SwaVLoss()(high, low), native.reshape(1))


@pytest.mark.parametrize("iterations", [0, 1])
def test_sinkhorn_zero_iterations_everywhere(iterations):
    scores = torch.randn(7, 4, dtype=torch.float64)
    expected = reference.sinkhorn(scores, iterations=iterations)
    if iterations == 0:
        q = torch.exp(scores / 0.05)
        torch.testing.assert_close(expected, q / q.sum() * 7)
    torch.testing.assert_close(functional.sinkhorn(scores, iterations=iterations), expected)
    views = [torch.randn(7, 4, dtype=torch.float64) for _ in range(3)]
    torch.testing.assert_close(functional.swav(views, sinkhorn_iterations=iterations),
                               reference.swav(views, sinkhorn_iterations=iterations))
    losses.SwAVLoss(sinkhorn_iterations=iterations)(views)
    with pytest.raises(ValueError, match="sinkhorn_iterations"):
        losses.SwAVLoss(sinkhorn_iterations=-1)


def _unit(b=10, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1),
            F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1))


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_normalize_false_uses_inputs_as_given(symmetric):
    q0, k0 = _unit()
    q, k = (1.7 * q0).requires_grad_(), (0.6 * k0).requires_grad_()
    loss = losses.InfoNCELoss(0.2, symmetric=symmetric, normalize=False)(q, k)
    gq, gk = torch.autograd.grad(loss, (q, k))
    logits = q @ k.T / 0.2
    labels = torch.arange(q.shape[0])
    ref = F.cross_entropy(logits, labels)
    if symmetric:
        ref = 0.5 * (ref + F.cross_entropy(logits.T, labels))
    rq, rk = torch.autograd.grad(ref, (q, k))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gq, rq)
    torch.testing.assert_close(gk, rk)
    torch.testing.assert_close(
        reference.info_nce(q, k, 0.2, symmetric=symmetric, normalize=False), ref)
    # unit-norm inputs: the same value either way, but only normalize=False has their gradient
    a, b = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    g_false = torch.autograd.grad(functional.info_nce(a, b, 0.2, normalize=False), a)[0]
    g_true = torch.autograd.grad(functional.info_nce(a, b, 0.2), a)[0]
    g_eager = torch.autograd.grad(F.cross_entropy(a @ b.T / 0.2, labels), a)[0]
    torch.testing.assert_close(g_false, g_eager)
    assert (g_true - g_eager).abs().max() > 1e-3


def test_nt_xent_normalize_false_uses_inputs_as_given():
    z1, z2 = _unit(seed=3)
    z1, z2 = (2 * z1).requires_grad_(), (0.5 * z2).requires_grad_()
    b = z1.shape[0]
    z = torch.cat([z1, z2])
    logits = (z @ z.T / 0.3).masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    ref = F.cross_entropy(logits, torch.cat([torch.arange(b, 2 * b), torch.arange(b)]))
    loss = losses.NTXentLoss(0.3, normalize=False)(z1, z2)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(ref, (z1, z2))):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(reference.nt_xent(z1, z2, 0.3, normalize=False), ref)
    with pytest.raises(TypeError, match="normalize"):
        functional.nt_xent(z1, z2, normalize="no")
