"""A learnable temperature (0-dim tensor with gradient) in nt_xent, info_nce, dcl, dclw and
their modules; InfoNCELoss(symmetric=True) with open_clip's logit_scale matches open_clip's
ClipLoss(local_loss=False, gather_with_grad=True) formula, written here (issue 15)."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import functional
from fastssl import losses as L

BACKENDS = ["torch", "triton", "reference"]


def clip_loss(image, text, logit_scale):
    """open_clip's ClipLoss on one process: features normalised by the model, logits scaled
    by logit_scale.exp(), cross-entropy in both directions, averaged."""
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    logits_per_image = logit_scale.exp() * image @ text.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_image.T, labels)) / 2


def _inputs(dtype, n=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=dtype)
    b = a + 0.8 * torch.randn(n, d, generator=g, dtype=dtype)
    return a.requires_grad_(True), b.requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_symmetric_matches_open_clip_value_and_scale_gradient(backend):
    a, b = _inputs(torch.float32)
    logit_scale = torch.nn.Parameter(torch.tensor(2.3))
    with fastssl.use_backend(backend):
        loss = L.InfoNCELoss(symmetric=True)(a, b, temperature=1 / logit_scale.exp())
    grads = torch.autograd.grad(loss, [a, b, logit_scale])
    expected = clip_loss(a, b, logit_scale)
    grads_expected = torch.autograd.grad(expected, [a, b, logit_scale])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert grads[2].abs() > 1e-3  # the scale gradient is not trivially zero here


def test_scale_gradient_float64_gradcheck_against_open_clip_formula():
    a, b = _inputs(torch.float64)
    logit_scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)

    def ours(a, b, s):
        return functional.info_nce(a, b, 1 / s.exp(), symmetric=True)

    with fastssl.use_backend("torch"):
        assert torch.autograd.gradcheck(ours, (a, b, logit_scale))
        g = torch.autograd.grad(ours(a, b, logit_scale), logit_scale)[0]
    g_clip = torch.autograd.grad(clip_loss(a, b, logit_scale), logit_scale)[0]
    torch.testing.assert_close(g, g_clip, rtol=1e-10, atol=1e-12)


def _reference_formulas(name, a, b, t):
    """Plain formulas (full matrices) with the tensor temperature t."""
    ha, hb = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n = a.shape[0]
    if name == "info_nce":
        return F.cross_entropy(ha @ hb.T / t, torch.arange(n))
    z = torch.cat([ha, hb])
    s = z @ z.T / t
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    eye = torch.eye(2 * n, dtype=torch.bool)
    if name == "nt_xent":
        return F.cross_entropy(s.masked_fill(eye, float("-inf")), pos)
    neg = eye | F.one_hot(pos, 2 * n).bool()
    lse = torch.logsumexp(s.masked_fill(neg, float("-inf")), dim=1)
    return (lse - s[torch.arange(2 * n), pos]).mean()


LOSSES = {
    "nt_xent": lambda a, b, t: functional.nt_xent(a, b, t),
    "info_nce": lambda a, b, t: functional.info_nce(a, b, t),
    "dcl": lambda a, b, t: functional.dcl(a, b, t),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_tensor_temperature_matches_formula(name, backend):
    a, b = _inputs(torch.float32, seed=3)
    temperature = torch.tensor(0.3, requires_grad=True)
    with fastssl.use_backend(backend):
        loss = LOSSES[name](a, b, temperature)
    grads = torch.autograd.grad(loss, [a, b, temperature])
    expected = _reference_formulas(name, a, b, temperature)
    grads_expected = torch.autograd.grad(expected, [a, b, temperature])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "info_nce_sym", "dcl", "dclw"])
def test_gradcheck_float64_every_loss(name):
    fn = {"nt_xent": functional.nt_xent, "info_nce": functional.info_nce, "dcl": functional.dcl,
          "info_nce_sym": lambda a, b, t: functional.info_nce(a, b, t, symmetric=True),
          "dclw": lambda a, b, t: functional.dclw(a, b, t, sigma=0.4)}[name]
    a, b = _inputs(torch.float64, n=5, d=4, seed=5)
    if name == "dclw":  # its weights carry no gradient by design: check the scale only
        a, b = a.detach(), b.detach()
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    with fastssl.use_backend("torch"):
        assert torch.autograd.gradcheck(fn, (a, b, t))
        g = torch.autograd.grad(fn(a, b, t), t)[0]
    with fastssl.use_backend("reference"):
        g_ref = torch.autograd.grad(fn(a, b, t), t)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_float_and_detached_tensor_give_the_float_path():
    a, b = _inputs(torch.float32, seed=9)
    with fastssl.use_backend("torch"):
        x = functional.nt_xent(a, b, 0.25)
        y = functional.nt_xent(a, b, torch.tensor(0.25))
    torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_modules_accept_a_parameter_and_register_it():
    t = torch.nn.Parameter(torch.tensor(0.2))
    for module in (L.NTXentLoss(t), L.InfoNCELoss(t, symmetric=True), L.DCLLoss(t),
                   L.DCLWLoss(t)):
        assert [p for p in module.parameters()] == [t]
        a, b = _inputs(torch.float32, seed=1)
        module(a, b).backward()
        assert t.grad is not None and torch.isfinite(t.grad)
        t.grad = None


def test_no_n_by_n_buffer_is_saved():
    n = 256
    a, b = _inputs(torch.float32, n=n, d=8)
    logit_scale = torch.tensor(2.0, requires_grad=True)
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with fastssl.use_backend("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = functional.info_nce(a, b, 1 / logit_scale.exp(), symmetric=True)
        loss = loss + functional.nt_xent(a, b, 1 / logit_scale.exp())
    loss.backward()
    assert sizes and max(sizes) < n * n // 4, max(sizes)


def test_bad_temperatures_name_the_argument():
    a, b = _inputs(torch.float32)
    with pytest.raises(TypeError, match="temperature"):
        functional.info_nce(a, b, torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="temperature"):
        functional.nt_xent(a, b, torch.tensor(1))
    with pytest.raises(ValueError, match="temperature"):
        functional.dcl(a, b, torch.tensor(-0.1, requires_grad=True))
    with pytest.raises(ValueError, match="temperature"):
        L.InfoNCELoss(torch.tensor(float("nan")))
    with pytest.raises(TypeError, match="temperature"):
        functional.sce(a, b, None, use_keys=True, temperature=torch.tensor(0.1))
