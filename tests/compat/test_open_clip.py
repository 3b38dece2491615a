"""fastssl.compat.open_clip.ClipLoss in open_clip's documented call, against the formula (always)
and against open_clip 3.3.0's ClipLoss itself when it is importable (tests/compat/peers.py)."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from fastssl.compat.open_clip import ClipLoss
import peers


def _features(b=12, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1).requires_grad_()
    return img, txt


def _formula(img, txt, scale):
    # open_clip's documented loss: symmetric cross-entropy of scale * I T^T, labels arange
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_documented_call_equals_formula_values_and_gradients():
    img, txt = _features()
    scale = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    loss = ClipLoss()(img, txt, scale)
    grads = torch.autograd.grad(loss, (img, txt, scale))
    ref = _formula(img, txt, scale)
    ref_grads = torch.autograd.grad(ref, (img, txt, scale))
    assert loss.shape == ()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_features_used_as_given_and_output_dict():
    img, txt = _features(seed=1)
    # not unit norm: ClipLoss must not re-normalise (open_clip's model normalises before)
    img2, txt2 = (2 * img).detach(), (0.5 * txt).detach()
    out = ClipLoss()(img2, txt2, 10.0, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], _formula(img2, txt2, 10.0))
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    with_bias = ClipLoss()(img, txt, 10.0, logit_bias=bias)
    torch.testing.assert_close(with_bias, _formula(img, txt, 10.0))
    (g,) = torch.autograd.grad(with_bias, bias)
    assert float(g) == 0.0  # a shift of every logit: no gradient, as open_clip's (to rounding)


def test_unsupported_combinations_refused():
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="gather_with_grad"):
        ClipLoss(local_loss=True, gather_with_grad=False, world_size=2, rank=0)
    img, txt = _features()
    with pytest.raises(ValueError, match="world_size"):
        ClipLoss(world_size=2, rank=0, gather_with_grad=True)(img, txt, 10.0)
    with pytest.raises(TypeError, match="logit_scale"):
        ClipLoss()(img, txt, "10")


def test_signature_and_values_equal_peer():
    peer = peers.open_clip_loss()
    assert peers.open_clip_version() == "3.3.0", "the docstring names open_clip 3.3.0: update it"
    for method in ("__init__", "forward"):
        ours = inspect.signature(getattr(ClipLoss, method))
        theirs = inspect.signature(getattr(peer.ClipLoss, method))
        assert [(p.name, p.default) for p in ours.parameters.values()] == \
            [(p.name, p.default) for p in theirs.parameters.values()], method
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        img, txt = _features(b=16, d=8, seed=2, dtype=dtype)
        scale = torch.tensor(30.0, dtype=dtype, requires_grad=True)
        ours = ClipLoss()(img, txt, scale)
        g_ours = torch.autograd.grad(ours, (img, txt, scale))
        theirs = peer.ClipLoss()(img, txt, scale)
        g_theirs = torch.autograd.grad(theirs, (img, txt, scale))
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol)
