"""--method dino: the DINO head, the teacher EMA and its schedule, the per-step hooks (clip,
frozen last layer, weight decay on weights only), DINOv2's options, the presets and the CLI, and
a short run on the demo data (DALI) that checkpoints and resumes bit for bit."""
import json
import math

import pytest
import torch
import torch.nn as nn

from fastssl.methods import METHODS, StepContext, build_method
from fastssl.methods.dino import DINO, dino_momentum
from fastssl.methods.presets import PRESETS, get_preset
from fastssl.models.dino_head import DINOHead
from fastssl.train.cli import main
from fastssl.train.config import make_config
from fastssl.train.loop import StepRunner, train
from fastssl.optim import build_optimizer

DEVNULL = open("/dev/null", "w")
TINY_HEADS = {"projector": [32, 32, 16], "bn": False}


def _tiny_method(**args):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())
    return build_method("dino", backbone, 16, heads=TINY_HEADS,
                        args={"n_prototypes": 12, **args}, batch_size=8)


def _views(n_global=2, n_local=2, b=8):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, 4, 4, generator=g) for _ in range(n_global + n_local)]


def test_registered_with_presets():
    assert METHODS["dino"] is DINO
    rn50 = PRESETS["dino_resnet50_100ep"]
    assert rn50["method"] == "dino" and rn50["arch"] == "resnet50"
    # DINO README's ResNet-50 run: SGD lr 0.03 (per 256) at 8 x 64, 2 global + 8 local crops
    assert (rn50["optimizer"], rn50["base_lr"], rn50["batch_size"]) == ("sgd", 0.03, 512)
    assert [(c["size"], tuple(c["scale"]), c["count"]) for c in rn50["crops"]] == \
        [(224, (0.14, 1.0), 1), (224, (0.14, 1.0), 1), (96, (0.05, 0.14), 8)]
    assert rn50["method_args"]["n_prototypes"] == 65536 and rn50["weight_decay"] == 0.0
    assert math.isclose(rn50["final_lr_ratio"] * 0.03 * 512 / 256, 1e-6)
    assert PRESETS["demo_dino"]["method"] == "dino" and PRESETS["demo_dino"]["data"] == "demo"


def test_head_is_dino_head():
    head = DINOHead(16, 12, [32, 32, 8])
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [32, 32, 8]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.mlp)
    assert not head.last_layer.weight_g.requires_grad          # norm_last_layer
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.rand(12, 1) * 5)
    torch.testing.assert_close(head.last_layer.weight().norm(dim=1), torch.ones(12))
    assert DINOHead(16, 12, [8], norm_last_layer=False).last_layer.weight_g.requires_grad
    with pytest.raises(ValueError, match="hidden"):
        DINOHead(16, 12, [])


def test_teacher_momentum_schedule():
    assert dino_momentum(0, total_steps=100, base_momentum=0.996) == 0.996
    assert dino_momentum(100, total_steps=100, base_momentum=0.996) == 1.0
    assert math.isclose(dino_momentum(50, total_steps=100, base_momentum=0.996), 0.998)


def test_step_hooks_teacher_ema_frozen_last_layer_and_weight_decay():
    method = _tiny_method(clip_grad=0.0, weight_decay=0.0)
    student, teacher = method.model, method.momentum_model
    assert all(not p.requires_grad for p in teacher.parameters())
    for a, b in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(a, b)
    opt = build_optimizer("sgd", student.parameters(), lr=0.1, momentum=0.0)
    runner = StepRunner(method, student, opt)
    last = student.head.last_layer.weight_v.detach().clone()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    t_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    ctx = StepContext(step=0, epoch=0, total_steps=10, steps_per_epoch=5)
    loss = runner(_views(), torch.arange(8), ctx)
    assert torch.isfinite(loss)
    assert torch.equal(student.head.last_layer.weight_v, last)    # frozen in epoch 0
    assert not torch.equal(student.head.mlp[0].weight, before["head.mlp.0.weight"])
    m = dino_momentum(0, total_steps=10, base_momentum=0.996)
    for n, p in teacher.named_parameters():           # teacher = m * teacher + (1 - m) * student
        want = m * t_before[n] + (1 - m) * student.state_dict()[n]
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
    assert float(method.criterion.center.abs().sum()) > 0     # the centre moved off zero
    runner(_views(), torch.arange(8),
           StepContext(step=5, epoch=1, total_steps=10, steps_per_epoch=5))
    assert not torch.equal(student.head.last_layer.weight_v, last)

    # weight decay is added to the weights' gradients only, after the per-parameter clip
    method = _tiny_method(clip_grad=0.5, weight_decay=0.1)
    params = dict(method.model.named_parameters())
    for p in params.values():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    method.after_backward(StepContext(step=9, epoch=1, total_steps=10, steps_per_epoch=5))
    for name, p in params.items():
        if not p.requires_grad:
            continue
        clipped = 10.0 * 0.5 / (10.0 * p.numel() ** 0.5 + 1e-6)
        want = clipped + (0.1 * p.detach() if p.ndim > 1 else 0.0)
        torch.testing.assert_close(p.grad, torch.as_tensor(want).expand_as(p).float(),
                                   msg=name)


