"""The host side of the training input path, on real JPEG files: images/s per process and CPU
time per image, as a function of threads.

    python -m bench --op input                  # (same as python -m bench.input)
    python -m bench.input --files 300 --batch 64 --threads 1,2 --out bench/results/input-cpu

Stages, on the same generated ImageNet-like JPEGs (~110 KB, ~400 x 350): ``read+params`` (read,
parse the JPEG header, draw the batch's augmentation parameters, as the DALI loader's host side
does, for the SimCLR 2 x 224 and SwAV 2 x 224 + 6 x 96 recipes), ``verify`` (plus the first
epoch's PIL decode check) and ``dali-cpu`` (CPU DALI decode and augmentation, fed from memory).
``per_core_img_s`` = 1 / CPU seconds per image of the process: what one busy core sustains,
whatever the machine's load (recorded with each figure).
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
from fastssl.data.loaders import cores_per_process

CACHE = Path(
    os.environ.get("FASTSSL_BENCH_CACHE", Path.home() / ".cache" / "fastssl" / "bench_jpeg")
)
TARGET_IMG_S = 24_000      # 8 GPUs x 3,000 img/s
HOST_TARGET_PER_CORE = 5_000


def cores_per_gpu(local_world_size: int | None = None) -> int:
    """CPU cores this process may use divided by the processes (GPUs) of this node: what the
    loader's default thread count derives from (fastssl.data.loaders.default_num_threads)."""
    return cores_per_process(local_world_size)


def generate_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEG files of ImageNet-like size (width 300..500, height 260..440, ~110 KB): a smooth
    random image plus pixel noise, quality 95. Reused when already there."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("img_*.jpg"))
    if len(files) >= n:
        return files[:n]
    rng = np.random.default_rng(seed)
    out = []
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


def recipes():
    return {"simclr_2x224": expand_views(simclr_recipe()),
            "swav_2x224+6x96": expand_views(multicrop_recipe(224, 96, n_global=2, n_local=6))}


def _measure(work, n_images: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images": n_images, "wall_s": wall, "cpu_s": cpu, "img_s": n_images / wall,
            "cpu_us_per_image": 1e6 * cpu / n_images,
            "per_core_img_s": n_images / cpu if cpu > 0 else float("inf"),
            "load1": os.getloadavg()[0]}


def bench_read_params(
    files, views, batch: int, threads: int, epochs: int, verify: bool = False
) -> dict:
    names = [str(f) for f in files]
    n_batches = len(names) // batch

    def one_batch(key):
        epoch, position = key
        chunk = names[position * batch:(position + 1) * batch]
        widths, heights, encoded = [], [], []
        for path in chunk:
            buf = read_bytes(path)
            w, h = image_size(buf, path)
            if verify:
                verify_decodable(buf, path)
            encoded.append(np.frombuffer(buf, dtype=np.uint8))
            widths.append(w)
            heights.append(h)
        params = sample_view_params(views, (0, epoch, 1, position), batch, slice(0, batch),
                                    np.asarray(widths), np.asarray(heights))
        return encoded, list(params)

    keys = [(e, p) for e in range(epochs) for p in range(n_batches)]

    def work():
        if threads == 1:
            for k in keys:
                one_batch(k)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one_batch, keys))
    one_batch((0, 0))     # warm the page cache and numpy
    return _measure(work, len(keys) * batch)


def bench_dali(files, views, batch: int, threads: int, batches: int) -> dict:
    bufs = [Path(f).read_bytes() for f in files]
    sizes = [image_size(b, str(f)) for b, f in zip(bufs, files)]
    n_batches = len(bufs) // batch
    prepared = []
    for p in range(n_batches):
        enc = [np.frombuffer(b, dtype=np.uint8) for b in bufs[p * batch:(p + 1) * batch]]
        w = np.asarray([s[0] for s in sizes[p * batch:(p + 1) * batch]])
        h = np.asarray([s[1] for s in sizes[p * batch:(p + 1) * batch]])
        prepared.append((enc, list(sample_view_params(views, (0, 0, 1, p), batch,
                                                       slice(0, batch), w, h))))

    def source(info):
        return prepared[info.iteration % n_batches]

    pipe = build_train_pipeline(views, source, batch_size=batch, num_threads=threads,
                                device=torch.device("cpu"), seed=0, channels_last=False,
                                half=False, prefetch=2)
    pipe.run()     # warm-up (allocations)
    return _measure(lambda: [pipe.run() for _ in range(batches)], batches * batch)


