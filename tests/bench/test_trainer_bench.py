"""bench/trainer.py: each case runs its preset's real crop recipe, images are counted (not
views), and the DDP variant's configuration."""
import pytest
import torch

from bench import trainer
from bench.harness import BenchConfig


def test_cases_run_the_real_crop_recipes():
    assert trainer.recipe_label(trainer.crop_sizes("swav")) == "2x224+6x96"
    assert trainer.recipe_label(trainer.crop_sizes("groco_multicrop")) == "2x224+6x96"
    assert trainer.recipe_label(trainer.crop_sizes("simclr")) == "2x224"
    assert trainer.recipe_label(trainer.crop_sizes("swav", trainer.CPU_SCALE)) == "2x32+6x14"
    shapes = {s.shape["method"]: s.shape for s in trainer._sizes("cpu", False)}
    assert shapes["swav"]["views"] == 8 and shapes["swav"]["res"] == 32
    assert set(shapes) == set(trainer.METHODS)


def test_images_per_s_counts_images_not_views():
    size = trainer._case("swav", "resnet18", 4, 16 / 224)
    prepared = trainer._build("fastssl", size.shape, torch.float32, torch.device("cpu"))
    out = prepared.extras({"p50_ms": 500.0}, BenchConfig(quick=True, min_time_s=0.0, max_reps=3))
    assert out["images_per_s"] == pytest.approx(4 / 0.5)
    assert out["views_per_s"] == pytest.approx(8 * 4 / 0.5)
    assert out["recipe"] == "2x16+6x8"


def test_ddp_config_uses_the_real_pipeline():
    cfg = trainer.ddp_config("swav", "cpu", batch_per_rank=16, world=2, epochs=1, out="/tmp/x")
    assert cfg.backend == "dali" and cfg.data == "demo" and cfg.batch_size == 32
    assert cfg.sync_bn and cfg.knn_every == 0
    assert [(c["size"], c.get("count", 1)) for c in cfg.crops] == [(32, 2), (14, 6)]
    gpu = trainer.ddp_config(
        "groco_multicrop", "cuda", batch_per_rank=128, world=8, epochs=1, out="/tmp/x"
    )
    assert gpu.arch == "resnet50" and [(c["size"], c.get("count", 1)) for c in gpu.crops] == [
        (224, 1), (224, 1), (96, 6)]
