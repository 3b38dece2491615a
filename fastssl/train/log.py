"""Run logging on rank 0: a JSON-lines file (optionally mirrored to TensorBoard), a progress line
with ETAs, and a PNG of the training curves at the end of a run.

Epochs are numbered from 1 everywhere (progress bar, stdout, every ``log.jsonl`` record): a
record's ``epoch`` is the epoch its step ran in, or the epoch that just finished.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time

CURVES_NAME = "curves.png"
TENSORBOARD_DIR = "tensorboard"


def tensorboard_writer_class():
    """torch's SummaryWriter; ValueError naming --tensorboard when the package is missing (it is
    an optional dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError(f"--tensorboard: the tensorboard package is not installed "
                         f"(pip install tensorboard) ({e})") from None
    return SummaryWriter


class JsonlLogger:
    """Appends one JSON object per line; only rank 0 writes. With ``tensorboard_dir`` the step
    and epoch records' numbers also go to TensorBoard scalars (x axis: the global step)."""

    def __init__(self, path: str | None, enabled: bool = True, tensorboard_dir: str | None = None):
        self.path = path if enabled else None
        self.writer = None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if tensorboard_dir:
                self.writer = tensorboard_writer_class()(log_dir=tensorboard_dir)

    def log(self, **record) -> None:
        if not self.path:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
        if self.writer is not None:
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        step, event = record.get("step"), record.get("event")
        if event == "step":
            names = {
                "loss": "train/step_loss",
                "lr": "train/lr",
                "images_per_s": "train/images_per_s",
            }
        elif event == "epoch":
            names = {"loss": "train/epoch_mean_loss", "epoch": "train/epoch"}
        else:
            return
        for key, tag in names.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, float(record[key]), step)
        for key, value in (record.get("knn") or {}).items():
            self.writer.add_scalar(f"knn/{key}", float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def format_duration(seconds: float) -> str:
    """H:MM:SS (or D days, H:MM:SS); '?' while unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{s:02d}"


class RunClock:
    """Seconds per step over the steps this process has run, for the run's ETA."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total_steps, self.start_step = total_steps, start_step
        self.start = time.perf_counter()

    def eta(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return math.nan
        return (time.perf_counter() - self.start) / done * max(self.total_steps - step, 0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Progress:
    """One status line per epoch: step/total, images/s (every view of every image counts), the
    last step's loss, lr, and the ETA of the epoch and of the run.

    Redraws in place on a terminal; on a pipe it prints a line every ``every`` updates.
    ``start_step`` is the epoch's step count at the start (a run resumed mid-epoch), ``clock``
    the run's :class:`RunClock` and ``steps_before`` the global step at the epoch's start.
    """

    def __init__(self, total: int, *, epoch: int, epochs: int, enabled: bool = True, stream=None,
                 every: int = 10, start_step: int = 0, clock: RunClock | None = None,
                 steps_before: int = 0):
        self.total, self.epoch, self.epochs = total, epoch, epochs
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, every)
        self.start = time.perf_counter()
        self.start_step, self.clock, self.steps_before = start_step, clock, steps_before
        self.images = 0
        self.updates = 0
        self.rate = 0.0

    def update(self, step: int, images: int, loss: float, lr: float) -> None:
        self.images += images
        self.updates += 1
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.rate = self.images / elapsed
        if not self.enabled or (not self.tty and self.updates % self.every and step != self.total):
            return
        self.stream.write(("\r" + self.line(step, loss, lr, elapsed)) if self.tty
                          else (self.line(step, loss, lr, elapsed) + "\n"))
        self.stream.flush()

    def line(self, step: int, loss: float, lr: float, elapsed: float) -> str:
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "#" * done + "." * (width - done)
        loss_s = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
        ran = step - self.start_step
        epoch_eta = elapsed / ran * (self.total - step) if ran > 0 else math.nan
        run_eta = self.clock.eta(self.steps_before + step) if self.clock else math.nan
        return (f"epoch {self.epoch + 1}/{self.epochs} [{bar}] {step}/{self.total} "
                f"{self.rate:,.0f} img/s step loss {loss_s} lr {lr:.4g} "
                f"ETA epoch {format_duration(epoch_eta)} run {format_duration(run_eta)}")

    def close(self) -> float:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return self.images / max(time.perf_counter() - self.start, 1e-9)


def read_log(path: str) -> list[dict]:
    """The records of a log.jsonl (a torn last line, e.g. after a kill, is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _last_per_step(records: list[dict], event: str) -> list[dict]:
    """One record per step (a resumed run logs again from its checkpoint: the last one wins)."""
    by_step = {}
    for r in records:
        if r.get("event") == event and r.get("step") is not None:
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(log_path: str, png_path: str) -> str:
    """A PNG of the step loss and epoch mean loss, the learning rate and the k-NN accuracy over
    the global step, from ``log.jsonl``. Returns png_path. Needs matplotlib (Agg backend)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure   # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    records = read_log(log_path)
    steps = _last_per_step(records, "step")
    epochs = _last_per_step(records, "epoch")
    knn = [r for r in epochs if r.get("knn")]
    fig = Figure(figsize=(7, 7.5), layout="constrained")
    ax_loss, ax_lr, ax_knn = fig.subplots(3, 1, sharex=True)
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6,
                 label="step loss")
    ax_loss.plot([r["step"] for r in epochs], [r["loss"] for r in epochs], "o-", ms=4,
                 label="epoch mean loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right", fontsize="small")
    ax_lr.plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1)
    ax_lr.set_ylabel("learning rate")
    if knn:
        for key in sorted(knn[0]["knn"]):
            m = re.fullmatch(r"knn(\d+)_top(\d+)", key)
            ax_knn.plot([r["step"] for r in knn], [r["knn"][key] for r in knn], "o-", ms=4,
                        label=f"top-{m.group(2)} (k={m.group(1)})" if m else key)
        ax_knn.legend(loc="lower right", fontsize="small")
    else:
        ax_knn.text(0.5, 0.5, "no k-NN monitor in this run (--knn-every)", ha="center",
                    va="center", transform=ax_knn.transAxes, color="gray")
        ax_knn.set_yticks([])
    ax_knn.set_ylabel("k-NN accuracy (%)")
    ax_knn.set_xlabel("step")
    ax_knn.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_lr, ax_knn):
        ax.grid(alpha=0.3)
    config = next((r for r in records if r.get("event") == "start"), None)
    title = os.path.basename(os.path.dirname(os.path.abspath(log_path)))
    if config is not None:
        title = " ".join(str(config[k]) for k in ("method", "arch") if config.get(k)) + \
            (f" ({config['preset']})" if config.get("preset") else "") + f": {title}"
    fig.suptitle(title)
    tmp = png_path + ".tmp"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, png_path)
    return png_path
