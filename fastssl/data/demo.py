"""A small generated ImageFolder dataset with real class structure, built once and cached.

Ten classes, each a shape or pattern (circle, square, triangle, star, cross, ring, stripes,
checkerboard, diamond, dots) drawn in a class-specific colour palette on a textured background,
with random position, scale, rotation, colour variation and pixel noise per image. Labels are
learnable from shape and colour but not from any single pixel statistic, so k-NN accuracy of
learned features rises well above chance (10 %) while random features stay low.
Images are 64x64 JPEGs: 50 train and 15 val per class. Generation is deterministic.
"""
from __future__ import annotations

import colorsys
import math
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # PIL (the dev extra) is imported where the images are drawn
    from PIL import Image

__all__ = ["demo_dataset", "DEMO_CLASSES", "DEMO_TRAIN_PER_CLASS", "DEMO_VAL_PER_CLASS"]

DEMO_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "stripes", "checker",
                "diamond", "dots")
DEMO_TRAIN_PER_CLASS = 50
DEMO_VAL_PER_CLASS = 15
_SIZE = 64
_SUPERSAMPLE = 2
_VERSION = 1
_MARKER = ".fastssl_demo_complete"
# Centre hue (turns) of each class's palette; neighbours overlap a little on purpose.
_HUES = (0.0, 0.08, 0.16, 0.30, 0.45, 0.55, 0.63, 0.72, 0.82, 0.92)


def _default_root() -> str:
    base = os.environ.get("FASTSSL_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastssl")
    return os.path.join(base, "demo")


def _marker_text() -> str:
    return (f"fastssl demo dataset v{_VERSION}: {len(DEMO_CLASSES)} classes, "
            f"{DEMO_TRAIN_PER_CLASS} train + {DEMO_VAL_PER_CLASS} val per class, {_SIZE}px\n")


def _rgb(h, s, v):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _polygon(cx, cy, radius, sides, angle, inner=None):
    pts = []
    n = sides * (2 if inner else 1)
    for k in range(n):
        r = radius if (inner is None or k % 2 == 0) else radius * inner
        a = angle + 2 * math.pi * k / n
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw_class(draw, cls: str, rng, S: int, fg, fg2):
    scale = rng.uniform(0.22, 0.40) * S
    cx = rng.uniform(scale, S - scale)
    cy = rng.uniform(scale, S - scale)
    angle = rng.uniform(0, 2 * math.pi)
    if cls == "circle":
        draw.ellipse([cx - scale, cy - scale, cx + scale, cy + scale], fill=fg)
    elif cls == "square":
        draw.polygon(_polygon(cx, cy, scale * 1.2, 4, angle), fill=fg)
    elif cls == "triangle":
        draw.polygon(_polygon(cx, cy, scale * 1.3, 3, angle), fill=fg)
    elif cls == "star":
        draw.polygon(_polygon(cx, cy, scale * 1.3, 5, angle, inner=0.45), fill=fg)
    elif cls == "cross":
        w = scale * 0.35
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            L = scale * 1.3
            draw.polygon(
                [
                    (cx - dx * L + px, cy - dy * L + py),
                    (cx + dx * L + px, cy + dy * L + py),
                    (cx + dx * L - px, cy + dy * L - py),
                    (cx - dx * L - px, cy - dy * L - py),
                ],
                fill=fg,
            )
    elif cls == "ring":
        draw.ellipse([cx - scale, cy - scale, cx + scale, cy + scale], fill=fg)
        r = scale * rng.uniform(0.45, 0.6)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg2)
    elif cls == "stripes":
        period = rng.uniform(0.12, 0.2) * S
        dx, dy = math.cos(angle), math.sin(angle)
        for k in range(-12, 13):
            ox, oy = cx + dx * k * period, cy + dy * k * period
            w = period * 0.25
            draw.polygon([(ox - dy * 2 * S + dx * w, oy + dx * 2 * S + dy * w),
                          (ox + dy * 2 * S + dx * w, oy - dx * 2 * S + dy * w),
                          (ox + dy * 2 * S - dx * w, oy - dx * 2 * S - dy * w),
                          (ox - dy * 2 * S - dx * w, oy + dx * 2 * S - dy * w)], fill=fg)
    elif cls == "checker":
        cell = rng.uniform(0.12, 0.22) * S
        ox, oy = rng.uniform(0, cell, size=2)
        n = int(S / cell) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                if (i + j) % 2 == 0:
                    x0, y0 = ox + i * cell, oy + j * cell
                    draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=fg)
    elif cls == "diamond":
        draw.polygon(_polygon(cx, cy, scale * 1.3, 4, angle, inner=0.5), fill=fg)
    elif cls == "dots":
        r = rng.uniform(0.04, 0.07) * S
        step = rng.uniform(0.18, 0.26) * S
        ox, oy = rng.uniform(0, step, size=2)
        n = int(S / step) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                x0, y0 = ox + i * step, oy + j * step
                draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=fg)
    else:  # pragma: no cover - DEMO_CLASSES is fixed
        raise ValueError(cls)


