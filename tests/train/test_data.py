"""fastssl.data: demo dataset, DALI CPU loaders (views, sharding, resume), synthetic, eval.

DALI runs CPU-only here (device_id=None): 1-2 threads, 64/32 px images.
"""
import os
import shutil

import numpy as np
import pytest
import torch

from fastssl.data import (CorruptImageError, CropSpec, IMAGENET_MEAN, IMAGENET_STD,
                          build_eval_loader, build_train_loader, demo_dataset, recipe_for)
from fastssl.data import demo as demo_mod
from fastssl.data.crops import PARAM_FIELDS, _random_resized_crop, expand_views, sample_view_params

pytest.importorskip("nvidia.dali", reason="DALI (nvidia-dali-cuda130) is not installed")

CPU = torch.device("cpu")
TWO_VIEW = [CropSpec(32, (0.2, 1.0), 1, blur_p=1.0),
            CropSpec(32, (0.2, 1.0), 1, blur_p=0.1, solarize_p=0.2)]
MULTI_CROP = [CropSpec(64, (0.14, 1.0), 2, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5),
              CropSpec(32, (0.05, 0.14), 6, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5)]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """The demo dataset, built once for this module in a private cache directory."""
    cache = tmp_path_factory.mktemp("fastssl_cache")
    old = os.environ.get("FASTSSL_DATA_CACHE")
    os.environ["FASTSSL_DATA_CACHE"] = str(cache)
    try:
        root = demo_dataset()
        yield root
    finally:
        if old is None:
            os.environ.pop("FASTSSL_DATA_CACHE", None)
        else:
            os.environ["FASTSSL_DATA_CACHE"] = old


def _loader(crops=TWO_VIEW, batch_size=50, **kw):
    kw.setdefault("device", CPU)
    kw.setdefault("num_threads", 1)
    kw.setdefault("seed", 7)
    return build_train_loader("demo", crops, batch_size, **kw)


def _equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index) and torch.equal(x.labels, y.labels)
        assert len(x.views) == len(y.views)
        for u, v in zip(x.views, y.views):
            assert torch.equal(u, v)


def test_demo_dataset_layout_and_cache(demo_root, monkeypatch):
    assert os.path.basename(demo_root) == "demo"
    assert os.path.dirname(demo_root) == os.environ["FASTSSL_DATA_CACHE"]
    for split, per_class in (("train", demo_mod.DEMO_TRAIN_PER_CLASS),
                             ("val", demo_mod.DEMO_VAL_PER_CLASS)):
        classes = sorted(os.listdir(os.path.join(demo_root, split)))
        assert classes == sorted(demo_mod.DEMO_CLASSES)
        for c in classes:
            files = os.listdir(os.path.join(demo_root, split, c))
            assert len(files) == per_class and all(f.endswith(".jpg") for f in files)
    from PIL import Image
    with Image.open(os.path.join(demo_root, "train", "star", "star_000.jpg")) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    # Cached: a second call does not build again.
    monkeypatch.setattr(demo_mod, "_build", lambda target: pytest.fail("rebuilt a cached demo"))
    assert demo_dataset() == demo_root
    assert not [d for d in os.listdir(os.path.dirname(demo_root)) if d.startswith(".demo-")]


def test_demo_dataset_is_deterministic(demo_root, tmp_path):
    # Rebuild one class image with the same key and compare the encoded bytes.
    rng = np.random.default_rng([demo_mod._VERSION, 1, 3, 2])  # val, class 3, image 2
    path = tmp_path / "x.jpg"
    demo_mod._make_image(3, rng).save(path, format="JPEG", quality=90)
    cls = demo_mod.DEMO_CLASSES[3]
    with open(os.path.join(demo_root, "val", cls, f"{cls}_002.jpg"), "rb") as f:
        assert f.read() == path.read_bytes()
    with pytest.raises(ValueError, match="not a fastssl demo"):
        (tmp_path / "occupied").mkdir()
        (tmp_path / "occupied" / "mine.txt").write_text("user data")
        demo_dataset(str(tmp_path / "occupied"))


