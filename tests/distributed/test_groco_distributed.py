"""GroCo with gather_distributed=True under torchrun (gloo): docs/api.md's two promises."""
import pytest
import torch

import fastssl
from fastssl import distributed as D
from fastssl import reference
from fastssl.functional import groco
from fastssl.testing import run_torchrun

pytestmark = pytest.mark.distributed


def _global_views(rows, world, n_views):
    g = torch.Generator().manual_seed(11)
    return [torch.randn(rows * world, 6, generator=g, dtype=torch.float64) for _ in range(n_views)]


def worker_groco(rows, n_views, topk, backend):
    w, r = D.world_size(), D.rank()
    views = [v[r * rows:(r + 1) * rows].clone().requires_grad_(True)
             for v in _global_views(rows, w, n_views)]
    fn = reference.groco if backend == "reference" else groco
    with fastssl.use_backend("auto" if backend == "reference" else backend):
        loss = fn(views, topk_neg=topk, gather_distributed=True)
    grads = torch.autograd.grad(loss, views)
    too_small = None
    try:
        groco([v[:1] for v in views], topk_neg=rows * w, gather_distributed=True)
    except ValueError as e:
        too_small = str(e)
    return {"loss": loss.detach(), "grads": [g / w for g in grads], "too_small": too_small}


@pytest.mark.parametrize("world,backend", [(2, "cpp"), (3, "cpp"), (2, "reference")])
def test_groco_matches_single_process(world, backend):
    rows, n_views, topk = 4, 3, 5
    results = run_torchrun(f"{__file__}:worker_groco", world,
                           {"rows": rows, "n_views": n_views, "topk": topk, "backend": backend})
    views = [v.requires_grad_(True) for v in _global_views(rows, world, n_views)]
    ref = reference.groco(views, topk_neg=topk)
    g_ref = torch.autograd.grad(ref, views)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["loss"], ref.detach(), rtol=1e-10, atol=1e-12)
        for g, gr in zip(res["grads"], g_ref):
            torch.testing.assert_close(g, gr[r * rows:(r + 1) * rows], rtol=1e-8, atol=1e-12)
        assert res["too_small"] is not None and "topk_neg" in res["too_small"]
