"""ImageFolder scanning, file reading, cheap header validation and corrupt-file reporting."""
from __future__ import annotations

import io
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

__all__ = ["IMG_EXTENSIONS", "ImageFolderIndex", "CorruptImageError", "SkippedFiles",
           "scan_image_folder", "resolve_root", "read_bytes", "image_size", "find_undecodable"]

# torchvision's IMG_EXTENSIONS; DALI decodes all of them.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# JPEG start-of-frame markers (baseline, progressive, lossless, ...); C4/C8/CC are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class CorruptImageError(RuntimeError):
    """An image file that cannot be read or decoded; ``.path`` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"corrupt or unreadable image {path}: {reason}")
        self.path = path
        self.reason = reason


class SkippedFiles:
    """The unreadable images a run skips (``--skip-corrupt``): one list per run, shared by every
    loader of the run (training, the k-NN monitor's bank and queries), so that each file is
    reported once through `log` (default: stderr), whichever loader meets it first."""

    def __init__(self, log=None):
        self.reasons: dict[str, str] = {}
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self._lock = threading.Lock()

    def __contains__(self, path: str) -> bool:
        return path in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def add(self, path: str, reason: str) -> None:
        """Record `path` as skipped; the first time, report it."""
        with self._lock:
            first = path not in self.reasons
            self.reasons.setdefault(path, reason)
        if first:
            self._log(f"warning: skipping corrupt image {path}: {reason}")


@dataclass(frozen=True)
class ImageFolderIndex:
    """``root/<class>/<image>`` listing in torchvision's order (classes and files sorted)."""
    root: str
    classes: tuple[str, ...]
    files: tuple[str, ...]      # absolute paths, sample i
    labels: np.ndarray          # int64 (N,)

    def __len__(self) -> int:
        return len(self.files)


def resolve_root(data: str, split: str | None) -> str:
    """``data/split`` if that directory exists; for split "train" (or None) ``data`` itself else."""
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data: expected a directory path or 'demo', got {type(data).__name__}")
    data = os.fspath(data)
    if not os.path.isdir(data):
        raise FileNotFoundError(f"data: directory not found: {data}")
    if split is not None:
        sub = os.path.join(data, split)
        if os.path.isdir(sub):
            return sub
        if split != "train":
            raise FileNotFoundError(f"data: no '{split}' split directory under {data}")
    elif os.path.isdir(os.path.join(data, "train")):
        return os.path.join(data, "train")
    return data


def scan_image_folder(root: str) -> ImageFolderIndex:
    """List ``root/<class>/**/<image>``; label = index of the class in sorted order."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"data: no class directories in {root} (expected root/<class>/<image>)")
    files: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
            dirnames.sort()
            for f in filenames:
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                    found.append(os.path.join(dirpath, f))
        found.sort()
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"data: no images with extensions {IMG_EXTENSIONS} under {root}")
    return ImageFolderIndex(root=root, classes=tuple(classes), files=tuple(files),
                            labels=np.asarray(labels, dtype=np.int64))


def _jpeg_size(buf: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, None if not a parsable JPEG."""
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:   # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        seg_len = (buf[i + 2] << 8) | buf[i + 3]
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            h = (buf[i + 5] << 8) | buf[i + 6]
            w = (buf[i + 7] << 8) | buf[i + 8]
            return (w, h) if w > 0 and h > 0 else None
        i += 2 + seg_len
    return None


def image_size(buf: bytes, path: str) -> tuple[int, int]:
    """(width, height) of an encoded image, from its header; CorruptImageError if unreadable."""
    size = _jpeg_size(buf)
    if size is not None:
        return size
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(buf)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(path, f"not a recognisable image header ({e})") from None
    if w <= 0 or h <= 0:
        raise CorruptImageError(path, f"image header gives size {w}x{h}")
    return w, h


def read_bytes(path: str) -> bytes:
    """The encoded bytes of ``path``; CorruptImageError naming it if unreadable or empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptImageError(path, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise CorruptImageError(path, "empty file")
    return data


def verify_decodable(buf: bytes, path: str) -> None:
    """CorruptImageError naming `path` unless PIL decodes the whole image: catches corrupt scan
    data behind a valid header, which the DALI decoder only warns about without naming the file.
    JPEGs decode at 1/8 scale (draft mode): every entropy-coded byte is still read."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(buf)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:  # noqa: BLE001 - any failure means the file is not decodable
        raise CorruptImageError(
            path, f"image data cannot be decoded ({type(e).__name__}: {e})"
        ) from None


def find_undecodable(paths) -> list[tuple[str, str]]:
    """(path, reason) for each file PIL cannot fully decode; used to name the file behind a DALI
    decoder error, which itself does not say which sample failed."""
    from PIL import Image
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - any failure means the file is not decodable
            bad.append((p, f"{type(e).__name__}: {e}"))
    return bad
