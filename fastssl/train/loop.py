"""The training loop: DDP, AMP, schedules, checkpoints on every epoch and on SIGTERM, exact resume.

The hot path has no host synchronisation per step: the loss value and the non-finite flag are
read back only every ``log_every`` steps (and before any checkpoint is written, so a checkpoint
never holds parameters that a non-finite loss has touched).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from fastssl import distributed as D
from fastssl.data import CropSpec, build_train_loader
from fastssl.data.folder import CorruptImageError, SkippedFiles
from fastssl.data.loaders import default_num_threads
from fastssl.methods import Method, StepContext, build_method
from fastssl.models import build_backbone
from fastssl.models import checkpoint_io as ckpt_io
from fastssl.optim import build_optimizer, scale_lr, set_lr, warmup_cosine
from fastssl.train.checkpoint import resume_run, save_checkpoint, sweep_run_files
from fastssl.train.config import TrainConfig
from fastssl.train.log import CURVES_NAME, TENSORBOARD_DIR, JsonlLogger, Progress, RunClock, \
    format_duration, plot_curves
from fastssl.train.monitor import KNNMonitor


class NonFiniteLossError(RuntimeError):
    pass


class CorruptDataError(RuntimeError):
    """The run met an unreadable image (without --skip-corrupt); a resumable checkpoint of the
    steps before it has been written. The message is ``<file>: <reason>``."""


class DistTimeoutError(RuntimeError):
    """Under torchrun, a collective waited longer than --dist-timeout for the other ranks (one
    is frozen, lost or far slower); the message names the timeout and the rank."""


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


# --- setup helpers ------------------------------------------------------------------------------
def init_distributed(
    device_kind: str, timeout_s: float = D.DEFAULT_TIMEOUT_S
) -> tuple[int, int, int]:
    """Initialise the process group when launched by torchrun (NCCL on GPU, gloo on CPU), with
    `timeout_s` (--dist-timeout) for its collectives: a rank that stops answering ends the
    others' waits with an error instead of a hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
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
    return warmup_cosine(
        step,
        total_steps=total_steps,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        peak_lr=peak,
        final_lr=cfg.final_lr_ratio * peak,
        start_lr=cfg.start_lr_ratio * peak,
    )