def run(n_files: int, batch: int, threads: list[int], epochs: int, dali_batches: int,
        stages: list[str], log=print) -> list[dict]:
    files = generate_jpegs(CACHE, n_files)
    sizes = [f.stat().st_size for f in files]
    from PIL import Image
    dims = [Image.open(f).size for f in files[:100]]
    meta = {
        "files": len(files),
        "mean_kb": float(np.mean(sizes)) / 1e3,
        "mean_w": float(np.mean([d[0] for d in dims])),
        "mean_h": float(np.mean([d[1] for d in dims])),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "cores_per_gpu_default": cores_per_gpu(),
    }
    log(f"{meta['files']} JPEG files, mean {meta['mean_kb']:.0f} KB, {meta['mean_w']:.0f} x "
        f"{meta['mean_h']:.0f}; {meta['cores']} cores; load average {os.getloadavg()[0]:.2f}")
    records = []
    for recipe, views in recipes().items():
        for t in threads:
            for stage in stages:
                if stage == "read+params":
                    rec = bench_read_params(files, views, batch, t, epochs)
                elif stage == "verify":
                    rec = bench_read_params(files, views, batch, t, 1, verify=True)
                elif stage == "dali-cpu":
                    rec = bench_dali(files, views, batch, t, dali_batches)
                else:
                    raise ValueError(f"stage: unknown {stage!r}")
                rec.update(stage=stage, recipe=recipe, threads=t, batch=batch, **meta)
                records.append(rec)
                log(f"{recipe:16s} {stage:12s} threads {t}: {rec['img_s']:8.0f} img/s wall, "
                    f"{rec['cpu_us_per_image']:8.1f} us CPU/image = {rec['per_core_img_s']:8.0f} "
                    f"img/s per core (load {rec['load1']:.2f})")
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.input", description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", default=None,
                   help="comma-separated thread counts (default: 1 and the cores per GPU)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the files for read+params")
    p.add_argument("--dali-batches", type=int, default=6)
    p.add_argument("--stages", default="read+params,verify,dali-cpu")
    p.add_argument("--quick", action="store_true", help="few files and batches (smoke test)")
    p.add_argument("--out", type=Path, default=None, help="write results.jsonl and summary.md here")
    args = p.parse_args(argv)
    threads = ([int(t) for t in args.threads.split(",")] if args.threads
               else sorted({1, cores_per_gpu()}))
    if args.quick:
        args.files, args.batch, args.epochs, args.dali_batches = 32, 16, 1, 1
    records = run(args.files, args.batch, threads, args.epochs, args.dali_batches,
                  [s for s in args.stages.split(",") if s])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "results.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        (args.out / "summary.md").write_text(summary(records))
    return 0


def summary(records: list[dict]) -> str:
    lines = [
        "| recipe | stage | threads | img/s (wall) | CPU us / image | img/s per core | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['recipe']} | {r['stage']} | {r['threads']} | {r['img_s']:.0f} | "
            f"{r['cpu_us_per_image']:.1f} | {r['per_core_img_s']:.0f} | {r['load1']:.2f} |"
        )
    by = {(r["recipe"], r["stage"]): r for r in records if r["threads"] == 1}
    lines.append("")
    for recipe in sorted({r["recipe"] for r in records}):
        host, dali = by.get((recipe, "read+params")), by.get((recipe, "dali-cpu"))
        if host:
            lines.append(
                f"{recipe}: {TARGET_IMG_S:,} img/s need "
                f"{TARGET_IMG_S / host['per_core_img_s']:.1f} cores for read+params "
                f"({host['per_core_img_s']:.0f} img/s per core)"
                + (
                    f" and {TARGET_IMG_S / dali['per_core_img_s']:.0f} cores for CPU DALI "
                    f"decode+augment ({dali['per_core_img_s']:.0f} img/s per core)"
                    if dali
                    else ""
                )
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