def test_crop_spec_validation_and_recipes():
    with pytest.raises(ValueError, match="scale"):
        CropSpec(32, (0.5, 0.2))
    with pytest.raises(ValueError, match="blur_p"):
        CropSpec(32, (0.2, 1.0), blur_p=1.5)
    with pytest.raises(ValueError, match="size"):
        CropSpec(0, (0.2, 1.0))
    swav = recipe_for("swav", size=64, small_size=32)
    assert ([(v.size, v.scale) for v in expand_views(swav)]
            == [(64, (0.14, 1.0))] * 2 + [(32, (0.05, 0.14))] * 6)
    byol = expand_views(recipe_for("sfrik", size=64))
    assert [(v.blur_p, v.solarize_p) for v in byol] == [(1.0, 0.0), (0.1, 0.2)]
    assert expand_views(recipe_for("sce"))[0].scale == (0.2, 1.0)
    assert len(expand_views(recipe_for("groco", multicrop=True, small_size=32))) == 8
    with pytest.raises(ValueError, match="method"):
        recipe_for("mocov9")


def test_random_resized_crop_params_match_torchvision_rules():
    rng = np.random.default_rng(0)
    n = 2000
    width = rng.integers(40, 400, n)
    height = rng.integers(40, 400, n)
    top, left, h, w = _random_resized_crop(rng.random((n, 10)), rng.random((n, 10)),
                                           rng.random((n, 2)), width, height, (0.08, 1.0))
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (width * height)
    assert area.min() >= 0.07 and area.max() <= 1.0
    # Impossible aspect ratios fall back to the centred, aspect-clamped whole-image crop.
    t, lft, ch, cw = _random_resized_crop(np.full((1, 10), 0.99), np.full((1, 10), 0.99),
                                          np.full((1, 2), 0.5), np.array([300]), np.array([30]),
                                          (0.9, 1.0))
    assert (ch[0], cw[0]) == (30, 40) and (t[0], lft[0]) == (0, 130)
    # Parameters are a function of the key and the global-batch row only.
    views = expand_views(MULTI_CROP)
    sizes = np.full(8, 64)
    full = sample_view_params(views, (1, 2, 1, 3), 8, slice(0, 8), sizes, sizes)
    part = sample_view_params(views, (1, 2, 1, 3), 8, slice(4, 8), sizes[4:], sizes[4:])
    assert full.shape == (8, 8, len(PARAM_FIELDS)) and np.array_equal(full[4:], part)


def test_two_view_loader(demo_root):
    loader = _loader(TWO_VIEW, batch_size=50)
    assert len(loader) == 500 // 50 and loader.num_samples == 500 and loader.num_classes == 10
    batches = list(loader)
    assert len(batches) == 10 and loader.position == 10
    seen = []
    for b in batches:
        assert len(b.views) == 2
        for v in b.views:
            assert v.shape == (50, 3, 32, 32) and v.dtype == torch.float32 and v.device == CPU
            assert torch.isfinite(v).all()
        assert b.labels.dtype == torch.int64 and b.index.dtype == torch.int64
        # Labels are the class directory of the indexed file.
        for i, y in zip(b.index.tolist(), b.labels.tolist()):
            assert os.path.basename(os.path.dirname(loader.folder.files[i])) == loader.classes[y]
        seen += b.index.tolist()
    assert sorted(seen) == list(range(500))  # one epoch = one permutation
    # Normalised: roughly zero-mean, unit-scale, and not identical across the two views.
    v = torch.cat([b.views[0] for b in batches])
    assert abs(v.mean().item()) < 1.0 and 0.3 < v.std().item() < 2.0
    assert not torch.equal(batches[0].views[0], batches[0].views[1])


def test_multicrop_loader_and_channels_last(demo_root):
    kw = dict(batch_size=20, num_threads=2)
    nchw = _loader(MULTI_CROP, **kw)
    nhwc = _loader(MULTI_CROP, channels_last=True, **kw)
    a, b = next(iter(nchw)), next(iter(nhwc))
    assert [tuple(v.shape) for v in a.views] == [(20, 3, 64, 64)] * 2 + [(20, 3, 32, 32)] * 6
    for u, v in zip(a.views, b.views):
        assert v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()
        assert u.is_contiguous() and torch.equal(u, v)
    # float16 output straight from DALI.
    half = next(iter(_loader(MULTI_CROP, dtype=torch.float16, **kw)))
    assert half.views[0].dtype == torch.float16
    torch.testing.assert_close(half.views[0].float(), a.views[0], atol=2e-2, rtol=1e-2)


