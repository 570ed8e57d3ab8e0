"""The offline demo set: real photo cut-outs composited onto real background photos.

Foregrounds are the photo stamps of Debian's `tuxpaint-stamps-default` (PNG with
alpha, GPL-2: read at run time from the installed package, never committed);
each stamp category is a class. Backgrounds are crops of outdoor photos shipped
in PyPI `mvtb-data` (MIT), chosen to contain none of the demo classes.
Each composite gets an exact segmentation mask from the stamp's alpha:
0 = background, c+1 = class c, `IGNORE_INDEX` on semi-transparent edge pixels.

The set is a pure function of (seed, n_images, categories, size) and the
installed files: every image is drawn from its own seeded generator, so the same
bytes come out every time. Stamps are split between train and val (no stamp is
in both), so probes trained on `split: train` and scored on `split: val` measure
generalisation to unseen objects. The set is written once under
`<cache_dir>/demo-<hash>/` (built in a temporary folder, then renamed) and
reused by every dataset key that shares those parameters, whatever its split.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from saev_report.datasets.base import ImageDataset, ImageRecord
from saev_report.progress import bar
from saev_report.spec import DemoDataset, content_hash
from saev_report.errors import InputUnavailable
from saev_report.locks import cache_entry_lock

FORMAT_VERSION = 1

STAMPS_ENV = "SAEV_REPORT_STAMPS_DIR"
DEFAULT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")

# Folders of photographs (checked by eye); a stamp belongs to the most specific
# chosen folder that contains it, so bovines are not also mammals.
DEFAULT_CATEGORIES: tuple[str, ...] = (
    "animals/birds",
    "animals/mammals",
    "animals/mammals/bovines",
    "food/fruit",
    "food/vegetables",
    "plants/flowers",
    "household",
    "vehicles",
)
SKIPPED_FOLDERS = frozenset({"cartoon", "toys"})  # drawings, and a teddy bear among the mammals
SKIPPED_STAMPS = frozenset({"vehicles/emergency/sedan_police.png"})  # police livery to lay over a car, no car

# Outdoor photos in mvtb-data's images/ folder without animals, food, flowers,
# household objects or vehicles in view (its flower, tomato and aerial photos are left out).
BACKGROUNDS: tuple[str, ...] = (
    *(f"campus/P1070{n}.png" for n in (491, 493, 494, 495, 496, 497, 498, 499, 500, 501)),
    *(f"campus/P1070{n}.png" for n in (503, 504, 505, 506, 507, 509, 510, 512, 514, 515)),
    *(f"campus/holdout/P1070{n}.png" for n in (492, 502, 508, 511, 513)),
    "church.png",
    "building2-3.png",
    "eiffel-1.png",
    "eiffel-2.png",
    "notre-dame.png",
    "parks.png",
    "road.png",
    "rocks2-l.png",
    "walls-l.png",
)

IGNORE_INDEX = 255
VAL_EVERY = 5  # one round in five (one image per class per round) is validation: 20 %
STAMP_VAL_FRACTION = 0.2
STAMP_SCALE = (0.35, 0.75)  # longer side of the stamp, as a fraction of the image side
CROP_SCALE = (0.5, 1.0)  # background crop side, as a fraction of the photo's shorter side
ALPHA_OPAQUE, ALPHA_CLEAR = 250, 5  # mask: ≥ opaque → class, ≤ clear → background, else ignore

# Drawing filter: line art and flat-shaded clip-art have large runs of identical
# neighbouring pixels and few colours; photos have neither.
MAX_FLAT_FRACTION = 0.5
MIN_COLOURS = 64
MIN_OPAQUE_PIXELS = 700  # tiny stamps would be blown up into blur
MAX_UPSCALE = 3.0  # small stamps are drawn smaller rather than enlarged past this


class DemoDataUnavailable(InputUnavailable):
    """A file the demo set is made from is not installed."""


# --------------------------------------------------------------------------- sources


def stamps_dir() -> Path:
    """The tuxpaint stamps folder (`$SAEV_REPORT_STAMPS_DIR` overrides the Debian path)."""
    root = Path(os.environ.get(STAMPS_ENV) or DEFAULT_STAMPS_DIR)
    if not root.is_dir():
        raise DemoDataUnavailable(
            f"the demo set needs the photo stamps of Debian's tuxpaint-stamps-default, expected in {root}; "
            "install them with `sudo apt-get install tuxpaint-stamps-default` (`make install` does this), "
            f"or point ${STAMPS_ENV} at a copy of its stamps folder"
        )
    return root


def backgrounds_dir() -> Path:
    """mvtb-data's image folder, found without importing the package."""
    found = importlib.util.find_spec("mvtbdata")
    if found is None or found.origin is None:
        raise DemoDataUnavailable(
            "the demo set needs the background photos of PyPI `mvtb-data`: `pip install mvtb-data` "
            "(part of the `demo` extra: pip install -e '.[demo]')"
        )
    return Path(found.origin).parent / "images"


