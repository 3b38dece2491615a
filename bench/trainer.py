"""The training step end to end: backbone + heads + loss + backward + optimiser, per method.

Each case builds the method as `fastssl.train` does (fastssl.models.build_backbone,
fastssl.methods.build_method with the preset's heads and method arguments, the preset's
optimiser) and times `fastssl.train.loop.StepRunner` on fixed synthetic views (random tensors
already on the device, so the loader is not measured), with the hooks the trainer calls
(momentum update, prototype normalisation, queue).

- GPU: the seeds' ImageNet presets on ResNet-50, 2 x 224 views (each view counts as an image
  for images/s), batch 256, bf16 autocast, channels-last: the issue-7 setting.
- CPU: the demo presets (ResNet-18, 2 x 32 views, small heads), batch 32.

Providers: ``fastssl`` (losses on the automatic backend) and ``reference`` (the same step with
every fastssl op forced to the "reference" backend, i.e. fastssl.reference computes the loss).
Besides the step time, each record has images_per_s, loss_ms (the loss module's forward and
backward alone, timed on the inputs it received in a real step, under the same autocast) and
loss_share = loss_ms / step time.
"""
from __future__ import annotations

import contextlib

import torch

from bench.harness import (BenchConfig, OpSpec, Prepared, Size, Skip, backend_forced, percentile_summary,
                           time_cpu, time_cuda_events)

METHODS = ("simclr", "groco", "sce", "sogclr", "sfrik", "swav", "auh")
# The ImageNet preset each method's GPU benchmark takes its heads and hyperparameters from.
GPU_PRESET = {"simclr": "simclr_200ep", "groco": "groco_2views_100ep", "sce": "sce_200ep",
              "sogclr": "sogclr_800ep", "sfrik": "sfrik_200ep", "swav": "swav_200ep_bs256", "auh": "auh_200ep"}


def _preset(method: str, device_type: str) -> dict:
    from fastssl.methods.presets import get_preset
    return get_preset(GPU_PRESET[method] if device_type == "cuda" else f"demo_{method}")


def _clone_inputs(obj):
    """Fresh leaves for the loss-only timing: tensors that carried a gradient become new leaves."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().clone()
        return out.requires_grad_(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_inputs(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone_inputs(v) for k, v in obj.items()}
    return obj


def _leaves(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _leaves(o)]
    return []


def _build(provider, shape, dtype, device):
    if provider not in ("fastssl", "reference"):
        raise Skip("the training step is measured with the fastssl losses and with the reference losses")
    try:
        from fastssl.methods import build_method
        from fastssl.methods.base import StepContext
        from fastssl.models import build_backbone
        from fastssl.train.loop import StepRunner
        from fastssl.train.optim import build_optimizer
    except ImportError as e:
        raise NotImplementedError(f"the trainer is not available: {e}") from None

    method_name, b, res, n_views = shape["method"], shape["B"], shape["res"], shape["views"]
    preset = _preset(method_name, device.type)
    backbone, feat_dim = build_backbone(shape["arch"])
    method = build_method(method_name, backbone, feat_dim, args=preset.get("method_args"),
                          heads=preset.get("heads"), num_samples=4 * b, batch_size=b)
    method.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        method.model.to(memory_format=torch.channels_last)
        if method.momentum_model is not None:
            method.momentum_model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(preset["optimizer"], method.model.parameters(), lr=0.01,
                                weight_decay=preset.get("weight_decay", 0.0), momentum=preset.get("momentum", 0.9),
                                exclude_1d=preset.get("exclude_1d", True))
    amp_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    runner = StepRunner(method, method.model, optimizer, scaler=scaler, amp_dtype=amp_dtype,
                        device_type=device.type)

    gen = torch.Generator(device="cpu").manual_seed(0)
    views = []
    for _ in range(n_views):
        v = torch.randn(b, 3, res, res, generator=gen).to(device)
        views.append(v.contiguous(memory_format=torch.channels_last) if channels_last else v)
    index = torch.arange(b, device=device)
    counter = {"step": 0}
    backend = "reference" if provider == "reference" else None

    # Capture the loss module's inputs in one real step, for the loss-only timing. A method may
    # hold several loss modules (SwAV: with and without its queue): all are watched.
    captured = {}
    criteria = {name: mod for name, mod in vars(method).items()
                if name.startswith("criterion") and isinstance(mod, torch.nn.Module)}

    def capturing(module):
        original = module.forward

        def forward(*args, **kwargs):
            if "args" not in captured:
                captured.update(module=module, args=_clone_inputs(args), kwargs=_clone_inputs(kwargs))
            return original(*args, **kwargs)
        return forward

    def step():
        ctx = StepContext(step=counter["step"], epoch=0, total_steps=10**6, steps_per_epoch=10**4)
        counter["step"] += 1
        with backend_forced(backend) if backend else contextlib.nullcontext():
            return runner(views, index, ctx)

    for mod in criteria.values():
        mod.forward = capturing(mod)
    try:
        step()
    finally:
        for mod in criteria.values():
            del mod.forward   # back to the class's forward
    if device.type == "cuda":
        torch.cuda.synchronize()

    def loss_only_ms(cfg: BenchConfig) -> float:
        criterion, args, kwargs = captured["module"], captured["args"], captured["kwargs"]
        leaves = _leaves(args) + _leaves(kwargs)
        autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                    else contextlib.nullcontext())

        def setup():
            for t in leaves:
                t.grad = None

        def run(_):
            with backend_forced(backend) if backend else contextlib.nullcontext():
                with autocast:
                    loss = criterion(*args, **kwargs)
                loss.backward()
        run(setup())   # warm-up
        if device.type == "cuda":
            times = time_cuda_events(setup, run, cfg)
        else:
            times = time_cpu(setup, run, cfg)
        return percentile_summary(times)["p50_ms"]

    def extras(rec: dict, cfg: BenchConfig) -> dict:
        out = {"images_per_s": b * n_views / (rec["p50_ms"] / 1e3)}
        if "args" in captured:
            loss_ms = loss_only_ms(cfg)
            out.update(loss_ms=loss_ms, loss_share=loss_ms / rec["p50_ms"])
        return out

    return Prepared(forward=step, backward=None, leaves=(), extras=extras, modes=("step",))


def _sizes(dev, quick):
    if quick:
        # The quick run checks that each method's step runs with the fastssl losses.
        return [Size({"method": m, "arch": "resnet18", "B": 16, "res": 16, "views": 2}, providers=("fastssl",))
                for m in METHODS]
    if dev == "cpu":
        return [Size({"method": m, "arch": "resnet18", "B": 32, "res": 32, "views": 2}) for m in METHODS]
    return [Size({"method": m, "arch": "resnet50", "B": 256, "res": 224, "views": 2}) for m in METHODS]


SPECS = [
    OpSpec("train_step", "trainer", _build, _sizes, providers=("fastssl", "reference"),
           dtypes=lambda dev, quick: (torch.float32,) if dev == "cpu" else (torch.bfloat16,),
           modes=("step",), x_key="B", x_label="batch size"),
]
