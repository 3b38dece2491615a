"""The checkpoint and resume policy of a training run: what a checkpoint holds and when it is
written (rank 0, every rank waiting; an epoch's failed write deferred to the next one), how a
resume restores it (model, momentum model, per-rank loss states, optimiser, scaler, loader,
RNGs), and the backbone.pth beside it kept equal to the checkpoint's backbone.

The files themselves (the safe loader, atomic writes, RNG state, the file names) are
fastssl.models.checkpoint_io, which evaluation reads too. ``run`` is the loop's Run
(fastssl.train.loop).
"""
from __future__ import annotations

import os

import torch.distributed as dist

from fastssl.models import backbone_state_dict
from fastssl.models import checkpoint_io as ckpt_io
from fastssl.train.config import TrainConfig


def resolve_resume(resume: str | None, out_dir: str) -> str | None:
    """``auto`` = the last checkpoint in out_dir if there is one (else start fresh)."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(out_dir, ckpt_io.LAST_NAME)
        return path if os.path.isfile(path) else None
    return resume


def sweep_run_files(out_dir: str) -> None:
    """Remove what a kill during an earlier write of the run's two files left (rank 0)."""
    ckpt_io.sweep_stale_temps(os.path.join(out_dir, ckpt_io.LAST_NAME))
    ckpt_io.sweep_stale_temps(os.path.join(out_dir, ckpt_io.BACKBONE_NAME))


def resume_run(run) -> None:
    """Load --resume's checkpoint (or OUT's last one under ``auto``) into the run."""
    cfg = run.cfg
    resume_path = resolve_resume(cfg.resume, run.out_dir)
    if not resume_path:
        return
    # RNG states must stay on the CPU; weights_only unless --trust-checkpoint
    state = ckpt_io.load(resume_path, map_location="cpu", trust_checkpoint=cfg.trust_checkpoint)
    check_compatible(state, cfg, resume_path)
    method = run.method
    try:
        method.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"--resume {resume_path}: the checkpoint's model does not fit this run's "
                         f"({str(e).strip().splitlines()[0]})") from None
    method.load_momentum_state(state["momentum"])
    load_loss_state(run, state, resume_path)
    run.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.loader.load_state_dict(state["loader"])
    run.start_epoch, run.step = state["epoch"], state["step"]
    run.resumed_mid_epoch = run.step > run.start_epoch * run.steps_per_epoch
    if run.resumed_mid_epoch and "epoch_loss" in state:
        run.resumed_loss = (float(state["epoch_loss"]["sum"]), int(state["epoch_loss"]["steps"]))
    ckpt_io.set_rng_state(state["rng"])
    if run.is_main and "backbone" in state:
        sync_backbone_file(run, state["backbone"], state["epoch"], state["step"])
    run.say(f"resumed from {resume_path}: {run.start_epoch} epoch(s) done, continuing in epoch "
            f"{run.start_epoch + 1} at step {run.step}")


def sync_backbone_file(run, backbone: dict, epoch: int, step: int) -> None:
    """Make OUT/backbone.pth hold the resumed checkpoint's backbone: a kill between the two
    files of one save (or during backbone.pth's write) leaves it one save older, and the eval
    CLIs would score those old weights. Rewritten (atomically) when missing, unreadable or
    different; a write error is a warning (training goes on, the next save retries)."""
    path = backbone_path(run)
    if ckpt_io.backbone_file_matches(path, backbone):
        return
    try:
        ckpt_io.save_backbone_atomic(backbone, path)
    except ckpt_io.CheckpointWriteError as e:
        run.say(f"warning: {path} is stale and could not be rewritten: {e}")
        return
    run.say(f"{path} did not hold the checkpoint's backbone (a save was interrupted); "
            f"rewritten from the checkpoint (epoch {epoch}, step {step})")
    run.logger.log(event="backbone_rewritten", epoch=epoch, step=step)


# what a resumed run must share with its checkpoint: other values build another model
_RESUME_KEYS = ("method", "arch", "heads")


