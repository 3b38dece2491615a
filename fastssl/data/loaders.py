"""Training and evaluation loaders (DALI, or synthetic tensors for throughput measurement).

Reading order. Epoch e's order is a permutation of the whole dataset drawn from (seed, e); it is
cut into global batches of ``batch_size * world_size`` samples (the incomplete tail is dropped)
and rank r takes rows [r*B, (r+1)*B) of each global batch, so the ranks partition every global
batch and all see the same number of iterations. The loader's state is (epoch, position), the
number of global batches already handed out in the epoch; augmentations are keyed by
(seed, epoch, global batch), so a loader restored from a state_dict yields exactly the batches,
bit for bit, that the original would have yielded next.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from fastssl.data.crops import CropSpec, expand_views, sample_view_params
from fastssl.data.dali import (
    DaliRunner,
    build_eval_pipeline,
    build_train_pipeline,
    dali_available,
    to_torch,
)
from fastssl.data.demo import demo_dataset
from fastssl.data.folder import (CorruptImageError, ImageFolderIndex, SkippedFiles,
                                 find_undecodable, image_size, read_bytes, resolve_root,
                                 scan_image_folder, verify_decodable)

__all__ = ["Batch", "TrainLoader", "DaliTrainLoader", "SyntheticTrainLoader", "EvalLoader",
           "build_train_loader", "build_eval_loader", "IMAGENET_TRAIN_SIZE"]

IMAGENET_TRAIN_SIZE = 1_281_167
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Batch(NamedTuple):
    views: list          # list of (B, 3, H, W) float tensors on the loader's device
    labels: torch.Tensor  # (B,) int64 class labels
    index: torch.Tensor | None  # (B,) int64 global sample indices (None if return_index=False)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected a cpu or cuda device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested but CUDA is not available")
    return device


def _resolve_data(data, split):
    if isinstance(data, str) and data == "demo":
        data = demo_dataset()
    return resolve_root(data, split)


def _read_batch(files):
    """Encoded arrays and (width, height) of each file; CorruptImageError names a bad file."""
    encoded, widths, heights = [], [], []
    for f in files:
        buf = read_bytes(f)
        w, h = image_size(buf, f)
        encoded.append(np.frombuffer(buf, dtype=np.uint8))
        widths.append(w)
        heights.append(h)
    return encoded, np.asarray(widths, np.int64), np.asarray(heights, np.int64)


def _decode_error(err: Exception, files) -> Exception:
    """Turn a DALI decoder error into one naming the file (DALI does not say which sample)."""
    bad = find_undecodable(files)
    text = " ".join(str(err).split()) or type(err).__name__
    first_line = text if len(text) <= 240 else text[:240] + "..."
    if bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return CorruptImageError(path, f"{reason}{more}; DALI: {first_line}")
    shown = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
    return RuntimeError(f"DALI pipeline failed on a batch of {len(files)} files ({shown}): {err}")


class _ReadAhead:
    """Reads (and prepares) the next few batches in background threads.

    DALI calls its external source on the training thread, inside ``pipe.run()``; reading a
    batch's files there would put file-system latency on the critical path of every step.
    File reads release the GIL, so a few threads overlap them with the step. Results depend only
    on the key, never on timing, so determinism is unaffected.
    """

    def __init__(self, prepare, depth: int = 4, workers: int = 4):
        self.prepare, self.depth, self.workers = prepare, depth, workers
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict = {}

    def get(self, key, upcoming):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fastssl-read")
        for k in upcoming:
            if k not in self._futures:
                self._futures[k] = self._pool.submit(self.prepare, k)
        future = self._futures.pop(key, None)
        if future is None:
            return self.prepare(key)
        return future.result()

    def clear(self):
        for f in self._futures.values():
            f.cancel()
        self._futures = {}


class TrainLoader:
    """Epoch/position bookkeeping shared by the DALI and the synthetic loader."""

    def __init__(self, *, num_samples: int, labels: np.ndarray | None, crops, batch_size: int,
                 device, rank: int, world_size: int, seed: int, channels_last: bool,
                 dtype: torch.dtype, return_index: bool, num_classes: int):
        self.views = expand_views(crops)
        self.crops = list(crops) if not isinstance(crops, CropSpec) else [crops]
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.seed = _check_int("seed", seed, 0)
        if dtype not in _OUT_DTYPES:
            raise ValueError(f"dtype: expected one of {_OUT_DTYPES}, got {dtype}")
        self.dtype = dtype
        self.device = _resolve_device(device)
        self.channels_last = bool(channels_last)
        self.return_index = bool(return_index)
        self.num_samples = int(num_samples)
        self.num_classes = int(num_classes)
        self._labels = labels
        self.global_batch = self.batch_size * self.world_size
        if self.num_samples < self.global_batch:
            raise ValueError(f"batch_size: batch_size * world_size = {self.global_batch} exceeds "
                             f"the dataset size {self.num_samples}; no full batch per epoch")
        self.epoch = 0
        self.position = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._iter_token = 0

    def __len__(self) -> int:
        """Iterations per epoch (drop_last, the same on every rank)."""
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order. Selecting the current epoch keeps the position, so
        ``load_state_dict`` followed by ``set_epoch(same epoch)`` resumes mid-epoch."""
        epoch = _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "global_batch": self.global_batch, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch", "num_samples"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"state: {key}={state[key]} in the saved loader state, but this "
                                 f"loader has {key}={getattr(self, key)}; an exact resume needs "
                                 f"the same seed, dataset and global batch size")
        self.epoch = _check_int("state['epoch']", state["epoch"], 0)
        self.position = _check_int("state['position']", state["position"], 0)
        if self.position > len(self):
            raise ValueError(f"state: position {self.position} is beyond the epoch's "
                             f"{len(self)} iterations")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global permutation of sample indices of ``epoch`` (identical on every rank)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            seq = np.random.SeedSequence([self.seed, epoch, _ORDER_STREAM])
            perm = np.random.Generator(np.random.PCG64(seq)).permutation(self.num_samples)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def batch_indices(self, epoch: int, position: int) -> np.ndarray:
        """This rank's sample indices in global batch ``position`` of ``epoch``."""
        start = position * self.global_batch + self.rank * self.batch_size
        return self.epoch_order(epoch)[start:start + self.batch_size]

    def _start_position(self) -> int:
        # A partly consumed epoch resumes; a finished (or fresh) one starts over.
        return self.position if 0 < self.position < len(self) else 0

    def _meta(self, idx: np.ndarray):
        index = torch.from_numpy(idx.astype(np.int64))
        labels = (
            torch.from_numpy(self._labels[idx])
            if self._labels is not None
            else index % self.num_classes
        )
        labels = labels.to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True) if self.return_index else None
        return labels, index