def test_augmentations_applied(demo_root):
    # Flip only: view = the mirrored crop of the same box; gray and solarize are detectable.
    plain = dict(jitter_p=0.0, gray_p=0.0)
    loader = _loader([CropSpec(32, (1.0, 1.0), 1, flip_p=0.0, **plain),
                      CropSpec(32, (1.0, 1.0), 1, flip_p=1.0, **plain),
                      CropSpec(32, (1.0, 1.0), 1, flip_p=0.0, jitter_p=0.0, gray_p=1.0),
                      CropSpec(32, (1.0, 1.0), 1, flip_p=0.0, solarize_p=1.0, **plain),
                      CropSpec(32, (1.0, 1.0), 1, flip_p=0.0, blur_p=1.0, **plain)],
                     batch_size=10)
    b = next(iter(loader))
    base, flipped, gray, solar, blurred = b.views
    torch.testing.assert_close(flipped, base.flip(-1))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    g = gray * std + mean
    assert (g.amax(1) - g.amin(1)).max() < 2.5 / 255   # R = G = B up to rounding
    assert (base * std + mean - g).abs().mean() > 0.01
    px, sx = (base * std + mean) * 255, (solar * std + mean) * 255
    assert torch.allclose(torch.where(px >= 127.5, 255 - px, px), sx, atol=1.0)
    # Blur lowers the high-frequency energy.
    def hf(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean()
    assert hf(blurred) < 0.8 * hf(base)


def test_sharding_partitions_the_epoch(demo_root):
    single = _loader(TWO_VIEW, batch_size=60)
    ranks = [_loader(TWO_VIEW, batch_size=30, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 500 // 60
    per_rank = [list(r) for r in ranks]
    flat = [b.index for r in per_rank for b in r]
    all_idx = torch.cat(flat).tolist()
    assert len(all_idx) == len(set(all_idx)) == 8 * 60
    # Each global batch is split between the ranks, views included, bit for bit.
    g = next(iter(single))
    for r in range(2):
        rows = slice(30 * r, 30 * (r + 1))
        assert torch.equal(per_rank[r][0].index, g.index[rows])
        for u, v in zip(per_rank[r][0].views, g.views):
            assert torch.equal(u, v[rows])
    with pytest.raises(ValueError, match="rank"):
        _loader(TWO_VIEW, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        _loader(TWO_VIEW, batch_size=300, world_size=2)


def test_set_epoch_reshuffles_deterministically(demo_root):
    loader = _loader(TWO_VIEW, batch_size=100)
    e0 = list(loader)
    again = list(loader)           # a finished epoch iterated again repeats itself
    _equal_batches(e0, again)
    loader.set_epoch(1)
    e1 = list(loader)
    assert not torch.equal(torch.cat([b.index for b in e0]), torch.cat([b.index for b in e1]))
    assert sorted(torch.cat([b.index for b in e1]).tolist()) == list(range(500))
    other = _loader(TWO_VIEW, batch_size=100)
    other.set_epoch(1)
    _equal_batches(e1, list(other))  # same seed + epoch: same batches, another loader
    seeded = _loader(TWO_VIEW, batch_size=100, seed=8)
    assert not torch.equal(next(iter(seeded)).index, e0[0].index)


def test_resume_mid_epoch_is_bitwise_identical(demo_root):
    crops = [CropSpec(32, (0.08, 1.0), 2, blur_p=0.5, solarize_p=0.3)]
    loader = _loader(crops, batch_size=50, num_threads=2)
    list(loader)                   # epoch 0, then three batches of epoch 1
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    rest = list(it)                # what the uninterrupted run sees next
    assert len(rest) == 7

    resumed = _loader(crops, batch_size=50, num_threads=1)   # thread count does not matter
    resumed.load_state_dict(state)
    resumed.set_epoch(1)           # the trainer's loop calls this; it keeps the position
    _equal_batches(rest, list(resumed))
    assert resumed.position == len(resumed)
    # An abandoned iteration leaves the position where it stopped; the next one continues.
    loader.set_epoch(2)
    it = iter(loader)
    first = [next(it), next(it)]
    del it
    tail = list(loader)
    fresh = _loader(crops, batch_size=50)
    fresh.set_epoch(2)
    _equal_batches(first + tail, list(fresh))
    with pytest.raises(ValueError, match="global_batch"):
        _loader(crops, batch_size=25).load_state_dict(state)


def test_synthetic_backend():
    kw = dict(backend="synthetic", device=CPU, seed=3, dataset_size=1000)
    a = build_train_loader(None, MULTI_CROP, 16, **kw)
    b = build_train_loader(None, MULTI_CROP, 16, **kw)
    assert len(a) == 1000 // 16 and a.num_samples == 1000
    ba, bb = next(iter(a)), next(iter(b))
    assert [tuple(v.shape) for v in ba.views] == [(16, 3, 64, 64)] * 2 + [(16, 3, 32, 32)] * 6
    for u, v in zip(ba.views, bb.views):
        assert torch.equal(u, v)
    assert torch.equal(ba.index, bb.index) and ba.labels.dtype == torch.int64
    c = next(iter(build_train_loader(None, MULTI_CROP, 16, **{**kw, "seed": 4})))
    assert not torch.equal(c.views[0], ba.views[0])
    cl = build_train_loader(None, TWO_VIEW, 8, channels_last=True, dtype=torch.bfloat16,
                            **{**kw, "dataset_size": 64})
    batches = list(cl)
    assert len(batches) == 8 and batches[0].views[0].dtype == torch.bfloat16
    assert batches[0].views[0].is_contiguous(memory_format=torch.channels_last)
    assert sorted(torch.cat([x.index for x in batches]).tolist()) == list(range(64))
    assert (
        build_train_loader(None, TWO_VIEW, 8, backend="synthetic", device=CPU).num_samples
        == 1_281_167
    )


def test_eval_loader_order_and_shapes(demo_root):
    loader = build_eval_loader("demo", "val", 64, size=56, device=CPU, num_threads=1)
    assert loader.num_samples == 150 and loader.num_classes == 10 and len(loader) == 3
    batches = list(loader)
    assert [x.shape[0] for x, _ in batches] == [64, 64, 22]
    assert all(x.shape[1:] == (3, 56, 56) and x.dtype == torch.float32 for x, _ in batches)
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, torch.arange(10).repeat_interleave(15))   # fixed (sorted) order
    again = list(loader)
    for (x, y), (x2, y2) in zip(batches, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # The batch size does not change the values.
    full = next(iter(build_eval_loader("demo", "val", 4, size=56, device=CPU)))[0]
    assert torch.equal(full, batches[0][0][:4])
    shards = [build_eval_loader("demo", "train", 64, size=32, device=CPU, rank=r, world_size=3)
              for r in range(3)]
    idx = np.concatenate([s.indices for s in shards])
    assert np.array_equal(idx, np.arange(500))
    n = sum(x.shape[0] for x, _ in shards[2])
    assert n == len(shards[2].indices)
    with pytest.raises(ValueError, match="split"):
        build_eval_loader("demo", "test", 8, device=CPU)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image_error_names_the_file(demo_root, tmp_path, kind):
    src = os.path.join(demo_root, "train")
    for c in ("circle", "square"):
        os.makedirs(tmp_path / c)
        for i in range(3):
            shutil.copy(os.path.join(src, c, f"{c}_{i:03d}.jpg"), tmp_path / c)
    with open(os.path.join(src, "circle", "circle_010.jpg"), "rb") as f:
        good = f.read()
    bad = tmp_path / "square" / "broken.jpg"
    # "garbage" fails the header check; "truncated" has a valid header and fails in DALI's decoder.
    bad.write_bytes(b"definitely not a JPEG" if kind == "garbage" else good[: len(good) // 3])
    loader = build_train_loader(str(tmp_path), TWO_VIEW, 7, device=CPU, num_threads=1)
    with pytest.raises(CorruptImageError, match="broken.jpg") as info:
        list(loader)
    assert info.value.path == str(bad)
    ev = build_eval_loader(str(tmp_path), "train", 7, size=32, device=CPU, num_threads=1)
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        list(ev)


@pytest.mark.gpu
def test_gpu_loader_mixed_decode(demo_root):
    # nvJPEG ("mixed") decode and GPU augmentation; outputs are CUDA tensors on the given device.
    dev = torch.device("cuda", 0)
    loader = _loader(MULTI_CROP, batch_size=32, device=dev, channels_last=True, num_threads=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 500 // 32
    b = batches[0]
    assert [tuple(v.shape) for v in b.views] == [(32, 3, 64, 64)] * 2 + [(32, 3, 32, 32)] * 6
    for v in b.views:
        assert v.device == dev and v.dtype == torch.float32 and torch.isfinite(v).all()
        assert v.is_contiguous(memory_format=torch.channels_last)
    assert b.labels.device == dev and b.index.device == dev
    # Resume mid-epoch on the GPU: same samples, same augmentation parameters.
    loader.set_epoch(1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = list(it)
    resumed = _loader(MULTI_CROP, batch_size=32, device=dev, channels_last=True, num_threads=2)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(again) == len(rest)
    for x, y in zip(rest, again):
        assert torch.equal(x.index, y.index)
        for u, v in zip(x.views, y.views):
            torch.testing.assert_close(u, v, atol=2e-2, rtol=0)
    ev = build_eval_loader("demo", "val", 64, size=56, device=dev)
    images, labels = next(iter(ev))
    assert images.shape == (64, 3, 56, 56) and images.device == dev and labels.device == dev