def check_compatible(state: dict, cfg: TrainConfig, path: str) -> None:
    """ValueError comparing the checkpoint's method, arch and heads with this run's."""
    saved = dict(state.get("config") or {})
    saved.setdefault("method", state.get("method"))
    saved.setdefault("arch", state.get("arch"))
    ours = cfg.to_dict()
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, this run {ours[key]!r}"
             for key in _RESUME_KEYS if key in saved and saved.get(key) != ours[key]]
    if diffs:
        raise ValueError(f"--resume {path}: the checkpoint was trained with other settings ("
                         + "; ".join(diffs) + ")")


def backbone_path(run) -> str:
    return os.path.join(run.out_dir, ckpt_io.BACKBONE_NAME)


def save_checkpoint(run, epoch_done: int, step_done: int, may_defer: bool = False) -> None:
    """Rank 0 writes the resumable state (atomically); every rank waits for it. A write that
    fails (full disk) raises CheckpointWriteError naming the path, or with may_defer (an epoch
    checkpoint with epochs still to run) warns and leaves the retry to the next checkpoint, so
    the epoch's work is not lost with the process."""
    error = None
    per_rank = loss_states_per_rank(run)
    if run.is_main:
        cfg, method = run.cfg, run.method
        state = {"version": ckpt_io.CHECKPOINT_VERSION, "arch": cfg.arch, "method": cfg.method,
                 "config": cfg.to_dict(), "backbone": backbone_state_dict(method.model.backbone),
                 "model": method.model.state_dict(), "momentum": method.momentum_state(),
                 "optimizer": run.optimizer.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                 "loss_state": method.criterion.state_dict(), "epoch": epoch_done,
                 "step": step_done, "loader": run.loader.state_dict(), "rng": ckpt_io.rng_state()}
        if per_rank is not None:
            state["loss_state_per_rank"] = per_rank
        if run.epoch_loss is not None and step_done > epoch_done * run.steps_per_epoch:
            # mid-epoch: the resumed run's epoch loss then covers the whole epoch
            state["epoch_loss"] = {"sum": float(run.epoch_loss.loss_sum),
                                   "steps": run.epoch_loss.n_steps}
        try:
            ckpt_io.save_atomic(state, run.last_path)
            # the weights alone, for torchvision and weights_only loaders (after the resumable
            # state: a kill between the two leaves a backbone one save older, never a newer one)
            ckpt_io.save_backbone_atomic(state["backbone"], backbone_path(run))
        except ckpt_io.CheckpointWriteError as e:
            error = e
    if run.world > 1:
        dist.barrier()
    if error is not None:
        if not may_defer:
            raise error
        run.say(f"warning: {error}; the previous checkpoint is kept, training goes on and the "
                "next checkpoint retries")
        run.logger.log(event="checkpoint_failed", step=step_done, error=str(error))


def loss_states_per_rank(run) -> list | None:
    """Every rank's loss state (on rank 0; None elsewhere) when it differs per rank (SwAV's
    queue); None when rank 0's copy is every rank's. A collective: every rank calls it."""
    if run.world == 1 or not run.method.loss_state_per_rank:
        return None
    mine = {k: v.detach().cpu() for k, v in run.method.criterion.state_dict().items()}
    gathered = [None] * run.world if run.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def load_loss_state(run, state: dict, path: str) -> None:
    """Rank 0's loss state, or this rank's own where it is kept per rank."""
    per_rank = state.get("loss_state_per_rank")
    criterion = run.method.criterion
    if per_rank is None or not run.method.loss_state_per_rank:
        criterion.load_state_dict(state["loss_state"])
        if run.world > 1 and run.method.loss_state_per_rank and hasattr(criterion, "reset_queue"):
            # a single-process checkpoint has one queue: every rank holding it would count
            # its rows W times in the distributed Sinkhorn; start the queues afresh instead
            criterion.reset_queue()
            run.say(f"--resume {path}: the checkpoint holds one rank's loss state; the "
                    f"{run.world} ranks' queues start empty")
        return
    if len(per_rank) == run.world:
        criterion.load_state_dict(per_rank[run.rank])
        return
    criterion.load_state_dict(state["loss_state"])
    if hasattr(criterion, "reset_queue"):
        criterion.reset_queue()
    run.say(f"--resume {path}: the checkpoint holds the loss states of {len(per_rank)} ranks, "
            f"this run has {run.world}; the queues start empty")