class DaliTrainLoader(TrainLoader):
    """Multi-view augmented batches decoded and augmented by DALI (CPU or GPU)."""

    def __init__(self, folder: ImageFolderIndex, crops, batch_size: int, *, device, rank: int,
                 world_size: int, seed: int, num_threads: int, channels_last: bool,
                 dtype: torch.dtype, return_index: bool, prefetch: int = 2, read_ahead: int = 4,
                 skip_corrupt: bool = False, log=None, skipped: SkippedFiles | None = None):
        super().__init__(num_samples=len(folder), labels=folder.labels, crops=crops,
                         batch_size=batch_size, device=device, rank=rank, world_size=world_size,
                         seed=seed, channels_last=channels_last, dtype=dtype,
                         return_index=return_index, num_classes=len(folder.classes))
        self.folder = folder
        self.classes = folder.classes
        # an unreadable image (bad header, or scan data PIL cannot decode) raises, or with
        # skip_corrupt is reported once (in `skipped`, the run's list shared with its other
        # loaders, else through `log`) and replaced by the next readable file
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped = skipped if skipped is not None else SkippedFiles(log)
        self._verified: set[int] = set()
        self._lock = threading.Lock()
        self.num_threads = _check_int("num_threads", num_threads, 1)
        self._run_epoch = 0
        self._run_start = 0
        half = dtype == torch.float16
        self._runner = DaliRunner(lambda: build_train_pipeline(
            self.views, self._source, batch_size=self.batch_size, num_threads=self.num_threads,
            device=self.device, seed=self.seed, channels_last=self.channels_last, half=half,
            prefetch=prefetch))
        self._prefetch = prefetch
        self._read_ahead = _ReadAhead(self._prepare, depth=max(read_ahead, prefetch + 1))

    def _files(self, epoch, position):
        return [self.folder.files[i] for i in self.batch_indices(epoch, position)]

    def _read_checked(self, i: int):
        """(encoded, width, height) of file i; CorruptImageError naming it if it cannot be read or
        fully decoded. The decode check runs once per file and run (in the read-ahead threads):
        the DALI decoder decodes corrupt scan data with a libjpeg warning that names no file."""
        path = self.folder.files[i]
        buf = read_bytes(path)
        w, h = image_size(buf, path)
        if i not in self._verified:
            verify_decodable(buf, path)
            with self._lock:
                self._verified.add(i)
        return np.frombuffer(buf, dtype=np.uint8), w, h

    def _readable(self, i: int):
        """_read_checked, or None (reported once) for an unreadable file under skip_corrupt."""
        path = self.folder.files[i]
        if path in self.skipped:
            return None
        try:
            return self._read_checked(i)
        except CorruptImageError as e:
            if not self.skip_corrupt:
                raise
            self.skipped.add(path, e.reason)
            return None

    def _read_batch_checked(self, indices):
        """Encoded images and sizes of a batch; under skip_corrupt an unreadable file is replaced
        by the next readable one of the folder (the sample keeps its index and label)."""
        encoded, widths, heights = [], [], []
        n = len(self.folder.files)
        for i in indices:
            for j in range(n if self.skip_corrupt else 1):
                got = self._readable((int(i) + j) % n)
                if got is not None:
                    break
            else:
                raise CorruptImageError(self.folder.files[int(i)], "no readable image left to use")
            encoded.append(got[0])
            widths.append(got[1])
            heights.append(got[2])
        return encoded, np.asarray(widths, np.int64), np.asarray(heights, np.int64)

    def _prepare(self, key):
        """Encoded images and augmentation parameters of global batch
        ``key = (epoch, position)``."""
        epoch, position = key
        encoded, widths, heights = self._read_batch_checked(self.batch_indices(epoch, position))
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        params = sample_view_params(self.views, (self.seed, epoch, _AUGMENT_STREAM, position),
                                    self.global_batch, rows, widths, heights)
        return encoded, list(params)

    def _source(self, info):
        """DALI's external source: batch ``info.iteration`` of the current run."""
        position = self._run_start + info.iteration
        if position >= len(self):
            raise StopIteration
        epoch = self._run_epoch
        upcoming = [
            (epoch, p) for p in range(position, min(position + self._read_ahead.depth, len(self)))
        ]
        return self._read_ahead.get((epoch, position), upcoming)

    def __iter__(self):
        self._iter_token += 1
        token = self._iter_token
        epoch, start = self.epoch, self._start_position()
        self.position = start
        self._run_epoch, self._run_start = epoch, start
        self.epoch_order(epoch)    # computed once here, not concurrently by the reader threads
        self._read_ahead.clear()
        pipe = self._runner.start()
        for position in range(start, len(self) + 1):
            if token != self._iter_token:
                raise RuntimeError("loader: a newer iteration over this loader was started")
            try:
                outputs = pipe.run()
            except StopIteration:
                self._runner.finished()
                return
            except CorruptImageError:
                self._runner.abandon()
                raise
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError for decode failures
                self._runner.abandon()
                files = [f for p in range(position, min(position + self._prefetch + 1, len(self)))
                         for f in self._files(epoch, p)]
                raise _decode_error(e, files) from e
            views = [to_torch(o, self.device, self.channels_last, self.dtype) for o in outputs]
            labels, index = self._meta(self.batch_indices(epoch, position))
            self.position = position + 1
            try:
                yield Batch(views, labels, index)
            except GeneratorExit:
                self._runner.abandon()
                raise
        # Unreachable unless the source and the position count disagree.
        self._runner.abandon()
        raise RuntimeError("loader: DALI produced more batches than the epoch holds")


