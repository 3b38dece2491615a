"""Trainer faults: corrupt images, a full disk, killed checkpoint writes, umask, unreadable or
mismatched checkpoints on --resume, the epoch loss after a resume, an unusable --out."""
import errno
import io
import json
import os
import signal
import stat
import sys

import numpy as np
import pytest
import torch

from fastssl.models import checkpoint_io as ckpt_io
from fastssl.train.cli import main
from fastssl.train.loop import CorruptDataError, train


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import DEVNULL, small  # noqa: E402  (the tiny synthetic run)


def _cli_args(out, *extra):
    return [
        "--method",
        "simclr",
        "--loader",
        "synthetic",
        "--dataset-size",
        "16",
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
        *extra,
    ]


def _small_cli_config(monkeypatch):
    """The CLI's demo preset at test size: 16-pixel crops (no flag sets the crops)."""
    import fastssl.train.cli as cli
    original = cli.make_config

    def tiny(preset, overrides):
        preset = dict(preset, crops=[{"size": 16, "scale": [0.3, 1.0], "count": 2}])
        return original(preset, overrides)
    monkeypatch.setattr(cli, "make_config", tiny)


# --- corrupt images -------------------------------------------------------------------------------
def _image_folder(root, n_good=7, garbage=True, bad_scan=False):
    """root/<class>/*.jpg: small valid JPEGs, plus zz_garbage.jpg (no image header) and/or
    zz_bad_scan.jpg (valid header, corrupt scan data)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    paths = {}
    for i in range(n_good):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(d / f"im{i}.jpg")
    if garbage:
        paths["garbage"] = root / "c0" / "zz_garbage.jpg"
        paths["garbage"].write_bytes(b"this is not an image" * 20)
    if bad_scan:
        buf = io.BytesIO()
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()
        # a frame marker in the middle of the entropy-coded data: libjpeg gives up on the scan
        # (random bytes there are mostly decoded with only a warning; see the report)
        mid = (data.index(b"\xff\xda") + len(data)) // 2
        paths["bad_scan"] = root / "c1" / "zz_bad_scan.jpg"
        paths["bad_scan"].write_bytes(data[:mid] + b"\xff\xc0" + data[mid:])
    return paths


def _dali_config(tmp_path, data, **over):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    return small("simclr", tmp_path / "out", backend="dali", data=str(data), dataset_size=None,
                 **{"batch_size": 4, "epochs": 1, **over})


def test_corrupt_image_stops_with_a_resumable_checkpoint_naming_the_file(tmp_path, capsys):
    bad = _image_folder(tmp_path / "data")["garbage"]
    cfg = _dali_config(tmp_path, tmp_path / "data")
    with pytest.raises(CorruptDataError) as info:
        train(cfg, stream=DEVNULL)
    assert str(info.value).startswith(f"{bad}: ")
    state = ckpt_io.load(str(tmp_path / "out" / ckpt_io.LAST_NAME))
    assert state["epoch"] == 0 and 0 <= state["step"] < 2
    # resumable: the rest of the epoch with the bad file skipped
    stream = io.StringIO()
    cfg = _dali_config(tmp_path, tmp_path / "data", resume="auto", skip_corrupt=True)
    result = train(cfg, stream=stream)
    assert result["status"] == "completed" and result["step"] == 2
    # the command line: `error: <file>: <reason>`, exit 2
    argv = [
        "--preset",
        "demo_simclr",
        "--data",
        str(tmp_path / "data"),
        "--loader",
        "dali",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--knn-every",
        "0",
        "--out",
        str(tmp_path / "cli"),
        "--head",
        "projector=[32,16]",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: " in err and "Traceback" not in err


def test_skip_corrupt_names_and_skips_bad_files_including_corrupt_scan_data(tmp_path):
    paths = _image_folder(tmp_path / "data", n_good=6, garbage=True, bad_scan=True)  # 2 batches
    stream = io.StringIO()
    cfg = _dali_config(tmp_path, tmp_path / "data", skip_corrupt=True, epochs=2)
    result = train(cfg, stream=stream)
    assert result["status"] == "completed" and result["step"] == 4
    text = stream.getvalue()
    for p in paths.values():
        assert text.count(f"skipping corrupt image {p}:") == 1, text   # once, over both epochs


def _split_folder(root):
    """root/train (garbage + corrupt scan data: the training loader meets them first, then the
    monitor's bank) and root/val (corrupt scan data only the monitor reads)."""
    paths = _image_folder(root / "train", n_good=6, garbage=True, bad_scan=True)
    paths["val_bad_scan"] = _image_folder(root / "val", n_good=4, garbage=False,
                                          bad_scan=True)["bad_scan"]
    return paths


def test_skip_corrupt_is_honoured_by_the_knn_monitor_each_file_logged_once(tmp_path):
    paths = _split_folder(tmp_path / "data")
    stream = io.StringIO()
    cfg = _dali_config(tmp_path, tmp_path / "data", skip_corrupt=True, epochs=2, knn_every=1,
                       knn_k=3, eval_size=16)
    result = train(cfg, stream=stream)
    assert result["status"] == "completed" and result["step"] == 4
    assert set(result["skipped"]) == {str(p) for p in paths.values()}
    text = stream.getvalue()
    for p in paths.values():
        assert text.count(f"skipping corrupt image {p}:") == 1, text   # one list for the run
    knn = result["knn"]
    assert 0.0 <= knn["knn3_top1"] <= 100.0
    # the monitor's bank and queries leave the skipped images out (labels stay aligned)
    monitor = result["monitor"]
    assert monitor.val_loader.skipped is monitor.train_loader.skipped
    # the command line: exit 0, the files reported once
    argv = ["--preset", "demo_simclr", "--data", str(tmp_path / "data"), "--loader", "dali",
            "--batch-size", "4", "--epochs", "1", "--knn-every", "1", "--knn-k", "3",
            "--eval-size", "16", "--out", str(tmp_path / "cli"), "--head", "projector=[32,16]",
            "--skip-corrupt"]
    import contextlib
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    for p in paths.values():
        assert out.getvalue().count(f"skipping corrupt image {p}:") == 1, out.getvalue()


def test_corrupt_image_met_by_the_monitor_is_named(tmp_path, capsys):
    bad = _image_folder(tmp_path / "data" / "val", n_good=4, garbage=True)["garbage"]
    _image_folder(tmp_path / "data" / "train", n_good=8, garbage=False)
    argv = ["--preset", "demo_simclr", "--data", str(tmp_path / "data"), "--loader", "dali",
            "--batch-size", "4", "--epochs", "1", "--knn-every", "1", "--knn-k", "3",
            "--eval-size", "16", "--out", str(tmp_path / "cli"), "--head", "projector=[32,16]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: " in err and "k-NN monitor" in err and "Traceback" not in err
    assert ckpt_io.load(str(tmp_path / "cli" / ckpt_io.LAST_NAME))["epoch"] == 1


def test_corrupt_scan_data_behind_a_valid_header_is_named(tmp_path):
    bad = _image_folder(tmp_path / "data", garbage=False, bad_scan=True)["bad_scan"]
    with pytest.raises(CorruptDataError) as info:
        train(_dali_config(tmp_path, tmp_path / "data"), stream=DEVNULL)
    assert str(info.value).startswith(f"{bad}: ")


# --- checkpoint writes ----------------------------------------------------------------------------
def test_full_disk_names_the_path_keeps_training_and_retries(tmp_path, monkeypatch):
    real = ckpt_io._write_file
    calls = []

    def full_once(path, data):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, data)
    monkeypatch.setattr(ckpt_io, "_write_file", full_once)
    stream = io.StringIO()
    result = train(small("simclr", tmp_path, epochs=2), stream=stream)
    assert result["status"] == "completed"
    last = str(tmp_path / ckpt_io.LAST_NAME)
    assert (
        f"cannot write checkpoint {last}: [Errno 28] No space left on device" in stream.getvalue()
    )
    assert torch.load(last, weights_only=False)["epoch"] == 2     # the retry holds both epochs
    assert sorted(os.listdir(tmp_path)) == ["backbone.pth", "checkpoint_last.pth", "config.json",
                                            "curves.png", "log.jsonl"]


def test_full_disk_at_the_last_checkpoint_is_an_error_naming_the_path(
    tmp_path, monkeypatch, capsys
):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(ckpt_io, "_write_file", full)
    _small_cli_config(monkeypatch)
    assert main(_cli_args(tmp_path / "run", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    last = os.path.join(str(tmp_path / "run"), ckpt_io.LAST_NAME)
    assert f"error: cannot write checkpoint {last}: [Errno 28] No space left on device" in err
    assert "Traceback" not in err and "inline_container" not in err
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "run"))


def test_checkpoint_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt_io.save_atomic({"x": torch.zeros(2)}, str(tmp_path / "a.pth"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pth").st_mode) == 0o644
    old = os.umask(0o077)
    try:
        ckpt_io.save_atomic({"x": torch.zeros(2)}, str(tmp_path / "b.pth"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "b.pth").st_mode) == 0o600


def test_stale_temporary_files_are_swept_and_each_target_has_one_temp_name(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / ".tmp_abc123.pth", tmp_path / f".{ckpt_io.LAST_NAME}.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    assert ckpt_io.temp_path(str(tmp_path / ckpt_io.LAST_NAME)) == str(stale[1])
    train(small("simclr", tmp_path, epochs=1, resume="auto"), stream=DEVNULL)
    assert not any(p.exists() for p in stale)
    assert sorted(os.listdir(tmp_path)) == ["backbone.pth", "checkpoint_last.pth", "config.json",
                                            "curves.png", "log.jsonl"]


# --- --resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_resume_of_an_unreadable_file_names_it(tmp_path, damage):
    path = tmp_path / "ckpt.pth"
    if damage == "garbage":
        path.write_bytes(b"12345 garbage, not a checkpoint")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        buf = io.BytesIO()
        torch.save({"version": 1, "model": {"w": torch.randn(1000)}}, buf)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="is not a readable checkpoint") as info:
        train(small("simclr", tmp_path / "run", resume=str(path)), stream=DEVNULL)
    assert str(path) in str(info.value)


def test_resume_with_another_head_or_method_compares_them(tmp_path, capsys):
    first = train(small("simclr", tmp_path, epochs=1), stream=DEVNULL)
    with pytest.raises(ValueError) as info:
        train(small("simclr", tmp_path, epochs=2, resume="auto", heads={"projector": [32, 8]}),
              stream=DEVNULL)
    msg = str(info.value)
    assert first["checkpoint"] in msg and "heads" in msg and "[32, 16]" in msg and "[32, 8]" in msg
    with pytest.raises(ValueError, match=r"method: checkpoint 'simclr', this run 'sce'"):
        train(small("sce", tmp_path, epochs=2, resume="auto"), stream=DEVNULL)


def test_epoch_loss_after_a_sigterm_resume_covers_the_whole_epoch(tmp_path):
    torch.set_num_threads(1)
    train(small("simclr", tmp_path / "full", epochs=2), stream=DEVNULL)

    def kill_at_step(step, loss):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
    part = train(small("simclr", tmp_path / "part", epochs=2), hooks={"step_end": kill_at_step},
                 stream=DEVNULL)
    assert part["status"] == "interrupted"
    train(small("simclr", tmp_path / "part", epochs=2, resume="auto"), stream=DEVNULL)

    def epoch_losses(d):
        return [r["loss"] for r in map(json.loads, open(d / "log.jsonl")) if r["event"] == "epoch"]
    assert epoch_losses(tmp_path / "part") == epoch_losses(tmp_path / "full")


# --- --out ----------------------------------------------------------------------------------------
def test_file_valued_out_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    _small_cli_config(monkeypatch)
    assert main(_cli_args(target)) == 2
    err = capsys.readouterr().err
    assert f"error: --out {target}: cannot create the output directory" in err
    assert main(_cli_args(target / "sub")) == 2
    assert f"error: --out {target / 'sub'}" in capsys.readouterr().err
