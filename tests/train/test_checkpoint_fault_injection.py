"""Fault injection into the checkpoint writer: SIGKILL at seeded random points inside checkpoint
writes, then resume. After every kill the last checkpoint loads; at the end no temporary file is
left and the final state is bitwise equal to that of an uninterrupted run.

The trainer runs in a subprocess (tiny synthetic SimCLR run, 3 epochs x 4 steps, one thread).
FASTSSL_CHECKPOINT_WRITE_DELAY slows each 1 MiB chunk of a write, so that a write lasts about a
second; the parent waits for the write's temporary file to appear, then kills after a random
delay, so each kill lands at a random point of a write (or just after it, during the rename).
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastssl.models import checkpoint_io as ckpt_io

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import _assert_bitwise_equal  # noqa: E402

WRITE_DELAY_S = 0.008     # per MiB; a checkpoint of the tiny ResNet-18 run is ~135 MiB
KILLS = 4


def _driver(out: str) -> None:
    from fastssl.methods.presets import get_preset
    from fastssl.train.config import make_config
    from fastssl.train.loop import train
    torch.set_num_threads(1)
    cfg = make_config(get_preset("demo_simclr"), dict(
        backend="synthetic", dataset_size=32, batch_size=8, epochs=3, knn_every=0,
        crops=[{"size": 16, "scale": [0.3, 1.0], "count": 2}], log_every=4,
        heads={"projector": [32, 16]}, out=out, resume="auto"))
    result = train(cfg, stream=open(os.devnull, "w"))
    print("status", result["status"], result["step"], flush=True)


def _start(out, slow: bool):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(ckpt_io._SLOW_WRITE_ENV, None)
    if slow:
        env[ckpt_io._SLOW_WRITE_ENV] = str(WRITE_DELAY_S)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    assert "status completed 12" in out


def _state(path):
    s = torch.load(path, weights_only=False)
    return (
        s["model"],
        s["momentum"],
        s["loss_state"],
        s["optimizer"]["state"],
        s["step"],
        s["epoch"],
    )


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_then_resume(tmp_path):
    reference = tmp_path / "reference"
    _finish(_start(reference, slow=False))

    out = tmp_path / "killed"
    last = out / ckpt_io.LAST_NAME
    tmp = ckpt_io.temp_path(str(last))
    rng = np.random.default_rng(1234)
    kills_in_write = 0
    for attempt in range(KILLS):
        stale = os.path.exists(tmp)                # the previous kill's; the new run sweeps it
        proc = _start(out, slow=True)
        deadline = time.monotonic() + 240
        while stale and os.path.exists(tmp) and proc.poll() is None:
            assert time.monotonic() < deadline, f"stale {tmp} was not swept at start"
            time.sleep(0.002)
        while not os.path.exists(tmp) and proc.poll() is None:   # a write has begun
            assert time.monotonic() < deadline, "no checkpoint write started"
            time.sleep(0.002)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(float(rng.uniform(0.0, 1.2)))
        kills_in_write += os.path.exists(tmp)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        if last.exists():                          # whatever the kill interrupted, this loads
            state = ckpt_io.load(str(last))
            assert state["step"] == 4 * state["epoch"]
    assert kills_in_write >= 1, "no kill landed inside a write"

    _finish(_start(out, slow=False))
    assert sorted(os.listdir(out)) == ["backbone.pth", "checkpoint_last.pth", "config.json",
                                       "curves.png", "log.jsonl"]
    _assert_bitwise_equal(_state(reference / ckpt_io.LAST_NAME), _state(last))


if __name__ == "__main__" and len(sys.argv) == 2:
    _driver(sys.argv[1])