class SyntheticTrainLoader(TrainLoader):
    """Fixed random views of the recipe's shapes, already on the device: the model/loss
    throughput without any data cost. Labels and indices follow the real epoch order."""

    def __init__(self, crops, batch_size: int, *, device, rank: int, world_size: int, seed: int,
                 channels_last: bool, dtype: torch.dtype, return_index: bool,
                 dataset_size: int | None, num_classes: int = 1000):
        n = (
            IMAGENET_TRAIN_SIZE
            if dataset_size is None
            else _check_int("dataset_size", dataset_size, 1)
        )
        super().__init__(num_samples=n, labels=None, crops=crops, batch_size=batch_size,
                         device=device, rank=rank, world_size=world_size, seed=seed,
                         channels_last=channels_last, dtype=dtype, return_index=return_index,
                         num_classes=num_classes)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank)
        self._fixed_views = []
        for spec in self.views:
            x = torch.randn(self.batch_size, 3, spec.size, spec.size, generator=gen)
            x = x.to(device=self.device, dtype=self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._fixed_views.append(x)

    def __iter__(self):
        self._iter_token += 1
        token = self._iter_token
        epoch, start = self.epoch, self._start_position()
        self.position = start
        for position in range(start, len(self)):
            if token != self._iter_token:
                raise RuntimeError("loader: a newer iteration over this loader was started")
            labels, index = self._meta(self.batch_indices(epoch, position))
            self.position = position + 1
            yield Batch(list(self._fixed_views), labels, index)


def cores_per_process(local_world_size: int | None = None) -> int:
    """CPU cores this process may use (its affinity) shared among the processes of its node
    (LOCAL_WORLD_SIZE under torchrun: one per GPU)."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local))


def default_num_threads(device, local_world_size: int | None = None) -> int:
    """DALI threads per process: on GPU the host only reads files and draws parameters (about
    50 us of CPU per image, bench/input.py), so a few threads keep up; on CPU DALI decodes and
    augments on the host, so it gets every core of the process's share."""
    share = cores_per_process(local_world_size)
    return min(share, 4) if _resolve_device(device).type == "cuda" else share


def build_train_loader(
    data,
    crops,
    batch_size: int,
    *,
    backend: str = "auto",
    device=None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_threads: int | None = None,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    return_index: bool = True,
    dataset_size: int | None = None,
    skip_corrupt: bool = False,
    log=None,
    skipped: SkippedFiles | None = None,
) -> TrainLoader:
    """A TrainLoader over ``data`` (an ImageFolder root, "DIR/train" if present, or "demo").

    backend: "dali", "synthetic" (``data`` is then ignored; ``dataset_size`` samples, ImageNet's
    1,281,167 by default) or "auto" (DALI; an error if it is not installed).
    num_threads: DALI threads; None derives them from the cores per process
    (:func:`default_num_threads`).
    DALI: each file is decode-checked once per loader; an unreadable one raises CorruptImageError
    naming it, or with skip_corrupt is replaced by the next readable file and reported once
    through ``log`` (default: a warning on stderr), or in ``skipped`` (a
    :class:`~fastssl.data.folder.SkippedFiles` shared with the run's other loaders).
    """
    if backend not in ("auto", "dali", "synthetic"):
        raise ValueError(f"backend: expected 'auto', 'dali' or 'synthetic', got {backend!r}")
    expand_views(crops)
    if backend == "synthetic":
        return SyntheticTrainLoader(crops, batch_size, device=device, rank=rank,
                                    world_size=world_size, seed=seed, channels_last=channels_last,
                                    dtype=dtype, return_index=return_index,
                                    dataset_size=dataset_size)
    if dataset_size is not None:
        raise ValueError("dataset_size: only meaningful for backend='synthetic'")
    if num_threads is None:
        num_threads = default_num_threads(device)
    if not dali_available():
        raise RuntimeError("backend: DALI is not installed (pip install nvidia-dali-cuda130); "
                           "use backend='synthetic' for throughput runs without data")
    folder = scan_image_folder(_resolve_data(data, None))
    return DaliTrainLoader(folder, crops, batch_size, device=device, rank=rank,
                           world_size=world_size, seed=seed, num_threads=num_threads,
                           channels_last=channels_last, dtype=dtype, return_index=return_index,
                           skip_corrupt=skip_corrupt, log=log, skipped=skipped)


class EvalLoader:
    """(images, labels) batches of one split in a fixed order: resize, centre crop, normalise.

    With world_size > 1 rank r reads the r-th of world_size contiguous chunks of the split
    (``indices``); every sample is read by exactly one rank and the last batch may be short.
    ``subset`` (sorted sample indices of the split) restricts the loader to those samples: only
    they are read and decoded (the online k-NN monitor's bank and queries).

    skip_corrupt: an unreadable image (bad header, or data PIL cannot decode: checked once per
    file and loader) is left out of its batch, image and label, and reported once in
    ``skipped`` (the run's :class:`~fastssl.data.folder.SkippedFiles`; a new one through
    ``log`` if None); without it, CorruptImageError names the file.
    """

    def __init__(self, folder: ImageFolderIndex, batch_size: int, *, size: int, device, rank: int,
                 world_size: int, num_threads: int, channels_last: bool = False, prefetch: int = 2,
                 read_ahead: int = 4, subset=None, skip_corrupt: bool = False,
                 skipped: SkippedFiles | None = None, log=None):
        self.folder = folder
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.size = _check_int("size", size, 1)
        world_size = _check_int("world_size", world_size, 1)
        rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.device = _resolve_device(device)
        self.channels_last = bool(channels_last)
        self.split_size = len(folder)
        chosen = np.arange(len(folder)) if subset is None else np.asarray(subset, dtype=np.int64)
        if chosen.ndim != 1 or (chosen.size and (chosen.min() < 0 or chosen.max() >= len(folder))):
            raise ValueError(f"subset: expected a 1-D array of sample indices in "
                             f"[0, {len(folder)}), got {chosen.shape} values")
        self.num_samples = int(chosen.size)    # what the loader yields, over all ranks
        self.num_classes = len(folder.classes)
        self.classes = folder.classes
        self.indices = np.array_split(chosen, world_size)[rank]
        self.labels = torch.from_numpy(folder.labels[self.indices])
        self._num_threads = _check_int("num_threads", num_threads, 1)
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped = skipped if skipped is not None else SkippedFiles(log)
        self._verified: set[int] = set()
        self._kept: dict[int, np.ndarray] = {}    # batch -> its readable samples (skip_corrupt)
        self._prefetch = prefetch
        self._read_ahead = _ReadAhead(self._prepare, depth=max(read_ahead, prefetch + 1))
        self._runner = DaliRunner(lambda: build_eval_pipeline(
            self._source, size=self.size, batch_size=self.batch_size,
            num_threads=self._num_threads, device=self.device,
            channels_last=self.channels_last, prefetch=prefetch))

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def _batch(self, i):
        return self.indices[i * self.batch_size:(i + 1) * self.batch_size]

    def _prepare(self, i):
        if not self.skip_corrupt:
            return _read_batch([self.folder.files[j] for j in self._batch(i)])[0]
        encoded, kept = [], []
        for j in self._batch(i):
            got = self._readable(int(j))
            if got is not None:
                encoded.append(got)
                kept.append(j)
        if not kept:
            first = self.folder.files[int(self._batch(i)[0])]
            raise CorruptImageError(first, f"every image of its batch of {len(self._batch(i))} "
                                           f"is unreadable")
        self._kept[i] = np.asarray(kept, dtype=np.int64)
        return encoded

    def _readable(self, j: int):
        """The encoded bytes of sample j, or None (recorded in `skipped`) when unreadable. The
        decode check runs once per file and loader: the DALI decoder does not name the file."""
        path = self.folder.files[j]
        if path in self.skipped:
            return None
        try:
            buf = read_bytes(path)
            image_size(buf, path)
            if j not in self._verified:
                verify_decodable(buf, path)
                self._verified.add(j)
        except CorruptImageError as e:
            self.skipped.add(path, e.reason)
            return None
        return np.frombuffer(buf, dtype=np.uint8)

    def _labels(self, i):
        rows = self._kept.pop(i) if self.skip_corrupt else self._batch(i)
        return torch.from_numpy(self.folder.labels[rows])

    def _source(self, info):
        i = info.iteration
        if i >= len(self):
            raise StopIteration
        return self._read_ahead.get(i, range(i, min(i + self._read_ahead.depth, len(self))))

    def __iter__(self):
        if len(self) == 0:
            return
        self._read_ahead.clear()
        pipe = self._runner.start()
        for i in range(len(self) + 1):
            try:
                (out,) = pipe.run()
            except StopIteration:
                self._runner.finished()
                return
            except CorruptImageError:
                self._runner.abandon()
                raise
            except Exception as e:  # noqa: BLE001
                self._runner.abandon()
                files = [
                    self.folder.files[j]
                    for k in range(i, min(i + self._prefetch + 1, len(self)))
                    for j in self._batch(k)
                ]
                raise _decode_error(e, files) from e
            images = to_torch(out, self.device, self.channels_last, torch.float32)
            labels = self._labels(i).to(self.device, non_blocking=True)
            try:
                yield images, labels
            except GeneratorExit:
                self._runner.abandon()
                raise
        self._runner.abandon()
        raise RuntimeError("loader: DALI produced more batches than the split holds")


def spread_subset(n: int, count: int) -> np.ndarray:
    """`count` distinct indices of range(n) spread evenly (every class of a class-sorted split
    gets its share); all of range(n) when count >= n."""
    if count >= n:
        return np.arange(n)
    return np.arange(count, dtype=np.int64) * n // count


def build_eval_loader(data, split: str, batch_size: int, *, size: int = 224, device=None,
                      rank: int = 0, world_size: int = 1, num_threads: int = 2,
                      channels_last: bool = False, max_samples: int | None = None,
                      skip_corrupt: bool = False, skipped: SkippedFiles | None = None,
                      log=None) -> EvalLoader:
    """Fixed-order loader of ``data/split`` ("train" or "val"; "demo" for the demo dataset).

    max_samples: read only that many samples, spread evenly over the split (the others are
    neither read nor decoded). skip_corrupt, skipped, log: see :class:`EvalLoader`."""
    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    if max_samples is not None:
        _check_int("max_samples", max_samples, 1)
    if not dali_available():
        raise RuntimeError("DALI is not installed (pip install nvidia-dali-cuda130)")
    folder = scan_image_folder(_resolve_data(data, split))
    subset = None if max_samples is None else spread_subset(len(folder), max_samples)
    return EvalLoader(folder, batch_size, size=size, device=device, rank=rank,
                      world_size=world_size, num_threads=num_threads, channels_last=channels_last,
                      subset=subset, skip_corrupt=skip_corrupt, skipped=skipped, log=log)
