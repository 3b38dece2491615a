"""Learnable temperature under torchrun (gloo, 2 ranks): with gather_distributed, the value on
every rank is the single-process value on the global batch, and the scale's gradient on each
rank is W times that rank's share, so DDP's average (sum / W) is the single-process gradient
(as for the embeddings' gradients, docs/api.md)."""
import pytest
import torch

import fastssl
from fastssl import distributed as D
from fastssl import functional
from fastssl import losses as L
from fastssl.testing import run_torchrun

pytestmark = pytest.mark.distributed

ROWS, DIM = 3, 5
CASES = {
    "info_nce_sym": lambda a, b, t, gd: functional.info_nce(a, b, t, symmetric=True,
                                                            gather_distributed=gd),
    "info_nce": lambda a, b, t, gd: functional.info_nce(a, b, t, gather_distributed=gd),
    "nt_xent": lambda a, b, t, gd: functional.nt_xent(a, b, t, gather_distributed=gd),
    "dcl": lambda a, b, t, gd: functional.dcl(a, b, t, gather_distributed=gd),
}


def _run(world, rank, gather):
    g = torch.Generator().manual_seed(4)
    a_all = torch.randn(ROWS * world, DIM, generator=g, dtype=torch.float64)
    b_all = a_all + 0.6 * torch.randn(ROWS * world, DIM, generator=g, dtype=torch.float64)
    rows = slice(rank * ROWS, (rank + 1) * ROWS) if gather else slice(None)
    out = {}
    for backend in ("torch", "reference"):
        for name, fn in CASES.items():
            logit_scale = torch.tensor(1.9, dtype=torch.float64, requires_grad=True)
            with fastssl.use_backend(backend):
                loss = fn(a_all[rows], b_all[rows], 1 / logit_scale.exp(), gather)
            loss.backward()
            out[backend, name] = (loss.detach(), logit_scale.grad.clone())
        # NTXentLoss with a memory bank: value, scale gradient and the bank after 3 steps
        torch.manual_seed(0)
        module = L.NTXentLoss(0.3, memory_bank_size=(8, DIM), gather_distributed=gather).double()
        for step in range(3):
            logit_scale = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
            a = a_all[rows].clone().requires_grad_(True)
            with fastssl.use_backend(backend):
                loss = module(a, b_all[rows] + step, temperature=1 / logit_scale.exp())
            loss.backward()
            out[backend, "bank", step] = (loss.detach(), logit_scale.grad.clone())
        out[backend, "bank_state"] = (module.memory_bank.clone(), module.memory_bank_ptr.clone())
    return out


def worker():
    return _run(D.world_size(), D.rank(), True)


def test_scale_gradient_is_each_ranks_share_for_ddp():
    world = 2
    results = run_torchrun(f"{__file__}:worker", world)
    single = _run(world, 0, False)
    bank, ptr = single.pop(("torch", "bank_state"))
    for res in results:
        for backend in ("torch", "reference"):
            torch.testing.assert_close(res[backend, "bank_state"][0], bank)
            # 6 rows, then 2 of 6 (end), then 6
            assert int(res[backend, "bank_state"][1]) == int(ptr) == 6
    single.pop(("reference", "bank_state"))
    for key, (loss, grad) in single.items():
        for res in results:
            torch.testing.assert_close(res[key][0], loss, msg=str(key))
        # DDP averages: (sum over ranks of each rank's gradient) / W
        averaged = sum(res[key][1] for res in results) / world
        torch.testing.assert_close(averaged, grad, msg=str(key))
        assert not torch.allclose(results[0][key][1], results[1][key][1]), key
