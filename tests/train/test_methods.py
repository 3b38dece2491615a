"""Every method: a few training steps through fastssl.train on demo-sized synthetic data, and
its per-step hooks (SCE momentum + queue, SwAV prototypes, SogCLR u, multi-crop batching)."""
import copy

import pytest
import torch
import torch.nn as nn

from fastssl.methods import METHODS, StepContext, build_method
from fastssl.methods.base import _resolution_groups
from fastssl.methods.presets import PRESETS, get_preset
from fastssl.train.config import make_config
from fastssl.train.loop import StepRunner, train
from fastssl.optim import build_optimizer

TINY_HEADS = {
    "simclr": {"projector": [32, 16]}, "auh": {"projector": [32, 16]},
    "sfrik": {"projector": [32, 64]}, "sogclr": {"projector": [32, 16]},
    "groco": {"projector": [32, 32, 16]}, "swav": {"projector": [32, 16]},
    "sce": {"projector": [32, 32, 16], "predictor": [32, 16]},
    "dino": {"projector": [32, 16], "bn": False},
}
TINY_ARGS = {"groco": {"topk_neg": 4}, "sce": {"queue_size": 64}, "swav": {"n_prototypes": 10,
             "freeze_prototypes_iters": 1}, "dino": {"n_prototypes": 10}}


def tiny_config(method, tmp_path, **over):
    preset = get_preset(f"demo_{method}")
    crops = [{"size": 16, "scale": [0.3, 1.0], "count": 2}]
    if method in ("swav", "dino"):
        crops.append({"size": 8, "scale": [0.1, 0.3], "count": 2})
    values = dict(backend="synthetic", dataset_size=24, batch_size=8, epochs=1, knn_every=0,
                  out=str(tmp_path / method), crops=crops, heads=TINY_HEADS[method],
                  method_args={**preset["method_args"], **TINY_ARGS.get(method, {})}, log_every=1)
    values.update(over)
    return make_config(preset, values)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_a_few_steps(method, tmp_path):
    cfg = tiny_config(method, tmp_path)
    result = train(cfg, stream=open("/dev/null", "w"))
    assert result["status"] == "completed" and result["step"] == 3
    state = torch.load(result["checkpoint"], weights_only=False)
    assert state["method"] == method and state["step"] == 3 and state["epoch"] == 1
    for v in state["model"].values():
        if v.is_floating_point():
            assert torch.isfinite(v).all()
    if method == "sce":
        assert state["momentum"] is not None
        assert int(state["loss_state"]["queue_ptr"]) == (3 * 2 * 8) % 64
    if method == "sogclr":
        assert (state["loss_state"]["u"] > 0).sum() == 3 * 8


def test_every_method_has_a_demo_and_an_imagenet_preset():
    for name in METHODS:
        assert f"demo_{name}" in PRESETS
        assert any(p["method"] == name and p["arch"] == "resnet50" for p in PRESETS.values())
    for name in ("groco_2views_100ep", "groco_multicrop_100ep", "sce_200ep", "sogclr_800ep",
                 "sfrik_200ep", "swav_800ep_bs4096"):
        assert name in PRESETS
    swav = PRESETS["swav_800ep_bs4096"]
    assert swav["batch_size"] == 4096 and swav["base_lr"] == 4.8 and swav["optimizer"] == "larc"
    assert sum(c["count"] for c in swav["crops"]) == 8
    assert swav["method_args"]["freeze_prototypes_iters"] == 313
    groco = PRESETS["groco_multicrop_100ep"]
    assert groco["optimizer"] == "sgd" and groco["method_args"]["n_pos_views"] == 2
    from fastssl.train.loop import peak_lr
    assert peak_lr(make_config(PRESETS["groco_2views_100ep"])) == pytest.approx(24.0)
    assert peak_lr(make_config(PRESETS["sce_200ep"])) == pytest.approx(4.8)
    assert peak_lr(make_config(PRESETS["sogclr_800ep"])) == pytest.approx(1.2)
    assert peak_lr(make_config(PRESETS["sfrik_200ep"])) == pytest.approx(3.2)


# --- hooks on a tiny conv backbone -----------------------------------------------------------
def tiny_backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten()), 8


