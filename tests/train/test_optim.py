"""LARS/LARC (multi-tensor, no host sync) against a per-parameter reference; schedules."""
import math

import pytest
import torch

from fastssl.optim import LARS, build_optimizer, cosine_momentum, scale_lr, warmup_cosine


def reference_step(params, grads, bufs, *, lr, wd, eta, momentum, exclude_1d, mode, eps=1e-8):
    """Straightforward per-parameter update rule (LARS, You et al. 2017, with SwAV's LARC trust
    ratio), in float64."""
    for p, g, buf in zip(params, grads, bufs):
        if exclude_1d and p.ndim == 1:
            d = g.clone()
        elif mode == "lars":      # VICReg / Barlow Twins / SFRIK / SogCLR / SCE
            d = g + wd * p
            w_norm, d_norm = p.norm().item(), d.norm().item()
            if w_norm > 0 and d_norm > 0:
                d = d * (eta * w_norm / d_norm)
        else:                     # apex LARC, clip=False (SwAV)
            w_norm, g_norm = p.norm().item(), g.norm().item()
            if w_norm > 0 and g_norm > 0:
                d = (g + wd * p) * (eta * w_norm / (g_norm + wd * w_norm + eps))
            else:
                d = g.clone()
        buf.mul_(momentum).add_(d)
        p.sub_(lr * buf)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (6,), (4, 6, 3, 3), (4,), (3, 4)]
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    params.append(torch.zeros(3, 2, dtype=torch.float64))  # |w| = 0: no adaptation
    grads = [
        [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params] for _ in range(4)
    ]
    for step in grads:
        step[4].zero_()                                             # |g| = 0 for one tensor
    return params, grads


@pytest.mark.parametrize(
    "mode,exclude_1d", [("lars", True), ("lars", False), ("larc", False), ("larc", True)]
)
def test_lars_matches_per_parameter_reference(mode, exclude_1d):
    params, grads = _problem()
    ref = [p.clone() for p in params]
    ref_bufs = [torch.zeros_like(p) for p in params]
    fast = [torch.nn.Parameter(p.clone()) for p in params]
    opt = LARS(fast, lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.001,
               exclude_1d=exclude_1d, mode=mode)
    for step_grads in grads:
        for p, g in zip(fast, step_grads):
            p.grad = g.clone()
        opt.step()
        reference_step(ref, step_grads, ref_bufs, lr=0.5, wd=1e-2, eta=0.001, momentum=0.9,
                       exclude_1d=exclude_1d, mode=mode)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)


def test_lars_float32_and_lr_groups_and_none_grads():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4))
    ref = [p.detach().double().clone() for p in model.parameters()]
    bufs = [torch.zeros_like(p) for p in ref]
    opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-4)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(10, 8)).pow(2).mean().backward()
        model[3].bias.grad = None  # a parameter without gradient is skipped
        grads = [
            p.grad.double().clone() if p.grad is not None else None for p in model.parameters()
        ]
        opt.step()
        live = [i for i, g in enumerate(grads) if g is not None]
        reference_step([ref[i] for i in live], [grads[i] for i in live], [bufs[i] for i in live],
                       lr=0.1, wd=1e-4, eta=0.001, momentum=0.9, exclude_1d=True, mode="lars")
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-7)
    assert "momentum_buffer" not in opt.state[model[3].bias]


def test_lars_step_has_no_host_sync(monkeypatch):
    # The trust ratios stay on the device: no .item()/.tolist()/.cpu() inside step().
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = LARS(params, lr=0.1, weight_decay=1e-4)

    def forbidden(*a, **k):
        raise AssertionError("host sync in LARS.step")
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "cpu", forbidden)
    monkeypatch.setattr(torch.Tensor, "__bool__", forbidden)
    opt.step()


def test_lars_state_dict_roundtrip():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = LARS([p], lr=0.1, weight_decay=1e-3)
    p.grad = torch.randn(4, 4)
    opt.step()
    opt2 = LARS([torch.nn.Parameter(p.detach().clone())], lr=0.1, weight_decay=1e-3)
    opt2.load_state_dict(opt.state_dict())
    torch.testing.assert_close(opt2.state[opt2.param_groups[0]["params"][0]]["momentum_buffer"],
                               opt.state[p]["momentum_buffer"])


def test_bad_optimizer_arguments():
    p = [torch.nn.Parameter(torch.randn(2, 2))]
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS(p, trust_coefficient=0)
    with pytest.raises(ValueError, match="mode"):
        LARS(p, mode="lamb")
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("adam", p)
    sgd = build_optimizer("sgd", p, lr=0.1, weight_decay=1e-6)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


def test_scale_lr_rules():
    assert scale_lr(0.3, 4096, "linear") == pytest.approx(4.8)        # SCE
    assert scale_lr(0.75, 1024, "linear32") == pytest.approx(24.0)    # GroCo linear
    assert scale_lr(0.75, 1024, "sqrt") == pytest.approx(24.0)        # GroCo sqrt
    assert scale_lr(0.075, 256, "sqrt") == pytest.approx(1.2)         # SogCLR
    assert scale_lr(4.8, 4096, "none") == 4.8                         # SwAV
    with pytest.raises(ValueError, match="lr_scaling"):
        scale_lr(1.0, 256, "cubic")


def test_warmup_cosine():
    kw = dict(total_steps=100, warmup_steps=10, peak_lr=1.0, final_lr=0.01)
    assert warmup_cosine(0, **kw) == 0.0
    assert warmup_cosine(5, **kw) == pytest.approx(0.5)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(55, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    assert warmup_cosine(100, **kw) == pytest.approx(0.01)
    lrs = [warmup_cosine(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # SwAV: warmup from start_warmup 0.3 to 4.8
    assert warmup_cosine(
        0, total_steps=10, warmup_steps=5, peak_lr=4.8, start_lr=0.3
    ) == pytest.approx(0.3)
    assert warmup_cosine(0, total_steps=10, warmup_steps=0, peak_lr=2.0) == pytest.approx(2.0)


def test_cosine_momentum():
    assert cosine_momentum(0, total_steps=101, base_momentum=0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, total_steps=101, base_momentum=0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, total_steps=101, base_momentum=0.99) == pytest.approx(1.0)
    ms = [cosine_momentum(s, total_steps=101, base_momentum=0.99) for s in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    assert math.isclose(cosine_momentum(3, total_steps=1, base_momentum=0.9), 0.9)
