"""Checkpoint files a user loads outside fastssl: ``backbone.pth`` (tensors only, torchvision
names, ``weights_only=True``) and the full checkpoint through plain ``torch.load`` (its RNG states
are tensors and plain values), which fastssl's resume still reads."""
import os
import random
import sys

import numpy as np
import pytest
import torch

from fastssl.models import resnet50
from fastssl.models import checkpoint_io as ckpt_io
from fastssl.train.loop import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_models import _torchvision_layout  # noqa: E402  (torchvision's names, written out)
from test_trainer import DEVNULL, small  # noqa: E402

FC = {"fc.weight", "fc.bias"}


@pytest.fixture(scope="module")
def resnet50_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("r50")
    torch.manual_seed(0)
    result = train(small("simclr", out, arch="resnet50", epochs=1, dataset_size=8, batch_size=8),
                   stream=DEVNULL)
    assert result["status"] == "completed"
    return result


def test_backbone_file_is_weights_only_with_torchvision_names(resnet50_run):
    path = resnet50_run["backbone"]
    assert os.path.basename(path) == "backbone.pth" and os.path.dirname(path) == resnet50_run["out"]
    sd = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in sd.values())
    expected = _torchvision_layout("resnet50")
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: s for k, s in expected.items()
                                                          if k not in FC}
    # fastssl's own ResNet-50 carries torchvision's parameter names (test_models checks them
    # against the layout above): only fc is missing, nothing is unexpected
    missing, unexpected = resnet50().load_state_dict(sd, strict=False)
    assert set(missing) == FC and not unexpected
    # the same weights as the full checkpoint's backbone (the trained ones, not an init)
    full = torch.load(resnet50_run["checkpoint"], weights_only=True)
    assert full["backbone"].keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(v, full["backbone"][k].cpu()), k
    assert not os.path.exists(ckpt_io.temp_path(path))


def _import_torchvision():
    try:
        import torchvision
    except (ImportError, RuntimeError, OSError) as e:  # absent, or built for another torch
        pytest.skip(f"torchvision cannot be imported here ({type(e).__name__}: {e}); the name "
                    "check above binds everywhere")
    return torchvision


def test_backbone_file_loads_into_torchvision_resnet50(resnet50_run):
    torchvision = _import_torchvision()
    sd = torch.load(resnet50_run["backbone"], weights_only=True)
    net = torchvision.models.resnet50()
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert set(missing) == FC and not unexpected
    for k, v in sd.items():
        assert torch.equal(net.state_dict()[k], v), k


def test_full_checkpoint_loads_with_plain_torch_load(resnet50_run):
    state = torch.load(resnet50_run["checkpoint"])           # weights_only=True by default
    for key in ("model", "optimizer", "loader", "rng", "config", "backbone", "epoch", "step"):
        assert key in state
    assert ckpt_io.load(resnet50_run["checkpoint"])["step"] == state["step"]


@pytest.mark.parametrize("legacy", [False, True], ids=["tensors", "legacy-tuples"])
def test_rng_state_round_trip(tmp_path, legacy):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()        # a cached gaussian in numpy's state
    random.gauss(0, 1)                  # and in Python's
    if legacy:                          # the checkpoints written before this format
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                 "python": random.getstate()}
    else:
        ckpt_io.save_atomic({"rng": ckpt_io.rng_state()}, str(tmp_path / "rng.pth"))
        state = torch.load(tmp_path / "rng.pth", weights_only=True)["rng"]
    expected = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random(),
                random.gauss(0, 1))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ckpt_io.set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), np.random.standard_normal(), random.random(),
           random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]



# the states beyond simclr's: SGD (groco), momentum encoder + queue (sce), u buffer (sogclr),
# LARC + queue (swav)
@pytest.mark.parametrize("method", ["groco", "sce", "sogclr", "swav"])
def test_each_methods_checkpoint_loads_weights_only(method, tmp_path):
    from test_methods import tiny_config
    result = train(tiny_config(method, tmp_path, dataset_size=8), stream=DEVNULL)   # 1 step
    state = torch.load(result["checkpoint"])                                # weights_only=True
    assert state["method"] == method and state["step"] == 1
    torch.load(result["backbone"], weights_only=True)
    if method == "sce":                       # and fastssl's resume reads the same file
        resumed = train(tiny_config(method, tmp_path, dataset_size=8, epochs=2, resume="auto"),
                        stream=DEVNULL)
        assert resumed["status"] == "completed" and resumed["step"] == 2
