"""Stage `splice`: a model's heads scored with the patch tokens at layer L replaced by x̂ (no error
term) and by their mean, for every SAE of the sweep: the `cls_*` / `seg_*` columns of `saes`."""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import DatasetSpec, ModelSpec, SAESpec
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, open_backbone, open_dataset, table_part, take
from saev_report.stages.heads import HeadOut
from saev_report.stages.record import RecordOut
from saev_report.stages.tokens import TokensOut
from saev_report.stages.train import TrainOut


class SpliceParams(StageParams):
    model_key: str
    model: ModelSpec
    """The model as declared, less its display label."""
    heads: dict[str, str]
    """Head key → column prefix (`cls`, `seg`): the model's first head of each task on this dataset."""
    sae: SAESpec
    dataset_key: str
    dataset: DatasetSpec
    batch_size: int
    seed: int
    device: str


class SpliceOut(StageOut):
    pass


def splice(params: SpliceParams, inputs: Inputs, out_dir: Path) -> None:
    import numpy as np

    from saev_report.experiments import spliced_scores, store_patch_mean
    from saev_report.progress import log
    from saev_report.runtime import seed_everything
    from saev_report.spec import sae_id, sae_sweep
    from saev_report.tables import write_table

    seed_everything(params.seed)
    backbone, device = open_backbone(params.model, params.cache_dir, params.device, params.seed)
    dataset = open_dataset(params.dataset_key, params.dataset, params.cache_dir)
    heads = {key: take(inputs, f"head/{key}", HeadOut).head(device) for key in params.heads}
    rows: dict[str, dict] = {}
    per_image: list[dict] = []
    for layer in params.model.layers:
        train = take(inputs, "train/L{}".format(layer), TrainOut)
        saes = {sae_id(params.model_key, layer, c): train.sae(c.tag, device) for c in sae_sweep(params.sae)}
        record = take(inputs, "record", RecordOut)
        mean_d = store_patch_mean(record.store(layer))
        stored = None
        if "tokens" in inputs:  # the recorded layer-L and final tokens: no forward pass up to layer L
            found = take(inputs, "tokens", TokensOut)
            stored = (found.layer(record, layer), found.final(record))
        scores = spliced_scores(backbone, saes, mean_d, heads, dataset, layer, batch_size=params.batch_size, tokens=stored)
        for (sid, head_key), s in scores.items():
            prefix = params.heads[head_key]
            rows.setdefault(sid, {"sae_id": sid}).update({
                f"{prefix}_head": head_key, f"{prefix}_clean": s.clean, f"{prefix}_spliced": s.spliced,
                f"{prefix}_ablated": s.ablated, f"{prefix}_recovered": s.recovered,
            })
            for i, idx in enumerate(s.image_idx or []):
                per_image.append({"sae_id": sid, "head": head_key, "task": heads[head_key].task, "dataset": params.dataset_key,
                                  "image_idx": idx, **{arm: np.atleast_1d(s.per_image[arm][i]).tolist() for arm in ("clean", "spliced", "ablated")}})
            recovered = f", recovered {s.recovered:.2f}" if s.recovered is not None else ""
            log(f"  {sid} × {head_key}: {s.metric} clean {s.clean:.3f}, spliced {s.spliced:.3f}, mean-ablated {s.ablated:.3f}{recovered}")
    write_table(table_part(out_dir, "saes", "splice"), "saes", list(rows.values()), params.digest())
    write_table(table_part(out_dir, "splice_images"), "splice_images", per_image, params.digest())


SPLICE = StageKind(name="splice", version=3, params=SpliceParams, out=SpliceOut, action=splice,
                    reads={"record": Role(RecordOut), "train": Role(TrainOut, per_key=True), "head": Role(HeadOut, per_key=True),
                           "tokens": Role(TokensOut, optional=True)},
                    writes=("saes", "splice_images"))
