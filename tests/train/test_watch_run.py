"""Watching a run: progress with the ETA of the epoch and the run, images/s and labelled losses;
epochs numbered from 1 in every record; optional TensorBoard (a fake SummaryWriter here: the
package is optional); the curves PNG at the end of every run."""
import io
import json
import os
import re
import sys

import pytest

from fastssl.train import log as train_log
from fastssl.train.cli import main
from fastssl.train.loop import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trainer import small  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ETA = r"\d+:\d\d:\d\d"


def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_format_duration():
    assert train_log.format_duration(0) == "0:00:00"
    assert train_log.format_duration(3725.4) == "1:02:05"
    assert train_log.format_duration(2 * 86400 + 61) == "2d 0:01:01"
    assert train_log.format_duration(float("nan")) == "?"


def test_progress_line_has_both_etas_rate_and_the_step_loss():
    stream = io.StringIO()
    clock = train_log.RunClock(total_steps=40, start_step=0)
    progress = train_log.Progress(4, epoch=2, epochs=10, stream=stream, every=1, clock=clock,
                                  steps_before=8)
    for step in range(1, 5):
        progress.update(step, 32, 1.5, 0.1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert re.fullmatch(rf"epoch 3/10 \[#+\.*\] 1/4 [\d,]+ img/s step loss 1\.5000 lr 0\.1 "
                        rf"ETA epoch {ETA} run {ETA}", lines[0]), lines[0]
    assert "ETA epoch 0:00:00" in lines[-1]          # the epoch is done; the run is not
    assert progress.rate > 0


def test_epochs_numbered_from_one_in_every_record_and_the_curves_png(tmp_path, capsys):
    out = tmp_path / "run"
    result = train(small("simclr", out, epochs=2, dataset_size=16, batch_size=8))   # 2 x 2 steps
    assert result["status"] == "completed"
    stdout, stderr = capsys.readouterr()
    for e in (1, 2):
        assert re.search(
            rf"^epoch {e}/2: epoch mean loss \d+\.\d{{4}}, [\d,]+ img/s, run ETA {ETA}$",
            stdout,
            re.M,
        ), stdout
        assert re.search(rf"^epoch {e}/2 \[#+\] 2/2 .* step loss .* ETA epoch {ETA} run {ETA}$",
                         stderr, re.M), stderr
    records = _records(out)
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in steps] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 2), (2, 4)]
    assert all(r["images_per_s"] > 0 for r in steps)
    assert records[0]["event"] == "start" and records[0]["epochs"] == 2
    png = out / train_log.CURVES_NAME
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_a_stopped_run_numbers_its_epoch_the_same_way_and_still_draws(tmp_path, capsys):
    out = tmp_path / "run"
    result = train(small("simclr", out, epochs=2, dataset_size=16, batch_size=8, max_steps=3))
    assert result["status"] == "stopped"
    assert "stopped at epoch 2, step 3" in capsys.readouterr().out
    records = _records(out)
    assert records[-1]["event"] == "stopped" and records[-1]["epoch"] == 2
    assert [r["epoch"] for r in records if r["event"] == "step"] == [1, 1, 2]
    assert (out / train_log.CURVES_NAME).stat().st_size > 0
    # resume: the log gets the rest, the curves one point per step
    train(small("simclr", out, epochs=2, dataset_size=16, batch_size=8, resume="auto"))
    stdout = capsys.readouterr().out
    assert "1 epoch(s) done, continuing in epoch 2 at step 3" in stdout
    assert [(r["epoch"], r["step"]) for r in _records(out) if r["event"] == "epoch"] == [
        (1, 2),
        (2, 4),
    ]


def test_curves_from_a_log_with_knn_and_a_resumed_overlap(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"event": "start", "method": "simclr", "arch": "resnet18", "preset": "demo"}]
    for step in list(range(1, 7)) + [5, 6, 7, 8]:           # resumed from step 4
        rows.append({"event": "step", "epoch": (step - 1) // 4 + 1, "step": step,
                     "loss": 5.0 / step, "lr": 0.1 * step, "images_per_s": 100.0})
        if step % 4 == 0:
            rows.append({"event": "epoch", "epoch": step // 4, "step": step, "loss": 4.0 / step,
                         "knn": {"knn20_top1": 10.0 * step, "knn20_top5": 12.0 * step}})
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"torn")
    png = train_log.plot_curves(str(log), str(tmp_path / "c.png"))
    data = open(png, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not os.path.exists(png + ".tmp")
    assert [r["step"] for r in train_log._last_per_step(train_log.read_log(str(log)), "step")] \
        == list(range(1, 9))


class FakeSummaryWriter:
    instances = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_scalars_through_a_summary_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(train_log, "tensorboard_writer_class", lambda: FakeSummaryWriter)
    FakeSummaryWriter.instances.clear()
    out = tmp_path / "run"
    train(small("simclr", out, epochs=2, dataset_size=16, batch_size=8, tensorboard=True),
          stream=io.StringIO())
    (writer,) = FakeSummaryWriter.instances
    assert writer.log_dir == str(out / train_log.TENSORBOARD_DIR) and writer.closed
    tags = {}
    for tag, value, step in writer.scalars:
        tags.setdefault(tag, []).append(step)
    assert tags["train/step_loss"] == [1, 2, 3, 4] and tags["train/lr"] == [1, 2, 3, 4]
    assert tags["train/images_per_s"] == [1, 2, 3, 4]
    assert tags["train/epoch_mean_loss"] == [2, 4]


def test_tensorboard_absent_is_a_clear_error_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(
        ValueError, match=r"--tensorboard: the tensorboard package is not installed"
    ):
        train_log.tensorboard_writer_class()
    rc = main(
        [
            "--loader",
            "synthetic",
            "--dataset-size",
            "16",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--tensorboard",
        ]
    )
    assert rc == 2
    assert (
        "error: --tensorboard: the tensorboard package is not installed" in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()
    # not asked for: no tensorboard import at all
    assert train(small("simclr", tmp_path / "plain", epochs=1, dataset_size=8, batch_size=8),
                 stream=io.StringIO())["status"] == "completed"
