"""Stage `images`: one row per image of a dataset (path, label, size, status)."""

from __future__ import annotations

from pathlib import Path

from saev_report.progress import log
from saev_report.spec import DatasetSpec
from saev_report.stages.base import Inputs, StageKind, StageOut, StageParams, open_dataset, table_part


class ImagesParams(StageParams):
    dataset_key: str
    dataset: DatasetSpec


class ImagesOut(StageOut):
    def labels(self) -> dict[int, str | None]:
        """Label of every image, by dataset index."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.table_part("images"), columns=["image_idx", "label"])
        return dict(zip(table.column("image_idx").to_pylist(), table.column("label").to_pylist()))


def image_row(dataset_key: str, record) -> dict:
    from PIL import Image

    row = {"dataset": dataset_key, "image_idx": record.index, "path": str(Path(record.path).resolve()),
           "label": record.label, "mask_path": record.mask_path, "width": None, "height": None, "status": "ok"}
    try:
        with Image.open(record.path) as image:  # header only: cheap even for large sets
            row["width"], row["height"] = image.size
    except Exception as exc:
        row["status"] = f"unreadable: {type(exc).__name__}"
    return row


def images(params: ImagesParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report.tables import write_table

    dataset = open_dataset(params.dataset_key, params.dataset, params.cache_dir)
    rows = [image_row(params.dataset_key, r) for r in dataset.records]
    write_table(table_part(out_dir, "images"), "images", rows, params.digest())
    log(f"  {len(rows)} image(s) in {params.dataset_key}")


IMAGES = StageKind(name="images", version=1, params=ImagesParams, out=ImagesOut, action=images)
