"""`open_dataset`: a spec's dataset entry → an `ImageDataset`, whatever its kind."""

from __future__ import annotations

from pathlib import Path

from saev_report.datasets.demo import demo_dataset
from saev_report.datasets.folders import ade20k, cub200, image_folder, seg_folder
from saev_report.datasets.base import ImageDataset
from saev_report.spec import DatasetSpec


def open_dataset(key: str, spec: DatasetSpec, cache_dir: Path) -> ImageDataset:
    """Open the dataset described by a spec entry (`DatasetSpec`), applying `max_images`.

    The demo set is generated under `cache_dir` on first use and reused afterwards.
    """
    if spec.kind == "demo":
        dataset = demo_dataset(key, spec, Path(cache_dir))
    elif spec.kind == "image_folder":
        dataset = image_folder(key, spec.root, labels=spec.labels)
    elif spec.kind == "seg_folder":
        dataset = seg_folder(key, spec.images, spec.masks, classes=spec.classes, ignore_index=spec.ignore_index)
    elif spec.kind == "cub200":
        dataset = cub200(key, spec.root, split=spec.split)
    elif spec.kind == "ade20k":
        dataset = ade20k(key, spec.root, split=spec.split)
    else:
        raise ValueError(f"unknown dataset kind {spec.kind!r}")
    return dataset.subset(spec.max_images)
