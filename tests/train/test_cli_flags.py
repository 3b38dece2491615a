"""train_imagenet.py flags: ImageNet presets need --data (at once, also with --print-config);
--loader names the data loader (--backend is its deprecated alias). The eval CLIs name the
checkpoint files the trainer writes when --checkpoint is missing."""
import json
import time

import pytest

from fastssl.methods.presets import PRESETS
from fastssl.train.cli import main

IMAGENET_PRESETS = [name for name, p in PRESETS.items() if "data" not in p]


@pytest.mark.parametrize("extra", [[], ["--print-config"]], ids=["run", "print-config"])
@pytest.mark.parametrize("preset", ["groco_2views_100ep", "sce_200ep", "swav_800ep_bs4096"])
def test_imagenet_preset_without_data_stops_at_once(preset, extra, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(["--preset", preset, *extra])
    assert e.value.code == 2 and time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "argument --data:" in err and preset in err and "ImageNet" in err


def test_every_imagenet_preset_resolves_with_data(capsys):
    assert len(IMAGENET_PRESETS) > 20
    for name in IMAGENET_PRESETS:
        assert main(["--preset", name, "--data", "/imagenet", "--print-config"]) == 0
        cfg = json.loads(capsys.readouterr().out)
        assert cfg["data"] == "/imagenet" and cfg["preset"] == name


def test_synthetic_loader_needs_no_data(capsys):
    assert main(["--preset", "sce_200ep", "--loader", "synthetic", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "synthetic"


def test_loader_flag_and_deprecated_backend_alias(capsys):
    assert main(["--loader", "synthetic", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["backend"] == "synthetic" and "deprecated" not in err
    assert main(["--backend", "synthetic", "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["backend"] == "synthetic"
    assert "--backend synthetic is deprecated" in err and "use --loader synthetic" in err
    with pytest.raises(SystemExit) as e:
        main(["--loader", "dali", "--backend", "synthetic", "--print-config"])
    assert e.value.code == 2 and "they disagree" in capsys.readouterr().err


def test_help_names_loader_not_backend(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--loader" in out and "--backend" not in out


def test_eval_missing_checkpoint_names_what_the_trainer_writes(tmp_path, capsys):
    from fastssl.eval.knn import main as knn_main
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "checkpoint_last.pth").write_bytes(b"")
    (run / "backbone.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        knn_main(["--checkpoint", str(run / "checkpoint.pt"), "--data", "demo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"checkpoint not found: {run / 'checkpoint.pt'} ({run} holds backbone.pth, " \
           f"checkpoint_last.pth; a training run writes OUT/checkpoint_last.pth and " \
           f"OUT/backbone.pth)" in err
    with pytest.raises(SystemExit):
        knn_main(["--checkpoint", str(tmp_path / "nowhere" / "c.pt"), "--data", "demo"])
    assert "(a training run writes OUT/checkpoint_last.pth" in capsys.readouterr().err