def class_names(categories: list[str]) -> list[str]:
    """Class name of each category: its last folder name, or the whole path if those clash."""
    short = [c.rstrip("/").split("/")[-1] for c in categories]
    return short if len(set(short)) == len(short) else [c.strip("/") for c in categories]


def candidate_stamps(root: Path, categories: list[str]) -> dict[str, list[Path]]:
    """PNG files of each category, before the drawing filter, sorted.

    A file goes to the most specific chosen category containing it; cartoon
    folders and pre-mirrored duplicates (`*_mirror.png`) are left out.
    """
    found: dict[str, list[Path]] = {}
    for category in categories:
        folder = root / category
        if not folder.is_dir():
            known = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_dir())
            raise ValueError(f"stamp category {category!r} is not a folder of {root}; some categories: {', '.join(known[:30])}")
        deeper = [other for other in categories if other != category and other.startswith(category.rstrip("/") + "/")]
        paths = []
        for path in folder.rglob("*.png"):
            rel = path.relative_to(root).as_posix()
            folders = path.relative_to(folder).parts[:-1]
            if SKIPPED_FOLDERS.intersection(folders) or path.stem.endswith("_mirror") or rel in SKIPPED_STAMPS:
                continue
            if any(rel.startswith(other.rstrip("/") + "/") for other in deeper):
                continue
            paths.append(path)
        found[category] = sorted(paths, key=lambda p: p.as_posix())
    return found


def is_photo(rgba_hw4: np.ndarray) -> bool:
    """Heuristic: enough opaque pixels, many colours, few runs of identical neighbours."""
    opaque_hw = rgba_hw4[..., 3] == 255
    n_semi = int(((rgba_hw4[..., 3] > 0) & ~opaque_hw).sum())
    if opaque_hw.sum() < max(MIN_OPAQUE_PIXELS, n_semi):  # mostly see-through: a ghostly glass
        return False
    rgb_hw3 = rgba_hw4[..., :3].astype(np.int16)
    pairs_hw = opaque_hw[:, 1:] & opaque_hw[:, :-1]
    same_hw = (rgb_hw3[:, 1:] == rgb_hw3[:, :-1]).all(-1)
    flat_fraction = (same_hw & pairs_hw).sum() / max(int(pairs_hw.sum()), 1)
    quantised_n3 = rgba_hw4[..., :3][opaque_hw] // 8
    n_colours = len(np.unique(quantised_n3[:, 0].astype(np.int32) * 1024 + quantised_n3[:, 1] * 32 + quantised_n3[:, 2]))
    return flat_fraction <= MAX_FLAT_FRACTION and n_colours >= MIN_COLOURS


@dataclass(frozen=True)
class Stamp:
    """A foreground cut-out, cropped to its alpha bounding box."""

    rel: str  # path relative to the stamps folder
    image: Image.Image  # RGBA
    mirrorable: bool  # tuxpaint's `nomirror` marks stamps with text or handedness


