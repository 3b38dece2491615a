"""Run logging: a JSON-lines file and a progress line on rank 0."""
from __future__ import annotations

import json
import math
import os
import sys
import time


class JsonlLogger:
    """Appends one JSON object per line; only rank 0 writes."""

    def __init__(self, path: str | None, enabled: bool = True):
        self.path = path if enabled else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def log(self, **record) -> None:
        if not self.path:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


class Progress:
    """One status line per epoch: step/total, images/s (every view of every image counts), loss, lr.

    Redraws in place on a terminal; on a pipe it prints a line every ``every`` updates.
    """

    def __init__(self, total: int, *, epoch: int, epochs: int, enabled: bool = True, stream=None,
                 every: int = 10):
        self.total, self.epoch, self.epochs = total, epoch, epochs
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = max(1, every)
        self.start = time.perf_counter()
        self.images = 0
        self.updates = 0

    def update(self, step: int, images: int, loss: float, lr: float) -> None:
        self.images += images
        self.updates += 1
        if not self.enabled or (not self.tty and self.updates % self.every and step != self.total):
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.images / elapsed
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "#" * done + "." * (width - done)
        loss_s = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
        line = (f"epoch {self.epoch + 1}/{self.epochs} [{bar}] {step}/{self.total} "
                f"{rate:,.0f} img/s loss {loss_s} lr {lr:.4g}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> float:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        return self.images / max(time.perf_counter() - self.start, 1e-9)
