"""train_imagenet.py flags: ImageNet presets need --data (at once, also with --print-config);
--loader names the data loader (--backend is its deprecated alias). The eval CLIs name the
checkpoint files the trainer writes when --checkpoint is missing. Every bad --method-arg or
--head is an argparse error (exit 2, no traceback); --dist-timeout takes seconds or minutes; a
run stopped by SIGTERM/SIGINT exits 128 + the signal's number after its checkpoint."""
import json
import os
import signal
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


# --- bad --method-arg / --head: argparse errors (exit 2, no traceback) --------------------------
@pytest.mark.parametrize(
    "method,arg,needle",
    [
        (
            "simclr",
            'temperature="0.2"',
            'temperature: expected a finite number for simclr (default 0.15), got a string "0.2"',
        ),
        (
            "sogclr",
            "gamma=[1]",
            "gamma: expected a finite number for sogclr (default 0.9), got a list [1]",
        ),
        ("simclr", "temperature=NaN", "temperature: expected a finite number"),
        ("simclr", "temperature=true", "temperature: expected a finite number"),
        ("simclr", "gamma=0.5", "unknown key(s) ['gamma'] for simclr"),
        ("swav", "sinkhorn_iterations=2.5", "sinkhorn_iterations: expected an integer"),
        ("swav", "n_prototypes=0", "n_prototypes: expected a value >= 1 for swav, got 0"),
        ("sce", "use_keys=1", "use_keys: expected true or false"),
        ("sce", "base_momentum=1.5", "base_momentum: expected a value in [0.0, 1.0]"),
        ("sfrik", "weights=[1, 2]", "weights: expected a list of 3 finite numbers"),
        ("groco", 'n_pos_views="all"', "n_pos_views: expected an integer or null"),
    ],
)
def test_bad_method_arg_is_an_argparse_error(method, arg, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--method", method, "--method-arg", arg, "--print-config"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: argument --method-arg: {needle}" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "arg,needle",
    [
        (
            'projector="x"',
            'projector: expected a non-empty list of positive integers, got a string "x"',
        ),
        ("projector=[64,0]", "projector: expected a non-empty list of positive integers"),
        ("bn=1", "bn: expected true or false"),
        ("width=3", "unknown key 'width'"),
    ],
)
def test_bad_head_is_an_argparse_error(arg, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--head", arg, "--print-config"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: argument --head: {needle}" in err, err


def test_good_method_args_still_resolve(capsys):
    assert main(["--method", "groco", "--method-arg", "n_pos_views=null", "--method-arg",
                 "steepness=2", "--print-config"]) == 0
    args = json.loads(capsys.readouterr().out)["method_args"]
    assert args["n_pos_views"] is None and args["steepness"] == 2
    assert main(["--method", "sfrik", "--method-arg", "weights=[1, 2.5, 3]", "--print-config"]) == 0


# --- --dist-timeout -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,seconds", [(None, 600.0), ("90", 90.0), ("45s", 45.0),
                                          ("10m", 600.0), ("1.5min", 90.0)])
def test_dist_timeout_in_seconds_or_minutes(text, seconds, capsys):
    extra = [] if text is None else ["--dist-timeout", text]
    assert main([*extra, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["dist_timeout"] == seconds


@pytest.mark.parametrize("text", ["0", "-5", "abc", "10h", "inf"])
def test_bad_dist_timeout_is_an_argparse_error(text, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--dist-timeout", text, "--print-config"])
    assert e.value.code == 2 and "argument --dist-timeout:" in capsys.readouterr().err


# --- exit status of a run stopped by a signal -----------------------------------------------------
def _tiny_run(monkeypatch, hooks):
    """The CLI at test size (16-pixel crops), with `hooks` passed to train()."""
    import fastssl.train.cli as cli
    import fastssl.train.loop as loop
    original_config, original_train = cli.make_config, loop.train

    def tiny(preset, overrides):
        return original_config(dict(preset, crops=[{"size": 16, "scale": [0.3, 1.0], "count": 2}]),
                               overrides)
    monkeypatch.setattr(cli, "make_config", tiny)
    monkeypatch.setattr(loop, "train", lambda cfg, **kw: original_train(cfg, hooks=hooks, **kw))


def _run_argv(out):
    # --data other than demo: no learned-vs-random k-NN at the end (the synthetic loader
    # ignores it)
    return ["--preset", "demo_simclr", "--data", "unused", "--loader", "synthetic",
            "--dataset-size", "32", "--batch-size", "8", "--epochs", "2", "--knn-every", "0",
            "--log-every", "1", "--out", str(out), "--head", "projector=[32,16]",
            "--resume", "auto"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_exits_128_plus_its_number_after_the_checkpoint(sig, tmp_path, monkeypatch,
                                                                   capsys):
    import torch
    from fastssl.models import checkpoint_io as ckpt_io
    armed = [True]

    def signal_at_step_3(step, loss):
        if step == 3 and armed[0]:
            os.kill(os.getpid(), sig)
    _tiny_run(monkeypatch, {"step_end": signal_at_step_3})
    assert main(_run_argv(tmp_path)) == 128 + sig             # 143 / 130: not done, resume it
    assert torch.load(tmp_path / ckpt_io.LAST_NAME, weights_only=True)["step"] == 3
    assert f"interrupted by signal {int(sig)}" in capsys.readouterr().out
    armed[0] = False
    assert main(_run_argv(tmp_path)) == 0                      # the retry finishes it
    assert torch.load(tmp_path / ckpt_io.LAST_NAME, weights_only=True)["epoch"] == 2
