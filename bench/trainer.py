"""The training step end to end: backbone + heads + loss + backward + optimiser, per method.

Each case builds the method as `fastssl.train` does (build_backbone, build_method with the
preset's heads and arguments, the preset's optimiser) and times `fastssl.train.loop.StepRunner`
on synthetic views already on the device (the loader is not measured), with the trainer's hooks.
images_per_s counts images, not views (views_per_s too); each method runs its preset's crop
recipe (SwAV 2 x 224 + 6 x 96; GroCo also multi-crop, ``groco_multicrop``). GPU: ResNet-50,
B = 256, bf16 autocast, channels-last. CPU: ResNet-18, B = 32, the recipes scaled 224 -> 32.
Providers: ``fastssl`` and ``reference`` (every op forced to the reference backend); records
add loss_ms (the loss's forward and backward alone) and loss_share = loss_ms / step time.

``python -m bench.trainer --ddp``: ``fastssl.train`` itself under torchrun (2 gloo ranks on CPU,
NCCL on every GPU), SyncBatchNorm on GPU, DALI on the demo data, images/s after the first steps.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from fastssl.methods import build_method
from fastssl.methods.base import StepContext
from fastssl.methods.presets import get_preset
from fastssl.models import build_backbone
from fastssl.testing import free_port
from fastssl.train.config import make_config
from fastssl.train.loop import StepRunner, train
from fastssl.optim import build_optimizer

from .common import PKG
from .harness import (BenchConfig, OpSpec, Prepared, Size, Skip, backend_forced, percentile_summary,
                           time_cpu, time_cuda_events)

METHODS = ("simclr", "groco", "groco_multicrop", "sce", "sogclr", "sfrik", "swav", "auh")
# The ImageNet preset each case takes its crop recipe (and on GPU its heads and
# hyperparameters) from.
GPU_PRESET = {
    "simclr": "simclr_200ep",
    "groco": "groco_2views_100ep",
    "groco_multicrop": "groco_multicrop_100ep",
    "sce": "sce_200ep",
    "sogclr": "sogclr_800ep",
    "sfrik": "sfrik_200ep",
    "swav": "swav_200ep_bs256",
    "auh": "auh_200ep",
}
CPU_SCALE = 32 / 224


def _method_name(case: str) -> str:
    return case.split("_")[0]


def _preset(case: str, device_type: str) -> dict:
    return get_preset(GPU_PRESET[case] if device_type == "cuda" else f"demo_{_method_name(case)}")


def crop_sizes(case: str, scale: float = 1.0) -> list[int]:
    """The view sizes of the case's ImageNet recipe, in view order, scaled (CPU runs)."""
    sizes = []
    for crop in get_preset(GPU_PRESET[case])["crops"]:
        sizes += [max(8, round(crop["size"] * scale))] * int(crop.get("count", 1))
    return sizes


def recipe_label(sizes: list[int]) -> str:
    parts, i = [], 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        parts.append(f"{j - i}x{sizes[i]}")
        i = j
    return "+".join(parts)


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
        raise Skip(
            "the training step is measured with the fastssl losses and with the reference losses"
        )

    case, b = shape["method"], shape["B"]
    sizes = [int(x) for x in shape["sizes"].split(",")]
    n_views = len(sizes)
    method_name = _method_name(case)
    preset = _preset(case, device.type)
    backbone, feat_dim = build_backbone(shape["arch"])
    method = build_method(method_name, backbone, feat_dim, args=preset.get("method_args"),
                          heads=preset.get("heads"), num_samples=4 * b, batch_size=b)
    method.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        method.model.to(memory_format=torch.channels_last)
        if method.momentum_model is not None:
            method.momentum_model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        preset["optimizer"],
        method.model.parameters(),
        lr=0.01,
        weight_decay=preset.get("weight_decay", 0.0),
        momentum=preset.get("momentum", 0.9),
        exclude_1d=preset.get("exclude_1d", True),
    )
    amp_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    runner = StepRunner(method, method.model, optimizer, scaler=scaler, amp_dtype=amp_dtype,
                        device_type=device.type)

    gen = torch.Generator(device="cpu").manual_seed(0)
    views = []
    for res in sizes:
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
                captured.update(
                    module=module, args=_clone_inputs(args), kwargs=_clone_inputs(kwargs)
                )
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
        # images, not views: a SwAV sample of 8 crops is one image
        out = {"images_per_s": b / (rec["p50_ms"] / 1e3),
               "views_per_s": b * n_views / (rec["p50_ms"] / 1e3), "recipe": recipe_label(sizes)}
        if "args" in captured:
            loss_ms = loss_only_ms(cfg)
            out.update(loss_ms=loss_ms, loss_share=loss_ms / rec["p50_ms"])
        return out

    return Prepared(forward=step, backward=None, leaves=(), extras=extras, modes=("step",))


def _case(case: str, arch: str, b: int, scale: float, providers=None) -> Size:
    sizes = crop_sizes(case, scale)
    shape = {"method": case, "arch": arch, "B": b, "res": sizes[0], "views": len(sizes),
             "sizes": ",".join(map(str, sizes))}
    return Size(shape, providers=providers) if providers else Size(shape)


