"""Stage `analyse`: metrics, per-feature statistics and exemplars of every SAE of a (model, layer)."""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import AnalysisSpec, SAESpec
from saev_report.stages.base import Inputs, StageKind, StageOut, StageParams, table_part, take
from saev_report.stages.images import ImagesOut
from saev_report.stages.record import RecordOut
from saev_report.stages.train import TrainOut


class AnalyseParams(StageParams):
    model_key: str
    layer: int
    dataset_key: str
    """The record dataset (named in the exemplar rows)."""
    sae: SAESpec
    """The sweep, to know which SAEs the train input holds and their settings."""
    analysis: AnalysisSpec
    device: str


class AnalyseOut(StageOut):
    def features_part(self, tag: str) -> Path:
        """The `features` table part of the SAE with sweep tag `tag`."""
        return self.table_part("features", tag)

    def features(self, tag: str) -> list[dict]:
        import pyarrow.parquet as pq

        return pq.read_table(self.features_part(tag)).to_pylist()


def analyse(params: AnalyseParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report import distributed
    from saev_report.analyse import analyse_store, write_analysis
    from saev_report.progress import log
    from saev_report.runtime import pick_device
    from saev_report.spec import sae_id, sae_sweep
    from saev_report.tables import write_table

    device = pick_device(params.device)
    store = take(inputs, "record", RecordOut).store(params.layer)
    saes = take(inputs, "train", TrainOut)
    labels = take(inputs, "images", ImagesOut).labels()
    labels_or_none = labels if any(v is not None for v in labels.values()) else None
    shard = distributed.current()  # under torchrun each rank scans its share; all get the merged result
    rows = []
    for config in sae_sweep(params.sae):
        sid = sae_id(params.model_key, params.layer, config)
        result = analyse_store(store, saes.sae(config.tag, device), labels_or_none, params.analysis, sid, params.dataset_key,
                               device, shard=shard)
        if not shard.is_main:
            continue
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


ANALYSE = StageKind(name="analyse", version=2, params=AnalyseParams, out=AnalyseOut, action=analyse, parallel=True)
