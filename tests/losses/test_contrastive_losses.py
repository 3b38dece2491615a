"""Contrastive losses: bad-input errors (exact type, message naming the argument) and the
nn.Module wrappers (buffers, state_dict, SCE queue behaviour)."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import functional
from fastssl import losses as L
from fastssl import reference as R

X = torch.randn(4, 3)
Y = torch.randn(4, 3)
IDX = torch.arange(4)
U = torch.zeros(10)
Q = F.normalize(torch.randn(6, 3), dim=1)

BAD = [
    # (callable, exception type, words the message must contain)
    (lambda f: f.nt_xent(X, torch.randn(5, 3)), ValueError, ["z2", "(4, 3)", "(5, 3)"]),
    (lambda f: f.nt_xent(X, torch.randn(4, 2)), ValueError, ["z2"]),
    (lambda f: f.nt_xent(X[0], Y[0]), ValueError, ["z1", "2-D"]),
    (lambda f: f.nt_xent(X.long(), Y.long()), TypeError, ["z1", "int64"]),
    (lambda f: f.nt_xent(X, Y.double()), TypeError, ["z2", "float64"]),
    (lambda f: f.nt_xent(X[:0], Y[:0]), ValueError, ["z1", "row"]),
    (lambda f: f.nt_xent(X, Y, 0.0), ValueError, ["temperature"]),
    (lambda f: f.nt_xent(X, Y, -1.0), ValueError, ["temperature"]),
    (lambda f: f.nt_xent(X, Y, "0.1"), TypeError, ["temperature"]),
    (lambda f: f.nt_xent(X.numpy(), Y), TypeError, ["z1", "Tensor"]),
    (lambda f: f.info_nce(X, torch.randn(3, 3)), ValueError, ["k"]),
    (lambda f: f.info_nce(X, Y, symmetric=1), TypeError, ["symmetric"]),
    (lambda f: f.info_nce(X, Y, temperature=float("nan")), ValueError, ["temperature"]),
    (lambda f: f.dcl(X[:1], Y[:1]), ValueError, ["z1", "at least 2"]),
    (lambda f: f.dcl(X, Y, temperature=0), ValueError, ["temperature"]),
    (lambda f: f.sogclr(X, Y, IDX, U, gamma=0.0), ValueError, ["gamma"]),
    (lambda f: f.sogclr(X, Y, IDX, U, gamma=1.5), ValueError, ["gamma"]),
    (lambda f: f.sogclr(X, Y, IDX.float(), U), TypeError, ["index"]),
    (lambda f: f.sogclr(X, Y, IDX[:3], U), ValueError, ["index", "(4,)"]),
    (lambda f: f.sogclr(X, Y, IDX, U.long()), TypeError, ["u"]),
    (lambda f: f.sogclr(X, Y, IDX, U.view(2, 5)), ValueError, ["u", "(2, 5)"]),
    (lambda f: f.sogclr(X, Y, IDX, [0.0] * 10), TypeError, ["u"]),
    (lambda f: f.sogclr(X[:1], Y[:1], IDX[:1], U), ValueError, ["z1"]),
    (lambda f: f.sogclr(X, Y, IDX, U, temperature=-0.1), ValueError, ["temperature"]),
    (lambda f: f.sce(X, Y, None), ValueError, ["queue", "use_keys"]),
    (lambda f: f.sce(X, Y, Q[:0]), ValueError, ["queue"]),
    (lambda f: f.sce(X, Y, torch.randn(5, 4)), ValueError, ["queue", "(5, 4)"]),
    (lambda f: f.sce(X, Y, Q, coeff=1.5), ValueError, ["coeff"]),
    (lambda f: f.sce(X, Y, Q, temperature_m=0.0), ValueError, ["temperature_m"]),
    (lambda f: f.sce(X, Y, Q, temperature=0.0), ValueError, ["temperature"]),
    (lambda f: f.sce(X, torch.randn(4, 5), Q), ValueError, ["k"]),
    (lambda f: f.sce(X[:1], Y[:1], None, use_keys=True), ValueError, ["q"]),
    (lambda f: f.sce(X, Y, Q.long()), TypeError, ["queue"]),
    (lambda f: f.sce(X, Y, Q, use_keys="yes"), TypeError, ["use_keys"]),
]


@pytest.mark.parametrize("module", ["functional", "reference"])
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(module, case):
    call, exc, words = BAD[case]
    f = functional if module == "functional" else R
    with pytest.raises(exc) as info:
        call(f)
    assert type(info.value) is exc
    for w in words:
        assert w in str(info.value), (str(info.value), w)


def test_non_finite_inputs_raise_only_when_enabled():
    bad = X.clone()
    bad[0, 0] = float("nan")
    functional.nt_xent(bad, Y)  # off by default: no check, no exception
    fastssl.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match="z1"):
            functional.nt_xent(bad, Y)
    finally:
        fastssl.set_check_finite(False)


@pytest.mark.parametrize("cls,fn,kw", [
    (L.NTXentLoss, functional.nt_xent, {"temperature": 0.3}),
    (L.DCLLoss, functional.dcl, {"temperature": 0.3}),
])
def test_stateless_modules_match_functional(cls, fn, kw):
    m = cls(**kw)
    torch.testing.assert_close(m(X, Y), fn(X, Y, **kw))
    assert len(m.state_dict()) == 0


def test_infonce_module():
    m = L.InfoNCELoss(temperature=0.2, symmetric=True)
    torch.testing.assert_close(m(X, Y), functional.info_nce(X, Y, 0.2, symmetric=True))


def test_sogclr_module_buffer_and_updates():
    m = L.SogCLRLoss(num_samples=10, gamma=0.5, temperature=0.2)
    assert set(m.state_dict()) == {"u"}
    assert m.u.dtype == torch.float32 and m.u.shape == (10,)
    u = torch.zeros(10)
    for _ in range(2):
        out = m(X, Y, IDX)
        ref = functional.sogclr(X, Y, IDX, u, gamma=0.5, temperature=0.2)
        torch.testing.assert_close(out, ref)
    torch.testing.assert_close(m.u, u)
    assert (m.u[:4] > 0).all() and (m.u[4:] == 0).all()
    m2 = L.SogCLRLoss(num_samples=10)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.u, m.u)
    with pytest.raises(ValueError, match="gamma"):
        L.SogCLRLoss(10, gamma=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        L.SogCLRLoss(0)


def test_sce_module_queue_and_enqueue():
    torch.manual_seed(0)
    m = L.SCELoss(dim=3, queue_size=10, coeff=0.5)
    assert set(m.state_dict()) == {"queue", "queue_ptr"}
    assert m.queue.shape == (10, 3)
    torch.testing.assert_close(m.queue.norm(dim=1), torch.ones(10))
    before = m.queue.clone()
    q, k = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    loss = m(q, k)
    # The loss used the queue as it was before the call.
    torch.testing.assert_close(loss, functional.sce(q, k, before, coeff=0.5))
    loss.backward()
    assert q.grad is not None
    torch.testing.assert_close(m.queue[:4], F.normalize(k, dim=1))
    torch.testing.assert_close(m.queue[4:], before[4:])
    assert int(m.queue_ptr) == 4
    # FIFO with wrap-around: 4 + 4 + 4 keys in a queue of 10.
    k2, k3 = torch.randn(4, 3), torch.randn(4, 3)
    m(q.detach(), k2)
    m(q.detach(), k3)
    assert int(m.queue_ptr) == 2
    torch.testing.assert_close(m.queue[4:8], F.normalize(k2, dim=1))
    torch.testing.assert_close(m.queue[8:10], F.normalize(k3[:2], dim=1))
    torch.testing.assert_close(m.queue[0:2], F.normalize(k3[2:], dim=1))


def test_sce_module_more_keys_than_queue():
    m = L.SCELoss(dim=3, queue_size=3)
    k = torch.randn(5, 3)
    m(torch.randn(5, 3), k)
    # The newest 3 keys survive; the pointer moved by 5 (mod 3).
    assert int(m.queue_ptr) == 2
    kn = F.normalize(k, dim=1)
    torch.testing.assert_close(m.queue[[2, 0, 1]], kn[2:])


def test_sce_module_without_queue():
    m = L.SCELoss(dim=3, queue_size=0, use_keys=True)
    assert m.queue.shape == (0, 3)
    torch.testing.assert_close(m(X, Y), functional.sce(X, Y, None, use_keys=True))
    with pytest.raises(ValueError, match="queue_size"):
        L.SCELoss(dim=3, queue_size=0)
    with pytest.raises(ValueError, match="queue_size"):
        L.SCELoss(dim=3, queue_size=-1)
