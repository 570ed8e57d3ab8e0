"""Datasets read from folders on disk: plain image folders, image + mask folders,
CUB-200-2011 and ADE20K SceneParsing in their released layouts.

Every listing is sorted so a dataset's order (and so its image indices) does not
depend on the file system.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from saev_report.datasets.base import BadImage, ImageDataset, ImageRecord, display_path, load_mask
from saev_report.progress import log

# GIFs are listed so that the `images` table can say why an animated one is skipped.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


def list_images(root: Path) -> list[Path]:
    """Image files under `root` (recursive, hidden entries skipped), sorted by relative path.

    Broken symlinks are listed too: the `images` table reports them instead of losing them.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    found = [
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and (path.is_file() or (path.is_symlink() and not path.exists()))
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def image_folder(key: str, root: Path, labels: str = "folder") -> ImageDataset:
    """Images under `root`; with `labels="folder"` the first sub-folder names the class.

    Files directly in `root` have no label.
    """
    root = Path(root)
    records = []
    for i, path in enumerate(list_images(root)):
        parts = path.relative_to(root).parts
        label = display_path(parts[0]) if labels == "folder" and len(parts) > 1 else None
        records.append(ImageRecord(i, str(path.resolve() if path.exists() else path.absolute()), label, None))
    classes = sorted({r.label for r in records if r.label is not None})
    return ImageDataset(key, records, classes)


def seg_folder(
    key: str, images: Path, masks: Path, classes: list[str] | None = None, ignore_index: int = 255
) -> ImageDataset:
    """Images with same-stem PNG masks: `masks/<rel>/<stem>.png` for `images/<rel>/<stem>.*`.

    Images without a mask are left out (and counted in a log line). Without
    `classes`, the masks are scanned for the largest id and classes are named
    `class_<id>`.
    """
    images, masks = Path(images), Path(masks)
    if not masks.is_dir():
        raise FileNotFoundError(f"mask folder {str(masks)!r} does not exist")
    records: list[ImageRecord] = []
    missing = 0
    for path in list_images(images):
        mask_path = (masks / path.relative_to(images)).with_suffix(".png")
        if not mask_path.is_file():
            missing += 1
            continue
        records.append(ImageRecord(len(records), str(path.resolve()), None, str(mask_path.resolve())))
    if missing:
        log(f"[yellow]{key}: {missing} image(s) without a mask in {masks} were left out")
    if classes is None:
        classes = [f"class_{i}" for i in range(_max_mask_id(records, ignore_index) + 1)]
    return ImageDataset(key, records, [], list(classes), ignore_index)


def _max_mask_id(records: list[ImageRecord], ignore_index: int) -> int:
    """Largest class id in any mask, ignoring `ignore_index` and unreadable masks."""
    top = 0
    for record in records:
        try:
            values = np.unique(load_mask(record.mask_path))  # type: ignore[arg-type]
        except BadImage:
            continue
        values = values[values != ignore_index]
        if values.size:
            top = max(top, int(values.max()))
    return top


# --------------------------------------------------------------------------- CUB-200-2011


def prettify_cub_class(name: str) -> str:
    """`001.Black_footed_Albatross` → `Black footed Albatross`."""
    _, _, bare = name.partition(".") if name[:3].isdigit() else ("", "", name)
    return bare.replace("_", " ").strip()


def _read_pairs(path: Path) -> dict[int, str]:
    """`<id> <value>` lines of a CUB metadata file."""
    pairs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ident, value = line.split(maxsplit=1)
            pairs[int(ident)] = value.strip()
    return pairs


def cub200(key: str, root: Path, split: str = "train") -> ImageDataset:
    """CUB-200-2011 (`images.txt`, `image_class_labels.txt`, `classes.txt`,
    `train_test_split.txt`, `images/`); label = prettified class name."""
    root = Path(root)
    for name in ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root} is not a CUB_200_2011 folder: {name} is missing")
    paths = _read_pairs(root / "images.txt")
    class_of = _read_pairs(root / "image_class_labels.txt")
    class_names = {ident: prettify_cub_class(name) for ident, name in _read_pairs(root / "classes.txt").items()}
    is_train = _read_pairs(root / "train_test_split.txt")
    want_train = split == "train"
    records = []
    for ident in sorted(paths):
        if (is_train[ident] == "1") != want_train:
            continue
        label = class_names[int(class_of[ident])]
        records.append(ImageRecord(len(records), str((root / "images" / paths[ident]).resolve()), label, None))
    return ImageDataset(key, records, sorted(set(class_names.values())))


# --------------------------------------------------------------------------- ADE20K

# The 150 SceneParsing classes in id order (first name of each objectInfo150 entry).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150


def ade20k_classes(root: Path) -> list[str]:
    """Class names from `objectInfo150.csv` (or `.txt`, tab-separated) when present, else the built-in list."""
    for name, delimiter in (("objectInfo150.csv", ","), ("objectInfo150.txt", "\t")):
        path = Path(root) / name
        if path.is_file():
            with path.open(encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter=delimiter))
            names = [row["Name"].split(";")[0].strip() for row in rows if row.get("Name")]
            if len(names) == 150:
                return names
    return list(ADE20K_CLASSES)


def ade20k(key: str, root: Path, split: str = "training") -> ImageDataset:
    """ADE20K SceneParsing (`images/<split>/*.jpg`, `annotations/<split>/*.png`).

    Mask value 0 is unlabelled and k is class k-1; `ImageDataset.mask` applies that.
    """
    root = Path(root)
    image_dir, mask_dir = root / "images" / split, root / "annotations" / split
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"{root} is not an ADEChallengeData2016 folder: need images/{split} and annotations/{split}")
    records: list[ImageRecord] = []
    for path in list_images(image_dir):
        mask_path = mask_dir / (path.stem + ".png")
        if mask_path.is_file():
            records.append(ImageRecord(len(records), str(path.resolve()), None, str(mask_path.resolve())))
    return ImageDataset(key, records, [], ade20k_classes(root), ignore_index=255, reduce_zero_label=True)

