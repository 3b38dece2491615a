"""backbone.pth is never left stale: SIGKILL at every write point of a run's final save
(checkpoint_last.pth's temp file half or fully written, before its rename; backbone.pth's write
not begun, half done, or done but not renamed), then ``--resume auto``: backbone.pth holds the
checkpoint's backbone and no temporary file is left.

Epoch 1 of 2 runs once in this process; each kill point copies that run and finishes it in a
subprocess that SIGKILLs itself at the chosen point of its only save (the final one)."""
import io
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from fastssl.models import checkpoint_io as ckpt_io
from fastssl.train.loop import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import DEVNULL, small  # noqa: E402  (the tiny synthetic run)

KILL_POINTS = [("checkpoint_last.pth", "half"), ("checkpoint_last.pth", "written"),
               ("backbone.pth", "before"), ("backbone.pth", "half"), ("backbone.pth", "written")]


def _config(out, **over):
    return small("simclr", out, epochs=2, **over)


def _driver(out: str, target: str, phase: str) -> None:
    """Finish the run in `out`; SIGKILL at `phase` of the first write of `target`'s temp file."""
    torch.set_num_threads(1)
    real = ckpt_io._write_file

    def write(path, data):
        if os.path.basename(path) == f".{target}.tmp":
            if phase == "half":
                with open(path, "wb") as f:
                    f.write(bytes(memoryview(data)[:len(data) // 2]))
            elif phase == "written":
                real(path, data)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, data)
    ckpt_io._write_file = write
    train(_config(out, resume="auto"), stream=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def one_epoch_done(tmp_path_factory):
    out = tmp_path_factory.mktemp("epoch1") / "run"
    result = train(_config(out, max_steps=4), stream=DEVNULL)     # 4 steps = epoch 1 of 2
    assert result["status"] == "stopped" and result["epoch"] == 1
    return out


def _backbone_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("target,phase", KILL_POINTS)
def test_kill_during_the_final_save_then_resume_auto_leaves_no_stale_backbone(
        one_epoch_done, tmp_path, target, phase):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_done, out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), target, phase],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last, backbone = out / ckpt_io.LAST_NAME, out / ckpt_io.BACKBONE_NAME
    state = ckpt_io.load(str(last))
    stale = not _backbone_equal(torch.load(backbone, weights_only=True), state["backbone"])
    # the kill points after checkpoint_last.pth's rename leave the backbone one save older
    assert stale == (target == "backbone.pth") and state["epoch"] == (2 if stale else 1)

    stream = io.StringIO()
    result = train(_config(out, resume="auto"), stream=stream)
    assert result["status"] == "completed" and result["epoch"] == 2
    state = ckpt_io.load(str(last))
    assert state["epoch"] == 2
    assert _backbone_equal(torch.load(backbone, weights_only=True), state["backbone"])
    assert ("rewritten from the checkpoint" in stream.getvalue()) == stale, stream.getvalue()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], sorted(os.listdir(out))
    if (target, phase) == KILL_POINTS[-1]:
        # a second start finds both files consistent and rewrites nothing
        stream = io.StringIO()
        train(_config(out, resume="auto"), stream=stream)
        assert "rewritten" not in stream.getvalue()


if __name__ == "__main__" and len(sys.argv) == 4:
    _driver(*sys.argv[1:])