def views_of(sizes, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


def run_steps(method, views_list, steps=2, optimizer="lars"):
    opt = build_optimizer(optimizer, method.model.parameters(), lr=0.1, weight_decay=1e-4)
    runner = StepRunner(method, method.model, opt)
    losses = []
    for step in range(steps):
        ctx = StepContext(step=step, epoch=0, total_steps=10, steps_per_epoch=10)
        index = torch.arange(8) + 8 * step
        losses.append(runner(views_list[step % len(views_list)], index, ctx))
    return losses


def test_multicrop_views_of_one_resolution_share_a_backbone_call():
    calls = []
    backbone, dim = tiny_backbone()
    backbone.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    method = build_method("swav", backbone, dim, heads=TINY_HEADS["swav"],
                          args={"n_prototypes": 10})
    out = method.model(views_of([16, 16, 8, 8, 8]))
    assert calls == [16, 24]
    assert len(out["scores"]) == 5 and out["scores"][0].shape == (8, 10)
    assert _resolution_groups(views_of([8, 16, 16, 8])) == [(0, 1), (1, 3), (3, 4)]


def test_swav_prototypes_normalised_and_frozen():
    backbone, dim = tiny_backbone()
    method = build_method("swav", backbone, dim, heads=TINY_HEADS["swav"],
                          args={"n_prototypes": 10, "freeze_prototypes_iters": 2})
    with torch.no_grad():
        method.model.prototypes.weight.mul_(3.0)
    run_steps(method, [views_of([16, 16, 8, 8])], steps=2, optimizer="larc")
    w = method.model.prototypes.weight.detach()
    # Frozen for 2 iterations: only the per-step normalisation touched them.
    torch.testing.assert_close(w.norm(dim=1), torch.ones(10))
    frozen = w.clone()
    run_steps_from = build_optimizer("larc", method.model.parameters(), lr=0.1)
    runner = StepRunner(method, method.model, run_steps_from)
    runner(views_of([16, 16, 8, 8]), torch.arange(8),
           StepContext(step=5, epoch=0, total_steps=10, steps_per_epoch=10))
    assert not torch.equal(method.model.prototypes.weight.detach(), frozen)


def test_sce_momentum_is_an_ema_of_parameters_only():
    backbone, dim = tiny_backbone()
    method = build_method("sce", backbone, dim, heads=TINY_HEADS["sce"],
                          args={"queue_size": 64, "base_momentum": 0.9})
    target0 = copy.deepcopy(method.momentum_model.state_dict())
    assert all(not p.requires_grad for p in method.momentum_model.parameters())
    assert not any(n.startswith("predictor") for n in target0)
    online_before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    run_steps(method, [views_of([16, 16])], steps=1)
    m = method.current_momentum
    assert m == pytest.approx(0.9)          # cosine schedule at step 0
    online_after = dict(method.model.named_parameters())
    for name, p in method.momentum_model.named_parameters():
        expected = m * target0[name] + (1 - m) * online_after[name].detach()
        torch.testing.assert_close(p.detach(), expected)
        assert (not torch.equal(p.detach(), online_before[name])
                or online_before[name].abs().sum() == 0)
    # BN running statistics of the target come from its own forward passes, not from the EMA.
    for name, b in method.momentum_model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(b) == 1
    assert int(method.criterion.queue_ptr) == 16


def test_sogclr_u_is_indexed_by_dataset_index():
    backbone, dim = tiny_backbone()
    method = build_method("sogclr", backbone, dim, heads=TINY_HEADS["sogclr"], num_samples=40)
    run_steps(method, [views_of([16, 16])], steps=2)
    u = method.criterion.u
    assert u.shape == (40,)
    assert (u[:16] > 0).all() and (u[16:] == 0).all()


def test_sogclr_needs_num_samples():
    backbone, dim = tiny_backbone()
    with pytest.raises(ValueError, match="num_samples"):
        build_method("sogclr", backbone, dim, heads=TINY_HEADS["sogclr"], num_samples=0)


def test_groco_projector_bias_frozen_and_views_checked():
    backbone, dim = tiny_backbone()
    method = build_method("groco", backbone, dim, heads=TINY_HEADS["groco"], args={"topk_neg": 4})
    last = [m for m in method.model.projector.modules() if isinstance(m, nn.Linear)][-1]
    assert last.bias is not None and not last.bias.requires_grad
    method.check_views(8)
    simclr = build_method("simclr", *tiny_backbone(), heads=TINY_HEADS["simclr"])
    with pytest.raises(ValueError, match="views"):
        simclr.check_views(3)


def test_unknown_method_and_argument():
    backbone, dim = tiny_backbone()
    with pytest.raises(ValueError, match="method"):
        build_method("byol", backbone, dim)
    with pytest.raises(ValueError, match="unknown method argument"):
        build_method("simclr", backbone, dim, args={"temprature": 0.1})


def test_swav_queue_starts_at_its_epoch_and_is_rescored():
    backbone, dim = tiny_backbone()
    method = build_method("swav", backbone, dim, heads=TINY_HEADS["swav"], batch_size=8,
                          args={"n_prototypes": 10, "queue_length": 20, "epoch_queue_starts": 1,
                                "freeze_prototypes_iters": 0})
    assert method.queue_length() == 16           # whole global batches only
    opt = build_optimizer("larc", method.model.parameters(), lr=0.1)
    runner = StepRunner(method, method.model, opt)
    views = views_of([16, 16, 8])
    runner(views, torch.arange(8), StepContext(step=0, epoch=0, total_steps=9, steps_per_epoch=3))
    assert method.criterion.queue.numel() == 0   # not started in epoch 0
    for step in range(1, 4):
        loss = runner(views, torch.arange(8),
                      StepContext(step=step, epoch=1, total_steps=9, steps_per_epoch=3))
        assert torch.isfinite(loss)
    assert method.criterion.queue.shape == (2, 16, 16) and method.criterion.queue_full


def test_bf16_autocast_steps(tmp_path):
    # Heads under bf16 autocast; GroCo's loss runs in float32 outside it (ResNet-18, CPU bf16).
    cfg = tiny_config("groco", tmp_path, amp="bf16", batch_size=12, dataset_size=24)
    result = train(cfg, stream=open("/dev/null", "w"))
    assert result["status"] == "completed" and result["step"] == 2


def test_swav_step_under_bf16_autocast():
    backbone, dim = tiny_backbone()
    method = build_method("swav", backbone, dim, heads=TINY_HEADS["swav"],
                          args={"n_prototypes": 10})
    opt = build_optimizer("larc", method.model.parameters(), lr=0.1, exclude_1d=False)
    runner = StepRunner(method, method.model, opt, amp_dtype=torch.bfloat16, device_type="cpu")
    loss = runner(views_of([16, 16, 8]), torch.arange(8),
                  StepContext(step=0, epoch=0, total_steps=1, steps_per_epoch=1))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
