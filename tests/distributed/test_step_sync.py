"""No host synchronisation in a training step after warm-up, for every method with
gather_distributed=True (2 gloo ranks, DDP), and every loss compiles with fullgraph=True under
the process group. One torchrun launch runs all checks (torchrun start-up dominates); it also
checks which loss states differ per rank after the steps (only SwAV's queue), which is what
the checkpoint saves per rank.

A "synchronising call" is one that waits for the device on CUDA: a host read of a tensor
(item, tolist, bool/int/float, cpu, numpy) or the equal-batch exchange (all-gather + tolist).
The only host reads allowed are the SogCLR index range check, which runs on the host only for
CPU tensors (on CUDA it is ``torch._assert_async``, see fastssl/_checks.py).
"""
import os
import traceback

import pytest
import torch
import torch.nn as nn

from fastssl import distributed as D
from fastssl.testing import run_torchrun

pytestmark = pytest.mark.distributed

GLOBAL_BATCH, NUM_SAMPLES, STEPS = 8, 32, 3
TINY = {
    "simclr": ({"projector": [16, 8], "bn": False}, {}),
    "auh": ({"projector": [16, 8], "bn": False}, {}),
    "sfrik": ({"projector": [16, 8], "bn": False}, {"sim_coeff": 40.0}),
    "sogclr": ({"projector": [16, 8], "bn": False}, {}),
    "groco": ({"projector": [16, 16, 8], "bn": False}, {"topk_neg": 3}),
    "sce": ({"projector": [16, 8], "predictor": [16, 8], "bn": False}, {"queue_size": 16}),
    # the queue is used from the first step (epoch_queue_starts 0) and full from step 2
    "swav": ({"projector": [16, 8], "bn": False},
             {"n_prototypes": 6, "queue_length": 8, "epoch_queue_starts": 0,
              "freeze_prototypes_iters": 1}),
}
VIEWS = {"groco": [8, 8, 4, 4], "swav": [8, 8, 4, 4]}   # multi-crop: small crops too
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
_ALLOWED = ("fastssl/_checks.py",)   # the CPU-only SogCLR index check (on CUDA: _assert_async)


def _backbone():
    # convolution + global pooling: any crop size, no BatchNorm (DDP on gloo, float64)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


class _SyncCounter:
    """Patches Tensor host reads and the equal-batch exchange; records where each happened."""

    def __init__(self):
        self.calls = []
        self._saved = {}

    def __enter__(self):
        for name in _HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[(torch.Tensor, name)] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        self._saved[(D, "_exchange_shapes")] = D._exchange_shapes
        D._exchange_shapes = self._wrap("check_equal_batch exchange", D._exchange_shapes)
        return self

    def __exit__(self, *exc):
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)

    def _wrap(self, label, original):
        counter = self

        def wrapper(*args, **kwargs):
            stack = traceback.extract_stack(limit=8)[:-1]
            where = next((f"{os.path.relpath(f.filename)}:{f.lineno}" for f in reversed(stack)
                          if "fastssl" in f.filename or "torch" in f.filename), "?")
            counter.calls.append((label, where))
            return original(*args, **kwargs)
        return wrapper

    def disallowed(self):
        return [c for c in self.calls if not any(a in c[1] for a in _ALLOWED)]


def _step_syncs(name):
    from fastssl.methods import StepContext, build_method
    from fastssl.train.loop import StepRunner
    from fastssl.optim import LARS
    r, w = D.rank(), D.world_size()
    D.reset_batch_checks()   # each method warms up on its own
    torch.manual_seed(0)
    heads, args = TINY[name]
    method = build_method(name, _backbone(), 16, heads=heads, args=args, num_samples=NUM_SAMPLES,
                          batch_size=GLOBAL_BATCH, gather_distributed=True)
    model = nn.parallel.DistributedDataParallel(method.model)
    runner = StepRunner(method, model, LARS(method.model.parameters(), lr=0.1))
    b = GLOBAL_BATCH // w
    g = torch.Generator().manual_seed(1 + r)
    per_step = []
    for step in range(STEPS):
        views = [torch.randn(b, 3, s, s, generator=g) for s in VIEWS.get(name, [8, 8])]
        index = torch.arange(b) + r * b + (step % 2) * GLOBAL_BATCH
        ctx = StepContext(step=step, epoch=0, total_steps=STEPS, steps_per_epoch=STEPS)
        with _SyncCounter() as counter:
            runner(views, index, ctx)
        per_step.append(counter.calls)
    state = {k: v.detach().clone() for k, v in method.criterion.state_dict().items()}
    return per_step, state


