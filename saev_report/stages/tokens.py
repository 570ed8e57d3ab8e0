"""Stage `tokens`: what a model's heads and edits read beyond its recording, without re-running it.

Final-norm tokens of the recorded images the heads read come from resuming the
forward pass at the last recorded layer; images of head and edit datasets that
the record dataset lacks are recorded here, once (see `record.record_reach`).
"""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import DatasetSpec, Dtype, ModelSpec
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, open_backbone, open_dataset
from saev_report.stages.record import RecordOut


class TokensParams(StageParams):
    model_key: str
    model: ModelSpec
    """The model as declared, less its display label."""
    from_layer: int | None
    """Recorded layer the final tokens are resumed from; None when the model is not recorded."""
    edit_layers: list[int]
    """Layers some edit resumes from (every token kind is kept for the extra images)."""
    head_datasets: dict[str, DatasetSpec]
    """Datasets heads of this model train and select on: they need final tokens."""
    edit_datasets: dict[str, DatasetSpec]
    """Datasets edits of this model change: they need every token kind at the edit layers."""
    dtype: Dtype
    batch_size: int
    shard_mb: int
    seed: int
    device: str


class TokensOut(StageOut):
    """Tokens by image path; pass the model's `RecordOut` (None if it is not recorded)."""

    def final(self, record: RecordOut | None):
        """`record.RecordedTokens` of the final norm, over the recorded and the extra images."""
        from saev_report.record import EXTRA, RecordedTokens, TokenSet, read_image_index

        image_size, extra = read_image_index(self.root / EXTRA, self.cache_dir)
        sets = [TokenSet((self.root / EXTRA / "final",), tuple(extra))]
        if record is not None:
            sets.insert(0, TokenSet((self.root / "final",), tuple(record.image_index()[1])))
        return RecordedTokens(sets, image_size)

    def layer(self, record: RecordOut | None, layer: int):
        """`record.RecordedTokens` of every token kind at `layer`, over the recorded and the extra images."""
        from saev_report.record import EXTRA, RecordedTokens, TokenSet, read_image_index

        image_size, extra = read_image_index(self.root / EXTRA, self.cache_dir)
        sets = [TokenSet((self.root / EXTRA / f"L{layer}",), tuple(extra))]
        if record is not None:
            sets.insert(0, record.token_set(layer))
        return RecordedTokens(sets, image_size)


def tokens(params: TokensParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report.record import EXTRA, RecordedTokens, record_reach, relocate_image_index
    from saev_report.runtime import seed_everything

    seed_everything(params.seed)
    backbone, device = open_backbone(params.model, params.cache_dir, params.device, params.seed)
    record = inputs.get("record")
    recorded, images = None, []
    if isinstance(record, RecordOut) and params.from_layer is not None:
        image_size, images = record.image_index()
        recorded = RecordedTokens([record.token_set(params.from_layer)], image_size)
    head_data = [open_dataset(key, ds, params.cache_dir) for key, ds in sorted(params.head_datasets.items())]
    edit_data = [open_dataset(key, ds, params.cache_dir) for key, ds in sorted(params.edit_datasets.items())]
    record_reach(
        backbone, recorded, images, head_data, edit_data, model_key=params.model_key, from_layer=params.from_layer,
        edit_layers=params.edit_layers, final=bool(head_data), out_dir=out_dir, dtype=params.dtype,
        batch_size=params.batch_size, shard_mb=params.shard_mb, device=device,
    )
    relocate_image_index(out_dir / EXTRA, params.cache_dir)  # paths into the shared cache, relative to it


TOKENS = StageKind(name="tokens", version=1, params=TokensParams, out=TokensOut, action=tokens, reads={"record": Role(RecordOut, optional=True)})
