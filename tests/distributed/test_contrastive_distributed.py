"""Contrastive losses under torchrun (gloo, world 2 and 3), torch and reference backends:
the loss on every rank equals the single-process loss on the concatenated batch, each rank's
gradient / W equals the single-process gradient of its rows, and SogCLR's u and SCE's queue are
the single-process state after several steps. One launch per world size checks every loss."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import distributed as D
from fastssl import functional
from fastssl import losses as L
from fastssl.testing import run_torchrun

pytestmark = pytest.mark.distributed

ROWS, DIM, NUM_SAMPLES, QUEUE = 3, 5, 40, 13
BACKENDS = ("torch", "reference")


def _queue():
    g = torch.Generator().manual_seed(11)
    return F.normalize(torch.randn(7, DIM, generator=g, dtype=torch.float64), dim=1)


CASES = {
    "nt_xent": lambda a, b, gd: functional.nt_xent(a, b, 0.2, gather_distributed=gd),
    "info_nce": lambda a, b, gd: functional.info_nce(a, b, 0.2, gather_distributed=gd),
    "info_nce_sym": lambda a, b, gd: functional.info_nce(
        a, b, 0.2, symmetric=True, gather_distributed=gd
    ),
    "dcl": lambda a, b, gd: functional.dcl(a, b, 0.2, gather_distributed=gd),
    "dclw": lambda a, b, gd: functional.dclw(a, b, 0.2, sigma=0.3, gather_distributed=gd),
    "sce": lambda a, b, gd: functional.sce(a, b, _queue(), coeff=0.3, gather_distributed=gd),
    "sce_keys": lambda a, b, gd: functional.sce(
        a, b, _queue(), use_keys=True, gather_distributed=gd
    ),
    "sce_keys_noqueue": lambda a, b, gd: functional.sce(
        a, b, None, use_keys=True, gather_distributed=gd
    ),
}
# SogCLR batches (global indices): first visit, revisit, a permutation of seen samples, then
# all new samples. Every rank sees the same seen/unseen status as the global batch, so the
# per-rank first-visit rule agrees with the single-process one.
SOG_BATCHES = [list(range(0, 18, 2)), list(range(0, 18, 2)), [16, 2, 8, 0, 14, 4, 12, 6, 10],
               list(range(20, 29))]


def _batch(world, step, salt):
    g = torch.Generator().manual_seed(100 * step + salt)
    n = ROWS * world
    a = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return a, b


def _mine(x, rank):
    return x[rank * ROWS:(rank + 1) * ROWS]


def _grad_b(name):
    return not name.startswith("sce")


def _run_all(world, rank, gather):
    """Everything the test compares, on this rank's rows (gather) or the whole batch."""
    scale = world if gather else 1
    sl = (lambda x: _mine(x, rank)) if gather else (lambda x: x)
    out = {}
    for backend in BACKENDS:
        with fastssl.use_backend(backend):
            for i, (name, fn) in enumerate(CASES.items()):
                a_all, b_all = _batch(world, 0, i)
                a = sl(a_all).clone().requires_grad_(True)
                b = sl(b_all).clone().requires_grad_(_grad_b(name))
                loss = fn(a, b, gather)
                loss.backward()
                out[backend, name] = (loss.detach(), a.grad / scale,
                                      b.grad / scale if _grad_b(name) else None)
            u = torch.zeros(NUM_SAMPLES)
            for step, idx in enumerate(SOG_BATCHES):
                a_all, b_all = _batch(world, step + 1, 50)
                index = sl(torch.tensor(idx[:ROWS * world]))
                a = sl(a_all).clone().requires_grad_(True)
                b = sl(b_all).clone().requires_grad_(True)
                loss = functional.sogclr(a, b, index, u, gamma=0.7, temperature=0.2,
                                 gather_distributed=gather)
                loss.backward()
                out[backend, "sogclr", step] = (loss.detach(), a.grad / scale, b.grad / scale)
            out[backend, "sogclr_u"] = u.clone()
            torch.manual_seed(0)
            module = L.SCELoss(DIM, queue_size=QUEUE, coeff=0.4, gather_distributed=gather).double()
            for step in range(3):
                q_all, k_all = _batch(world, step + 1, 70)
                q = sl(q_all).clone().requires_grad_(True)
                loss = module(q, sl(k_all))
                loss.backward()
                out[backend, "sce_module", step] = (loss.detach(), q.grad / scale, None)
            out[backend, "sce_queue"] = (module.queue.clone(), module.queue_ptr.clone())
    return out


def worker_all():
    return _run_all(D.world_size(), D.rank(), True)


@pytest.mark.parametrize("world", [2, 3])
def test_every_contrastive_loss_matches_single_process(world):
    results = run_torchrun(f"{__file__}:worker_all", world)
    single = _run_all(world, 0, False)
    for rank, res in enumerate(results):
        for key, expected in single.items():
            got = res[key]
            if key[1] in ("sogclr_u",):
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=0, msg=str(key))
                continue
            if key[1] == "sce_queue":
                torch.testing.assert_close(got[0], expected[0], msg=str(key))
                assert int(got[1]) == int(expected[1]), key
                continue
            loss, ga, gb = got
            torch.testing.assert_close(loss, expected[0], msg=f"{key} loss rank {rank}")
            torch.testing.assert_close(
                ga, _mine(expected[1], rank), msg=f"{key} grad a rank {rank}"
            )
            if expected[2] is not None:
                torch.testing.assert_close(gb, _mine(expected[2], rank),
                                           msg=f"{key} grad b rank {rank}")
