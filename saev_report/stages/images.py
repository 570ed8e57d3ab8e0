"""Stage `images`: one row per image of a dataset (path, label, size, status)."""

from __future__ import annotations

from pathlib import Path

from saev_report.progress import log
from saev_report.spec import DatasetSpec
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, open_dataset, table_part


class ImagesParams(StageParams):
    dataset_key: str
    dataset: DatasetSpec


class ImagesOut(StageOut):
    def labels(self) -> dict[int, str | None]:
        """Label of every image, by dataset index."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.table_part("images"), columns=["image_idx", "label"])
        return dict(zip(table.column("image_idx").to_pylist(), table.column("label").to_pylist()))


def images(params: ImagesParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report.datasets import image_rows
    from saev_report.tables import write_table

    dataset = open_dataset(params.dataset_key, params.dataset, params.cache_dir)
    rows = image_rows(dataset, cache_dir=params.cache_dir)  # decodes each file with the record stage's checks
    write_table(table_part(out_dir, "images"), "images", rows, params.digest())
    log(f"  {len(rows)} image(s) in {params.dataset_key}")


IMAGES = StageKind(name="images", version=2, params=ImagesParams, out=ImagesOut, action=images, writes=("images",))
