"""The DINO family under torchrun (gloo, 2 and 3 ranks), gather_distributed=True: on every rank
the value equals the single-process value of the global batch and the rank's gradient / W the
single-process gradient of its rows (docs/api.md); the Sinkhorn-Knopp sums, the center's batch
mean and KoLeo's neighbour search run over every rank's rows. Backends: the fused torch and C++
paths and the reference."""
import pytest
import torch

import fastssl
from fastssl import distributed as D
from fastssl import functional
from fastssl import reference as R
from fastssl.testing import assert_close, run_torchrun

pytestmark = pytest.mark.distributed

ROWS, K, P, DIM = 3, 7, 4, 5
BACKENDS = ("reference", "torch", "cpp")


def _global(world):
    g = torch.Generator().manual_seed(21)
    n = ROWS * world
    students = [1.5 * torch.randn(n, K, generator=g, dtype=torch.float64) for _ in range(3)]
    teachers = [0.1 * torch.randn(n, K, generator=g, dtype=torch.float64) for _ in range(2)]
    center = 0.2 * torch.randn(1, K, generator=g, dtype=torch.float64)
    sp = torch.randn(n, P, K, generator=g, dtype=torch.float64)
    tp = 0.1 * torch.randn(n, P, K, generator=g, dtype=torch.float64)
    masks = torch.rand(n, P, generator=g) < 0.5
    masks[0, 0] = True
    z = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    return students, teachers, center, sp, tp, masks, z


def _losses(mod, data, gather):
    students, teachers, center, sp, tp, masks, z = data
    return {
        "dino_softmax": (students, lambda s: mod.dino(s, teachers, center=center,
                                                      gather_distributed=gather)),
        "dino_sinkhorn": (students, lambda s: mod.dino(s, teachers, centering="sinkhorn_knopp",
                                                       gather_distributed=gather)),
        "ibot_softmax": ([sp], lambda s: mod.ibot_patch(s[0], tp, masks, center=center,
                                                        gather_distributed=gather)),
        "ibot_sinkhorn": ([sp], lambda s: mod.ibot_patch(s[0], tp, masks,
                                                         centering="sinkhorn_knopp",
                                                         gather_distributed=gather)),
        "koleo": ([z], lambda s: mod.koleo(s[0], gather_distributed=gather)),
    }


def _evaluate(mod, data, gather, scale):
    out = {}
    for name, (inputs, fn) in _losses(mod, data, gather).items():
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        loss = fn(leaves)
        loss.backward()
        out[name] = (loss.detach(), [x.grad / scale for x in leaves])
    students, teachers, center = data[:3]
    out["center"] = mod.dino_center(teachers, center, momentum=0.7, gather_distributed=gather)
    return out


def worker():
    w, r = D.world_size(), D.rank()
    rows = slice(r * ROWS, (r + 1) * ROWS)
    students, teachers, center, sp, tp, masks, z = _global(w)
    local = ([s[rows] for s in students], [t[rows] for t in teachers], center, sp[rows],
             tp[rows], masks[rows], z[rows])
    results = {}
    for backend in BACKENDS:
        mod = R if backend == "reference" else functional
        with fastssl.use_backend(backend):
            results[backend] = _evaluate(mod, local, True, w)
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_gather_value_and_gradient_promises(world):
    results = run_torchrun(f"{__file__}:worker", world)
    want = _evaluate(R, _global(world), False, 1.0)
    for r, res in enumerate(results):
        rows = slice(r * ROWS, (r + 1) * ROWS)
        for backend in BACKENDS:
            got = res[backend]
            assert_close(got["center"], want["center"], msg=f"{backend} center rank {r}")
            for name in ("dino_softmax", "dino_sinkhorn", "ibot_softmax", "ibot_sinkhorn",
                         "koleo"):
                loss, grads = want[name]
                g_loss, g_grads = got[name]
                msg = f"{backend} {name} rank {r} of {world}"
                assert_close(g_loss, loss, msg=msg)
                for a, b in zip(g_grads, grads):
                    assert_close(a, b[rows], msg=msg)
