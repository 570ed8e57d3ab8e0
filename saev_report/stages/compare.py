"""Stages `compare` and `stability`: match one SAE's features to another's over the same images.

`compare` matches the SAEs of two models; `stability` matches one model's SAE to
its twin trained with another seed. Both write `matches` rows.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, table_part, take
from saev_report.stages.record import RecordOut
from saev_report.stages.train import TrainOut


class SAERef(BaseModel):
    """One side of a match: which SAE, of which model and layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_key: str
    layer: int
    sae_tag: str
    sae_id: str


class MatchParams(StageParams):
    a: SAERef
    b: SAERef
    min_score: float


class MatchesOut(StageOut):
    pass


BATCH_IMAGES = 16
"""Images per feature-map batch (and the unit in which ranks split the images)."""


def _aligned_maps(store_a, store_b, sae_a, sae_b, batch_images: int = 16, shard=None):
    """Per-side iterables of feature maps over the images both stores hold, in the same order
    (under torchrun: this rank's share of them, whole batches)."""
    import numpy as np
    import torch

    from saev_report.compare import Repeatable, feature_maps

    pos_a = {int(i): p for p, i in enumerate(store_a.image_indices)}
    pos_b = {int(i): p for p, i in enumerate(store_b.image_indices)}
    common = sorted(set(pos_a) & set(pos_b))
    if shard is not None:
        mine = shard.range(len(common), align=batch_images)
        common = common[mine.start:mine.stop]

    def side(store, positions: dict[int, int], sae):
        grid = (store.meta.grid_h, store.meta.grid_w)
        patches = store.meta.patch_slice

        def batches():
            for start in range(0, len(common), batch_images):
                chunk = common[start:start + batch_images]
                acts_bpd = torch.stack([store.image_acts(positions[i])[patches] for i in chunk]).float()
                with torch.inference_mode():
                    yield feature_maps(acts_bpd, sae, grid)

        return Repeatable(batches)

    return side(store_a, pos_a, sae_a), side(store_b, pos_b, sae_b), np.array(common)


def compare(params: MatchParams, inputs: Inputs, out_dir: Path) -> None:
    """Match model `a`'s SAE to model `b`'s: comparison `a~b`."""
    from saev_report.compare import comparison_name

    _match(comparison_name(params.a.model_key, params.b.model_key), params, inputs, out_dir)


def stability(params: MatchParams, inputs: Inputs, out_dir: Path) -> None:
    """Match a model's SAE to its other-seed twin: comparison `model~seeds`."""
    from saev_report.compare import stability_name

    _match(stability_name(params.a.model_key), params, inputs, out_dir)


def _match(comparison: str, params: MatchParams, inputs: Inputs, out_dir: Path) -> None:
    """Match `a`'s features to `b`'s; inputs `record_a`, `train_a`, `record_b`, `train_b`."""
    from saev_report import distributed
    from saev_report.compare import match_features, match_rows
    from saev_report.progress import log
    from saev_report.tables import write_table

    a, b = params.a, params.b
    store_a = take(inputs, "record_a", RecordOut).store(a.layer)
    store_b = take(inputs, "record_b", RecordOut).store(b.layer)
    sae_a = take(inputs, "train_a", TrainOut).sae(a.sae_tag)
    sae_b = take(inputs, "train_b", TrainOut).sae(b.sae_tag)
    shard = distributed.current()
    n_common = len(set(store_a.image_indices.tolist()) & set(store_b.image_indices.tolist()))
    if n_common < shard.world * BATCH_IMAGES:
        shard = distributed.ONE  # too few images for every rank to get a batch: each does it all
    maps_a, maps_b, common = _aligned_maps(store_a, store_b, sae_a, sae_b, BATCH_IMAGES, shard if shard.world > 1 else None)
    result = match_features(maps_a, maps_b, min_score=params.min_score, label=comparison, shard=shard)
    if not distributed.current().is_main:
        return
    rows = match_rows(result, comparison, a.sae_id, b.sae_id, params.min_score)
    write_table(table_part(out_dir, "matches"), "matches", rows, params.digest())
    matched = [r for r in rows if r["sae_a"] == a.sae_id]
    n_matched = sum(bool(r["matched"]) for r in matched)
    scores = [r["score"] for r in matched if r["score"] is not None]
    median = sorted(scores)[len(scores) // 2] if scores else float("nan")
    log(f"  {comparison}: {n_matched}/{len(matched)} features of {a.sae_id} matched (median best r {median:.3f}) over {len(common)} images")


# Both sides' recordings and SAEs (a stability stage fills both sides from one model).
MATCH_READS = {"record_a": Role(RecordOut), "train_a": Role(TrainOut), "record_b": Role(RecordOut), "train_b": Role(TrainOut)}
COMPARE = StageKind(name="compare", version=1, params=MatchParams, out=MatchesOut, action=compare, parallel=True,
                    reads=MATCH_READS, writes=("matches",))
STABILITY = StageKind(name="stability", version=1, params=MatchParams, out=MatchesOut, action=stability, parallel=True,
                      reads=MATCH_READS, writes=("matches",))