def _compiled_losses():
    """Each loss with gather_distributed=True compiled with fullgraph=True: value and input
    gradient equal to the eager call on the same inputs."""
    import torch.nn.functional as nnf
    from fastssl import functional as F
    r = D.rank()
    g = torch.Generator().manual_seed(10 + r)
    b, d = 4, 8
    base1, base2 = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    idx = torch.arange(b) + r * b
    queue = nnf.normalize(torch.randn(6, d, generator=g), dim=1)
    losses = {
        "nt_xent": lambda z1, z2: F.nt_xent(z1, z2, gather_distributed=True),
        "info_nce": lambda z1, z2: F.info_nce(z1, z2, symmetric=True, gather_distributed=True),
        "dcl": lambda z1, z2: F.dcl(z1, z2, gather_distributed=True),
        "dclw": lambda z1, z2: F.dclw(z1, z2, gather_distributed=True),
        # a fresh u per call: the in-place update must not change the next call's value
        "sogclr": lambda z1, z2: F.sogclr(z1, z2, idx, torch.zeros(4 * b), gather_distributed=True),
        "sce": lambda z1, z2: F.sce(nnf.normalize(z1, dim=1), nnf.normalize(z2, dim=1).detach(),
                                    queue, gather_distributed=True),
        "groco": lambda z1, z2: F.groco([z1, z2, z1 * z2], topk_neg=3, gather_distributed=True),
        "sfrik": lambda z1, z2: F.sfrik(z1, z2, gather_distributed=True),
        "auh": lambda z1, z2: F.auh(z1, z2, gather_distributed=True),
        "swav": lambda z1, z2: F.swav([z1 @ z2.T, z2 @ z1.T, z1 @ z1.T], gather_distributed=True),
    }
    out = {}
    for name, fn in losses.items():
        torch._dynamo.reset()
        try:
            z1, z2 = base1.clone().requires_grad_(True), base2.clone().requires_grad_(True)
            value = torch.compile(fn, fullgraph=True, backend="aot_eager")(z1, z2)
            grads = torch.autograd.grad(value, (z1, z2), allow_unused=True)
            e1, e2 = base1.clone().requires_grad_(True), base2.clone().requires_grad_(True)
            ref = fn(e1, e2)
            ref_grads = torch.autograd.grad(ref, (e1, e2), allow_unused=True)
            out[name] = {"value": value.detach(), "ref": ref.detach(), "grads": grads,
                         "ref_grads": ref_grads}
        except Exception as e:  # noqa: BLE001 - reported by the test with the loss's name
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    return out


def _shape_change_rechecks():
    """A cached shape is not re-exchanged; a new shape is, and a mismatch still raises."""
    r = D.rank()
    D.reset_batch_checks()
    with _SyncCounter() as counter:
        D.gather(torch.zeros(3, 4), name="a")
        D.gather(torch.zeros(3, 4), name="a")
    exchanges = sum(c[0] == "check_equal_batch exchange" for c in counter.calls)
    try:
        D.gather(torch.zeros(5 + r, 4), name="z1")
        message = None
    except ValueError as e:
        message = str(e)
    return {"exchanges": exchanges, "message": message}


def worker():
    torch.set_num_threads(1)
    return {"steps": {name: _step_syncs(name) for name in TINY}, "compiled": _compiled_losses(),
            "recheck": _shape_change_rechecks()}


def test_no_host_sync_after_warm_up_and_fullgraph_compile_two_ranks():
    results = run_torchrun(f"{__file__}:worker", 2, timeout=600)
    # the checkpoint keeps one copy of a loss state that is equal on every rank (SCE's queue,
    # SogCLR's u) and every rank's copy where it differs (SwAV's queue): the methods say which
    from fastssl.methods import METHODS
    for name in TINY:
        states = [res["steps"][name][1] for res in results]
        same = all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
        assert same != METHODS[name].loss_state_per_rank, (name, sorted(states[0]))
    for rank, res in enumerate(results):
        for name, (per_step, _) in res["steps"].items():
            # warm-up: the equal-batch check runs (once per gathered shape)
            assert any(c[0] == "check_equal_batch exchange" for c in per_step[0]), (
                name,
                per_step[0],
            )
            for step, calls in enumerate(per_step[1:], start=1):
                bad = [c for c in calls if not any(a in c[1] for a in _ALLOWED)]
                assert not bad, f"rank {rank} {name} step {step}: synchronising calls {bad}"
        assert res["recheck"]["exchanges"] == 1
        assert res["recheck"]["message"] and "z1" in res["recheck"]["message"]
        for name, res_c in res["compiled"].items():
            assert "error" not in res_c, f"rank {rank} {name}: {res_c.get('error')}"
            torch.testing.assert_close(res_c["value"], res_c["ref"], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank} {name} value")
            for got, want in zip(res_c["grads"], res_c["ref_grads"]):
                assert (got is None) == (want is None), (rank, name)
                if got is None:    # SCE's keys carry no gradient
                    continue
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                           msg=f"rank {rank} {name} gradient")


def test_equal_batch_check_runs_once_per_shape_single_process_is_free():
    # without a process group the check is a no-op and caches nothing
    D.reset_batch_checks()
    D.check_equal_batch("x", torch.zeros(3, 2))
    assert not D._checked_shapes
