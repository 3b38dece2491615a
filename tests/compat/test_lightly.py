"""fastssl.compat.lightly against lightly's own unit tests and against lightly itself.

Part 1 repeats the checks of lightly's tests/loss files (test_ntx_ent_loss.py, test_dcl_loss.py,
test_swav_loss.py, lightly 1.6.0's MemoryBankModule rules), written here from reading them, run
against the compat classes with only the import changed. Exceptions, each with its reason:

* pytest-mock's ``mocker.patch.object(dist, "is_available")`` becomes pytest's monkeypatch with
  a counting stub (same check: called once, ValueError when False).
* ``memory_bank_size`` as a bare int > 0 (lightly <= 1.5 tests): lightly 1.6.0 itself refuses
  it (ValueError, checked below), so the bank cases use (size, dim) tuples as 1.6.0 requires.
* the CUDA variants (``test_forward_pass_cuda``, ``..._memory_bank_cuda``) run only with a GPU.
* lightly's unseeded draws are seeded here (the checks hold for any draw).

Part 2 compares numbers directly with the installed peer (skipped with the reason when lightly
is not importable; see tests/compat/peers.py).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import distributed as dist

from fastssl.compat.lightly import (DCLLoss, DCLWLoss, NTXentLoss, SwaVLoss,
                                    negative_mises_fisher_weights, sinkhorn)
import peers
from conftest import HAS_CUDA


def _count_is_available(monkeypatch, value):
    calls = []

    def stub():
        calls.append(1)
        return value
    monkeypatch.setattr(dist, "is_available", stub)
    return calls


# ---------------------------------------------------------------------------------------------
# Part 1: lightly's tests/loss/test_ntx_ent_loss.py


def _ntxent_manual(out0, out1, temperature):
    # SimCLR's Algorithm 1, the pseudocode lightly's test follows (float64 numpy)
    out0, out1 = np.array(out0, dtype=np.float64), np.array(out1, dtype=np.float64)
    n = len(out0)
    z = np.concatenate([out0, out1], axis=0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    e = np.exp(z @ z.T / temperature)
    loss = 0.0
    for k in range(n):
        for i, j in ((k, k + n), (k + n, k)):
            denominator = e[i].sum() - e[i, i]
            loss += -np.log(e[i, j] / denominator)
    return loss / (2.0 * n)


class TestNTXentLoss:
    def test__gather_distributed(self, monkeypatch):
        calls = _count_is_available(monkeypatch, True)
        NTXentLoss(gather_distributed=True)
        assert len(calls) == 1

    def test__gather_distributed_dist_not_available(self, monkeypatch):
        calls = _count_is_available(monkeypatch, False)
        with pytest.raises(ValueError):
            NTXentLoss(gather_distributed=True)
        assert len(calls) == 1

    @pytest.mark.parametrize("n_samples", [1, 2, 4])
    @pytest.mark.parametrize("dimension", [1, 2, 16, 64])
    @pytest.mark.parametrize("temperature", [0.1, 1, 10])
    @pytest.mark.parametrize("gather_distributed", [False, True])
    def test_with_values(self, n_samples, dimension, temperature, gather_distributed):
        rng = np.random.default_rng(n_samples * 1000 + dimension)
        out0 = torch.tensor(rng.normal(0, 1, size=(n_samples, dimension)), dtype=torch.float32)
        out1 = torch.tensor(rng.normal(0, 1, size=(n_samples, dimension)), dtype=torch.float32)
        loss_function = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)
        l1 = float(loss_function(out0, out1))
        l2 = float(loss_function(out1, out0))
        l1_manual = _ntxent_manual(out0, out1, temperature)
        assert l1 == pytest.approx(l2, abs=1e-5)
        assert l1 == pytest.approx(l1_manual, abs=1e-5)
        assert l2 == pytest.approx(l1_manual, abs=1e-5)

    @pytest.mark.parametrize("n_samples", [1, 2, 8, 16])
    @pytest.mark.parametrize("memory_bank_size", [0, 1, 2, 8, 15, 16, 17])
    @pytest.mark.parametrize("temperature", [0.1, 1, 7])
    @pytest.mark.parametrize("gather_distributed", [False, True])
    def test_with_correlated_embedding(self, n_samples, memory_bank_size, temperature,
                                       gather_distributed):
        rng = np.random.default_rng(n_samples * 100 + memory_bank_size)
        out0_np = rng.random((n_samples, 1))
        out1_np = rng.random((n_samples, 1))
        out0 = torch.tensor(np.concatenate([out0_np, 2 * out0_np], axis=1), dtype=torch.float32)
        out1 = torch.tensor(np.concatenate([out1_np, 2 * out1_np], axis=1), dtype=torch.float32)
        out0.requires_grad = True
        bank = (memory_bank_size, 2) if memory_bank_size > 0 else 0
        loss_function = NTXentLoss(temperature=temperature, memory_bank_size=bank,
                                   gather_distributed=gather_distributed)
        if memory_bank_size > 0:
            for _ in range(int(memory_bank_size / n_samples) + 2):
                loss = float(loss_function(out0, out1))  # fill the bank over several rounds
            expected_loss = -1 * np.log(1 / (memory_bank_size + 1))
        else:
            loss = float(loss_function(out0, out1))
            expected_loss = -1 * np.log(1 / (2 * n_samples - 1))
        assert loss == pytest.approx(expected_loss)  # rel 1e-6, as lightly's test

    @pytest.mark.parametrize("dim", [32, 1])
    @pytest.mark.parametrize("temperature", [0.5, -1.0])
    def test_forward_pass_symmetry(self, dim, temperature):
        # lightly's test_forward_pass, test_forward_pass_1d and test_forward_pass_neg_temp
        torch.manual_seed(0)
        loss = NTXentLoss(temperature=temperature, memory_bank_size=0)
        for bsz in range(1, 20):
            batch_1, batch_2 = torch.randn((bsz, dim)), torch.randn((bsz, dim))
            l1, l2 = loss(batch_1, batch_2), loss(batch_2, batch_1)
            assert (l1 - l2).pow(2).item() == pytest.approx(0.0)

    def test_forward_pass_memory_bank(self):
        torch.manual_seed(0)
        loss = NTXentLoss(memory_bank_size=(64, 32))
        for bsz in range(1, 20):
            loss(torch.randn((bsz, 32)), torch.randn((bsz, 32)))

    @pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
    def test_forward_pass_cuda(self):
        loss = NTXentLoss(memory_bank_size=0)
        bank_loss = NTXentLoss(memory_bank_size=(64, 32))
        for bsz in range(1, 20):
            batch_1, batch_2 = torch.randn((bsz, 32)).cuda(), torch.randn((bsz, 32)).cuda()
            assert (loss(batch_1, batch_2) - loss(batch_2, batch_1)).pow(2).item() \
                == pytest.approx(0.0)
            bank_loss(batch_1, batch_2)

    def test_defaults_and_errors_as_lightly(self):
        loss = NTXentLoss()
        assert loss.temperature == 0.5 and loss.gather_distributed is False
        with pytest.raises(ValueError, match="Illegal temperature"):
            NTXentLoss(temperature=0.0)
        with pytest.raises(ValueError, match="does not specify the feature dimension"):
            NTXentLoss(memory_bank_size=64)
        with pytest.raises(ValueError, match="non-negative"):
            NTXentLoss(memory_bank_size=(-1, 4))
        with pytest.raises(ValueError, match="tuple"):
            NTXentLoss(memory_bank_size=(4, 4, 4))
        assert loss(torch.randn(4, 3), torch.randn(4, 3)).shape == ()
        # the bank is not saved (lightly's buffers are non-persistent)
        assert NTXentLoss(memory_bank_size=(8, 3)).state_dict() == {}


class TestMemoryBank:
    def test_fifo_and_update_rule(self):
        torch.manual_seed(0)
        loss = NTXentLoss(memory_bank_size=(5, 3))
        bank0 = loss.memory_bank.bank.clone()
        assert torch.allclose(bank0.norm(dim=1), torch.ones(5))
        x, y = torch.randn(2, 3), torch.randn(2, 3)
        loss(x, y)  # out0 does not require grad: no update (lightly's rule)
        assert torch.equal(loss.memory_bank.bank, bank0)
        loss(x.requires_grad_(), y)
        assert torch.allclose(loss.memory_bank.bank[:2], F.normalize(y, dim=1))
        assert int(loss.memory_bank.bank_ptr) == 2
        y3 = torch.randn(4, 3)
        loss(torch.randn(4, 3, requires_grad=True), y3)  # reaches the end: fill, drop, ptr 0
        assert torch.allclose(loss.memory_bank.bank[2:], F.normalize(y3, dim=1)[:3])
        assert int(loss.memory_bank.bank_ptr) == 0


# ---------------------------------------------------------------------------------------------
# lightly's tests/loss/test_dcl_loss.py


def _dcl_loop(x1, x2, temperature):
    # lightly's loop-based dcl_reference: every anchor, its positive out, the rest negatives
    z1, z2 = F.normalize(x1, dim=1), F.normalize(x2, dim=1)
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    losses = []
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        mask = torch.ones(2 * n, dtype=torch.bool)
        mask[i] = mask[pos] = False
        sims = z[i] @ z[mask].T / temperature
        losses.append(-(z[i] @ z[pos]) / temperature + torch.logsumexp(sims, dim=0))
    return torch.stack(losses).mean()


class TestDCLLoss:
    def test__gather_distributed(self, monkeypatch):
        calls = _count_is_available(monkeypatch, True)
        DCLLoss(gather_distributed=True)
        assert len(calls) == 1

    def test__gather_distributed_dist_not_available(self, monkeypatch):
        calls = _count_is_available(monkeypatch, False)
        with pytest.raises(ValueError):
            DCLLoss(gather_distributed=True)
        assert len(calls) == 1

    @pytest.mark.parametrize("sigma", [0.0000001, 0.5, 10000])
    def test_negative_mises_fisher_weights(self, sigma):
        torch.manual_seed(0)
        out0, out1 = torch.rand((3, 5)), torch.rand((3, 5))
        w = negative_mises_fisher_weights(out0, out1, sigma)
        assert w.shape == (3,) and not w.requires_grad

    @pytest.mark.parametrize("batch_size", [2, 3])
    @pytest.mark.parametrize("dim", [1, 3])
    @pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
    @pytest.mark.parametrize("gather_distributed", [False, True])
    @pytest.mark.parametrize("weighted", [True, False])
    def test_dclloss_forward(self, batch_size, dim, temperature, gather_distributed, weighted):
        torch.manual_seed(0)
        out0, out1 = torch.rand((batch_size, dim)), torch.rand((batch_size, dim))
        criterion = DCLLoss(temperature=temperature, gather_distributed=gather_distributed,
                            weight_fn=negative_mises_fisher_weights if weighted else None)
        loss0, loss1 = criterion(out0, out1), criterion(out1, out0)
        assert loss0 > 0
        assert loss0 == pytest.approx(loss1)

    def test_dclloss_backprop(self):
        torch.manual_seed(0)
        layer = torch.nn.Linear(5, 5)
        out0, out1 = layer(torch.rand(3, 5)), layer(torch.rand(3, 5))
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        DCLLoss()(out0, out1).backward()
        optimizer.step()

    def test_dclwloss_forward(self):
        torch.manual_seed(0)
        out0, out1 = torch.rand(3, 5), torch.rand(3, 5)
        criterion = DCLWLoss()
        loss0, loss1 = criterion(out0, out1), criterion(out1, out0)
        assert loss0 > 0
        assert loss0 == pytest.approx(loss1)

    @pytest.mark.parametrize("batch_size", [3, 4])
    @pytest.mark.parametrize("dim", [5, 7])
    @pytest.mark.parametrize("temperature", [0.1, 0.5])
    def test_dclloss_matches_reference(self, batch_size, dim, temperature):
        torch.manual_seed(0)
        out0, out1 = torch.randn(batch_size, dim), torch.randn(batch_size, dim)
        assert torch.allclose(DCLLoss(temperature=temperature)(out0, out1),
                              _dcl_loop(out0, out1, temperature))


# ---------------------------------------------------------------------------------------------
# lightly's tests/loss/test_swav_loss.py


class TestSwaVLoss:
    def test__sinkhorn_gather_distributed(self, monkeypatch):
        calls = _count_is_available(monkeypatch, True)
        SwaVLoss(sinkhorn_gather_distributed=True)
        assert len(calls) == 1

    def test__sinkhorn_gather_distributed_dist_not_available(self, monkeypatch):
        calls = _count_is_available(monkeypatch, False)
        with pytest.raises(ValueError):
            SwaVLoss(sinkhorn_gather_distributed=True)
        assert len(calls) == 1

    @pytest.mark.parametrize("n_low_res", range(6))
    @pytest.mark.parametrize("sinkhorn_iterations", range(3))
    def test_forward_pass(self, n_low_res, sinkhorn_iterations):
        criterion = SwaVLoss(sinkhorn_iterations=sinkhorn_iterations)
        high_res = [torch.eye(32, 32) for _ in range(2)]
        low_res = [torch.eye(32, 32) for _ in range(n_low_res)]
        loss = criterion(high_res, low_res)
        assert loss.shape == (1,)  # lightly's shape
        assert loss.cpu().numpy() < 0.5  # almost zero for the unit matrix
        queue = [torch.eye(128, 32) for _ in range(2)]
        assert criterion(high_res, low_res, queue).cpu().numpy() < 0.5

    @pytest.mark.parametrize("n_low_res", range(6))
    @pytest.mark.parametrize("sinkhorn_iterations", range(3))
    def test_forward_pass_bsz_1_and_1d(self, n_low_res, sinkhorn_iterations):
        criterion = SwaVLoss(sinkhorn_iterations=sinkhorn_iterations)
        criterion([torch.eye(1, 32) for _ in range(2)], [torch.eye(1, 32)] * n_low_res)
        loss = criterion([torch.eye(32, 1) for _ in range(2)], [torch.eye(32, 1)] * n_low_res)
        assert loss.cpu().numpy() < 0.5

    def test_sinkhorn_zero_iterations_is_the_normalisation(self):
        torch.manual_seed(0)
        out = torch.randn(6, 4, dtype=torch.float64)
        q = torch.exp(out / 0.05)
        expected = q / q.sum() * 6  # lightly/SwAV: no row or column scaling at 0 iterations
        assert torch.allclose(sinkhorn(out, iterations=0), expected)
        codes = sinkhorn(out, iterations=3)
        assert torch.allclose(codes.sum(1), torch.ones(6, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Part 2: the numbers of the installed peer


def test_peer_version_is_the_documented_one():
    peers.lightly_module("ntx_ent_loss")
    assert peers.lightly_version() == "1.6.0", "docstrings name lightly 1.6.0: update them"


@pytest.mark.parametrize("bank", [0, (24, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ntxent_equals_peer(bank, dtype):
    peer = peers.lightly_module("ntx_ent_loss")
    torch.manual_seed(3)
    ours = NTXentLoss(memory_bank_size=bank)
    torch.manual_seed(3)  # the bank's random start: the same draws
    theirs = peer.NTXentLoss(memory_bank_size=bank)
    if bank:
        assert torch.equal(ours.memory_bank.bank, theirs.memory_bank.bank)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for step in range(4):
        a = torch.randn(10, 8, dtype=dtype, requires_grad=True)
        b = torch.randn(10, 8, dtype=dtype, requires_grad=True)
        a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        if bank and dtype == torch.float64:
            ours.memory_bank.bank = ours.memory_bank.bank.double()
            theirs.memory_bank.bank = theirs.memory_bank.bank.double()
        lo, lt = ours(a, b), theirs(a2, b2)
        torch.testing.assert_close(lo, lt, **tol)
        lo.backward()
        lt.backward()
        torch.testing.assert_close(a.grad, a2.grad, **tol)
        torch.testing.assert_close(b.grad, b2.grad, **tol)
        if bank:
            torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank, **tol)


@pytest.mark.parametrize("cls", ["DCLLoss", "DCLWLoss"])
def test_dcl_equals_peer(cls):
    peer = peers.lightly_module("dcl_loss")
    torch.manual_seed(4)
    a = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    lo = {"DCLLoss": DCLLoss, "DCLWLoss": DCLWLoss}[cls](temperature=0.2)(a, b)
    lt = getattr(peer, cls)(temperature=0.2)(a2, b2)
    torch.testing.assert_close(lo, lt, rtol=1e-10, atol=1e-12)
    (lo * 1.0).backward()
    lt.backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("n_low", [0, 4])
@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_equals_peer(iterations, n_low, with_queue):
    peer = peers.lightly_module("swav_loss")
    torch.manual_seed(5)
    high = [torch.randn(8, 10, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    low = [torch.randn(8, 10, dtype=torch.float64, requires_grad=True) for _ in range(n_low)]
    queue = [torch.randn(16, 10, dtype=torch.float64) for _ in range(2)] if with_queue else None
    lo = SwaVLoss(sinkhorn_iterations=iterations)(high, low, queue)
    grads_o = torch.autograd.grad(lo.sum(), high + low)
    lt = peer.SwaVLoss(sinkhorn_iterations=iterations)(high, low, queue)
    grads_t = torch.autograd.grad(lt.sum(), high + low)
    assert lo.shape == lt.shape == (1,)
    torch.testing.assert_close(lo, lt, rtol=1e-9, atol=1e-12)
    for go, gt in zip(grads_o, grads_t):
        torch.testing.assert_close(go, gt, rtol=1e-9, atol=1e-12)
    for it in (0, 2):
        torch.testing.assert_close(sinkhorn(high[0].detach(), it, 0.1),
                                   peer.sinkhorn(high[0].detach(), it, 0.1),
                                   rtol=1e-9, atol=1e-12)


def test_signatures_equal_peer():
    import inspect
    mods = {name: peers.lightly_module(mod) for name, mod in
            (("NTXentLoss", "ntx_ent_loss"), ("DCLLoss", "dcl_loss"), ("DCLWLoss", "dcl_loss"),
             ("SwaVLoss", "swav_loss"))}
    import fastssl.compat.lightly as compat
    for name, mod in mods.items():
        for method in ("__init__", "forward"):
            ours = inspect.signature(getattr(getattr(compat, name), method))
            theirs = inspect.signature(getattr(getattr(mod, name), method))
            assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == \
                [(p.name, p.default, p.kind) for p in theirs.parameters.values()], (name, method)
    for fn, mod in (("sinkhorn", mods["SwaVLoss"]),
                    ("negative_mises_fisher_weights", mods["DCLLoss"])):
        ours, theirs = inspect.signature(getattr(compat, fn)), inspect.signature(getattr(mod, fn))
        assert [(p.name, p.default) for p in ours.parameters.values()] == \
            [(p.name, p.default) for p in theirs.parameters.values()], fn
