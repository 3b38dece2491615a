"""SwAV under torchrun (2 gloo ranks): distributed Sinkhorn equals one process on the
concatenated batch; the swav loss keeps docs/api.md's value and gradient promises."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import distributed as D
from fastssl import functional
from fastssl import reference as R
from fastssl.testing import assert_close, run_torchrun

pytestmark = pytest.mark.distributed

B_LOCAL, K, N_CROPS = 5, 7, 3


def _global_scores(world, rows=B_LOCAL, seed=11):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(K, 6, generator=g, dtype=torch.float64), dim=1)
    return [
        F.normalize(torch.randn(rows * world, 6, generator=g, dtype=torch.float64), dim=1)
        @ protos.T
        for _ in range(N_CROPS)
    ]


SWAV_CASES = [("cpp", False), ("torch", False), ("reference", True)]
SINKHORN_BACKENDS = ["reference", "torch", "cpp"]


def worker_all():
    """One torchrun for every check (starting ranks is the slow part)."""
    w, r = D.world_size(), D.rank()
    s = _global_scores(w)[0]
    queue = _global_scores(w, rows=3, seed=12)[0]
    mine = s[r * B_LOCAL:(r + 1) * B_LOCAL]
    my_queue = queue[r * 3:(r + 1) * 3]
    out = {}
    for b in SINKHORN_BACKENDS:
        with fastssl.use_backend(b):
            out[b] = functional.sinkhorn(mine, gather_distributed=True)
            out[b + "_queue"] = functional.sinkhorn(
                torch.cat([my_queue, mine]), gather_distributed=True
            )
            out[b + "_local"] = functional.sinkhorn(mine, gather_distributed=False)
    out["reference_fn"] = R.sinkhorn(mine, gather_distributed=True)
    for backend, use_reference in SWAV_CASES:
        views = [
            v[r * B_LOCAL : (r + 1) * B_LOCAL].clone().requires_grad_(True)
            for v in _global_scores(w)
        ]
        fn = R.swav if use_reference else functional.swav
        with fastssl.use_backend(backend):
            loss = fn(views, n_assign_crops=2, gather_distributed=True)
        loss.backward()
        out[("swav", backend)] = {"loss": loss.detach(), "grads": [v.grad / w for v in views]}
    return out


@pytest.fixture(scope="module")
def results():
    return run_torchrun(f"{__file__}:worker_all", 2)


def test_sinkhorn_gather_equals_single_process(results):
    s = _global_scores(2)[0]
    queue = _global_scores(2, rows=3, seed=12)[0]
    want = R.sinkhorn(s)
    # queue rows of every rank plus every batch: Sinkhorn is equivariant to row order
    want_q = R.sinkhorn(torch.cat([queue[:3], s[:B_LOCAL], queue[3:], s[B_LOCAL:]]))
    for r, res in enumerate(results):
        rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        assert_close(res["reference_fn"], want[rows])
        for b in SINKHORN_BACKENDS:
            assert_close(res[b], want[rows], msg=b)
            qrows = slice(r * (3 + B_LOCAL), (r + 1) * (3 + B_LOCAL))
            assert_close(res[b + "_queue"], want_q[qrows], msg=b)
            assert_close(res[b + "_local"], R.sinkhorn(s[rows]), msg=b)


@pytest.mark.parametrize("backend,use_reference", SWAV_CASES)
def test_swav_gather_value_and_gradient_promises(results, backend, use_reference):
    views = [v.clone().requires_grad_(True) for v in _global_scores(2)]
    ref = R.swav(views, n_assign_crops=2)
    grads = torch.autograd.grad(ref, views)
    for r, res in enumerate(results):
        got = res[("swav", backend)]
        rows = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        # (1) the global-batch loss on every rank; (2) rank gradient / W = single-process rows
        assert_close(got["loss"], ref.detach())
        for g, want in zip(got["grads"], grads):
            assert_close(g, want[rows])
