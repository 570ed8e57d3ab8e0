"""Stage `experiments`: one `ExperimentSpec`'s concept-suppression tests, for each SAE it names.

Each concept's features are ranked on the analysis's `concepts` rows (the record dataset) or, when
those hold none of the concepts tested (`rank_on: auto`) or when asked (`head_train`), on concept
statistics computed here over the head's training data, written to `experiment_concepts`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saev_report.spec import DatasetSpec, ExperimentSpec, ModelSpec
from saev_report.stages.analyse import AnalyseOut
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, open_backbone, open_dataset, table_part, take
from saev_report.stages.heads import HeadOut
from saev_report.stages.train import TrainOut

if TYPE_CHECKING:
    import pyarrow as pa


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
    record_dataset_key: str
    """The dataset the analysis's `concepts` rows were scored on (named in the rows)."""
    rank_dataset_key: str | None
    """The head's training data, which the stage may rank on: None with `rank_on: analysis`, since
    it is then never read (and so not part of the key)."""
    rank_dataset: DatasetSpec | None
    seed: int
    device: str


class ExperimentsOut(StageOut):
    pass


def experiment(params: ExperimentParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report.experiments import head_data_concepts, rank_batch_size, ranked_features, run_experiment, tested_concepts
    from saev_report.progress import log
    from saev_report.runtime import seed_everything
    from saev_report.tables import write_table

    exp = params.experiment
    seed_everything(params.seed)
    backbone, device = open_backbone(params.model, params.cache_dir, params.device, params.seed)
    dataset = open_dataset(params.dataset_key, params.dataset, params.cache_dir)
    head = take(inputs, "head", HeadOut).head(device)
    analysis = take(inputs, "analyse", AnalyseOut)
    trained = take(inputs, "train", TrainOut)
    saes = {choice.sae_tag: trained.sae(choice.sae_tag, device) for choice in params.saes}

    # Which SAEs rank on the analysis, and which on the head's training data.
    ranking: dict[str, tuple[list[dict[str, Any]] | pa.Table, str]] = {}
    on_head_data: list[SAEChoice] = []
    for choice in params.saes:
        rows = analysis.concepts(choice.sae_tag) if exp.rank_on != "head_train" else []
        if rows and tested_concepts(ranked_features(rows, choice.sae_id, params.level), head.classes, exp.concepts):
            ranking[choice.sae_tag] = (rows, params.record_dataset_key)
        elif params.rank_dataset_key is None:
            raise ValueError(f"experiment {exp.name}: the analysis of {choice.sae_id} scores none of head {exp.head}'s "
                             f"{params.level}-level concepts on {params.record_dataset_key}; use `rank_on: auto` or "
                             "`head_train` to rank on the head's training data")
        else:
            on_head_data.append(choice)
    if on_head_data:
        assert params.rank_dataset_key is not None and params.rank_dataset is not None
        if params.rank_dataset_key == params.dataset_key:
            log(f"  [yellow]experiment {exp.name}[/]: ranking on {params.rank_dataset_key}, the images it edits too "
                "(the head has no validation data): the test is circular")
        rank_data = open_dataset(params.rank_dataset_key, params.rank_dataset, params.cache_dir)
        batch = rank_batch_size(backbone.layer_layout(params.layer).n_patches, max(saes[c.sae_tag].n_features for c in on_head_data))
        work = out_dir / "work"  # memory-mapped patch labels, gone once ranked
        tables = head_data_concepts(backbone, {c.sae_tag: saes[c.sae_tag] for c in on_head_data},
                                    {c.sae_tag: c.sae_id for c in on_head_data}, rank_data, params.layer, params.level,
                                    params.seed, batch, patch_path=work / "patch_labels.npy")
        shutil.rmtree(work, ignore_errors=True)
        for choice in on_head_data:
            table = tables[choice.sae_tag]
            ranking[choice.sae_tag] = (table, params.rank_dataset_key)
            table = table.append_column("experiment", [[exp.name] * table.num_rows])
            table = table.append_column("dataset", [[params.rank_dataset_key] * table.num_rows])
            write_table(table_part(out_dir, "experiment_concepts", choice.sae_tag), "experiment_concepts", table, params.digest())

    tokens_cache: dict = {}  # the SAEs share each edited image's forward pass
    for choice in params.saes:
        concept_rows, rank_dataset = ranking[choice.sae_tag]
        rows = run_experiment(
            name=exp.name, backbone=backbone, sae=saes[choice.sae_tag], sae_id=choice.sae_id,
            head=head, head_key=exp.head, dataset=dataset, layer=params.layer, concept_rows=concept_rows,
            feature_rows={int(r["feature"]): r for r in analysis.features(choice.sae_tag)}, level=params.level, ms=exp.m,
            factors=exp.factors, wheres=exp.where, controls=exp.controls, n_images=exp.n_images, concepts=exp.concepts, random_draws=exp.random_draws,
            seed=params.seed, tokens_cache=tokens_cache, rank_dataset=rank_dataset,
        )
        write_table(table_part(out_dir, "experiments", choice.sae_tag), "experiments", rows, params.digest())
        # Summaries, intervals and verdicts: the `claims` stage (one aggregation of these rows).


EXPERIMENTS = StageKind(name="experiments", version=3, params=ExperimentParams, out=ExperimentsOut, action=experiment,
                         reads={"head": Role(HeadOut), "train": Role(TrainOut), "analyse": Role(AnalyseOut)},
                         writes=("experiments", "experiment_concepts"))
