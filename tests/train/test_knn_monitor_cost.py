"""The online k-NN monitor reads only its subsets, and costs at most 2% of the training images
decoded between two of its runs for every ImageNet preset."""
import json

import pytest
import torch

from fastssl.methods.presets import PRESETS
from fastssl.train import monitor as M

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if p.get("data") != "demo"))
def test_every_imagenet_preset_pays_at_most_two_percent(name):
    from fastssl.train.config import TrainConfig
    preset = PRESETS[name]
    cfg = TrainConfig(**{k: v for k, v in preset.items() if k in TrainConfig.__dataclass_fields__})
    if not cfg.knn_every:
        return
    trained = (IMAGENET_TRAIN // cfg.batch_size) * cfg.batch_size * cfg.knn_every
    bank, queries = M.monitor_subsets(IMAGENET_TRAIN, IMAGENET_VAL, trained // cfg.knn_every,
                                      cfg.knn_every, cfg.knn_train_samples or None)
    assert (bank + queries) / trained <= 0.02 + 1e-12, (name, bank, queries, trained)
    # a useful monitor all the same: a bank and queries of several thousand images
    assert bank >= 10_000 and queries >= 10_000


def test_subsets_fill_a_small_dataset_whole_and_respect_the_bank_cap():
    assert M.monitor_subsets(500, 150, 448, 1, 30000) == (500, 150)     # the demo: whole
    assert M.monitor_subsets(10**6, 10**5, None, 1, 3000) == (3000, 10**5)  # no budget known
    bank, queries = M.monitor_subsets(10**6, 1000, 10**6, 1, None)
    assert queries == 1000 and bank == 20000 - 1000                    # val too small: rest to bank


def test_monitor_reads_only_its_subsets(monkeypatch):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from fastssl.data import loaders
    read = []
    original = loaders._read_batch

    def counting(files):
        read.extend(files)
        return original(files)
    monkeypatch.setattr(loaders, "_read_batch", counting)
    # budget: 2% of 2,000 training images = 40 images (no floor): 20 queries, 20 bank rows
    monitor = M.KNNMonitor("demo", k=3, device=torch.device("cpu"), size=16,
                           max_train_samples=None, batch_size=8, num_threads=1,
                           train_images_per_epoch=2000, min_images=0)
    assert monitor.train_loader.num_samples == 20 and monitor.val_loader.num_samples == 20
    assert monitor.train_loader.split_size > 20
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten())
    result = monitor(backbone)
    assert set(result) == {"knn3_top1", "knn3_top5"}
    assert len(read) == len(set(read)) == 40                # each subset image once, nothing else
    assert monitor.decoded_share() == pytest.approx(40 / 2000)
    # the subsets are spread over the class-sorted splits: every class is in the bank
    assert len(set(monitor.train_loader.labels.tolist())) == monitor.train_loader.num_classes


def test_trainer_logs_the_monitor_share(tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from fastssl.methods.presets import get_preset
    from fastssl.train.config import make_config
    from fastssl.train.loop import train
    cfg = make_config(get_preset("demo_simclr"), dict(
        backend="dali", data="demo", batch_size=100, epochs=1, knn_every=1, eval_size=16,
        crops=[{"size": 16, "scale": [0.3, 1.0], "count": 2}], heads={"projector": [32, 16]},
        out=str(tmp_path)))
    with open("/dev/null", "w") as devnull:
        train(cfg, stream=devnull)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    (epoch,) = [r for r in records if r.get("event") == "epoch"]
    from fastssl.data.demo import DEMO_CLASSES, DEMO_TRAIN_PER_CLASS, DEMO_VAL_PER_CLASS
    n_train = len(DEMO_CLASSES) * DEMO_TRAIN_PER_CLASS
    trained = n_train // 100 * 100
    # the demo is below the floor: monitored whole (bank = train split, queries = val split)
    expected = (n_train + len(DEMO_CLASSES) * DEMO_VAL_PER_CLASS) / trained
    assert epoch["knn_decoded_share"] == pytest.approx(expected) and "knn" in epoch


def test_eval_loader_subset_arguments_are_checked():
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from fastssl.data import build_eval_loader
    from fastssl.data.folder import scan_image_folder
    from fastssl.data.loaders import EvalLoader, _resolve_data, spread_subset
    with pytest.raises(ValueError, match="max_samples"):
        build_eval_loader("demo", "val", 8, size=16, device="cpu", max_samples=0)
    folder = scan_image_folder(_resolve_data("demo", "val"))
    with pytest.raises(ValueError, match="subset"):
        EvalLoader(folder, 8, size=16, device="cpu", rank=0, world_size=1, num_threads=1,
                   subset=[0, len(folder)])
    loader = build_eval_loader("demo", "val", 8, size=16, device="cpu", max_samples=12)
    assert loader.num_samples == 12 and len(loader) == 2
    assert list(spread_subset(10, 4)) == [0, 2, 5, 7] and list(spread_subset(3, 5)) == [0, 1, 2]
