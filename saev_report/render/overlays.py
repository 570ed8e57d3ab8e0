"""Build-time images: thumbnails (one per distinct image), edit marks and class maps.

Feature heat-maps are not images: the browser draws them over the shared
thumbnail from a byte per patch (`heatmaps`).

Every file is content-addressed (its name hashes what it shows), so a rebuild
skips or hard-links files the previous site already has. The functions that
render are module-level and take plain arguments, so a process pool can run them.

Thumbnails show exactly what the backbone saw: backbones resize the shorter
side to `image_size * 8/7` and centre-crop `image_size`, i.e. the central
square of side 7/8 of the shorter side; the patch grid covers that square.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from saev_report.datasets.base import path_of_display, resolve_in_cache
from saev_report.render.addresses import image_file

CROP_FRACTION = 7 / 8  # must match Backbone.preprocess (resize to size·8/7, centre crop)
STYLE_VERSION = "4"  # bump to re-render every overlay after changing how they look
JPEG_QUALITY = 72  # thumbnails are the bulk of a site's images: ~25 % smaller than 80, no visible loss at 160 px

EDIT_RGB = (236, 72, 153)


# --------------------------------------------------------------------------- names


def _hash(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def file_digest(path: str) -> str | None:
    """Hash of a file's bytes, or None if it cannot be read."""
    h = hashlib.blake2b(digest_size=12)
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def thumbnail_name(source_digest: str, px: int) -> str:
    # 64 bits: collision-free for any image set a site can hold, and 8 bytes shorter per <img> than the full hash.
    return _hash("thumb", STYLE_VERSION, source_digest, str(px))[:16]


def marks_name(thumb: str, grid: tuple[int, int], patches: list[int]) -> str:
    return _hash("marks", STYLE_VERSION, thumb, f"{grid[0]}x{grid[1]}", ",".join(map(str, patches)))


def classmap_name(thumb: str, grid: tuple[int, int], classes_p: list[int]) -> str:
    return _hash("classmap", STYLE_VERSION, thumb, f"{grid[0]}x{grid[1]}", ",".join(map(str, classes_p)))


# --------------------------------------------------------------------------- file reuse


def place(dest: Path, previous: Path | None) -> bool:
    """True when `dest` exists already or was hard-linked (copied) from the previous site."""
    if dest.exists():
        return True
    if previous is not None and previous.exists():
        ensure_dir(dest.parent)
        try:
            os.link(previous, dest)
        except OSError:
            shutil.copy2(previous, dest)
        return True
    return False


_made_dirs: set[Path] = set()  # per process: one mkdir per fan-out folder, not one per file


def forget_dirs() -> None:
    """Call when a build starts: its staging folder is new even if its path is not."""
    _made_dirs.clear()


def ensure_dir(folder: Path) -> None:
    if folder not in _made_dirs:
        folder.mkdir(parents=True, exist_ok=True)
        _made_dirs.add(folder)


def _save_jpeg(image: Image.Image, dest: Path) -> None:
    # Temp name + rename: later builds reuse files by name, so a killed worker must not leave half a JPEG.
    ensure_dir(dest.parent)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    image.convert("RGB").save(tmp, "JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, dest)


# --------------------------------------------------------------------------- thumbnails


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The central square the backbone sees (side = 7/8 of the shorter side)."""
    side = min(width, height) * CROP_FRACTION
    left, top = (width - side) / 2, (height - side) / 2
    return round(left), round(top), round(left + side), round(top + side)


def load_thumbnail_source(path: str, px: int) -> Image.Image:
    image = Image.open(path)
    image.draft("RGB", (px * 2, px * 2))  # JPEG: decode at reduced scale, much faster for large photos
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@dataclass(frozen=True)
class ThumbJob:
    source: str  # image file, as the `images` table shows it
    px: int
    site: str  # new site root
    previous: str | None  # previous site root, for reuse
    cache_dir: str | None = None  # the shared cache, which the table's relative paths (the demo set) are in


def make_thumbnail(job: ThumbJob) -> tuple[str, str | None, bool]:
    """(source, thumbnail name or None if unreadable, rendered now). `job.source` is a path as the
    `images` table shows it (odd bytes of a non-UTF-8 name escaped): opened by its real name."""
    try:
        source = path_of_display(resolve_in_cache(job.source, job.cache_dir))
    except ValueError:  # a relative path and no cache to find it in: the placeholder
        return job.source, None, False
    digest = file_digest(source)
    if digest is None:
        return job.source, None, False
    name = thumbnail_name(digest, job.px)
    rel = image_file("t", name)
    if place(Path(job.site) / rel, Path(job.previous) / rel if job.previous else None):
        return job.source, name, False
    try:
        image = load_thumbnail_source(source, job.px)
        thumb = image.crop(crop_box(*image.size)).resize((job.px, job.px), Image.Resampling.LANCZOS)
    except Exception:  # corrupt or unsupported files get the placeholder, never a failed build
        return job.source, None, False
    _save_jpeg(thumb, Path(job.site) / rel)
    return job.source, name, True


# --------------------------------------------------------------------------- edits


def patch_rect(patch: int, grid: tuple[int, int], px: int) -> tuple[float, float, float, float]:
    rows, cols = grid
    r, c = divmod(int(patch), cols)
    return c * px / cols, r * px / rows, (c + 1) * px / cols - 1, (r + 1) * px / rows - 1


def render_marks(thumb: str, dest: str, grid: tuple[int, int], patches: list[int]) -> None:
    """The image with edited patches tinted and outlined; every patch → a frame around the whole image."""
    base = Image.open(thumb).convert("RGBA")
    px = base.size[0]
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    n_patches = grid[0] * grid[1]
    chosen = sorted({p for p in patches if 0 <= p < n_patches})
    if len(chosen) == n_patches:
        draw.rectangle((0, 0, px - 1, px - 1), outline=EDIT_RGB + (255,), width=max(2, px // 80))
    for p in chosen if len(chosen) < n_patches else []:
        draw.rectangle(patch_rect(p, grid, px), fill=EDIT_RGB + (90,), outline=EDIT_RGB + (230,), width=1)
    _save_jpeg(Image.alpha_composite(base, layer), Path(dest))


def class_color(index: int) -> tuple[int, int, int]:
    """Distinct, stable colour per class id (golden-ratio hue walk, fixed saturation/value)."""
    import colorsys

    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65 + 0.25 * ((index // 7) % 2), 0.95 - 0.2 * ((index // 3) % 2))
    return round(r * 255), round(g * 255), round(b * 255)


def render_class_map(thumb: str, dest: str, grid: tuple[int, int], classes_p: list[int]) -> None:
    """Predicted class per patch as translucent colours over the image (patch-exact, no smoothing)."""
    base = Image.open(thumb).convert("RGBA")
    ids_hw = np.asarray(classes_p, dtype=np.int64).reshape(grid)
    palette = np.array([class_color(i) + (150,) for i in range(int(ids_hw.max(initial=0)) + 1)], dtype=np.uint8)
    rgba_hw4 = palette[np.clip(ids_hw, 0, None)]
    rgba_hw4[ids_hw < 0, 3] = 0
    layer = Image.fromarray(rgba_hw4, "RGBA").resize(base.size, Image.Resampling.NEAREST)
    _save_jpeg(Image.alpha_composite(base, layer), Path(dest))
