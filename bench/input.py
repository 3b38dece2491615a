"""The host side of the training input path on generated ImageNet-like JPEGs (~110 KB, ~400 x 350):
images/s and CPU time per image against threads, for the SimCLR 2 x 224 and SwAV 2 x 224 + 6 x 96
recipes. Stages: ``read+params`` (read, parse the header, draw the augmentation parameters, as
the DALI loader's host side does), ``verify`` (plus the first epoch's PIL decode check),
``dali-cpu`` (CPU DALI decode and augmentation, fed from memory). ``per_core_img_s`` = 1 / CPU
seconds per image: what one busy core sustains, whatever the load (recorded with each figure).

    python -m bench --op input        # = python -m bench.input [--threads 1,2 --out DIR ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fastssl.data.crops import expand_views, multicrop_recipe, sample_view_params, simclr_recipe
from fastssl.data.dali import build_train_pipeline
from fastssl.data.folder import image_size, read_bytes, verify_decodable
from fastssl.data.loaders import cores_per_process as cores_per_gpu  # noqa: F401 (tests, CLI)

from .common import table

CACHE = Path(os.environ.get("FASTSSL_BENCH_CACHE",
                            Path.home() / ".cache" / "fastssl" / "bench_jpeg"))
TARGET_IMG_S = 24_000      # 8 GPUs x 3,000 img/s


def generate_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs (width 300..500, height 260..440, ~110 KB at quality 95: a smooth random image
    plus pixel noise); reused when already there."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    if len(files := sorted(folder.glob("img_*.jpg"))) >= n:
        return files[:n]
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        w, h = int(rng.integers(300, 501)), int(rng.integers(260, 441))
        low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img = np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
        if not path.exists():
            Image.fromarray(img).save(path, "JPEG", quality=95)
        out.append(path)
    return out


def _measure(work, n_images: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images": n_images, "wall_s": wall, "cpu_s": cpu, "img_s": n_images / wall,
            "cpu_us_per_image": 1e6 * cpu / n_images,
            "per_core_img_s": n_images / cpu if cpu > 0 else float("inf"),
            "load1": os.getloadavg()[0]}


def _params(views, key, bufs, sizes, batch):
    w, h = (np.asarray([s[i] for s in sizes]) for i in (0, 1))
    enc = [np.frombuffer(b, dtype=np.uint8) for b in bufs]
    return enc, list(sample_view_params(views, key, batch, slice(0, batch), w, h))


def bench_read_params(files, views, batch, threads, epochs, verify=False) -> dict:
    names = [str(f) for f in files]

    def one_batch(key):
        epoch, pos = key
        bufs = [read_bytes(p) for p in names[pos * batch:(pos + 1) * batch]]
        sizes = [image_size(b, p) for b, p in zip(bufs, names[pos * batch:])]
        for b, p in zip(bufs, names[pos * batch:]) if verify else ():
            verify_decodable(b, p)
        return _params(views, (0, epoch, 1, pos), bufs, sizes, batch)

    keys = [(e, p) for e in range(epochs) for p in range(len(names) // batch)]
    one_batch((0, 0))     # warm the page cache and numpy
    with ThreadPoolExecutor(threads) as pool:
        run = (lambda: [one_batch(k) for k in keys]) if threads == 1 else (
            lambda: list(pool.map(one_batch, keys)))
        return _measure(run, len(keys) * batch)


def bench_dali(files, views, batch, threads, batches) -> dict:
    bufs = [Path(f).read_bytes() for f in files]
    sizes = [image_size(b, str(f)) for b, f in zip(bufs, files)]
    n = len(bufs) // batch
    prepared = [_params(views, (0, 0, 1, p), bufs[p * batch:(p + 1) * batch],
                        sizes[p * batch:(p + 1) * batch], batch) for p in range(n)]
    pipe = build_train_pipeline(views, lambda info: prepared[info.iteration % n], batch_size=batch,
                                num_threads=threads, device=torch.device("cpu"), seed=0,
                                channels_last=False, half=False, prefetch=2)
    pipe.run()     # warm-up (allocations)
    return _measure(lambda: [pipe.run() for _ in range(batches)], batches * batch)


def run(n_files, batch, threads, epochs, dali_batches, stages, log=print) -> list[dict]:
    from PIL import Image
    files = generate_jpegs(CACHE, n_files)
    dims = [Image.open(f).size for f in files[:100]]
    meta = {"files": len(files), "mean_kb": float(np.mean([f.stat().st_size for f in files])) / 1e3,
            "mean_w": float(np.mean([d[0] for d in dims])),
            "mean_h": float(np.mean([d[1] for d in dims])),
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)), "cores_per_gpu_default": cores_per_gpu()}
    log(f"{meta['files']} JPEG files, mean {meta['mean_kb']:.0f} KB, {meta['mean_w']:.0f} x "
        f"{meta['mean_h']:.0f}; {meta['cores']} cores; load average {os.getloadavg()[0]:.2f}")
    stage_fn = {"read+params": lambda v, t: bench_read_params(files, v, batch, t, epochs),
                "verify": lambda v, t: bench_read_params(files, v, batch, t, 1, verify=True),
                "dali-cpu": lambda v, t: bench_dali(files, v, batch, t, dali_batches)}
    records = []
    for recipe, views in {"simclr_2x224": expand_views(simclr_recipe()), "swav_2x224+6x96":
                          expand_views(multicrop_recipe(224, 96, n_global=2, n_local=6))}.items():
        for t in threads:
            for stage in stages:
                rec = dict(stage_fn[stage](views, t), stage=stage, recipe=recipe, threads=t,
                           batch=batch, **meta)
                records.append(rec)
                log(f"{recipe:16s} {stage:12s} threads {t}: {rec['img_s']:8.0f} img/s wall, "
                    f"{rec['cpu_us_per_image']:8.1f} us CPU/image = {rec['per_core_img_s']:8.0f} "
                    f"img/s per core (load {rec['load1']:.2f})")
    return records


def summary(records: list[dict]) -> str:
    lines = table(["recipe", "stage", "threads", "img/s (wall)", "CPU us / image",
                   "img/s per core", "load avg"],
                  [[r["recipe"], r["stage"], r["threads"], f"{r['img_s']:.0f}",
                    f"{r['cpu_us_per_image']:.1f}", f"{r['per_core_img_s']:.0f}",
                    f"{r['load1']:.2f}"] for r in records]) + [""]
    by = {(r["recipe"], r["stage"]): r for r in records if r["threads"] == 1}
    for recipe in sorted({r["recipe"] for r in records}):
        host, dali = by.get((recipe, "read+params")), by.get((recipe, "dali-cpu"))
        if host:
            lines.append(f"{recipe}: {TARGET_IMG_S:,} img/s need "
                         f"{TARGET_IMG_S / host['per_core_img_s']:.1f} cores for read+params "
                         f"({host['per_core_img_s']:.0f} img/s per core)" + (
                             f" and {TARGET_IMG_S / dali['per_core_img_s']:.0f} cores for CPU "
                             f"DALI decode+augment ({dali['per_core_img_s']:.0f} img/s per core)"
                             if dali else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.input", description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", help="comma-separated thread counts (default: 1, cores per GPU)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the files for read+params")
    p.add_argument("--dali-batches", type=int, default=6)
    p.add_argument("--stages", default="read+params,verify,dali-cpu")
    p.add_argument("--quick", action="store_true", help="few files and batches (smoke test)")
    p.add_argument("--out", type=Path, help="write results.jsonl and summary.md here")
    a = p.parse_args(argv)
    threads = ([int(t) for t in a.threads.split(",")] if a.threads
               else sorted({1, cores_per_gpu()}))
    if a.quick:
        a.files, a.batch, a.epochs, a.dali_batches = 32, 16, 1, 1
    records = run(a.files, a.batch, threads, a.epochs, a.dali_batches,
                  [s for s in a.stages.split(",") if s])
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (a.out / "summary.md").write_text(summary(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
