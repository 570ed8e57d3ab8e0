"""Stage `experiments`: one `ExperimentSpec`'s concept-suppression tests, for each SAE it names."""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import DatasetSpec, ExperimentSpec, ModelSpec
from saev_report.stages.analyse import AnalyseOut
from saev_report.stages.base import Inputs, StageKind, StageOut, StageParams, open_backbone, open_dataset, table_part, take
from saev_report.stages.heads import HeadOut
from saev_report.stages.train import TrainOut


class SAEChoice(StageParams):
    sae_tag: str
    sae_id: str


class ExperimentParams(StageParams):
    experiment: ExperimentSpec
    """The experiment with its defaults resolved (`layer`, `dataset` set)."""
    layer: int
    level: str
    """`patch` for a segmentation head, `image` for a classification head."""
    saes: list[SAEChoice]
    model: ModelSpec
    """The edited model as declared, less its display label."""
    dataset_key: str
    dataset: DatasetSpec
    seed: int
    device: str


class ExperimentsOut(StageOut):
    pass


def experiment(params: ExperimentParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report.experiments import log_summary, run_experiment, summarise
    from saev_report.runtime import seed_everything
    from saev_report.tables import write_table

    exp = params.experiment
    seed_everything(params.seed)
    backbone, device = open_backbone(params.model, params.cache_dir, params.device, params.seed)
    dataset = open_dataset(params.dataset_key, params.dataset, params.cache_dir)
    head = take(inputs, "head", HeadOut).head(device)
    analysis = take(inputs, "analyse", AnalyseOut)
    tokens_cache: dict = {}  # the SAEs share each image's forward pass
    for choice in params.saes:
        concepts = analysis.concepts(choice.sae_tag)
        if not concepts:
            raise ValueError(f"experiment {exp.name}: the analysis wrote no `concepts` rows for {choice.sae_id}; "
                             "experiments need concept statistics (a record dataset with masks or labels)")
        rows = run_experiment(
            name=exp.name, backbone=backbone, sae=take(inputs, "train", TrainOut).sae(choice.sae_tag, device), sae_id=choice.sae_id,
            head=head, head_key=exp.head, dataset=dataset, layer=params.layer, concept_rows=concepts,
            feature_rows={int(r["feature"]): r for r in analysis.features(choice.sae_tag)}, level=params.level, ms=exp.m,
            factors=exp.factors, wheres=exp.where, controls=exp.controls, n_images=exp.n_images, concepts=exp.concepts,
            seed=params.seed, tokens_cache=tokens_cache,
        )
        write_table(table_part(out_dir, "experiments", choice.sae_tag), "experiments", rows, params.digest())
        log_summary(exp.name, choice.sae_id, summarise(rows))


EXPERIMENTS = StageKind(name="experiments", version=1, params=ExperimentParams, out=ExperimentsOut, action=experiment)
