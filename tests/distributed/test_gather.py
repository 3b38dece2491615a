"""fastssl.distributed under torchrun (gloo): the gather's backward and the loss scaling."""
import pytest
import torch

from fastssl import distributed as D
from fastssl.testing import run_torchrun

pytestmark = pytest.mark.distributed


def _global_batch(rows_per_rank, world):
    g = torch.Generator().manual_seed(7)
    return torch.randn(rows_per_rank * world, 5, generator=g, dtype=torch.float64)


def _toy_loss(local, gathered):
    # A loss coupling every local row with every gathered row, plus a local term.
    return ((local @ gathered.T).sin().sum() + local.pow(2).sum()) / gathered.shape[0]


def worker_gather(rows):
    w, r = D.world_size(), D.rank()
    x_all = _global_batch(rows, w)
    x = x_all[r * rows:(r + 1) * rows].clone().requires_grad_(True)
    share = _toy_loss(x, D.gather(x))
    loss = D.reduce_loss(share)
    loss.backward()
    return {"loss": loss.detach(), "grad": x.grad / w}


def worker_unequal():
    r = D.rank()
    x = torch.randn(3 + r, 4)
    try:
        D.gather(x, name="z1")
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("world", [2, 3])
def test_gather_matches_single_process(world):
    rows = 3
    results = run_torchrun(f"{__file__}:worker_gather", world, {"rows": rows})
    x = _global_batch(rows, world).requires_grad_(True)
    ref = _toy_loss(x, x)
    ref.backward()
    for r, res in enumerate(results):
        torch.testing.assert_close(res["loss"], ref.detach())
        torch.testing.assert_close(res["grad"], x.grad[r * rows:(r + 1) * rows])


def test_unequal_batches_raise_on_every_rank():
    msgs = run_torchrun(f"{__file__}:worker_unequal", 2)
    for m in msgs:
        assert m is not None and "z1" in m and "same local shape" in m


def test_single_process_identity():
    x = torch.randn(4, 3, requires_grad=True)
    assert D.gather(x) is x
    assert D.world_size() == 1 and D.rank() == 0
    s = x.sum()
    assert D.reduce_loss(s) is s
