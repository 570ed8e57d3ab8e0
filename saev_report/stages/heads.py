"""Stage `heads`: one linear probe on a model's final-layer tokens."""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import DatasetSpec, HeadSpec, ModelSpec
from saev_report.stages.base import Inputs, StageKind, StageOut, StageParams, open_backbone, open_dataset, table_part


class HeadParams(StageParams):
    head_key: str
    head: HeadSpec
    model: ModelSpec
    """The head's model as declared, less its display label."""
    train_key: str
    train_dataset: DatasetSpec
    val_key: str | None
    val_dataset: DatasetSpec | None
    batch_size: int
    """Images per forward pass when extracting final-layer tokens."""
    seed: int
    device: str


class HeadOut(StageOut):
    def head_dir(self) -> Path:
        return self.root / "head"

    def head(self, device: "str | object" = "cpu"):
        """The trained `LinearHead`, frozen."""
        from saev_report.heads import load_head

        return load_head(self.head_dir(), device)


def train_head_stage(params: HeadParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report.heads import build_head
    from saev_report.runtime import seed_everything
    from saev_report.tables import write_table

    seed_everything(params.seed)
    backbone, device = open_backbone(params.model, params.cache_dir, params.device, params.seed)
    train_ds = open_dataset(params.train_key, params.train_dataset, params.cache_dir)
    val_ds = open_dataset(params.val_key, params.val_dataset, params.cache_dir) if params.val_key else None
    row = build_head(params.head_key, params.head, backbone, train_ds, val_ds, out_dir / "head", seed=params.seed,
                     device=device, batch_size=params.batch_size)
    write_table(table_part(out_dir, "heads"), "heads", [row], params.digest())


HEADS = StageKind(name="heads", version=1, params=HeadParams, out=HeadOut, action=train_head_stage)