def _make_image(class_id: int, rng) -> Image.Image:
    from PIL import Image, ImageDraw
    S = _SIZE * _SUPERSAMPLE
    hue = _HUES[class_id] + rng.uniform(-0.05, 0.05)
    fg = _rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    fg2 = _rgb(hue + 0.5, rng.uniform(0.1, 0.4), rng.uniform(0.2, 0.6))
    # Background: a random low-saturation colour with a smooth gradient and blotchy texture.
    bg = np.array(
        _rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.35), rng.uniform(0.15, 0.85)), np.float32
    )
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    g = rng.uniform(-40, 40, size=2)
    coarse = rng.normal(0, 18, size=(8, 8, 3)).astype(np.float32)
    coarse = np.kron(coarse, np.ones((S // 8, S // 8, 1), np.float32))
    base = bg + (g[0] * (xx - 0.5) + g[1] * (yy - 0.5))[..., None] + coarse
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    _draw_class(ImageDraw.Draw(img), DEMO_CLASSES[class_id], rng, S, fg, fg2)
    img = img.resize((_SIZE, _SIZE), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, size=(_SIZE, _SIZE, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _build(target: str) -> None:
    for split_id, (split, per_class) in enumerate((("train", DEMO_TRAIN_PER_CLASS),
                                                   ("val", DEMO_VAL_PER_CLASS))):
        for class_id, cls in enumerate(DEMO_CLASSES):
            d = os.path.join(target, split, cls)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([_VERSION, split_id, class_id, i])
                _make_image(class_id, rng).save(os.path.join(d, f"{cls}_{i:03d}.jpg"),
                                                format="JPEG", quality=90)
    with open(os.path.join(target, _MARKER), "w") as f:
        f.write(_marker_text())


def _is_complete(root: str) -> bool:
    try:
        with open(os.path.join(root, _MARKER)) as f:
            return f.read() == _marker_text()
    except OSError:
        return False


def demo_dataset(root: str | None = None) -> str:
    """Path of the demo ImageFolder root (``train/<class>/*.jpg``, ``val/<class>/*.jpg``).

    Built on first use under ``root`` (default ``$FASTSSL_DATA_CACHE/demo`` or
    ``~/.cache/fastssl/demo``) in a temporary sibling directory that is renamed into place, so a
    crash or a concurrent build never leaves a half-written dataset; later calls only check the
    marker file.
    """
    root = os.path.abspath(os.fspath(root) if root is not None else _default_root())
    if _is_complete(root):
        return root
    if os.path.exists(root):
        if not os.path.exists(os.path.join(root, _MARKER)) and os.listdir(root):
            raise ValueError(f"root: {root} exists, is not empty and is not a fastssl demo "
                             f"dataset; pass another root")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-build-", dir=parent)
    try:
        _build(tmp)
        if os.path.exists(root):
            # An empty directory or an older version of the demo set (ours, per its marker).
            stale = tempfile.mkdtemp(prefix=".demo-stale-", dir=parent)
            os.rename(root, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root):   # lost a race to a builder that also failed
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return root
