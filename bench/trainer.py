"""The training step end to end (backbone + heads + loss + backward + optimiser) per method, built
as `fastssl.train` builds it and timed with its `StepRunner` on synthetic views on the device.
images_per_s counts images, not views; each method runs its preset's crop recipe. GPU: ResNet-50,
B = 256, bf16 autocast, channels-last; CPU: ResNet-18, B = 32, recipes scaled 224 -> 32.
Records add loss_ms (the loss's forward and backward alone) and loss_share = loss_ms / step.

``python -m bench.trainer --ddp``: ``fastssl.train`` itself under torchrun (2 gloo ranks on CPU,
NCCL on every GPU), SyncBatchNorm on GPU, DALI on the demo data, images/s after the first steps.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
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
from fastssl.optim import build_optimizer
from fastssl.testing import free_port
from fastssl.train.config import make_config
from fastssl.train.loop import StepRunner, train

from .common import PKG
from .harness import (BenchConfig, OpSpec, Prepared, Size, Skip, backend_forced,
                      percentile_summary, time_cpu, time_cuda_events)

METHODS = ("simclr", "groco", "groco_multicrop", "sce", "sogclr", "sfrik", "swav", "auh")
# The ImageNet preset each case takes its crop recipe (on GPU its heads and arguments) from.
GPU_PRESET = {"simclr": "simclr_200ep", "groco": "groco_2views_100ep",
              "groco_multicrop": "groco_multicrop_100ep", "sce": "sce_200ep",
              "sogclr": "sogclr_800ep", "sfrik": "sfrik_200ep", "swav": "swav_200ep_bs256",
              "auh": "auh_200ep"}
CPU_SCALE = 32 / 224


def _preset(case: str, device_type: str) -> dict:
    return get_preset(GPU_PRESET[case] if device_type == "cuda" else f"demo_{case.split('_')[0]}")


def _crops(case: str, scale: float = 1.0) -> list[dict]:
    return [{**c, "size": max(8, round(c["size"] * scale))}
            for c in get_preset(GPU_PRESET[case])["crops"]]


def crop_sizes(case: str, scale: float = 1.0) -> list[int]:
    """The view sizes of the case's ImageNet recipe, in view order, scaled (CPU runs)."""
    return [c["size"] for c in _crops(case, scale) for _ in range(int(c.get("count", 1)))]


def recipe_label(sizes: list[int]) -> str:
    return "+".join(f"{len(list(g))}x{s}" for s, g in itertools.groupby(sizes))


