"""Stage `record`: a model's residual stream over the record dataset, one store per layer.

Each layer's store holds the spec's token kinds (what SAEs train on) and a small
`L<layer>-rest` store the other kinds (CLS, registers), so later stages can
resume the forward pass from any recorded layer (see `record.record_layers`).
"""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import DatasetSpec, Dtype, ModelSpec
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, open_backbone, open_dataset


class RecordParams(StageParams):
    model_key: str
    model: ModelSpec
    """The model as declared, less its display label."""
    dataset_key: str
    dataset: DatasetSpec
    dtype: Dtype
    batch_size: int
    shard_mb: int
    seed: int
    device: str


class RecordOut(StageOut):
    def store_dir(self, layer: int) -> Path:
        return self.root / f"L{layer}"

    def store(self, layer: int):
        """The `ActivationStore` of `layer` (the model's token kinds): what SAEs train on."""
        from saev_report.activations import ActivationStore

        return ActivationStore(self.store_dir(layer))

    def image_index(self) -> tuple[int, list[tuple[int, str]]]:
        """(model input size, [(dataset index, resolved path)]) of the recorded dataset."""
        from saev_report.record import read_image_index

        return read_image_index(self.root, self.cache_dir)

    def token_set(self, layer: int):
        """Every token kind at `layer` of the recorded images, as one `record.TokenSet`."""
        from saev_report.record import TokenSet

        return TokenSet((self.store_dir(layer), self.root / f"L{layer}-rest"), tuple(self.image_index()[1]))


def record(params: RecordParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report import distributed
    from saev_report.record import relocate_image_index
    from saev_report.runtime import seed_everything
    from saev_report.sharded import record_across_ranks

    seed_everything(params.seed)
    backbone, device = open_backbone(params.model, params.cache_dir, params.device, params.seed)
    dataset = open_dataset(params.dataset_key, params.dataset, params.cache_dir)
    record_across_ranks(  # one process: record.record_layers
        backbone, dataset, shard=distributed.current(), model_key=params.model_key, layers=params.model.layers, tokens=params.model.tokens,
        out_dir=out_dir, dtype=params.dtype, batch_size=params.batch_size, shard_mb=params.shard_mb, device=device,
    )
    if distributed.current().is_main:  # paths into the shared cache (the demo set) stored relative to it
        relocate_image_index(out_dir, params.cache_dir)


RECORD = StageKind(name="record", version=2, params=RecordParams, out=RecordOut, action=record, resumable=True,
                    parallel=True)
