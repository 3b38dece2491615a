"""DALI pipeline graphs for training views and evaluation crops, and a runner around them.

The graphs take encoded images and per-sample augmentation parameters from ``fn.external_source``
(see crops.sample_view_params) and only apply them: decode once per image (``mixed`` = nvJPEG on
GPU, ``cpu`` otherwise), then per view: crop-and-resize of the drawn box (``fn.resize`` with an
ROI), colour twist (jitter and grayscale), Gaussian blur and solarize under per-sample
conditionals, flip + normalise + layout in ``fn.crop_mirror_normalize``. A CPU pipeline has
``device_id=None`` and no GPU operator, so it runs on machines without CUDA.
"""
from __future__ import annotations

import importlib.util

import torch

__all__ = ["dali_available", "build_train_pipeline", "build_eval_pipeline", "DaliRunner",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def _pipeline_kwargs(batch_size, num_threads, device, seed, prefetch):
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    else:
        device_id = None    # CPU-only: DALI then needs neither CUDA nor a GPU driver
    return dict(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                seed=seed, prefetch_queue_depth=prefetch)


def _normalize_args(channels_last: bool, half: bool):
    from nvidia.dali import types
    return dict(dtype=types.FLOAT16 if half else types.FLOAT,
                output_layout="HWC" if channels_last else "CHW",
                mean=[m * 255.0 for m in IMAGENET_MEAN], std=[s * 255.0 for s in IMAGENET_STD])


def build_train_pipeline(views, source, *, batch_size: int, num_threads: int, device: torch.device,
                         seed: int, channels_last: bool, half: bool, prefetch: int = 2):
    """A built pipeline whose outputs are the views, in order. ``source(batch_info)`` returns
    (list of encoded uint8 arrays, list of float32 (V, 12) parameter arrays) per batch."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    norm = _normalize_args(channels_last, half)

    @pipeline_def(enable_conditionals=True)
    def graph():
        encoded, params = fn.external_source(source=source, num_outputs=2, batch=True,
                                             batch_info=True, dtype=[types.UINT8, types.FLOAT],
                                             ndim=[1, 2])
        # EXIF orientation is ignored, as PIL/torchvision do, so header sizes match the pixels.
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                   output_type=types.RGB, adjust_orientation=False)
        outputs = []
        for v, spec in enumerate(views):
            x = fn.resize(images, size=[spec.size, spec.size], roi_start=params[v, 0:2],
                          roi_end=params[v, 2:4], roi_relative=False,
                          interp_type=types.INTERP_LINEAR, antialias=True)
            if spec.jitter_p > 0 or spec.gray_p > 0:
                x = fn.color_twist(x, brightness=params[v, 5], contrast=params[v, 6],
                                   saturation=params[v, 7], hue=params[v, 8])
            if spec.blur_p >= 1.0:
                x = fn.gaussian_blur(x, sigma=params[v, 10])
            elif spec.blur_p > 0:
                if params[v, 9] > 0.5:
                    x = fn.gaussian_blur(x, sigma=params[v, 10])
            if spec.solarize_p > 0:
                if params[v, 11] > 0.5:
                    # For uint8, 255 - x == x ^ 255: invert the pixels >= 128.
                    mask = fn.cast(x >= 128, dtype=types.UINT8) * types.Constant(
                        255, dtype=types.UINT8
                    )
                    x = x ^ mask
            mirror = fn.cast(params[v, 4], dtype=types.INT32) if spec.flip_p > 0 else 0
            outputs.append(fn.crop_mirror_normalize(x, mirror=mirror, **norm))
        return tuple(outputs)

    pipe = graph(**_pipeline_kwargs(batch_size, num_threads, device, seed, prefetch))
    pipe.build()
    return pipe


def build_eval_pipeline(source, *, size: int, batch_size: int, num_threads: int,
                        device: torch.device, channels_last: bool, prefetch: int = 2):
    """Resize the shorter side to round(size / 0.875), centre-crop size x size, normalise."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    norm = _normalize_args(channels_last, False)
    resize_to = int(round(size / 0.875))

    @pipeline_def
    def graph():
        encoded = fn.external_source(source=source, batch=True, batch_info=True,
                                     dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                   output_type=types.RGB, adjust_orientation=False)
        images = fn.resize(images, resize_shorter=resize_to, interp_type=types.INTERP_LINEAR,
                           antialias=True)
        return fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=0.5,
                                        crop_pos_y=0.5, **norm)

    pipe = graph(**_pipeline_kwargs(batch_size, num_threads, device, 0, prefetch))
    pipe.build()
    return pipe


def to_torch(tensor_list, device: torch.device, channels_last: bool, dtype: torch.dtype):
    """Copy one DALI output batch into a new (B, 3, H, W) torch tensor on ``device``."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    if device.type == "cuda":
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    else:
        feed_ndarray(dense, out)
    if channels_last:
        out = out.permute(0, 3, 1, 2)     # NCHW shape, channels_last strides, no copy
    if out.dtype != dtype:
        out = out.to(dtype)
    return out


class DaliRunner:
    """Owns one pipeline across epochs. A pipeline that ran an epoch to its end is reset and
    reused; one left mid-epoch (an abandoned iterator, an error) still holds prefetched batches,
    so it is rebuilt before the next epoch."""

    def __init__(self, build):
        self._build = build
        self._pipe = None
        self._clean = False

    def start(self):
        if self._pipe is not None and not self._clean:
            self._pipe = None
        if self._pipe is None:
            self._pipe = self._build()
        self._clean = False
        return self._pipe

    def finished(self):
        """The epoch's StopIteration was seen: reset for the next epoch."""
        self._pipe.reset()
        self._clean = True

    def abandon(self):
        self._clean = False
