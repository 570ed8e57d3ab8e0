"""Stage `heads`: one linear probe on a model's final-norm tokens, read from the `tokens` stage."""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import DatasetSpec, HeadSpec
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, open_dataset, table_part, take
from saev_report.stages.record import RecordOut
from saev_report.stages.tokens import TokensOut


class HeadParams(StageParams):
    head_key: str
    head: HeadSpec
    train_key: str
    train_dataset: DatasetSpec
    val_key: str | None
    val_dataset: DatasetSpec | None
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
    from saev_report.runtime import pick_device, seed_everything
    from saev_report.tables import write_table

    seed_everything(params.seed)
    record = take(inputs, "record", RecordOut) if "record" in inputs else None
    tokens = take(inputs, "tokens", TokensOut).final(record)
    train_ds = open_dataset(params.train_key, params.train_dataset, params.cache_dir)
    val_ds = open_dataset(params.val_key, params.val_dataset, params.cache_dir) if params.val_key else None
    row = build_head(params.head_key, params.head, tokens, train_ds, val_ds, out_dir / "head", seed=params.seed,
                     device=pick_device(params.device))
    write_table(table_part(out_dir, "heads"), "heads", [row], params.digest())


HEADS = StageKind(name="heads", version=2, params=HeadParams, out=HeadOut, action=train_head_stage,
                   reads={"tokens": Role(TokensOut), "record": Role(RecordOut, optional=True)}, writes=("heads",))
