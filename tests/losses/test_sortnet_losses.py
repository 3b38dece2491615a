"""GroCoLoss and SoftSortNet modules."""
import pytest
import torch

from fastssl import reference
from fastssl.losses import GroCoLoss, SoftSortNet

from conftest import diffsort, needs_diffsort  # diffsort optional (GPU machine)


@needs_diffsort  # reference.groco sorts with diffsort
def test_groco_module_matches_reference():
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(16, 12, generator=g, requires_grad=True) for _ in range(3)]
    mod = GroCoLoss(topk_neg=6, steepness=2.0)
    loss = mod(views)
    ref = reference.groco(views, topk_neg=6, steepness=2.0)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    ga = torch.autograd.grad(loss, views)
    gr = torch.autograd.grad(ref, views)
    for a, b in zip(ga, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    assert len(mod.state_dict()) == 0


def test_groco_module_tv_e_and_bf16():
    g = torch.Generator().manual_seed(1234)
    views = [torch.randn(16, 8, generator=g) for _ in range(2)]
    assert abs(GroCoLoss()(views).item() - 0.2071934) < 1e-6
    out = GroCoLoss()([v.to(torch.bfloat16).requires_grad_(True) for v in views])
    assert out.dtype == torch.float32 and abs(out.item() - 0.2071934) < 5e-3


def test_groco_module_bad_args():
    with pytest.raises(ValueError, match="steepness"):
        GroCoLoss(steepness=0)
    with pytest.raises(ValueError, match="network"):
        GroCoLoss(network="x")
    with pytest.raises(ValueError, match="topk_neg"):
        GroCoLoss(topk_neg=0)
    with pytest.raises(ValueError, match="topk_neg"):
        GroCoLoss(topk_neg=10)([torch.randn(10, 4), torch.randn(10, 4)])


@needs_diffsort
@pytest.mark.parametrize("network", ["odd_even", "bitonic"])
def test_soft_sort_net_matches_diffsort(network):
    x = torch.randn(6, 10, requires_grad=True)
    mine = SoftSortNet(network, 10, steepness=5.0, distribution="gaussian")
    ref = diffsort.DiffSortNet(network, 10, steepness=5.0, distribution="gaussian")
    (y1, p1), (y0, p0) = mine(x), ref(x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(y1.sum() + (p1 ** 2).sum(), x)[0]
    g0 = torch.autograd.grad(y0.sum() + (p0 ** 2).sum(), x)[0]
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)
    assert len(mine.state_dict()) == 0