@pytest.mark.parametrize("args", [{"centering": "sinkhorn_knopp"}, {"koleo_weight": 0.1},
                                  {"norm_last_layer": False, "n_global_crops": 1}])
def test_dinov2_options_train(args):
    method = _tiny_method(**args)
    opt = build_optimizer("lars", method.model.parameters(), lr=0.1)
    runner = StepRunner(method, method.model, opt)
    for step in range(2):
        loss = runner(_views(), torch.arange(8),
                      StepContext(step=step, epoch=1, total_steps=4, steps_per_epoch=2))
        assert torch.isfinite(loss)


def test_koleo_weight_adds_koleo_of_the_global_crops():
    base, reg = _tiny_method(), _tiny_method(koleo_weight=0.5)
    ctx = StepContext(step=0, epoch=0, total_steps=4, steps_per_epoch=2)
    views = _views()
    l0 = base.compute_loss(base.model, views, None, ctx)
    l1 = reg.compute_loss(reg.model, views, None, ctx)
    feats = base.model(views)["feats"]
    koleo = sum(base.koleo(f) for f in feats[:2])
    torch.testing.assert_close(l1, l0 + 0.5 * koleo)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_global_crops"):
        _tiny_method(n_global_crops=0)
    with pytest.raises(ValueError, match="clip_grad"):
        _tiny_method(clip_grad=-1.0)
    with pytest.raises(ValueError, match="unknown method argument"):
        _tiny_method(teacher_momentum=0.9)
    with pytest.raises(ValueError, match="views"):
        _tiny_method().check_views(2)


def test_cli_resolves_dino_presets(capsys):
    assert main(["--method", "dino", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "demo_dino" and cfg["data"] == "demo"
    assert main(["--method", "dino", "--data", "/imagenet", "--print-config",
                 "--method-arg", "centering=\"sinkhorn_knopp\"", "--method-arg",
                 "koleo_weight=0.1"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "dino_resnet50_100ep"
    assert cfg["method_args"]["centering"] == "sinkhorn_knopp"
    assert cfg["method_args"]["koleo_weight"] == 0.1


# --- a short run on the demo data: checkpoint, then an exact resume ------------------------------
def _demo_config(out, **over):
    preset = get_preset("demo_dino")
    values = dict(backend="dali", data="demo", batch_size=100, epochs=2, knn_every=0, log_every=1,
                  crops=[{"size": 16, "scale": [0.3, 1.0], "count": 2},
                         {"size": 8, "scale": [0.1, 0.3], "count": 2}],
                  heads=TINY_HEADS, out=str(out), num_threads=1,
                  method_args={**preset["method_args"], "n_prototypes": 32})
    values.update(over)
    return make_config(preset, values)


def _state(path):
    s = torch.load(path, weights_only=False)
    return s["model"], s["momentum"], s["loss_state"], s["optimizer"]["state"], s["step"]


def _assert_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_demo_run_checkpoints_and_resumes_exactly(tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    torch.set_num_threads(1)
    # 5 steps per epoch: 7 steps cross the end of the frozen-last-layer epoch
    full = train(_demo_config(tmp_path / "full", max_steps=7), stream=DEVNULL)
    assert full["status"] == "stopped" and full["step"] == 7
    state = torch.load(full["checkpoint"], weights_only=False)
    assert state["method"] == "dino" and state["momentum"] is not None
    assert set(state["loss_state"]) == {"center"} and state["loss_state"]["center"].shape == (1, 32)
    part = train(_demo_config(tmp_path / "part", max_steps=3), stream=DEVNULL)
    assert part["status"] == "stopped" and part["step"] == 3
    resumed = train(_demo_config(tmp_path / "part", max_steps=7, resume="auto"), stream=DEVNULL)
    assert resumed["status"] == "stopped" and resumed["step"] == 7
    _assert_equal(_state(full["checkpoint"]), _state(resumed["checkpoint"]))
