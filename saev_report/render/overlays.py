"""Build-time images: thumbnails, patch heat-map overlays, edit marks and class maps.

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
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from saev_report.render.addresses import image_file

CROP_FRACTION = 7 / 8  # must match Backbone.preprocess (resize to size·8/7, centre crop)
STYLE_VERSION = "2"  # bump to re-render every overlay after changing how they look
JPEG_QUALITY = 80

# Inferno, sampled at 9 points; dark → bright reads as low → high on any photo.
_INFERNO_ANCHORS = np.array(
    [(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85), (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)],
    dtype=np.float64,
)
_STOPS = np.linspace(0, 1, len(_INFERNO_ANCHORS))
COLORMAP_256x3 = np.stack(
    [np.interp(np.linspace(0, 1, 256), _STOPS, _INFERNO_ANCHORS[:, c]) for c in range(3)], axis=1
).round().astype(np.uint8)
MAX_ALPHA = 0.85
FADE = 0.45  # overlays desaturate the photo this much so the colour map stands out
OUTLINE_RGB = (34, 211, 238)  # cyan: stands out against every inferno colour
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
    return _hash("thumb", STYLE_VERSION, source_digest, str(px))


def overlay_name(thumb: str, acts_p: np.ndarray, grid: tuple[int, int], vmax: float, patch: int) -> str:
    acts = np.ascontiguousarray(acts_p, dtype=np.float32)
    return _hash("overlay", STYLE_VERSION, thumb, acts.tobytes(), f"{grid[0]}x{grid[1]}", repr(float(vmax)), str(int(patch)))


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
    source: str  # image file
    px: int
    site: str  # new site root
    previous: str | None  # previous site root, for reuse


def make_thumbnail(job: ThumbJob) -> tuple[str, str | None, bool]:
    """(source, thumbnail name or None if unreadable, rendered now)."""
    digest = file_digest(job.source)
    if digest is None:
        return job.source, None, False
    name = thumbnail_name(digest, job.px)
    rel = image_file("t", name)
    if place(Path(job.site) / rel, Path(job.previous) / rel if job.previous else None):
        return job.source, name, False
    try:
        image = load_thumbnail_source(job.source, job.px)
        thumb = image.crop(crop_box(*image.size)).resize((job.px, job.px), Image.Resampling.LANCZOS)
    except Exception:  # corrupt or unsupported files get the placeholder, never a failed build
        return job.source, None, False
    _save_jpeg(thumb, Path(job.site) / rel)
    return job.source, name, True


# --------------------------------------------------------------------------- overlays


@lru_cache(maxsize=256)  # an image recurs across many features' exemplars
def _faded_thumb(path: str) -> Image.Image:
    """The thumbnail, partly desaturated and slightly darkened (hue is kept: colour features stay readable)."""
    rgb = Image.open(path).convert("RGB")
    faded = Image.blend(rgb, ImageOps.grayscale(rgb).convert("RGB"), FADE)
    return ImageEnhance.Brightness(faded).enhance(0.92).convert("RGBA")


def heat_layer(acts_hw: np.ndarray, vmax: float, px: int) -> Image.Image:
    """Translucent colour map over the patch grid, upsampled to px × px (zero activation is transparent)."""
    t_hw = np.clip(acts_hw / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(acts_hw)
    rgb_hw3 = COLORMAP_256x3[(t_hw * 255).round().astype(np.uint8)]
    alpha_hw = np.where(acts_hw > 0, MAX_ALPHA * np.sqrt(t_hw), 0.0)
    rgba = np.dstack([rgb_hw3, (alpha_hw * 255).round().astype(np.uint8)])
    # Pillow resamples RGBA with premultiplied alpha, so transparent patches do not bleed black.
    return Image.fromarray(rgba, "RGBA").resize((px, px), Image.Resampling.BILINEAR)


def patch_rect(patch: int, grid: tuple[int, int], px: int) -> tuple[float, float, float, float]:
    rows, cols = grid
    r, c = divmod(int(patch), cols)
    return c * px / cols, r * px / rows, (c + 1) * px / cols - 1, (r + 1) * px / rows - 1


@dataclass(frozen=True)
class OverlayJob:
    thumb: str  # thumbnail file
    dest: str
    acts_p: np.ndarray  # float32, grid_h * grid_w, row-major
    grid: tuple[int, int]
    vmax: float  # shared by all exemplars of a feature
    patch: int  # maximising patch, outlined


def render_overlay(job: OverlayJob) -> None:
    base = _faded_thumb(job.thumb)
    px = base.size[0]
    acts_hw = np.asarray(job.acts_p, dtype=np.float32).reshape(job.grid)
    image = Image.alpha_composite(base, heat_layer(acts_hw, job.vmax, px))
    if 0 <= job.patch < job.grid[0] * job.grid[1]:
        draw = ImageDraw.Draw(image)
        x0, y0, x1, y1 = patch_rect(job.patch, job.grid, px)
        width = max(2, round(px / 80))  # thinner lines do not survive JPEG chroma subsampling
        draw.rectangle((x0 - width, y0 - width, x1 + width, y1 + width), outline=(0, 0, 0, 255), width=1)
        draw.rectangle((x0, y0, x1, y1), outline=OUTLINE_RGB + (255,), width=width)
    _save_jpeg(image, Path(job.dest))


def render_overlays(jobs: list[OverlayJob]) -> int:
    """A chunk of overlays (one pool task per chunk keeps pickling overhead low)."""
    for job in jobs:
        render_overlay(job)
    return len(jobs)


# --------------------------------------------------------------------------- edits


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
