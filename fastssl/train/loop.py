"""The training loop: DDP, AMP, schedules, checkpoints on every epoch and on SIGTERM, exact resume.

The hot path has no host synchronisation per step: the loss value and the non-finite flag are
read back only every ``log_every`` steps (and before any checkpoint is written, so a checkpoint
never holds parameters that a non-finite loss has touched).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from fastssl import distributed as D
from fastssl.methods import Method, StepContext, build_method
from fastssl.train import checkpoint as ckpt_io
from fastssl.train.config import TrainConfig
from fastssl.train.log import JsonlLogger, Progress
from fastssl.train.optim import build_optimizer, set_lr
from fastssl.train.schedules import scale_lr, warmup_cosine


class NonFiniteLossError(RuntimeError):
    pass


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# --- setup helpers ------------------------------------------------------------------------------
def init_distributed(device_kind: str) -> tuple[int, int, int]:
    """Initialise the process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return D.rank(), D.world_size(), local_rank


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def resolve_amp(amp: str, device: torch.device):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp: expected one of bf16, fp16, off, auto; got {amp!r}")
    return AMP_DTYPES[amp]


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def peak_lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else scale_lr(cfg.base_lr, cfg.batch_size, cfg.lr_scaling)


def lr_at(step: int, cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> float:
    peak = peak_lr(cfg)
    return warmup_cosine(step, total_steps=total_steps, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                         peak_lr=peak, final_lr=cfg.final_lr_ratio * peak, start_lr=cfg.start_lr_ratio * peak)


def crop_specs(crops: list[dict]):
    from fastssl.data import CropSpec
    specs = []
    for c in crops:
        c = dict(c)
        c["scale"] = tuple(c["scale"])
        if "jitter" in c:
            c["jitter"] = tuple(c["jitter"])
        specs.append(CropSpec(**c))
    return specs


def n_views(crops: list[dict]) -> int:
    return sum(int(c.get("count", 1)) for c in crops)


# --- one optimisation step ------------------------------------------------------------------------
@dataclass
class StepRunner:
    """Runs one step of a Method: hooks, autocast forward + loss, (scaled) backward, optimiser.

    Used by :func:`train` and directly by tests (e.g. DDP vs single process on a tiny model)."""
    method: Method
    model: nn.Module                      # method.model, possibly wrapped in DDP / compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    device_type: str = "cpu"

    def __call__(self, views, index, ctx: StepContext) -> torch.Tensor:
        self.method.before_step(ctx)
        autocast = (torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss = self.method.compute_loss(self.model, views, index, ctx)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.method.after_backward(ctx)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.method.after_backward(ctx)
            self.optimizer.step()
        self.method.after_step(ctx)
        return loss.detach()


# --- SIGTERM -------------------------------------------------------------------------------------
class StopFlag:
    """Set by SIGTERM (and SIGINT); the loop checkpoints and returns at the next check."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# --- the run -------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, hooks: dict | None = None, stream=None) -> dict:
    """Run (or resume) a pretraining run. Returns a summary dict: status ("completed",
    "interrupted" or "stopped"), epoch, step, the checkpoint path, k-NN results."""
    hooks = hooks or {}
    stream = stream or sys.stdout
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world, local_rank = init_distributed("cuda" if want_cuda else "cpu")
    device = resolve_device(cfg.device, local_rank)
    amp_dtype = resolve_amp(cfg.amp, device)
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    is_main = rank == 0
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the world size {world}")
    local_batch = cfg.batch_size // world
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)

    out_dir = cfg.out or os.path.join("runs", cfg.preset or cfg.method)
    last_path = os.path.join(out_dir, ckpt_io.LAST_NAME)
    logger = JsonlLogger(os.path.join(out_dir, "log.jsonl"), enabled=is_main)

    from fastssl.data import build_train_loader
    from fastssl.models import build_backbone, backbone_state_dict

    loader = build_train_loader(cfg.data, crop_specs(cfg.crops), local_batch, backend=cfg.backend,
                                device=device, rank=rank, world_size=world, seed=cfg.seed,
                                num_threads=cfg.num_threads, channels_last=channels_last,
                                return_index=True, dataset_size=cfg.dataset_size)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size}: larger than the dataset "
                         f"({loader.num_samples} images); no full batch per epoch")
    total_steps = cfg.epochs * steps_per_epoch

    backbone, feat_dim = build_backbone(cfg.arch, zero_init_residual=cfg.zero_init_residual)
    method = build_method(cfg.method, backbone, feat_dim, args=cfg.method_args, heads=cfg.heads,
                          num_samples=loader.num_samples, batch_size=cfg.batch_size,
                          gather_distributed=world > 1)
    method.check_views(n_views(cfg.crops))
    if world > 1 and device.type == "cuda" and cfg.sync_bn:
        method.model = nn.SyncBatchNorm.convert_sync_batchnorm(method.model)
        if method.momentum_model is not None:
            method.momentum_model = nn.SyncBatchNorm.convert_sync_batchnorm(method.momentum_model)
    method.to(device)
    if channels_last:
        method.model.to(memory_format=torch.channels_last)
        if method.momentum_model is not None:
            method.momentum_model.to(memory_format=torch.channels_last)

    optimizer = build_optimizer(cfg.optimizer, method.model.parameters(), lr=0.0,
                                weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                trust_coefficient=cfg.trust_coefficient, exclude_1d=cfg.exclude_1d)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, step, resumed_mid_epoch = 0, 0, False
    resume_path = ckpt_io.resolve_resume(cfg.resume, out_dir)
    if resume_path:
        state = ckpt_io.load(resume_path, map_location="cpu")   # RNG states must stay on the CPU
        if state["method"] != cfg.method or state["arch"] != cfg.arch:
            raise ValueError(f"--resume {resume_path}: checkpoint is {state['method']}/{state['arch']}, "
                             f"this run is {cfg.method}/{cfg.arch}")
        method.model.load_state_dict(state["model"])
        method.load_momentum_state(state["momentum"])
        method.criterion.load_state_dict(state["loss_state"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        start_epoch, step = state["epoch"], state["step"]
        resumed_mid_epoch = step > start_epoch * steps_per_epoch
        ckpt_io.set_rng_state(state["rng"])
        if is_main:
            print(f"resumed from {resume_path}: epoch {start_epoch}, step {step}", file=stream)

    model: nn.Module = method.model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    runner = StepRunner(method, model, optimizer, scaler, amp_dtype, device.type)

    def save(epoch_done: int, step_done: int) -> None:
        if is_main:
            state = {"version": ckpt_io.CHECKPOINT_VERSION, "arch": cfg.arch, "method": cfg.method,
                     "config": cfg.to_dict(), "backbone": backbone_state_dict(method.model.backbone),
                     "model": method.model.state_dict(), "momentum": method.momentum_state(),
                     "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "loss_state": method.criterion.state_dict(), "epoch": epoch_done, "step": step_done,
                     "loader": loader.state_dict(), "rng": ckpt_io.rng_state()}
            ckpt_io.save_atomic(state, last_path)
        if world > 1:
            dist.barrier()

    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        print(f"{cfg.method} {cfg.arch} on {cfg.data} ({cfg.backend}): {world} process(es) on {device}, "
              f"batch {cfg.batch_size}, {n_views(cfg.crops)} views, {cfg.epochs} epochs x {steps_per_epoch} steps, "
              f"peak lr {peak_lr(cfg):.4g}, amp {cfg.amp}, out {out_dir}", file=stream)

    bad = torch.zeros((), dtype=torch.bool, device=device)
    images_per_step = local_batch * n_views(cfg.crops) * world
    knn_results: dict = {}
    status = "completed"
    epoch = start_epoch
    pending_stop = False
    monitor = None

    def check_finite(at_step: int, loss_value: float | None = None) -> None:
        if bool(bad):
            msg = (f"non-finite loss ({loss_value if loss_value is not None else 'nan/inf'}) by step "
                   f"{at_step} (epoch {epoch + 1}); stopping. "
                   + (f"The last good checkpoint is kept at {last_path}."
                      if os.path.isfile(last_path) else "No checkpoint had been written yet."))
            logger.log(event="nonfinite", step=at_step, epoch=epoch)
            raise NonFiniteLossError(msg)

    with StopFlag() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            if not (resumed_mid_epoch and epoch == start_epoch):
                loader.set_epoch(epoch)
            method.model.train()
            if method.momentum_model is not None:
                method.momentum_model.train()
            progress = Progress(steps_per_epoch, epoch=epoch, epochs=cfg.epochs, enabled=is_main)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            n_steps = 0
            for batch in loader:
                ctx = StepContext(step=step, epoch=epoch, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
                lr = lr_at(step, cfg, total_steps, steps_per_epoch)
                set_lr(optimizer, lr)
                loss = runner(batch.views, batch.index, ctx)
                bad |= ~torch.isfinite(loss)
                loss_sum += loss.double()
                n_steps += 1
                step += 1
                in_epoch = step - epoch * steps_per_epoch
                if "step_end" in hooks:
                    hooks["step_end"](step, loss)
                sync_now = (step % cfg.log_every == 0) or in_epoch == steps_per_epoch
                if sync_now:
                    value = float(loss)
                    check_finite(step, value)
                    progress.update(in_epoch, images_per_step, value, lr)
                    logger.log(event="step", epoch=epoch, step=step, loss=value, lr=lr)
                else:
                    progress.images += images_per_step
                max_reached = cfg.max_steps is not None and step >= cfg.max_steps
                stop_now = stop.requested or max_reached
                if world > 1:
                    # Every rank must stop at the same step (a signal may reach them at different
                    # times): agree on it at the sync points, which all ranks share.
                    if sync_now or max_reached:
                        flag = torch.tensor([int(stop_now)], device=device)
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                        stop_now = bool(flag.item())
                    else:
                        stop_now = False
                if stop_now and in_epoch == steps_per_epoch:
                    pending_stop = True      # finish the epoch normally, then stop
                elif stop_now:
                    check_finite(step)
                    save(epoch, step)
                    status = "interrupted" if stop.requested else "stopped"
                    if is_main:
                        progress.close()
                        print(f"{status} at epoch {epoch + 1}, step {step}: checkpoint {last_path} "
                              f"(continue with --resume auto --out {out_dir})", file=stream)
                    logger.log(event=status, epoch=epoch, step=step)
                    return {"status": status, "epoch": epoch, "step": step, "checkpoint": last_path,
                            "out": out_dir, "knn": knn_results}
            rate = progress.close()
            check_finite(step)
            mean_loss = float(loss_sum) / max(n_steps, 1)
            save(epoch + 1, step)
            record = {"event": "epoch", "epoch": epoch + 1, "step": step, "loss": mean_loss,
                      "images_per_s": rate, "lr": lr_at(max(step - 1, 0), cfg, total_steps, steps_per_epoch)}
            if cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
                if monitor is None:
                    monitor = make_monitor(cfg, device)
                knn_results = run_knn(method.model.backbone, monitor)
                record["knn"] = knn_results
            logger.log(**record)
            if is_main:
                knn_s = "".join(f" {k} {v:.2f}" for k, v in knn_results.items()) if "knn" in record else ""
                print(f"epoch {epoch + 1}/{cfg.epochs}: loss {mean_loss:.4f}, {rate:,.0f} img/s{knn_s}",
                      file=stream)
            if "epoch_end" in hooks:
                hooks["epoch_end"](epoch + 1, step)
            if pending_stop and epoch + 1 < cfg.epochs:
                status = "interrupted" if stop.requested else "stopped"
                if is_main:
                    print(f"{status} after epoch {epoch + 1}, step {step}: checkpoint {last_path} "
                          f"(continue with --resume auto --out {out_dir})", file=stream)
                logger.log(event=status, epoch=epoch + 1, step=step)
                return {"status": status, "epoch": epoch + 1, "step": step, "checkpoint": last_path,
                        "out": out_dir, "knn": knn_results}
    return {"status": status, "epoch": cfg.epochs, "step": step, "checkpoint": last_path, "out": out_dir,
            "knn": knn_results, "model": method.model, "monitor": monitor, "device": device}


def make_monitor(cfg: TrainConfig, device: torch.device):
    from fastssl.train.monitor import KNNMonitor
    return KNNMonitor(cfg.data, k=cfg.knn_k, device=device, size=cfg.eval_size,
                      max_train_samples=cfg.knn_train_samples, num_threads=cfg.num_threads)


def run_knn(backbone: nn.Module, monitor) -> dict:
    """k-NN accuracy (%) of the backbone's features; a collective under torchrun."""
    was_training = backbone.training
    backbone.eval()
    try:
        return monitor(backbone)
    finally:
        backbone.train(was_training)


def random_init_backbone(cfg: TrainConfig) -> nn.Module:
    from fastssl.models import build_backbone
    seed_everything(cfg.seed)
    return build_backbone(cfg.arch, zero_init_residual=cfg.zero_init_residual)[0]
