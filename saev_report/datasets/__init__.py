"""Image datasets: folders, CUB-200, ADE20K and the offline demo set, behind one `ImageDataset`."""

from saev_report.datasets.base import (
    MIN_SIDE,
    BadImage,
    ImageDataset,
    ImageRecord,
    load_image,
    load_mask,
)
from saev_report.datasets.demo import DemoDataUnavailable
from saev_report.datasets.dispatch import open_dataset

__all__ = [
    "MIN_SIDE",
    "BadImage",
    "DemoDataUnavailable",
    "ImageDataset",
    "ImageRecord",
    "load_image",
    "load_mask",
    "open_dataset",
]
