"""Stage `record`: a model's residual stream over the record dataset, one store per layer."""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import DatasetSpec, Dtype, ModelSpec
from saev_report.stages.base import Inputs, StageKind, StageOut, StageParams, open_backbone, open_dataset


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
        """The `ActivationStore` of `layer`."""
        from saev_report.activations import ActivationStore

        return ActivationStore(self.store_dir(layer))


def record(params: RecordParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report.record import record_activations
    from saev_report.runtime import seed_everything

    seed_everything(params.seed)
    backbone, device = open_backbone(params.model, params.cache_dir, params.device, params.seed)
    dataset = open_dataset(params.dataset_key, params.dataset, params.cache_dir)
    record_activations(
        backbone, dataset, model_key=params.model_key, layers=params.model.layers, tokens=params.model.tokens,
        out_dir=out_dir, dtype=params.dtype, batch_size=params.batch_size, shard_mb=params.shard_mb, device=device,
    )


RECORD = StageKind(name="record", version=1, params=RecordParams, out=RecordOut, action=record, resumable=True)
