"""DDP training steps (2 gloo ranks) with the losses' gather_distributed=True give the same
parameters as a single process on the global batch: tiny BN-free MLP "backbone", float64, LARS."""
import pytest
import torch
import torch.nn as nn

from fastssl.methods import StepContext, build_method
from fastssl.testing import run_torchrun
from fastssl.train.loop import StepRunner
from fastssl.optim import LARS

pytestmark = pytest.mark.distributed

GLOBAL_BATCH, STEPS, NUM_SAMPLES = 8, 3, 32
METHODS = {
    "simclr": {"temperature": 0.2},
    "sfrik": {"sim_coeff": 40.0},
    "sogclr": {"gamma": 0.9, "temperature": 0.2},
}


def _method(name, gather_distributed):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())
    method = build_method(name, backbone, 16, heads={"projector": [16, 8], "bn": False},
                          args=METHODS[name], num_samples=NUM_SAMPLES,
                          batch_size=GLOBAL_BATCH, gather_distributed=gather_distributed)
    method.model.double()
    return method


def _data():
    g = torch.Generator().manual_seed(1)
    views = [
        [torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]
        for _ in range(STEPS)
    ]
    # The same samples every step: SogCLR forces gamma = 1 when the *local* batch has no visited
    # sample (upstream rule), which a rank can meet while the global batch does not; revisiting
    # the same samples keeps both runs on the same branch, so they must agree exactly.
    index = [torch.randperm(NUM_SAMPLES, generator=g)[:GLOBAL_BATCH]] * STEPS
    return views, index


def _train(name, model_wrapper, rows):
    method = _method(name, gather_distributed=model_wrapper is not None)
    model = model_wrapper(method.model) if model_wrapper else method.model
    opt = LARS(method.model.parameters(), lr=0.5, weight_decay=1e-3)
    runner = StepRunner(method, model, opt)
    views, index = _data()
    losses = []
    for step in range(STEPS):
        ctx = StepContext(step=step, epoch=0, total_steps=STEPS, steps_per_epoch=STEPS)
        losses.append(runner([v[rows] for v in views[step]], index[step][rows], ctx))
    state = {k: v.clone() for k, v in method.model.state_dict().items()}
    extra = method.criterion.u.clone() if name == "sogclr" else None
    return {"params": state, "losses": torch.stack(losses), "u": extra}


def worker_ddp():
    import torch.distributed as dist
    r, w = dist.get_rank(), dist.get_world_size()
    b = GLOBAL_BATCH // w
    rows = slice(r * b, (r + 1) * b)
    return {name: _train(name, nn.parallel.DistributedDataParallel, rows) for name in METHODS}


def test_ddp_equals_single_process_on_the_global_batch():
    results = run_torchrun(f"{__file__}:worker_ddp", 2)
    for name in METHODS:
        ref = _train(name, None, slice(None))
        for rank, res in enumerate(results):
            got = res[name]
            torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-9, atol=1e-10,
                                       msg=f"{name} rank {rank} losses")
            for key, value in ref["params"].items():
                torch.testing.assert_close(got["params"][key], value, rtol=1e-9, atol=1e-11,
                                           msg=f"{name} rank {rank} {key}")
            if ref["u"] is not None:
                torch.testing.assert_close(got["u"], ref["u"], rtol=1e-6, atol=1e-9)
