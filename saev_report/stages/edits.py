"""Stage `edits`: one `EditSpec`'s error-preserving interventions against a head, resumed from the recorded layer-L tokens."""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import DatasetSpec, EditSpec, ModelSpec
from saev_report.stages.analyse import AnalyseOut
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, open_backbone, open_dataset, table_part, take
from saev_report.stages.heads import HeadOut
from saev_report.stages.record import RecordOut
from saev_report.stages.tokens import TokensOut
from saev_report.stages.train import TrainOut


class EditParams(StageParams):
    edit: EditSpec
    """The edit with its defaults resolved: `layer` and `dataset` are set."""
    model: ModelSpec
    """The edited model as declared, less its display label."""
    sae_tag: str
    sae_id: str
    dataset: DatasetSpec
    """The spec of `edit.dataset`."""
    seed: int
    device: str

    @property
    def layer(self) -> int:
        assert self.edit.layer is not None, "the builder resolves the edit's layer"
        return self.edit.layer

    @property
    def dataset_key(self) -> str:
        assert self.edit.dataset is not None, "the builder resolves the edit's dataset"
        return self.edit.dataset


class EditsOut(StageOut):
    pass


def edit(params: EditParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report.edits import log_edit_summary, run_edits
    from saev_report.runtime import seed_everything
    from saev_report.tables import write_table

    seed_everything(params.seed)
    backbone, device = open_backbone(params.model, params.cache_dir, params.device, params.seed)
    dataset = open_dataset(params.dataset_key, params.dataset, params.cache_dir)
    tokens = take(inputs, "tokens", TokensOut).layer(take(inputs, "record", RecordOut), params.layer)
    rows = run_edits(
        params.edit, backbone=backbone, sae=take(inputs, "train", TrainOut).sae(params.sae_tag, device),
        sae_id=params.sae_id, head=take(inputs, "head", HeadOut).head(device), head_key=params.edit.head,
        dataset=dataset, layer=params.layer, tokens=tokens,
        features_table=take(inputs, "analyse", AnalyseOut).features(params.sae_tag), seed=params.seed,
    )
    write_table(table_part(out_dir, "edits"), "edits", rows, params.digest())
    log_edit_summary(params.edit.name, rows)


EDITS = StageKind(name="edits", version=2, params=EditParams, out=EditsOut, action=edit,
                   reads={"head": Role(HeadOut), "train": Role(TrainOut), "analyse": Role(AnalyseOut), "record": Role(RecordOut),
                          "tokens": Role(TokensOut)},
                   writes=("edits",))