def _sizes(dev, quick):
    if quick:
        # The quick run checks that each method's step runs with the fastssl losses.
        return [_case(m, "resnet18", 16, 16 / 224, providers=("fastssl",)) for m in METHODS]
    if dev == "cpu":
        return [_case(m, "resnet18", 32, CPU_SCALE) for m in METHODS]
    return [_case(m, "resnet50", 256, 1.0) for m in METHODS]


SPECS = [
    OpSpec("train_step", "trainer", _build, _sizes, providers=("fastssl", "reference"),
           dtypes=lambda dev, quick: (torch.float32,) if dev == "cpu" else (torch.bfloat16,),
           modes=("step",), x_key="B", x_label="batch size"),
]


# --- DDP variant: the trainer itself under torchrun ----------------------------------------------
def ddp_config(case: str, device_type: str, batch_per_rank: int, world: int, epochs: int, out: str):
    """fastssl.train's config for the DDP benchmark: the case's ImageNet recipe (scaled down on
    CPU), DALI on the demo data, SyncBatchNorm (the trainer converts on GPU), no k-NN monitor."""
    gpu = device_type == "cuda"
    preset = get_preset(GPU_PRESET[case] if gpu else f"demo_{_method_name(case)}")
    scale = 1.0 if gpu else CPU_SCALE
    crops = []
    for crop in get_preset(GPU_PRESET[case])["crops"]:
        crops.append({**crop, "size": max(8, round(crop["size"] * scale))})
    values = dict(data="demo", backend="dali", batch_size=batch_per_rank * world, epochs=epochs,
                  knn_every=0, crops=crops, sync_bn=True, out=out, log_every=10**6,
                  compare_random_init=False)
    if not gpu:
        values.update(arch="resnet18", amp="off")
    return make_config(preset, values)


def ddp_worker(case: str, batch_per_rank: int, epochs: int, warmup: int, result: str) -> None:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = ddp_config(
        case, device_type, batch_per_rank, world, epochs, os.path.dirname(result) + f"/run_{case}"
    )
    stamps = []

    def step_end(step, loss):
        if device_type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    cpu0 = time.process_time()
    train(cfg, hooks={"step_end": step_end}, stream=open(os.devnull, "w"))
    cpu = time.process_time() - cpu0
    timed = len(stamps) - warmup
    if dist.get_rank() == 0 and timed > 0:
        seconds = stamps[-1] - stamps[warmup - 1] if warmup else stamps[-1] - stamps[0]
        images = timed * cfg.batch_size
        n_views = sum(int(c.get("count", 1)) for c in cfg.crops)
        rec = {
            "op": "train_step_ddp",
            "method": case,
            "world": world,
            "device": device_type,
            "backend": "nccl" if device_type == "cuda" else "gloo",
            "sync_bn": device_type == "cuda",
            "input": "dali demo",
            "arch": cfg.arch,
            "batch_per_rank": batch_per_rank,
            "recipe": recipe_label(
                [c["size"] for c in cfg.crops for _ in range(int(c.get("count", 1)))]
            ),
            "steps_timed": timed,
            "seconds": seconds,
            "images_per_s": images / seconds,
            "views_per_s": images * n_views / seconds,
            "rank0_cpu_s": cpu,
            "load1": os.getloadavg()[0],
        }
        with open(result, "w") as f:
            json.dump(rec, f)


def ddp_main(
    cases, world: int | None, batch_per_rank: int, epochs: int, warmup: int, out
) -> list[dict]:
    if world is None:
        world = torch.cuda.device_count() if torch.cuda.is_available() else 2
    records = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="fastssl_ddp_bench_") as tmp:
            result = os.path.join(tmp, "result.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                   "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                   "-m", f"{PKG}.trainer", "--ddp-worker", case, str(batch_per_rank), str(epochs),
                   str(warmup), result]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0 or not os.path.exists(result):
                rec = {"op": "train_step_ddp", "method": case, "status": "error",
                       "error": (proc.stdout + proc.stderr)[-3000:]}
            else:
                rec = json.load(open(result))
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "error"})
                  if "error" not in rec else f"{case}: error\n{rec['error']}", flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results_ddp.jsonl"), "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return records


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--ddp-worker":
        case, b, epochs, warmup, result = argv[1:6]
        ddp_worker(case, int(b), int(epochs), int(warmup), result)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.trainer",
                                description="the trainer's DDP benchmark (see the module doc)")
    p.add_argument("--ddp", action="store_true", required=True)
    p.add_argument("--method", action="append", help=f"cases (default all: {', '.join(METHODS)})")
    p.add_argument("--world", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    p.add_argument("--batch-per-rank", type=int, default=None, help="default 32 on CPU, 128 on GPU")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="steps not timed")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    b = args.batch_per_rank or (128 if torch.cuda.is_available() else 32)
    ddp_main(args.method or list(METHODS), args.world, b, args.epochs, args.warmup, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