def load_stamp(path: Path, root: Path) -> Stamp | None:
    """The stamp at `path`, or None if it looks like a drawing."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    rgba_hw4 = np.asarray(rgba)
    if not is_photo(rgba_hw4):
        return None
    box = rgba.getchannel("A").getbbox()
    dat = path.with_suffix(".dat")
    mirrorable = not (dat.is_file() and "nomirror" in dat.read_text(encoding="utf-8", errors="replace").split())
    return Stamp(path.relative_to(root).as_posix(), rgba.crop(box), mirrorable)


def split_stamps(stamps: list[Stamp], category: str, seed: int) -> dict[str, list[Stamp]]:
    """Disjoint train / val stamps of one category (20 % val, at least one each)."""
    if len(stamps) < 2:
        raise ValueError(f"stamp category {category!r} has {len(stamps)} photo stamp(s); a class needs at least 2")
    order = np.random.default_rng([seed, zlib.crc32(category.encode())]).permutation(len(stamps))
    n_val = min(max(1, round(STAMP_VAL_FRACTION * len(stamps))), len(stamps) - 1)
    return {
        "val": [stamps[i] for i in sorted(order[:n_val])],
        "train": [stamps[i] for i in sorted(order[n_val:])],
    }


def load_backgrounds(folder: Path, size: int, map_fn: Callable = map) -> list[tuple[str, Image.Image]]:
    """Background photos, shrunk so their shorter side is at most 2·size (crops need no more);
    `map_fn` (a thread pool's `map`) may load them concurrently, in order."""
    missing = [folder / rel for rel in BACKGROUNDS if not (folder / rel).is_file()]
    if missing:
        raise DemoDataUnavailable(
            f"background photo {missing[0]} is missing; reinstall mvtb-data (`pip install --force-reinstall mvtb-data`)"
        )

    def load(rel: str) -> tuple[str, Image.Image]:
        with Image.open(folder / rel) as image:
            rgb = image.convert("RGB")
        shorter = min(rgb.size)
        if shorter > 2 * size:
            factor = 2 * size / shorter
            rgb = rgb.resize((round(rgb.width * factor), round(rgb.height * factor)), Image.Resampling.LANCZOS, reducing_gap=3.0)
        return rel, rgb

    return list(map_fn(load, BACKGROUNDS))


# --------------------------------------------------------------------------- composition


def image_plan(i: int, n_classes: int) -> tuple[int, str]:
    """(class, split) of image i: classes cycle, one round in VAL_EVERY is validation."""
    class_id, round_ = i % n_classes, i // n_classes
    return class_id, ("val" if round_ % VAL_EVERY == VAL_EVERY - 1 else "train")


def compose(
    background: Image.Image, stamp: Stamp, class_value: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One composite: (image [size, size, 3] uint8, mask [size, size] uint8, placement)."""
    # Background: a random square crop, resized to the output side, maybe mirrored.
    shorter = min(background.size)
    side = rng.uniform(*CROP_SCALE) * shorter
    x0 = rng.uniform(0, background.width - side)
    y0 = rng.uniform(0, background.height - side)
    crop = background.resize((size, size), Image.Resampling.LANCZOS, box=(x0, y0, x0 + side, y0 + side))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    # Foreground: longer side a random fraction of the image, random position.
    native = max(stamp.image.size)
    top = min(STAMP_SCALE[1], max(STAMP_SCALE[0], MAX_UPSCALE * native / size))
    factor = rng.uniform(STAMP_SCALE[0], top) * size / native
    w, h = (max(1, min(size, round(d * factor))) for d in stamp.image.size)
    fg = stamp.image.resize((w, h), Image.Resampling.LANCZOS)  # PIL resamples RGBA premultiplied
    flip = stamp.mirrorable and bool(rng.random() < 0.5)
    if flip:
        fg = fg.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))

    image_hw3 = np.array(crop, dtype=np.float32)
    fg_hw4 = np.asarray(fg, dtype=np.float32)
    alpha_hw1 = fg_hw4[..., 3:] / 255.0
    region = image_hw3[y : y + h, x : x + w]
    image_hw3[y : y + h, x : x + w] = region + (fg_hw4[..., :3] - region) * alpha_hw1

    mask_hw = np.zeros((size, size), dtype=np.uint8)
    alpha_hw = fg_hw4[..., 3]
    mask_hw[y : y + h, x : x + w] = np.where(alpha_hw >= ALPHA_OPAQUE, class_value, np.where(alpha_hw <= ALPHA_CLEAR, 0, IGNORE_INDEX))
    placement = {"box": [x, y, x + w, y + h], "flip": flip, "crop": [round(x0, 2), round(y0, 2), round(side, 2)]}
    return np.clip(image_hw3.round(), 0, 255).astype(np.uint8), mask_hw, placement


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class DemoSources:
    """What a demo set is made from: the parameters and the installed source files."""

    categories: list[str]
    stamps_root: Path
    candidates: dict[str, list[Path]]
    backgrounds_root: Path

    def inventory(self) -> list:
        """File names and sizes of every source, so a changed package changes the hash."""

        def size(path: Path) -> int:
            return path.stat().st_size if path.is_file() else -1

        stamps = [(p.relative_to(self.stamps_root).as_posix(), size(p)) for c in self.categories for p in self.candidates[c]]
        backgrounds = [(rel, size(self.backgrounds_root / rel)) for rel in BACKGROUNDS]
        return [stamps, backgrounds]


def demo_sources(categories: list[str] | None) -> DemoSources:
    categories = list(categories or DEFAULT_CATEGORIES)
    if len(set(categories)) != len(categories):
        raise ValueError(f"demo categories repeat: {categories}")
    root = stamps_dir()
    return DemoSources(categories, root, candidate_stamps(root, categories), backgrounds_dir())


def demo_hash(spec: DemoDataset, sources: DemoSources) -> str:
    """Hash of everything the set's bytes depend on (not split or max_images: those select)."""
    params = {"n_images": spec.n_images, "categories": sources.categories, "size": spec.size, "seed": spec.seed}
    return content_hash("demo", FORMAT_VERSION, params, sources.inventory())


def write_composite(out_dir: Path, pools: list[dict[str, list[Stamp]]], backgrounds: list[tuple[str, Image.Image]],
                    classes: list[str], size: int, seed: int, i: int) -> dict:
    """Compose image i, write it and its mask under `out_dir`, and return its index entry."""
    rng = np.random.default_rng([seed, i])  # per-image stream: order-independent, reproducible
    class_id, split = image_plan(i, len(classes))
    pool = pools[class_id][split]
    stamp = pool[int(rng.integers(len(pool)))]
    bg_name, background = backgrounds[int(rng.integers(len(backgrounds)))]
    image_hw3, mask_hw, placement = compose(background, stamp, class_id + 1, size, rng)
    name = f"{i:05d}.png"
    # Fast zlib level: the set is a cache, and encoding dominates the build time.
    Image.fromarray(image_hw3, "RGB").save(out_dir / "images" / name, compress_level=1)
    Image.fromarray(mask_hw, "L").save(out_dir / "masks" / name, compress_level=1)
    return {
        "image": f"images/{name}",
        "mask": f"masks/{name}",
        "label": classes[class_id],
        "class_id": class_id,
        "split": split,
        "stamp": stamp.rel,
        "background": bg_name,
        **placement,
    }


def build_demo(out_dir: Path, sources: DemoSources, n_images: int, size: int, seed: int, workers: int | None = None) -> None:
    """Write images/, masks/ and index.json into the (new, empty) folder `out_dir`, on `workers`
    threads (default: up to 4); the bytes are the same for any number."""
    names = class_names(sources.categories)
    order = sorted(range(len(names)), key=lambda k: names[k])  # class ids follow sorted names
    categories = [sources.categories[k] for k in order]
    classes = [names[k] for k in order]

    # Threads, not processes: PIL decodes and resamples and zlib encodes without the GIL, and every
    # image has its own generator, so the bytes do not depend on the order the threads finish in.
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as threads:
        pools: list[dict[str, list[Stamp]]] = []
        for category in categories:
            loaded = threads.map(partial(load_stamp, root=sources.stamps_root), sources.candidates[category])
            pools.append(split_stamps([s for s in loaded if s is not None], category, seed))
        backgrounds = load_backgrounds(sources.backgrounds_root, size, threads.map)

        (out_dir / "images").mkdir(parents=True)
        (out_dir / "masks").mkdir()
        write = partial(write_composite, out_dir, pools, backgrounds, classes, size, seed)
        entries = []
        with bar("demo images", total=n_images, unit="img") as progress:
            for entry in threads.map(write, range(n_images)):
                entries.append(entry)
                progress.advance(1)

    index = {
        "format": FORMAT_VERSION,
        "params": {"n_images": n_images, "size": size, "seed": seed, "categories": categories},
        "classes": classes,
        "seg_classes": ["background", *classes],
        "ignore_index": IGNORE_INDEX,
        "stamps": {split: {c: [s.rel for s in pool[split]] for c, pool in zip(classes, pools)} for split in ("train", "val")},
        "images": entries,
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")


def ensure_demo(spec: DemoDataset, cache_dir: Path) -> Path:
    """The demo folder for `spec` under `cache_dir`, built on first use (atomically, under its lock)."""
    sources = demo_sources(spec.categories)
    final = Path(cache_dir) / f"demo-{demo_hash(spec, sources)}"
    if (final / "index.json").is_file():
        return final
    with cache_entry_lock(final.parent, final.name):  # another build making the same set: wait for it
        if (final / "index.json").is_file():
            return final
        for leftover in final.parent.glob(final.name + ".partial-*"):  # killed builders' (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=final.name + ".partial-", dir=final.parent))
        try:
            build_demo(partial / "set", sources, spec.n_images, spec.size, spec.seed)
            os.rename(partial / "set", final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return final


def demo_dataset(key: str, spec: DemoDataset, cache_dir: Path) -> ImageDataset:
    """The demo set as an ImageDataset, restricted to `spec.split`."""
    folder = ensure_demo(spec, cache_dir)
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    records = []
    for entry in index["images"]:
        if spec.split != "all" and entry["split"] != spec.split:
            continue
        image_path, mask_path = (str((folder / entry[k]).resolve()) for k in ("image", "mask"))
        records.append(ImageRecord(len(records), image_path, entry["label"], mask_path))
    return ImageDataset(key, records, list(index["classes"]), list(index["seg_classes"]), index["ignore_index"])
