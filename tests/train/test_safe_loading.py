"""A checkpoint cannot run code: every loader (``--resume``, ``python -m fastssl.eval.knn``,
``python -m fastssl.eval.linear``, ``fastssl.models.load_backbone``) reads with
``torch.load(weights_only=True)``. A file whose unpickling would call a function is refused with
an error naming the file, and the function never runs. A checkpoint of an older fastssl (numpy
RNG state as an ndarray tuple) is refused the same way, and read only with --trust-checkpoint
(trust_checkpoint=True), whose help says that it runs code inside the file."""
import io
import os
import sys

import numpy as np
import pytest
import torch

from fastssl.models import build_backbone, load_backbone
from fastssl.models.backbone import UntrustedCheckpointError
from fastssl.models import checkpoint_io as ckpt_io
from fastssl.train.loop import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import DEVNULL, small  # noqa: E402  (the tiny synthetic run)


class _WritesMarker:
    """Unpickling calls open(marker, "w"): harmless, but it leaves the marker file behind."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    backbone = {k: v for k, v in build_backbone("resnet18")[0].state_dict().items()}
    torch.save({"version": 1, "arch": "resnet18", "model": {}, "backbone": backbone,
                "x": _WritesMarker(marker)}, path)
    return path, marker


def _tiny_cli(monkeypatch):
    import fastssl.train.cli as cli
    original = cli.make_config

    def tiny(preset, overrides):
        return original(dict(preset, crops=[{"size": 16, "scale": [0.3, 1.0], "count": 2}]),
                        overrides)
    monkeypatch.setattr(cli, "make_config", tiny)


def _train_argv(out, *extra):
    return ["--method", "simclr", "--loader", "synthetic", "--dataset-size", "16",
            "--batch-size", "8", "--epochs", "1", "--knn-every", "0", "--out", str(out),
            "--head", "projector=[32,16]", *extra]


def _eval_exit(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def _assert_refused(err, path):
    assert f"{path}: refused: the file holds objects other than tensors" in err, err
    assert "--trust-checkpoint" in err and "Traceback" not in err, err


def test_train_resume_refuses_a_checkpoint_that_runs_code(evil, tmp_path, monkeypatch, capsys):
    from fastssl.train.cli import main
    path, marker = evil
    _tiny_cli(monkeypatch)
    assert main(_train_argv(tmp_path / "run", "--resume", str(path))) == 2
    err = capsys.readouterr().err
    assert f"error: --resume {path}: refused" in err
    _assert_refused(err, path)
    assert not marker.exists()


@pytest.mark.parametrize("tool", ["knn", "linear"])
def test_eval_clis_refuse_a_checkpoint_that_runs_code(tool, evil, capsys):
    if tool == "knn":
        from fastssl.eval.knn import main
    else:
        from fastssl.eval.linear import main
    path, marker = evil
    code, err = _eval_exit(main, ["--checkpoint", str(path), "--data", "demo", "--device", "cpu",
                                  "--arch", "resnet18"], capsys)
    assert code == 2 and f"error: checkpoint {path}: refused" in err
    _assert_refused(err, path)
    assert not marker.exists()


def test_load_backbone_refuses_a_checkpoint_that_runs_code(evil):
    path, marker = evil
    with pytest.raises(UntrustedCheckpointError) as info:
        load_backbone(path, "resnet18")
    assert isinstance(info.value, ValueError) and info.value.path == str(path)
    _assert_refused(str(info.value), path)
    assert "it needs" in str(info.value)                  # the global it asked for
    assert not marker.exists()
    with pytest.raises(UntrustedCheckpointError):
        load_backbone(os.fspath(path), "resnet18")
    assert not marker.exists()


def test_trust_checkpoint_is_the_only_way_and_says_it_runs_code(evil, capsys):
    path, marker = evil
    load_backbone(path, "resnet18", trust_checkpoint=True)    # the caller's explicit choice
    assert marker.exists()
    from fastssl.eval.knn import build_parser as knn_parser
    from fastssl.eval.linear import build_parser as linear_parser
    from fastssl.train.cli import build_parser as train_parser
    for parser in (train_parser(), knn_parser(), linear_parser()):
        text = " ".join(parser.format_help().split())
        assert "--trust-checkpoint" in text and "RUNS ANY CODE INSIDE THE FILE" in text


def test_an_old_checkpoint_is_refused_then_read_with_trust_checkpoint(tmp_path, monkeypatch,
                                                                       capsys):
    from fastssl.train.cli import main
    out = tmp_path / "run"
    result = train(small("simclr", out, epochs=2, max_steps=4), stream=DEVNULL)
    assert result["status"] == "stopped"
    last = out / ckpt_io.LAST_NAME
    state = torch.load(last, weights_only=True)    # what fastssl writes loads safely
    # numpy's RNG state as an older fastssl stored it: the tuple with its ndarray
    state["rng"]["numpy"] = np.random.get_state()
    torch.save(state, last)

    with pytest.raises(UntrustedCheckpointError) as info:
        ckpt_io.load(str(last))
    assert "numpy" in str(info.value) and str(last) in str(info.value)
    _tiny_cli(monkeypatch)
    argv = ["--method", "simclr", "--loader", "synthetic", "--dataset-size", "32",
            "--batch-size", "8", "--epochs", "2", "--knn-every", "0", "--out", str(out),
            "--head", "projector=[32,16]", "--log-every", "1", "--resume", "auto"]
    assert main(argv) == 2
    _assert_refused(capsys.readouterr().err, last)
    stream = io.StringIO()
    cfg = small("simclr", out, epochs=2, resume="auto", trust_checkpoint=True)
    assert train(cfg, stream=stream)["status"] == "completed"
    assert "resumed from" in stream.getvalue()
    torch.load(last, weights_only=True)            # rewritten in the safe format
