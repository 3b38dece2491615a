"""sfrik_mmd, sfrik and auh with gather_distributed=True under torchrun (gloo, CPU).

docs/api.md: the loss on every rank equals the single-process loss on the concatenated batch, and
each rank's input gradient / W equals the single-process gradient of its rows. Checked for the
default (auto) fast path, the Triton kernels (interpreter on CPU) and the reference.
"""
import pytest
import torch

import fastssl
from fastssl._backend import can_serve
from fastssl import distributed as D
from fastssl import functional
from fastssl import reference as R
from fastssl.testing import run_torchrun

pytestmark = pytest.mark.distributed

ROWS, DIM = 3, 5
WEIGHTS = (1.0, 40.0, 40.0, 2.0)


def _global_pair(world):
    gen = torch.Generator().manual_seed(11)
    z1 = torch.randn(ROWS * world, DIM, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.4 * torch.randn(ROWS * world, DIM, generator=gen, dtype=torch.float64)
    return z1, z2


def _losses(module, a, b, gather):
    return {
        "sfrik_mmd": lambda: module.sfrik_mmd(a, weights=WEIGHTS, gather_distributed=gather),
        "sfrik": lambda: module.sfrik(a, b, weights=WEIGHTS, sim_coeff=50.0,
                                      gather_distributed=gather),
        "auh": lambda: module.auh(a, b, sim_coeff=50.0, scale=2.5, gather_distributed=gather),
    }


def _evaluate(module, z1, z2, gather, scale=1.0):
    out = {}
    for name in ("sfrik_mmd", "sfrik", "auh"):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        loss = _losses(module, a, b, gather)[name]()
        loss.backward()
        gb = b.grad / scale if b.grad is not None else torch.zeros_like(b)
        out[name] = (loss.detach(), a.grad / scale, gb)
    return out


def worker(with_triton):
    w, r = D.world_size(), D.rank()
    z1, z2 = _global_pair(w)
    rows = slice(r * ROWS, (r + 1) * ROWS)
    results = {}
    with fastssl.use_backend("auto"):
        results["fast"] = _evaluate(functional, z1[rows], z2[rows], True, scale=w)
    if with_triton and can_serve("triton", z1.device)[0]:
        with fastssl.use_backend("triton"):
            results["triton"] = _evaluate(functional, z1[rows], z2[rows], True, scale=w)
    results["reference"] = _evaluate(R, z1[rows], z2[rows], True, scale=w)
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process(world):
    # The Triton kernels (the interpreter on CPU) once, at world size 2, to keep this fast.
    with_triton = world == 2 and can_serve("triton", torch.device("cpu"))[0]
    results = run_torchrun(f"{__file__}:worker", world, {"with_triton": with_triton})
    z1, z2 = _global_pair(world)
    expected = _evaluate(R, z1, z2, False)
    for r, res in enumerate(results):
        assert ("triton" in res) == with_triton
        rows = slice(r * ROWS, (r + 1) * ROWS)
        for path, got in res.items():
            for name, (loss, g1, g2) in got.items():
                e_loss, e_g1, e_g2 = expected[name]
                msg = f"rank {r} {path} {name}"
                torch.testing.assert_close(loss, e_loss, msg=msg)
                torch.testing.assert_close(g1, e_g1[rows], msg=msg + " grad z1")
                torch.testing.assert_close(g2, e_g2[rows], msg=msg + " grad z2")