def _tree(obj, leaf):
    """obj with leaf() applied to every tensor of its lists, tuples and dicts."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree(o, leaf) for o in obj)
    if isinstance(obj, dict):
        return {k: _tree(v, leaf) for k, v in obj.items()}
    return leaf(obj) if isinstance(obj, torch.Tensor) else obj


def _build(provider, shape, dtype, device):
    if provider not in ("fastssl", "reference"):
        raise Skip("the training step is measured with the fastssl and the reference losses")
    case, b = shape["method"], shape["B"]
    sizes = [int(x) for x in shape["sizes"].split(",")]
    preset = _preset(case, device.type)
    backbone, feat_dim = build_backbone(shape["arch"])
    method = build_method(case.split("_")[0], backbone, feat_dim, args=preset.get("method_args"),
                          heads=preset.get("heads"), num_samples=4 * b, batch_size=b)
    method.to(device)
    cl = device.type == "cuda"   # channels-last on GPU
    for model in (method.model, method.momentum_model) if cl else ():
        if model is not None:
            model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(preset["optimizer"], method.model.parameters(), lr=0.01,
                                weight_decay=preset.get("weight_decay", 0.0),
                                momentum=preset.get("momentum", 0.9),
                                exclude_1d=preset.get("exclude_1d", True))
    amp = dtype if dtype in (torch.bfloat16, torch.float16) else None
    runner = StepRunner(method, method.model, optimizer, amp_dtype=amp, device_type=device.type,
                        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16))
    gen = torch.Generator(device="cpu").manual_seed(0)
    views = [torch.randn(b, 3, r, r, generator=gen).to(device).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format) for r in sizes]
    index, counter = torch.arange(b, device=device), itertools.count()
    forced = lambda: backend_forced("reference") if provider == "reference" else (  # noqa: E731
        contextlib.nullcontext())

    def step():
        ctx = StepContext(step=next(counter), epoch=0, total_steps=10**6, steps_per_epoch=10**4)
        with forced():
            return runner(views, index, ctx)

    # One real step captures the loss module's inputs for the loss-only timing (a method may hold
    # several loss modules, SwAV with and without its queue: all are watched).
    captured = {}
    criteria = [m for n, m in vars(method).items()
                if n.startswith("criterion") and isinstance(m, torch.nn.Module)]
    for mod in criteria:
        def forward(*args, _mod=mod, _orig=mod.forward, **kwargs):
            clone = lambda t: t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
            captured.setdefault("call", (_mod, _tree(args, clone), _tree(kwargs, clone)))
            return _orig(*args, **kwargs)
        mod.forward = forward
    try:
        step()
    finally:
        for mod in criteria:
            del mod.forward   # back to the class's forward
    if cl:
        torch.cuda.synchronize()

    def loss_only_ms(cfg: BenchConfig) -> float:
        criterion, args, kwargs = captured["call"]
        leaves = []
        _tree((args, kwargs), lambda t: leaves.append(t) if t.requires_grad else None)
        autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()

        def setup():
            for t in leaves:
                t.grad = None

        def run(_):
            with forced():
                with autocast:
                    loss = criterion(*args, **kwargs)
                loss.backward()
        run(setup())   # warm-up
        return percentile_summary((time_cuda_events if cl else time_cpu)(setup, run, cfg))["p50_ms"]

    def extras(rec: dict, cfg: BenchConfig) -> dict:
        s = rec["p50_ms"] / 1e3   # images, not views: a SwAV sample of 8 crops is one image
        out = {"images_per_s": b / s, "views_per_s": b * len(sizes) / s,
               "recipe": recipe_label(sizes)}
        if "call" in captured:
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
    if quick:   # that each method's step runs with the fastssl losses
        return [_case(m, "resnet18", 16, 16 / 224, providers=("fastssl",)) for m in METHODS]
    return [_case(m, "resnet18", 32, CPU_SCALE) if dev == "cpu" else _case(m, "resnet50", 256, 1.0)
            for m in METHODS]


SPECS = [OpSpec("train_step", "trainer", _build, _sizes, providers=("fastssl", "reference"),
                dtypes=lambda dev, quick: (torch.float32,) if dev == "cpu" else (torch.bfloat16,),
                modes=("step",), x_key="B", x_label="batch size")]


def ddp_config(case: str, device_type: str, batch_per_rank: int, world: int, epochs: int, out: str):
    """fastssl.train's config for the DDP benchmark: the case's ImageNet recipe (scaled down on
    CPU), DALI on the demo data, SyncBatchNorm (the trainer converts on GPU), no k-NN monitor."""
    gpu = device_type == "cuda"
    values = dict(data="demo", backend="dali", batch_size=batch_per_rank * world, epochs=epochs,
                  knn_every=0, crops=_crops(case, 1.0 if gpu else CPU_SCALE), sync_bn=True,
                  out=out, log_every=10**6, compare_random_init=False)
    return make_config(_preset(case, device_type),
                       values if gpu else dict(values, arch="resnet18", amp="off"))


def ddp_worker(case: str, batch_per_rank: int, epochs: int, warmup: int, result: str) -> None:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = ddp_config(case, device_type, batch_per_rank, world, epochs,
                     os.path.dirname(result) + f"/run_{case}")
    stamps = []

    def step_end(step, loss):
        if device_type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    cpu0 = time.process_time()
    train(cfg, hooks={"step_end": step_end}, stream=open(os.devnull, "w"))
    timed = len(stamps) - warmup
    if dist.get_rank() == 0 and timed > 0:
        seconds = stamps[-1] - stamps[max(warmup - 1, 0)]
        sizes = [c["size"] for c in cfg.crops for _ in range(int(c.get("count", 1)))]
        images = timed * cfg.batch_size
        rec = {"op": "train_step_ddp", "method": case, "world": world, "device": device_type,
               "backend": "nccl" if device_type == "cuda" else "gloo",
               "sync_bn": device_type == "cuda", "input": "dali demo", "arch": cfg.arch,
               "batch_per_rank": batch_per_rank, "recipe": recipe_label(sizes),
               "steps_timed": timed, "seconds": seconds, "images_per_s": images / seconds,
               "views_per_s": images * len(sizes) / seconds,
               "rank0_cpu_s": time.process_time() - cpu0, "load1": os.getloadavg()[0]}
        with open(result, "w") as f:
            json.dump(rec, f)


def ddp_main(cases, world, batch_per_rank, epochs, warmup, out) -> list[dict]:
    world = world or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
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
                print(f"{case}: error\n{rec['error']}", flush=True)
            else:
                rec = json.load(open(result))
                print(json.dumps(rec), flush=True)
            records.append(rec)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results_ddp.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--ddp-worker"]:
        case, b, epochs, warmup, result = argv[1:6]
        ddp_worker(case, int(b), int(epochs), int(warmup), result)
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.trainer",
                                description="the trainer's DDP benchmark (see the module doc)")
    p.add_argument("--ddp", action="store_true", required=True)
    p.add_argument("--method", action="append", help=f"cases (default all: {', '.join(METHODS)})")
    p.add_argument("--world", type=int, help="processes (default: GPUs, or 2 on CPU)")
    p.add_argument("--batch-per-rank", type=int, help="default 32 on CPU, 128 on GPU")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="steps not timed")
    p.add_argument("--out")
    a = p.parse_args(argv)
    b = a.batch_per_rank or (128 if torch.cuda.is_available() else 32)
    ddp_main(a.method or list(METHODS), a.world, b, a.epochs, a.warmup, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
