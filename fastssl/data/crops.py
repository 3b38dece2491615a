"""Augmentation recipes (lists of CropSpec) and the per-sample random parameters of a batch.

All randomness of an augmented batch is drawn here, in numpy, from a generator keyed by
(seed, epoch, global batch number); DALI only applies the drawn parameters. So a batch's views
depend on nothing but that key and the images: not on DALI's thread count, prefetch depth or RNG
state, and a run resumed mid-epoch reproduces the same augmentations bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CropSpec", "expand_views", "simclr_recipe", "byol_recipe", "sogclr_recipe",
           "multicrop_recipe", "recipe_for", "sample_view_params", "PARAM_FIELDS"]

# The order of the per-view parameter vector handed to the DALI graph.
PARAM_FIELDS = ("y0", "x0", "y1", "x1", "flip", "brightness", "contrast", "saturation", "hue",
                "blur", "sigma", "solarize")
_ATTEMPTS = 10                      # torchvision RandomResizedCrop tries 10 times
_RATIO = (3.0 / 4.0, 4.0 / 3.0)     # aspect-ratio range (width / height)
_SIGMA = (0.1, 2.0)                 # Gaussian blur sigma range (SimCLR/BYOL/SwAV)


@dataclass(frozen=True)
class CropSpec:
    """One kind of view: RandomResizedCrop(size, scale) -> flip -> colour jitter (p) ->
    grayscale (p) -> Gaussian blur (p) -> solarize (p) -> normalise; repeated ``count`` times.

    jitter = (brightness, contrast, saturation, hue) strengths as in torchvision's ColorJitter:
    factors ~ U[max(0, 1-s), 1+s], hue shift ~ U[-h, h] of a full turn.
    """
    size: int
    scale: tuple[float, float]
    count: int = 1
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size: expected a positive int, got {self.size!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count: expected a positive int, got {self.count!r}")
        try:
            lo, hi = (float(s) for s in self.scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale: expected (min, max), got {self.scale!r}") from None
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"scale: expected 0 < min <= max <= 1, got {self.scale!r}")
        object.__setattr__(self, "scale", (lo, hi))
        jit = tuple(float(j) for j in self.jitter)
        if len(jit) != 4 or min(jit) < 0 or jit[3] > 0.5:
            raise ValueError(f"jitter: expected 4 non-negative strengths (hue <= 0.5), "
                             f"got {self.jitter!r}")
        object.__setattr__(self, "jitter", jit)
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not (0.0 <= float(p) <= 1.0):
                raise ValueError(f"{name}: expected a probability in [0, 1], got {p!r}")
            object.__setattr__(self, name, float(p))


def expand_views(crops) -> list[CropSpec]:
    """The recipe as one CropSpec per output view, in output order."""
    if isinstance(crops, CropSpec):
        crops = [crops]
    crops = list(crops)
    if not crops or not all(isinstance(c, CropSpec) for c in crops):
        raise ValueError(f"crops: expected a non-empty list of CropSpec, got {crops!r}")
    return [c for c in crops for _ in range(c.count)]


# Recipes. Colour strengths: SimCLR/SwAV use ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), s = 1;
# BYOL / MoCo v3 / VICReg / SCE / DINO use (0.4, 0.4, 0.2, 0.1). Both with p = 0.8, gray p = 0.2.
_STRONG = (0.8, 0.8, 0.8, 0.2)
_BYOL = (0.4, 0.4, 0.2, 0.1)


def simclr_recipe(size: int = 224, scale=(0.08, 1.0)) -> list[CropSpec]:
    """SimCLR: two identical views, strong jitter, blur p = 0.5."""
    return [CropSpec(size, scale, 2, jitter=_STRONG, blur_p=0.5)]


def byol_recipe(size: int = 224, scale=(0.08, 1.0)) -> list[CropSpec]:
    """BYOL-style asymmetric pair (VICReg/SFRIK/AUH, SCE at scale 0.2, GroCo/DINO at 0.14):
    view 1 blur p = 1.0; view 2 blur p = 0.1 and solarize p = 0.2."""
    return [CropSpec(size, scale, 1, jitter=_BYOL, blur_p=1.0),
            CropSpec(size, scale, 1, jitter=_BYOL, blur_p=0.1, solarize_p=0.2)]


def sogclr_recipe(size: int = 224, scale=(0.08, 1.0)) -> list[CropSpec]:
    """SogCLR (MoCo-v3 codebase, both views): jitter (0.4, 0.4, 0.2, 0.1), blur p = 1.0."""
    return [CropSpec(size, scale, 2, jitter=_BYOL, blur_p=1.0)]


def multicrop_recipe(size: int = 224, small_size: int = 96, *, n_global: int = 2, n_local: int = 6,
                     global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), jitter=_STRONG,
                     blur_p: float = 0.5) -> list[CropSpec]:
    """SwAV multi-crop (2x224 at (0.14, 1) + 6x96 at (0.05, 0.14), blur p = 0.5 everywhere)."""
    return [CropSpec(size, global_scale, n_global, jitter=jitter, blur_p=blur_p),
            CropSpec(small_size, local_scale, n_local, jitter=jitter, blur_p=blur_p)]


def recipe_for(method: str, *, size: int = 224, small_size: int = 96,
               multicrop: bool | None = None, n_local: int = 6) -> list[CropSpec]:
    """The upstream augmentation of ``method`` at ``size`` (and ``small_size`` local crops).

    multicrop None: only SwAV uses local crops; True adds ``n_local`` local crops at
    (0.05, 0.14), blur p = 0.5, to any method (GroCo's multicrop configs).
    """
    method = str(method).lower()
    if method == "simclr":
        views = simclr_recipe(size)
    elif method in ("sfrik", "auh", "vicreg"):
        views = byol_recipe(size, (0.08, 1.0))
    elif method == "sce":
        views = byol_recipe(size, (0.2, 1.0))
    elif method == "groco":
        views = byol_recipe(size, (0.14, 1.0))
    elif method == "sogclr":
        views = sogclr_recipe(size)
    elif method == "swav":
        if multicrop is False:
            return [CropSpec(size, (0.14, 1.0), 2, jitter=_STRONG, blur_p=0.5)]
        return multicrop_recipe(size, small_size, n_local=n_local)
    else:
        raise ValueError(f"method: expected one of simclr, groco, sce, sogclr, sfrik, swav, auh, "
                         f"got {method!r}")
    if multicrop:
        jitter = views[0].jitter
        views = views + [CropSpec(small_size, (0.05, 0.14), n_local, jitter=jitter, blur_p=0.5)]
    return views


def _random_resized_crop(u_area, u_ratio, u_off, width, height, scale):
    """torchvision's RandomResizedCrop.get_params, vectorised over samples.

    u_area, u_ratio: (n, ATTEMPTS) uniforms; u_off: (n, 2); width/height: (n,) pixels.
    Returns integer boxes (top, left, height, width), each (n,).
    """
    area = (width * height).astype(np.float64)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    ratio = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = np.round(np.sqrt(target * ratio)).astype(np.int64)
    h = np.round(np.sqrt(target / ratio)).astype(np.int64)
    ok = (w > 0) & (h > 0) & (w <= width[:, None]) & (h <= height[:, None])
    first = np.argmax(ok, axis=1)
    rows = np.arange(len(width))
    cw, ch = w[rows, first], h[rows, first]
    # Fallback when no attempt fits: the central crop of the whole image, aspect clamped.
    none = ~ok.any(axis=1)
    if none.any():
        in_ratio = width / height
        fw = width.copy()
        fh = height.copy()
        narrow = in_ratio < _RATIO[0]
        wide = in_ratio > _RATIO[1]
        fh[narrow] = np.round(width[narrow] / _RATIO[0]).astype(np.int64)
        fw[wide] = np.round(height[wide] * _RATIO[1]).astype(np.int64)
        cw = np.where(none, np.minimum(fw, width), cw)
        ch = np.where(none, np.minimum(fh, height), ch)
    top = np.floor(u_off[:, 0] * (height - ch + 1)).astype(np.int64)
    left = np.floor(u_off[:, 1] * (width - cw + 1)).astype(np.int64)
    top = np.where(none, (height - ch) // 2, np.minimum(top, height - ch))
    left = np.where(none, (width - cw) // 2, np.minimum(left, width - cw))
    return top, left, ch, cw


# Uniform draws per view and sample: area x10, ratio x10, offset x2, flip, jitter-apply,
# 4 jitter factors, gray, blur-apply, sigma, solarize-apply.
_DRAWS = 2 * _ATTEMPTS + 2 + 1 + 1 + 4 + 1 + 1 + 1 + 1


def sample_view_params(views: list[CropSpec], key: tuple[int, ...], global_batch: int,
                       rows: slice, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """Augmentation parameters for ``rows`` of a global batch: float32 (n, V, len(PARAM_FIELDS)).

    The draws are made for the whole global batch from ``key`` and then sliced, so sample j of
    global batch b gets the same augmentation whatever the number of ranks it is split over.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))
    u = rng.random((global_batch, len(views), _DRAWS))[rows]
    n = u.shape[0]
    out = np.zeros((n, len(views), len(PARAM_FIELDS)), dtype=np.float32)
    width = np.asarray(width, dtype=np.int64)
    height = np.asarray(height, dtype=np.int64)
    for v, spec in enumerate(views):
        uv = u[:, v]
        a, r = uv[:, :_ATTEMPTS], uv[:, _ATTEMPTS:2 * _ATTEMPTS]
        c = 2 * _ATTEMPTS
        top, left, ch, cw = _random_resized_crop(a, r, uv[:, c:c + 2], width, height, spec.scale)
        c += 2
        out[:, v, 0], out[:, v, 1] = top, left
        out[:, v, 2], out[:, v, 3] = top + ch, left + cw
        out[:, v, 4] = uv[:, c] < spec.flip_p
        c += 1
        jitter_on = uv[:, c] < spec.jitter_p
        c += 1
        b, k, s, hue = spec.jitter
        f = uv[:, c:c + 4]
        c += 4
        brightness = max(0.0, 1 - b) + (1 + b - max(0.0, 1 - b)) * f[:, 0]
        contrast = max(0.0, 1 - k) + (1 + k - max(0.0, 1 - k)) * f[:, 1]
        saturation = max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * f[:, 2]
        hue_deg = (2 * f[:, 3] - 1) * hue * 360.0     # DALI's hue is in degrees
        out[:, v, 5] = np.where(jitter_on, brightness, 1.0)
        out[:, v, 6] = np.where(jitter_on, contrast, 1.0)
        sat = np.where(jitter_on, saturation, 1.0)
        # Grayscale after jitter == saturation 0 (DALI's hue rotation keeps luma).
        gray = uv[:, c] < spec.gray_p
        c += 1
        out[:, v, 7] = np.where(gray, 0.0, sat)
        out[:, v, 8] = np.where(jitter_on, hue_deg, 0.0)
        out[:, v, 9] = uv[:, c] < spec.blur_p
        c += 1
        out[:, v, 10] = _SIGMA[0] + (_SIGMA[1] - _SIGMA[0]) * uv[:, c]
        c += 1
        out[:, v, 11] = uv[:, c] < spec.solarize_p
    return out
