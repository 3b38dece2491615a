"""NTXentLoss(memory_bank_size=K) with lightly's semantics, written from lightly's
documentation: the anchors are z1's rows, each with its positive (row i of z2) and the bank's
rows as negatives; the bank holds past normalised z2 rows (no gradient), random normalised keys
at the start; after the loss the batch's z2 is written at the pointer (FIFO; a batch that runs
past the end fills it to the end, the rest is dropped, the pointer returns to 0), only in
training (z1 requires grad)."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import functional
from fastssl import losses as L

BACKENDS = ["torch", "triton", "reference"]


def bank_formula(z1, z2, bank, temperature):
    h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = torch.cat([(h1 * h2).sum(1, keepdim=True), h1 @ bank.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(z1.shape[0], dtype=torch.long))


def _batch(b=6, d=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=dtype)
    z2 = z1 + 0.5 * torch.randn(b, d, generator=g, dtype=dtype)
    return z1.requires_grad_(True), z2.requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_matches_formula(backend):
    z1, z2 = _batch()
    bank = F.normalize(torch.randn(11, 5, generator=torch.Generator().manual_seed(3)), dim=1)
    temperature = torch.tensor(0.3, requires_grad=True)
    with fastssl.use_backend(backend):
        loss = functional.nt_xent(z1, z2, temperature, memory_bank=bank)
    grads = torch.autograd.grad(loss, [z1, z2, temperature])
    expected = bank_formula(z1, z2, bank, temperature)
    grads_expected = torch.autograd.grad(expected, [z1, z2, temperature])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64():
    z1, z2 = _batch(b=4, d=3, dtype=torch.float64)
    bank = F.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    with fastssl.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda a, b: functional.nt_xent(a, b, 0.2, memory_bank=bank), (z1, z2))


def test_bank_update_semantics():
    torch.manual_seed(0)
    loss_fn = L.NTXentLoss(0.2, memory_bank_size=10)
    assert loss_fn.memory_bank.numel() == 0  # created at the first call (width of z1)
    pointers = []
    for step in range(4):
        z1, z2 = _batch(b=4, seed=step)
        if step == 0:
            torch.manual_seed(1)
            loss = loss_fn(z1, z2)
            torch.manual_seed(1)
            initial = F.normalize(torch.randn(10, 5), dim=1)
            torch.testing.assert_close(loss_fn.memory_bank[4:], initial[4:])
            torch.testing.assert_close(loss, bank_formula(z1, z2, initial, 0.2))
            expected_bank = initial.clone()
        else:
            before = loss_fn.memory_bank.clone()
            torch.testing.assert_close(before, expected_bank)
            loss = loss_fn(z1, z2)
            torch.testing.assert_close(loss, bank_formula(z1, z2, before, 0.2))
        loss.backward()  # the loss used a snapshot: the in-place update does not break it
        keys = F.normalize(z2.detach(), dim=1)
        ptr = [0, 4, 8, 0][step]
        if ptr + 4 >= 10:
            expected_bank[ptr:] = keys[:10 - ptr]
        else:
            expected_bank[ptr:ptr + 4] = keys
        pointers.append(int(loss_fn.memory_bank_ptr))
    torch.testing.assert_close(loss_fn.memory_bank, expected_bank)
    assert pointers == [4, 8, 0, 4]  # step 3 wrote rows 8, 9 and dropped the other two


def test_no_update_without_grad_and_no_bank_means_simclr():
    loss_fn = L.NTXentLoss(0.2, memory_bank_size=(7, 5))
    assert loss_fn.memory_bank.shape == (7, 5)
    before = loss_fn.memory_bank.clone()
    z1, z2 = _batch()
    with torch.no_grad():
        loss_fn(z1, z2)
    loss_fn(z1.detach(), z2)
    torch.testing.assert_close(loss_fn.memory_bank, before, rtol=0, atol=0)
    assert int(loss_fn.memory_bank_ptr) == 0
    torch.testing.assert_close(L.NTXentLoss(0.2)(z1, z2), functional.nt_xent(z1, z2, 0.2))
    assert len(L.NTXentLoss(0.2).state_dict()) == 0


def test_state_dict_round_trip():
    trained = L.NTXentLoss(0.2, memory_bank_size=9)
    for step in range(2):
        z1, z2 = _batch(b=4, seed=10 + step)
        trained(z1, z2)
    fresh = L.NTXentLoss(0.2, memory_bank_size=9)
    fresh.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fresh.memory_bank, trained.memory_bank, rtol=0, atol=0)
    assert int(fresh.memory_bank_ptr) == int(trained.memory_bank_ptr) == 8
    z1, z2 = _batch(b=4, seed=20)
    torch.testing.assert_close(fresh(z1, z2), trained(z1, z2))
    torch.testing.assert_close(fresh.memory_bank, trained.memory_bank, rtol=0, atol=0)
    assert set(trained.state_dict()) == {"memory_bank", "memory_bank_ptr"}


def test_bad_arguments_name_themselves():
    z1, z2 = _batch()
    with pytest.raises(ValueError, match="memory_bank_size"):
        L.NTXentLoss(0.1, memory_bank_size=-1)
    with pytest.raises(ValueError, match="memory_bank_size"):
        L.NTXentLoss(0.1, memory_bank_size=(4,))
    with pytest.raises(TypeError, match="memory_bank_size"):
        L.NTXentLoss(0.1, memory_bank_size=2.5)
    with pytest.raises(ValueError, match="memory_bank"):
        functional.nt_xent(z1, z2, memory_bank=torch.randn(4, 3))
    with pytest.raises(ValueError, match="z1"):
        L.NTXentLoss(0.1, memory_bank_size=(4, 3))(z1, z2)