def crop_specs(crops: list[dict]):
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
        autocast = (
            torch.autocast(self.device_type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
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
        self.signum = 0                   # the signal received (the exit status is 128 + it)
        self._previous = {}

    def _handler(self, signum, frame):
        self.requested = True
        self.signum = self.signum or int(signum)

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
    return threading.current_thread() is threading.main_thread()


# --- the run -------------------------------------------------------------------------------------
# train() = setup_run (process group, loader, model, optimiser) -> resume_run -> per epoch:
# run_epoch (the steps, with the stop every rank agrees on) -> finish_epoch (checkpoint, log).
@dataclass
class Run:
    """What one training run holds between its phases."""
    cfg: TrainConfig
    stream: object
    hooks: dict
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    out_dir: str
    last_path: str
    logger: JsonlLogger
    loader: object
    steps_per_epoch: int
    total_steps: int
    method: Method
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    images_per_step: int
    runner: StepRunner | None = None
    start_epoch: int = 0
    step: int = 0
    resumed_mid_epoch: bool = False
    epoch: int = 0
    knn_results: dict = None
    monitor: object = None
    clock: RunClock | None = None           # the run's ETA (steps run by this process)
    # running sums of the epoch in progress as of the resumed checkpoint (loss sum, steps)
    resumed_loss: tuple = (0.0, 0)
    # the epoch in progress, kept current for a mid-epoch checkpoint
    epoch_loss: "EpochOutcome | None" = None
    skipped: object = None                  # --skip-corrupt: the run's SkippedFiles

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, file=self.stream)

    def summary(self, status: str, epoch: int, **extra) -> dict:
        return {"status": status, "epoch": epoch, "step": self.step, "checkpoint": self.last_path,
                "backbone": os.path.join(self.out_dir, ckpt_io.BACKBONE_NAME), "out": self.out_dir,
                "knn": self.knn_results,
                "skipped": dict(self.skipped.reasons) if self.skipped is not None else {}, **extra}


@dataclass
class EpochOutcome:
    """How run_epoch ended: the whole epoch ran (stop_after: a stop was agreed on its last step),
    or the run stopped mid-epoch (stopped_mid_epoch)."""
    loss_sum: torch.Tensor
    n_steps: int
    rate: float = 0.0
    stop_after: bool = False
    stopped_mid_epoch: bool = False


def _configure_torch(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _build_method(cfg: TrainConfig, loader, world: int, device: torch.device,
                  channels_last: bool) -> Method:
    backbone, feat_dim = build_backbone(cfg.arch, zero_init_residual=cfg.zero_init_residual)
    method = build_method(cfg.method, backbone, feat_dim, args=cfg.method_args, heads=cfg.heads,
                          num_samples=loader.num_samples, batch_size=cfg.batch_size,
                          gather_distributed=world > 1)
    method.check_views(n_views(cfg.crops))
    convert = world > 1 and device.type == "cuda" and cfg.sync_bn
    for name in ("model", "momentum_model"):
        module = getattr(method, name)
        if module is not None and convert:
            setattr(method, name, nn.SyncBatchNorm.convert_sync_batchnorm(module))
    method.to(device)
    if channels_last:
        for module in (method.model, method.momentum_model):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    return method


def prepare_out_dir(out_dir: str) -> None:
    """Create --out (ValueError naming it when that is impossible: a file, no permission)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot create the output directory "
                         f"({e.strerror or e})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out_dir}: the output directory is not writable")


def setup_run(cfg: TrainConfig, hooks: dict, stream) -> Run:
    """Process group, device, loader, model, optimiser; nothing is read from a checkpoint yet."""
    want_cuda = cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available()
    )
    rank, world, local_rank = init_distributed("cuda" if want_cuda else "cpu", cfg.dist_timeout)
    device = resolve_device(cfg.device, local_rank)
    amp_dtype = resolve_amp(cfg.amp, device)
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    if cfg.batch_size % world:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is not divisible by the world size {world}"
        )
    local_batch = cfg.batch_size // world
    _configure_torch(cfg, device)
    seed_everything(cfg.seed)

    out_dir = cfg.out or os.path.join("runs", cfg.preset or cfg.method)
    if rank == 0:
        prepare_out_dir(out_dir)
    if cfg.num_threads is None:                 # the cores of this process's share (bench/input.py)
        cfg.num_threads = default_num_threads(device)
    # --skip-corrupt: one list of skipped files for every loader of the run (each logged once)
    skipped = (SkippedFiles(lambda text: print(text, file=stream, flush=True))
               if cfg.skip_corrupt else None)
    loader = build_train_loader(cfg.data, crop_specs(cfg.crops), local_batch, backend=cfg.backend,
                                device=device, rank=rank, world_size=world, seed=cfg.seed,
                                num_threads=cfg.num_threads, channels_last=channels_last,
                                return_index=True, dataset_size=cfg.dataset_size,
                                **({"skip_corrupt": True, "skipped": skipped}
                                   if cfg.skip_corrupt else {}))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size}: larger than the dataset "
                         f"({loader.num_samples} images); no full batch per epoch")
    method = _build_method(cfg, loader, world, device, channels_last)
    optimizer = build_optimizer(cfg.optimizer, method.model.parameters(), lr=0.0,
                                weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                trust_coefficient=cfg.trust_coefficient, exclude_1d=cfg.exclude_1d)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    last_path = os.path.join(out_dir, ckpt_io.LAST_NAME)
    if rank == 0:
        sweep_run_files(out_dir)
    return Run(cfg=cfg, stream=stream, hooks=hooks, rank=rank, world=world, device=device,
               amp_dtype=amp_dtype, out_dir=out_dir, last_path=last_path,
               logger=JsonlLogger(os.path.join(out_dir, "log.jsonl"), enabled=rank == 0,
                                  tensorboard_dir=(os.path.join(out_dir, TENSORBOARD_DIR)
                                                   if cfg.tensorboard else None)),
               loader=loader, steps_per_epoch=steps_per_epoch,
               total_steps=cfg.epochs * steps_per_epoch, method=method, optimizer=optimizer,
               scaler=scaler, images_per_step=local_batch * world,  # images, not views
               knn_results={}, skipped=skipped)


def wrap_model(run: Run) -> None:
    """DDP and torch.compile around the method's model; the step runner that uses them."""
    model: nn.Module = run.method.model
    if run.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:
        model = torch.compile(model)
    run.runner = StepRunner(run.method, model, run.optimizer, run.scaler, run.amp_dtype,
                            run.device.type)


def _announce(run: Run) -> None:
    if not run.is_main:
        return
    cfg = run.cfg
    os.makedirs(run.out_dir, exist_ok=True)
    with open(os.path.join(run.out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    run.say(
        f"{cfg.method} {cfg.arch} on {cfg.data} (loader {cfg.backend}): {run.world} process(es) on "
        f"{run.device}, batch {cfg.batch_size}, {n_views(cfg.crops)} views, {cfg.epochs} epochs x "
        f"{run.steps_per_epoch} steps, peak lr {peak_lr(cfg):.4g}, amp {cfg.amp}, out {run.out_dir}"
    )
    run.logger.log(event="start", method=cfg.method, arch=cfg.arch, preset=cfg.preset,
                   epochs=cfg.epochs, steps_per_epoch=run.steps_per_epoch, step=run.step,
                   world=run.world, batch_size=cfg.batch_size)


def check_finite(
    run: Run, bad: torch.Tensor, at_step: int, loss_value: float | None = None
) -> None:
    """Raise NonFiniteLossError if any loss since the last check was NaN/inf (reads `bad`)."""
    if bool(bad):
        msg = (f"non-finite loss ({loss_value if loss_value is not None else 'nan/inf'}) by step "
               f"{at_step} (epoch {run.epoch + 1}); stopping. "
               + (f"The last good checkpoint is kept at {run.last_path}."
                  if os.path.isfile(run.last_path) else "No checkpoint had been written yet."))
        run.logger.log(event="nonfinite", step=at_step, epoch=run.epoch + 1)
        raise NonFiniteLossError(msg)


def agreed_stop(run: Run, stop: StopFlag, sync_now: bool, max_reached: bool) -> bool:
    """Whether to stop after this step. Every rank must stop at the same step (a signal may reach
    them at different times): under torchrun they agree at the sync points, which all share.
    A signal that reached any rank marks every rank's stop as interrupted by it (one exit
    status for the whole job)."""
    stop_now = stop.requested or max_reached
    if run.world == 1:
        return stop_now
    if not (sync_now or max_reached):
        return False
    flag = torch.tensor([int(stop_now), stop.signum if stop.requested else 0], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    signum = int(flag[1].item())
    if signum and not stop.requested:
        stop.requested, stop.signum = True, signum
    return bool(flag[0].item())


def run_epoch(run: Run, epoch: int, stop: StopFlag, bad: torch.Tensor) -> EpochOutcome:
    """The steps of one epoch, until its end or an agreed stop (then checkpointed mid-epoch)."""
    cfg, spe = run.cfg, run.steps_per_epoch
    if not (run.resumed_mid_epoch and epoch == run.start_epoch):
        run.loader.set_epoch(epoch)
    run.method.model.train()
    if run.method.momentum_model is not None:
        run.method.momentum_model.train()
    progress = Progress(spe, epoch=epoch, epochs=cfg.epochs, enabled=run.is_main,
                        start_step=run.step - epoch * spe, clock=run.clock,
                        steps_before=epoch * spe)
    outcome = EpochOutcome(torch.zeros((), dtype=torch.float64, device=run.device), 0)
    if run.resumed_mid_epoch and epoch == run.start_epoch:
        outcome.loss_sum += run.resumed_loss[0]
        outcome.n_steps = run.resumed_loss[1]
    run.epoch_loss = outcome
    for batch in run.loader:
        ctx = StepContext(
            step=run.step, epoch=epoch, total_steps=run.total_steps, steps_per_epoch=spe
        )
        lr = lr_at(run.step, cfg, run.total_steps, spe)
        set_lr(run.optimizer, lr)
        loss = run.runner(batch.views, batch.index, ctx)
        bad |= ~torch.isfinite(loss)
        outcome.loss_sum += loss.double()
        outcome.n_steps += 1
        run.step += 1
        in_epoch = run.step - epoch * spe
        if "step_end" in run.hooks:
            run.hooks["step_end"](run.step, loss)
        sync_now = (run.step % cfg.log_every == 0) or in_epoch == spe
        if sync_now:
            value = float(loss)
            check_finite(run, bad, run.step, value)
            progress.update(in_epoch, run.images_per_step, value, lr)
            run.logger.log(event="step", epoch=epoch + 1, step=run.step, loss=value, lr=lr,
                           images_per_s=progress.rate)
        else:
            progress.images += run.images_per_step
        max_reached = cfg.max_steps is not None and run.step >= cfg.max_steps
        if not agreed_stop(run, stop, sync_now, max_reached):
            continue
        if in_epoch == spe:
            outcome.stop_after = True      # finish the epoch normally, then stop
            continue
        check_finite(run, bad, run.step)
        save_checkpoint(run, epoch, run.step)
        progress.close()
        outcome.stopped_mid_epoch = True
        return outcome
    outcome.rate = progress.close()
    return outcome


def finish_epoch(run: Run, epoch: int, outcome: EpochOutcome, bad: torch.Tensor) -> None:
    """Checkpoint the finished epoch, run the k-NN monitor when due, log and print the epoch."""
    cfg = run.cfg
    check_finite(run, bad, run.step)
    mean_loss = float(outcome.loss_sum) / max(outcome.n_steps, 1)
    save_checkpoint(run, epoch + 1, run.step, may_defer=epoch + 1 < cfg.epochs)
    record = {"event": "epoch", "epoch": epoch + 1, "step": run.step, "loss": mean_loss,
              "images_per_s": outcome.rate,
              "lr": lr_at(max(run.step - 1, 0), cfg, run.total_steps, run.steps_per_epoch)}
    if cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
        if run.monitor is None:
            run.monitor = make_monitor(cfg, run.device, run.steps_per_epoch * cfg.batch_size,
                                       skipped=run.skipped)
        run.knn_results = monitor_or_corrupt(run, run.monitor)
        record["knn"] = run.knn_results
        # images decoded by the monitor / images decoded for training since its last run
        record["knn_decoded_share"] = run.monitor.decoded_share()
    run.logger.log(**record)
    knn_s = ("".join(f" {k} {v:.2f}" for k, v in run.knn_results.items())
             if "knn" in record else "")
    eta = run.clock.eta(run.step) if run.clock else float("nan")
    run.say(f"epoch {epoch + 1}/{cfg.epochs}: epoch mean loss {mean_loss:.4f}, "
            f"{outcome.rate:,.0f} img/s{knn_s}, run ETA {format_duration(eta)}")
    if "epoch_end" in run.hooks:
        run.hooks["epoch_end"](epoch + 1, run.step)


def run_epoch_or_save(run: Run, epoch: int, stop: StopFlag, bad: torch.Tensor) -> EpochOutcome:
    """run_epoch; an unreadable image ends the run with CorruptDataError after a checkpoint of
    the steps before it (single process: under torchrun the other ranks cannot join the save)."""
    try:
        return run_epoch(run, epoch, stop, bad)
    except CorruptImageError as e:
        saved = ""
        if run.world == 1:
            check_finite(run, bad, run.step)
            save_checkpoint(run, epoch, run.step)
            saved = (f" (checkpoint at step {run.step}: fix or remove the file, or pass "
                     f"--skip-corrupt, and continue with --resume auto --out {run.out_dir})")
        run.logger.log(event="corrupt_image", step=run.step, path=e.path, reason=e.reason)
        raise CorruptDataError(f"{e.path}: {e.reason}{saved}") from e


def _stopped(run: Run, stop: StopFlag, epoch: int, where: str) -> dict:
    """The summary of a run stopped before its end: "interrupted" by a signal (its number under
    "signal": the CLI exits with 128 + it, so a retry loop resumes) or "stopped" (--max-steps)."""
    status = "interrupted" if stop.requested else "stopped"
    by = f" by signal {stop.signum}" if stop.requested else ""
    run.say(f"{status}{by} {where} {epoch + 1}, step {run.step}: checkpoint {run.last_path} "
            f"(continue with --resume auto --out {run.out_dir})")
    return run.summary(status, epoch, signal=stop.signum if stop.requested else None)


def train(cfg: TrainConfig, *, hooks: dict | None = None, stream=None) -> dict:
    """Run (or resume) a pretraining run. Returns a summary dict: status ("completed",
    "interrupted" by a signal, whose number is under "signal", or "stopped" by max_steps), epoch,
    step, the checkpoint path, k-NN results, the files skipped under skip_corrupt. Under
    torchrun, a collective that outlives cfg.dist_timeout raises DistTimeoutError."""
    run = None
    try:
        run = setup_run(cfg, hooks or {}, stream or sys.stdout)
        return _train(run, cfg)
    except RuntimeError as e:
        if D.is_timeout_error(e):
            raise _timeout_error(e, cfg, run) from e
        raise
    finally:
        if run is not None:
            end_of_run(run)


def _timeout_error(error: BaseException, cfg: TrainConfig, run: Run | None) -> DistTimeoutError:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    kept = (f"; the last checkpoint is kept at {run.last_path}"
            if run is not None and os.path.isfile(run.last_path) else "")
    return DistTimeoutError(
        f"rank {D.rank()} of {D.world_size()}: a collective waited longer than --dist-timeout "
        f"({cfg.dist_timeout:g} s) for the other ranks: a rank is frozen, lost or far slower"
        f"{kept} ({type(error).__name__}: {first[:300]})")


def _train(run: Run, cfg: TrainConfig) -> dict:
    resume_run(run)
    wrap_model(run)
    _announce(run)
    run.clock = RunClock(run.total_steps, run.step)
    bad = torch.zeros((), dtype=torch.bool, device=run.device)
    with StopFlag() as stop:
        for epoch in range(run.start_epoch, cfg.epochs):
            run.epoch = epoch
            outcome = run_epoch_or_save(run, epoch, stop, bad)
            if outcome.stopped_mid_epoch:
                result = _stopped(run, stop, epoch, "at epoch")
                run.logger.log(event=result["status"], epoch=epoch + 1, step=run.step)
                return result
            finish_epoch(run, epoch, outcome, bad)
            if outcome.stop_after and epoch + 1 < cfg.epochs:
                result = _stopped(run, stop, epoch, "after epoch")
                result["epoch"] = epoch + 1
                run.logger.log(event=result["status"], epoch=epoch + 1, step=run.step)
                return result
    return run.summary("completed", cfg.epochs, model=run.method.model, monitor=run.monitor,
                       device=run.device, skipped_files=run.skipped)


def end_of_run(run: Run) -> None:
    """However the run ended: close TensorBoard, draw the curves of log.jsonl next to it (rank 0;
    a failure here is reported, never raised over the run's own outcome)."""
    run.logger.close()
    log_path = run.logger.path
    if not (run.is_main and log_path and os.path.isfile(log_path)):
        return
    try:
        plot_curves(log_path, os.path.join(run.out_dir, CURVES_NAME))
    except ImportError:
        run.say(f"note: {CURVES_NAME} not drawn: matplotlib is not installed")
    except Exception as e:  # noqa: BLE001 - the curves are a convenience; the run's result stands
        run.say(f"warning: {CURVES_NAME} not drawn ({type(e).__name__}: {e})")


def monitor_or_corrupt(run: Run, monitor) -> dict:
    """run_knn; an unreadable image in the monitor's subsets (without --skip-corrupt) ends the
    run like one met in training: CorruptDataError naming it (the epoch's checkpoint is
    already written)."""
    try:
        return run_knn(run.method.model.backbone, monitor)
    except CorruptImageError as e:
        run.logger.log(event="corrupt_image", step=run.step, path=e.path, reason=e.reason)
        raise CorruptDataError(f"{e.path}: {e.reason} (k-NN monitor; the epoch's checkpoint is "
                               f"written: fix or remove the file, or pass --skip-corrupt, and "
                               f"continue with --resume auto --out {run.out_dir})") from e


def make_monitor(cfg: TrainConfig, device: torch.device, train_images_per_epoch: int | None = None,
                 skipped=None):
    """The k-NN monitor; given the images trained per epoch, it decodes at most 2% of the
    images trained between two of its runs (fastssl/train/monitor.py). With --skip-corrupt it
    leaves unreadable images out, reported once in `skipped` (the run's list)."""
    if cfg.skip_corrupt and skipped is None:
        skipped = SkippedFiles()
    return KNNMonitor(cfg.data, k=cfg.knn_k, device=device, size=cfg.eval_size,
                      max_train_samples=cfg.knn_train_samples or None, num_threads=cfg.num_threads,
                      train_images_per_epoch=train_images_per_epoch, every=cfg.knn_every or 1,
                      skip_corrupt=cfg.skip_corrupt, skipped=skipped)


def run_knn(backbone: nn.Module, monitor) -> dict:
    """k-NN accuracy (%) of the backbone's features; a collective under torchrun."""
    was_training = backbone.training
    backbone.eval()
    try:
        return monitor(backbone)
    finally:
        backbone.train(was_training)


def random_init_backbone(cfg: TrainConfig) -> nn.Module:
    seed_everything(cfg.seed)
    return build_backbone(cfg.arch, zero_init_residual=cfg.zero_init_residual)[0]
