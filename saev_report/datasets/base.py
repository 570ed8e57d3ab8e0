"""Image records, datasets and robust image / mask loading.

Every dataset kind becomes an `ImageDataset`: an ordered list of `ImageRecord`s
plus class names. Images are read lazily with `load_image`, which turns any odd
file (CMYK, 16-bit, palette, alpha, EXIF-rotated) into plain RGB and raises
`BadImage` — never anything else — for files it cannot use, so the record stage
can skip, log and count them. `image_rows` applies the same checks to build the
`images` table, so its `status` names every image the record stage will skip.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import Image, ImageOps
from rich.markup import escape

from saev_report.progress import log

PathLike = Union[str, "os.PathLike[str]"]

MIN_SIDE = 16
"""Images smaller than this on either side are rejected (too small for a patch grid)."""

ALPHA_BACKGROUND = (128, 128, 128)
"""Transparent pixels are composited on neutral grey: black or white would read as content."""

SUBSET_SEED = 0
"""Seed of the `max_images` subset permutation (fixed so subsets are reproducible)."""


class BadImage(Exception):
    """An image or mask file that cannot be used; `reason` says why."""

    def __init__(self, reason: str, path: PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: its position, file, class label and mask file."""

    index: int
    path: str
    label: str | None = None
    mask_path: str | None = None


@dataclass
class ImageDataset:
    """An ordered set of images with optional class labels and segmentation masks.

    `classes` are the sorted distinct labels; `seg_classes[k]` names mask value k.
    `reduce_zero_label` marks masks where 0 is unlabelled and k is class k-1
    (ADE20K); `mask(i)` applies it, so callers always see class ids or
    `ignore_index`.
    """

    key: str
    records: list[ImageRecord]
    classes: list[str] = field(default_factory=list)
    seg_classes: list[str] | None = None
    ignore_index: int = 255
    reduce_zero_label: bool = False

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int) -> Image.Image:
        """RGB image of record i (raises BadImage)."""
        return load_image(self.records[i].path)

    def mask(self, i: int) -> np.ndarray:
        """Class-id mask [H, W] int64 of record i, unlabelled pixels = ignore_index."""
        mask_path = self.records[i].mask_path
        if mask_path is None:
            raise ValueError(f"dataset {self.key!r} has no mask for image {i}")
        mask_hw = load_mask(mask_path)
        if self.reduce_zero_label:
            unlabelled_hw = mask_hw == 0
            mask_hw = mask_hw - 1
            mask_hw[unlabelled_hw] = self.ignore_index
        return mask_hw

    def class_id(self, label: str | None) -> int:
        """Index of `label` in `classes`, -1 for no label."""
        return -1 if label is None else self.classes.index(label)

    def label_ids(self) -> np.ndarray:
        """Class index of every record [N] int64 (-1 where unlabelled)."""
        lookup = {name: i for i, name in enumerate(self.classes)}
        return np.array([lookup.get(r.label, -1) if r.label is not None else -1 for r in self.records], dtype=np.int64)

    def subset(self, max_images: int | None) -> "ImageDataset":
        """At most `max_images` records, a deterministic random subset kept in dataset order.

        Subsets nest: the first m of one fixed permutation, so a smaller
        `max_images` always picks a subset of a larger one. Records are
        re-indexed 0..m-1; classes stay those of the full set.
        """
        n = len(self.records)
        if max_images is None or max_images >= n:
            return self
        order = np.random.default_rng(SUBSET_SEED).permutation(n)
        keep = np.sort(order[:max_images])
        records = [replace(self.records[int(j)], index=i) for i, j in enumerate(keep)]
        return replace(self, records=records)


# --------------------------------------------------------------------------- loading


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale one-channel integer or float pixels to 0..255 (16-bit, 32-bit, float modes)."""
    is_float = np.issubdtype(values.dtype, np.floating)
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    if is_float and 0 < top <= 1.0:
        scale = 255.0
    elif top <= 255:
        scale = 1.0
    elif top <= 65535:
        scale = 255.0 / 65535.0  # 16-bit data spans the full range
    else:
        scale = 255.0 / top
    return np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB; alpha (or a transparent palette / colour key) composited on grey."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        if mode.startswith("I;"):
            image = image.convert("I")  # 'I;16*' have no direct route to 'L'
        grey = _to_uint8(np.asarray(image))
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def display_path(path: PathLike) -> str:
    """`path` as text that any table can hold: a file name that is not valid UTF-8 (an old
    camera, a Windows zip) shows its odd bytes as `\\xNN` escapes (`caf\\xe9.jpg`)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def relative_to_cache(path: PathLike, cache_dir: PathLike | None) -> str:
    """`path` relative to the shared cache when it lies inside it, else absolute (dataset records
    are resolved already).

    What stage outputs store: a finished stage then still finds the generated demo set after the
    cache moves, or from another cache holding the same entries (`resolve_in_cache` undoes it)."""
    absolute = Path(os.path.abspath(path))  # not realpath: a broken symlink keeps its own name
    if cache_dir is not None:
        for root in (Path(os.path.realpath(cache_dir)), Path(os.path.abspath(cache_dir))):
            if absolute.is_relative_to(root):
                return absolute.relative_to(root).as_posix()
    return str(absolute)


