"""The trainer end to end: CLI, DALI demo run, checkpoint contents, exact resume after SIGTERM,
non-finite loss, torchrun (gloo) with 2 processes."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from fastssl.methods.presets import get_preset
from fastssl.train.cli import main
from fastssl.train.config import make_config
from fastssl.train.loop import NonFiniteLossError, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVNULL = open(os.devnull, "w")


def small(method="simclr", tmp=None, **over):
    preset = get_preset(f"demo_{method}")
    values = dict(backend="synthetic", dataset_size=32, batch_size=8, epochs=2, knn_every=0,
                  crops=[{"size": 16, "scale": [0.3, 1.0], "count": 2}], log_every=1,
                  heads={"projector": [32, 32, 16], "predictor": [32, 16]} if method == "sce"
                  else {"projector": [32, 16]}, out=str(tmp))
    if method == "sce":
        values["method_args"] = {**preset["method_args"], "queue_size": 64}
    values.update(over)
    return make_config(preset, values)


# --- command line ------------------------------------------------------------------------------
def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: train_imagenet.py" in out and "--preset" in out and "--resume" in out


@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "0"], "argument --epochs: expected a positive integer"),
    (["--batch-size", "abc"], "argument --batch-size"),
    (["--method", "byol"], "argument --method: invalid choice"),
    (["--amp", "fp8"], "argument --amp: invalid choice"),
    (["--preset", "nope"], "argument --preset: unknown preset 'nope'"),
    (["--preset", "sce_200ep", "--method", "swav"], "does not match preset"),
    (["--method-arg", "temperature"], "expected KEY=VALUE"),
    (["--method", "simclr", "--method-arg", "gamma=0.5"], "unknown key(s) ['gamma']"),
])
def test_bad_arguments_give_argparse_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_list_presets_and_print_config(capsys):
    assert main(["--list-presets"]) == 0
    out = capsys.readouterr().out
    for name in ("groco_2views_100ep", "groco_multicrop_100ep", "sce_200ep", "sogclr_800ep",
                 "sfrik_200ep", "swav_800ep_bs4096", "simclr_r18_100ep", "auh_r18_100ep", "demo"):
        assert name in out
    assert main(["--preset", "swav_800ep_bs4096", "--data", "/imagenet", "--epochs", "5",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["method"] == "swav" and cfg["epochs"] == 5 and cfg["batch_size"] == 4096
    assert main(["--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["data"] == "demo" and cfg["arch"] == "resnet18" and cfg["compare_random_init"]
    assert main(["--data", "/imagenet", "--method", "sce", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "sce_200ep"


# --- real data (DALI on the demo dataset), checkpoint contents ------------------------------------
def test_dali_demo_run_checkpoint_and_knn_monitor(tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    cfg = small("simclr", tmp_path, backend="dali", data="demo", dataset_size=None, batch_size=100,
                epochs=1, knn_every=1, eval_size=16)
    result = train(cfg, stream=DEVNULL)
    assert result["status"] == "completed" and result["step"] == 5
    knn = result["knn"]
    assert 0.0 <= knn["knn20_top1"] <= 100.0 and knn["knn20_top5"] >= knn["knn20_top1"]
    state = torch.load(result["checkpoint"], weights_only=False)
    for key in ("version", "arch", "method", "config", "backbone", "model", "momentum", "optimizer",
                "scaler", "loss_state", "epoch", "step", "loader", "rng"):
        assert key in state
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert state["loader"]["epoch"] == 0 and state["loader"]["position"] == 5
    assert not any(k.startswith("fc.") or k.startswith("module.") for k in state["backbone"])
    from fastssl.models import load_backbone
    load_backbone(result["checkpoint"], "resnet18")
    lines = [json.loads(x) for x in open(tmp_path / "log.jsonl")]
    assert any(r["event"] == "epoch" and "knn" in r for r in lines)
    assert sum(r["event"] == "step" for r in lines) == 5


def test_backbone_loads_into_torchvision_resnet50(tmp_path):
    tv = pytest.importorskip("torchvision", reason="torchvision is not installed")
    cfg = small("simclr", tmp_path, arch="resnet50", epochs=1, dataset_size=8, batch_size=8)
    result = train(cfg, stream=DEVNULL)
    state = torch.load(result["checkpoint"], weights_only=False)
    net = tv.models.resnet50()
    missing, unexpected = net.load_state_dict(state["backbone"], strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


# --- exact resume after SIGTERM mid-epoch ---------------------------------------------------------
def _final_state(path):
    s = torch.load(path, weights_only=False)
    return s["model"], s["momentum"], s["loss_state"], s["optimizer"]["state"], s["step"]


def _assert_bitwise_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_bitwise_equal(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_bitwise_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    torch.set_num_threads(1)
    full = train(small("sce", tmp_path / "full", epochs=2), stream=DEVNULL)
    assert full["status"] == "completed" and full["step"] == 8

    def kill_at_step(step, loss):
        if step == 6:                  # mid epoch 2 (4 steps per epoch)
            os.kill(os.getpid(), signal.SIGTERM)

    part = train(
        small("sce", tmp_path / "part", epochs=2), hooks={"step_end": kill_at_step}, stream=DEVNULL
    )
    assert part["status"] == "interrupted" and part["step"] == 6
    state = torch.load(part["checkpoint"], weights_only=False)
    assert state["step"] == 6 and state["epoch"] == 1 and state["loader"]["position"] == 2
    resumed = train(small("sce", tmp_path / "part", epochs=2, resume="auto"), stream=DEVNULL)
    assert resumed["status"] == "completed" and resumed["step"] == 8
    _assert_bitwise_equal(_final_state(full["checkpoint"]), _final_state(resumed["checkpoint"]))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(step, loss):
        if step == 5:                  # after epoch 1 (4 steps) was checkpointed
            with torch.no_grad():
                for p in model_ref["model"].parameters():
                    p.fill_(float("nan"))
    model_ref = {}
    import fastssl.train.loop as loop
    original = loop.StepRunner.__call__

    def spy(self, *a, **k):
        model_ref["model"] = self.method.model
        return original(self, *a, **k)
    loop.StepRunner.__call__ = spy
    try:
        with pytest.raises(
            NonFiniteLossError, match="non-finite loss .* last good checkpoint is kept"
        ):
            train(small("simclr", tmp_path, epochs=3), hooks={"step_end": poison}, stream=DEVNULL)
    finally:
        loop.StepRunner.__call__ = original
    state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=False)
    assert state["epoch"] == 1 and state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(small("simclr", tmp_path, resume=str(tmp_path / "missing.pth")), stream=DEVNULL)


# --- torchrun, 2 processes (gloo) -----------------------------------------------------------------
@pytest.mark.distributed
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        os.path.join(ROOT, "train_imagenet.py"),
        "--method",
        "simclr",
        "--loader",
        "synthetic",
        "--dataset-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--knn-every",
        "0",
        "--out",
        str(out),
        "--head",
        "projector=[32,16]",
        "--log-every",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    state = torch.load(out / "checkpoint_last.pth", weights_only=False)
    assert state["step"] == 8 and state["epoch"] == 2 and state["config"]["batch_size"] == 8


def _free_port():
    from fastssl.testing import free_port
    return free_port()
