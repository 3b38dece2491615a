"""A frozen rank under torchrun: rank 1 stops answering mid-training; with a short --dist-timeout
the live rank's collective times out, it exits non-zero with an error naming --dist-timeout, and
torchrun ends the job, instead of a hang that only an outer timeout ends.

The frozen rank sleeps forever with SIGTERM at its default action, so torchrun's teardown ends it
at once; a rank stopped by SIGSTOP is seen the same way by the live ranks (no answer), and
torchrun SIGKILLs it 30 s later (checked by hand: the job ended 64 s after its start, 4 s
timeout)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from fastssl.testing import free_port

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIST_TIMEOUT_S = 4


def _driver(argv):
    """One rank: the training CLI on tiny synthetic data; rank 1 freezes after step 3."""
    import torch
    import fastssl.train.cli as cli
    import fastssl.train.loop as loop
    torch.set_num_threads(1)
    original_config, original_train = cli.make_config, loop.train

    def tiny(preset, overrides):
        return original_config(dict(preset, crops=[{"size": 16, "scale": [0.3, 1.0], "count": 2}]),
                               overrides)

    def freeze_rank_1(step, loss):
        if step == 3 and int(os.environ["RANK"]) == 1:
            print("rank 1 freezing", file=sys.stderr, flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)   # torchrun's teardown ends it
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
            while True:
                time.sleep(3600)

    def train(cfg, **kwargs):
        return original_train(cfg, hooks={"step_end": freeze_rank_1}, **kwargs)
    cli.make_config, loop.train = tiny, train
    sys.exit(cli.main(argv))


def test_frozen_rank_ends_the_job_with_a_named_timeout(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           os.path.abspath(__file__), "--driver",
           "--method", "simclr", "--loader", "synthetic", "--dataset-size", "64",
           "--batch-size", "8", "--epochs", "1", "--knn-every", "0", "--log-every", "1",
           "--head", "projector=[32,16]", "--out", str(tmp_path / "run"),
           "--dist-timeout", f"{DIST_TIMEOUT_S}s"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)          # the hang this test guards against
        out, err = proc.communicate()
        pytest.fail(f"the job hung with a frozen rank:\n{err[-4000:]}")
    elapsed = time.monotonic() - start
    assert "rank 1 freezing" in err, err[-4000:]
    assert proc.returncode != 0, err[-4000:]
    assert "error: rank 0 of 2: a collective waited longer than --dist-timeout (4 s)" in err, \
        err[-4000:]
    assert "fastssl/train" not in err, err[-4000:]            # one line, no traceback of ours
    assert elapsed < 180, f"the job took {elapsed:.0f} s to end"
    print(f"\njob ended {elapsed:.1f} s after start (dist timeout {DIST_TIMEOUT_S} s)")


if __name__ == "__main__" and sys.argv[1:2] == ["--driver"]:
    _driver(sys.argv[2:])