def resolve_in_cache(path: str, cache_dir: PathLike | None) -> str:
    """A path `relative_to_cache` stored, absolute again: relative ones join the cache of the reader."""
    if os.path.isabs(path):
        return path
    if cache_dir is None:
        raise ValueError(f"image {path!r} is stored relative to the shared cache; its location is needed")
    return os.path.realpath(os.path.join(cache_dir, path))


_ESCAPED_BYTE = re.compile(r"\\x([0-9a-f]{2})")


def path_of_display(shown: str) -> str:
    """The file `display_path` showed as `shown` (the `images` table's `path`), as a name that opens
    it: `\\xNN` escapes become their bytes again (kept through `os.fsdecode`'s surrogate escapes).
    A name that exists as shown (a real backslash in a UTF-8 name) is taken as it is."""
    if "\\x" not in shown or os.path.lexists(shown):
        return shown
    parts = _ESCAPED_BYTE.split(shown)  # text, hex, text, hex, ..., text
    raw = b"".join(bytes([int(part, 16)]) if i % 2 else part.encode("utf-8") for i, part in enumerate(parts))
    return os.fsdecode(raw)


@contextmanager
def _checked_image(path: PathLike) -> Iterator[Image.Image]:
    """The decoded image at `path`, after the checks every image passes; BadImage otherwise.

    One place for the rules, so that the `images` table's status and the record stage agree.
    A name that is not valid UTF-8 (an old archive's Latin-1 byte) is no reason to skip a file:
    `path` keeps its bytes (`os.fsdecode`'s surrogate escapes) for opening it; tables and messages
    show it through `display_path`.
    """
    if os.path.islink(path) and not os.path.exists(path):
        raise BadImage("broken symlink", path)
    try:
        with Image.open(path) as image:
            if min(image.size) < MIN_SIDE:
                raise BadImage(f"too small ({image.size[0]}x{image.size[1]} px, minimum {MIN_SIDE})", path)
            n_frames = getattr(image, "n_frames", 1)
            if n_frames > 1:
                raise BadImage(f"animated ({n_frames} frames): no single frame stands for it", path)
            image.load()  # decode now so truncation surfaces here
            yield image
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large: {exc}", path) from None
    except FileNotFoundError:
        raise BadImage("file not found", display_path(path)) from None
    except Image.UnidentifiedImageError:
        raise BadImage("not a readable image", display_path(path)) from None
    except Exception as exc:  # PIL signals corrupt data with many exception types
        raise BadImage(f"corrupt image ({type(exc).__name__}: {exc})", display_path(path)) from None


def load_image(path: PathLike) -> Image.Image:
    """Read an image file as RGB, EXIF orientation applied.

    Raises BadImage for missing, corrupt, truncated, animated or non-image files, broken
    symlinks, and images smaller than MIN_SIDE pixels on a side. Any file name opens, UTF-8 or not.
    """
    with _checked_image(path) as image:
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a broken EXIF block should not lose the pixels
            pass
        try:
            return _to_rgb(image)
        except Exception as exc:
            raise BadImage(f"corrupt image ({type(exc).__name__}: {exc})", path) from None


@dataclass(frozen=True)
class ImageStatus:
    """What the `images` table says of one file: its size when known, and `ok` or why the
    record stage skips it (`BadImage.reason`)."""

    width: int | None
    height: int | None
    status: str


def inspect_image(path: PathLike) -> ImageStatus:
    """Decode `path` with the record stage's checks (`load_image`'s), without converting it."""
    try:
        with _checked_image(path) as image:
            return ImageStatus(image.size[0], image.size[1], "ok")
    except BadImage as exc:
        return ImageStatus(*_header_size(path), exc.reason)


def _header_size(path: PathLike) -> tuple[int | None, int | None]:
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:
        return None, None


def image_rows(dataset: ImageDataset, workers: int | None = None, cache_dir: PathLike | None = None) -> list[dict[str, object]]:
    """One `images` table row per record, each file decoded once (on threads: PIL releases the GIL).
    Paths inside `cache_dir` (the demo set) are stored relative to it (`relative_to_cache`)."""
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        statuses = list(pool.map(inspect_image, [r.path for r in dataset.records]))
    n_bad = sum(info.status != "ok" for info in statuses)
    if n_bad:
        log(f"  [yellow]{n_bad} of {len(statuses)} image(s) in {escape(dataset.key)} will be skipped[/]: see `status` in the images table")
    return [
        {
            "dataset": dataset.key,
            "image_idx": record.index,
            "path": display_path(relative_to_cache(record.path, cache_dir)),
            "label": record.label,
            "mask_path": None if record.mask_path is None else display_path(relative_to_cache(record.mask_path, cache_dir)),
            "width": info.width,
            "height": info.height,
            "status": info.status,
        }
        for record, info in zip(dataset.records, statuses)
    ]


def load_mask(path: PathLike) -> np.ndarray:
    """Read a single-channel mask (L, P, I, I;16) as class ids [H, W] int64; raises BadImage."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "P", "I", "1") and not image.mode.startswith("I;"):
                raise BadImage(f"mask must be single-channel, got mode {image.mode}", path)
            return np.asarray(image).astype(np.int64)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("mask file not found", path) from None
    except Exception as exc:
        raise BadImage(f"corrupt mask ({type(exc).__name__}: {exc})", path) from None
