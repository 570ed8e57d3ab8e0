"""Stage `analyse`: metrics, per-feature statistics, exemplars and concept detection of every SAE of a (model, layer)."""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import AnalysisSpec, DatasetSpec, SAESpec
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, open_dataset, table_part, take
from saev_report.stages.images import ImagesOut
from saev_report.stages.record import RecordOut
from saev_report.stages.train import TrainOut


class AnalyseParams(StageParams):
    model_key: str
    layer: int
    dataset_key: str
    """The record dataset (named in the exemplar rows)."""
    dataset: DatasetSpec
    """Its spec: the masks and class labels concept detection scores features against."""
    sae: SAESpec
    """The sweep, to know which SAEs the train input holds and their settings."""
    analysis: AnalysisSpec
    seed: int
    """Seed of the permuted-label null."""
    device: str


class AnalyseOut(StageOut):
    def features_part(self, tag: str) -> Path:
        """The `features` table part of the SAE with sweep tag `tag`."""
        return self.table_part("features", tag)

    def features(self, tag: str) -> list[dict]:
        import pyarrow.parquet as pq

        return pq.read_table(self.features_part(tag)).to_pylist()

    def concepts(self, tag: str) -> list[dict]:
        """The `concepts` rows of the SAE with sweep tag `tag` (empty when the analysis had no concept labels)."""
        import pyarrow.parquet as pq

        part = self.table_part("concepts", tag)
        return pq.read_table(part).to_pylist() if part.is_file() else []


def analyse(params: AnalyseParams, inputs: Inputs, out_dir: Path) -> None:
    """Under torchrun every rank scans its range of the images and rank 0 writes the merged tables."""
    from saev_report import distributed
    from saev_report.analyse import analyse_store, write_analysis
    from saev_report.progress import log
    from saev_report.runtime import pick_device
    from saev_report.spec import sae_id, sae_sweep
    from saev_report.tables import write_table

    shard = distributed.current()
    device = pick_device(params.device)
    store = take(inputs, "record", RecordOut).store(params.layer)
    saes = take(inputs, "train", TrainOut)
    labels = take(inputs, "images", ImagesOut).labels()
    labels_or_none = labels if any(v is not None for v in labels.values()) else None
    concept_labels = shared_concept_labels(open_dataset(params.dataset_key, params.dataset, params.cache_dir),
                                           (store.meta.grid_h, store.meta.grid_w), params.seed, out_dir / "concepts" / "patch_labels.npy",
                                           params.analysis.null_permutations)
    rows = []
    for config in sae_sweep(params.sae):
        sid = sae_id(params.model_key, params.layer, config)
        result = analyse_store(store, saes.sae(config.tag, device), labels_or_none, params.analysis, sid, params.dataset_key, device,
                               concept_labels=concept_labels, shard=shard)
        if result is None:
            continue  # not rank 0: this rank's share is merged into rank 0's result
        write_analysis(result, out_dir / "tables", params.digest(), stem=config.tag)
        trained = saes.sae_config(config.tag)
        rows.append({
            "sae_id": sid, "model": params.model_key, "layer": params.layer, "kind": config.kind, "d_model": trained["d_model"],
            "n_features": trained["n_features"], "expansion": config.expansion, "l1_coeff": config.l1_coeff,
            "k": config.k, "seed": config.seed, "n_patches_trained": trained.get("n_patches_trained"), **result.metrics,
        })
        m = result.metrics
        log(f"  {sid}: MSE {m['mse']:.4f}, FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, dead {m['n_dead']}, dense {m['n_dense']}")
    if shard.is_main:
        write_table(table_part(out_dir, "saes"), "saes", rows, params.digest())


def shared_concept_labels(dataset, grid: tuple[int, int], seed: int, patch_path: Path, n_null: int = 1):
    """The `ImageDataset`'s concept labels (None without masks or classes), read once for every SAE of the sweep.

    Under torchrun rank 0 computes them, writing the per-patch mask classes to `patch_path`;
    the other ranks take its labels (the very same null permutation) and memory-map that file."""
    import dataclasses

    import numpy as np

    from saev_report import distributed
    from saev_report.concepts import dataset_labels

    shard = distributed.current()
    labels = dataset_labels(dataset, grid, seed, patch_path, n_null) if shard.is_main else None
    if shard.world == 1:
        return labels
    # Everything but the (possibly huge) patch labels goes over the wire; those are on disk.
    sent = distributed.broadcast(None if labels is None else
                                 (dataclasses.replace(labels, patch_ip=None), labels.patch_ip is not None))
    if shard.is_main or sent is None:
        return labels
    light, has_patch = sent
    return dataclasses.replace(light, patch_ip=np.load(patch_path, mmap_mode="r") if has_patch else None)


# `parallel`: every rank scans a contiguous range of whole batches of the images and
# `analyse.ScanResult.merge_ranks` merges them exactly; rank 0 writes the tables.
ANALYSE = StageKind(name="analyse", version=6, params=AnalyseParams, out=AnalyseOut, action=analyse, parallel=True,
                     reads={"record": Role(RecordOut), "train": Role(TrainOut), "images": Role(ImagesOut)},
                     writes=("features", "exemplars", "quantile_exemplars", "class_split", "similar_features", "concepts",
                             "concept_nulls", "saes"))
