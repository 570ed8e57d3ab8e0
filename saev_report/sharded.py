"""What the record, train and analyse stages do across the ranks of a torchrun build.

- **record**: the images are cut into contiguous ranges at shard boundaries
  (`distributed.Shard.range` with `align = images per shard`); each rank records
  its range into its own stores under `ranks/<r>-of-<w>/` (so a killed rank
  resumes its own shards), then rank 0 merges them into `L<layer>/`. When every
  rank but the last stored a whole number of shards (no bad images), the merge
  hard-links the shards under their global names and writes one `meta.json`;
  otherwise it re-chunks them through a `ShardWriter`. Either way the store is
  bit-identical to a one-process recording: each rank ran the very batches one
  process would have run.
- **train**: with at least as many SAEs in the sweep as ranks, the SAEs are dealt
  round-robin and each rank trains its own in one pass over the store; with fewer,
  every SAE trains data-parallel on all ranks (`train_saes(data_parallel=...)`).

- **analyse** (`analyse.analyse_store(shard=...)`, not here: it needs no files of its
  own): each rank scans a contiguous range of whole analysis batches of the store's
  images (`Shard.range` with `align = images per batch`), so it runs the very batches
  one process would; `analyse.ScanResult.merge_ranks` then merges every accumulator
  exactly: counts, histograms (features, class split, concept detection with its
  null) and float64 sums add, maxima max, the per-dim means and M2 of the FVU combine
  (Chan et al.), and the top-k exemplars and the quantile samples re-rank over keys
  carrying the global image position (a sample's priority is a hash of the dataset
  image index, so the split cannot change it); only the winners' maps travel. Rank 0
  computes the concept labels once and shares them, and writes every table.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from saev_report import distributed
from saev_report.activations import META_FILE, ActivationStore, ShardEntry, ShardWriter, from_storage, read_meta, shard_name
from saev_report.backbones import Backbone
from saev_report.datasets import ImageDataset
from saev_report.distributed import Shard
from saev_report.record import IMAGES_FILE, layer_requests, record_activations, record_layers, shard_images, source_shape, write_image_index
from saev_report.spec import SAEConfig, SAESpec
from saev_report.train import BatchSource, TrainedSAE, train_saes

RANKS_DIR = "ranks"


def rank_dir(out_dir: Path, shard: Shard) -> Path:
    """Where rank `shard.rank` of a `shard.world`-rank recording keeps its own stores."""
    return Path(out_dir) / RANKS_DIR / f"{shard.rank}-of-{shard.world}"


def record_across_ranks(backbone: Backbone, dataset: ImageDataset, *, shard: Shard, model_key: str, layers: Sequence[int],
                        tokens: Sequence[str], out_dir: Path, dtype: str, batch_size: int, shard_mb: int,
                        device: torch.device) -> None:
    """`record.record_layers` with the images split over the ranks (see the module docstring)."""
    common = dict(model_key=model_key, dtype=dtype, batch_size=batch_size, shard_mb=shard_mb, device=device)
    if shard.world == 1:
        record_layers(backbone, dataset, layers=layers, tokens=tokens, out_dir=out_dir, **common)
        return
    requests = layer_requests(backbone.layout, layers, tokens)
    stores = {r.name: Path(out_dir) / r.name for r in requests}
    if (Path(out_dir) / IMAGES_FILE).exists() and all(_is_complete(store) for store in stores.values()):
        return  # merged by an earlier run that was killed before the stage was renamed
    # Cut where the biggest stores (most tokens per image) change shard, so their shards are
    # linked, not copied; smaller stores (CLS, registers) are re-chunked if they do not line up.
    align = min(shard_images(len(source_shape(backbone, r.source)[0].indices(r.tokens)), source_shape(backbone, r.source)[1],
                             dtype, batch_size, shard_mb)
                for r in requests)
    mine = shard.range(len(dataset.records), align=align)
    part = dataclasses.replace(dataset, records=dataset.records[mine.start:mine.stop])
    record_activations(backbone, part, stores=requests, out_dir=rank_dir(out_dir, shard), **common)
    distributed.barrier()
    if shard.is_main:
        ranks = [rank_dir(out_dir, Shard(r, shard.world)) for r in range(shard.world)]
        for name, store in stores.items():
            merge_stores([r / name for r in ranks], store)
        write_image_index(out_dir, backbone.image_size, dataset.records)
        shutil.rmtree(Path(out_dir) / RANKS_DIR)
    distributed.barrier()


def _is_complete(store: Path) -> bool:
    return (store / META_FILE).exists() and read_meta(store).complete


def merge_stores(parts: Sequence[Path], target: Path) -> Path:
    """Concatenate complete stores (the ranks' parts, in rank order) into the store `target`.

    Crash-safe: the merge is built in `<target>.merging/` and renamed; the parts are only
    read (shards are hard-linked), so a killed merge is simply redone.
    """
    metas = [read_meta(p) for p in parts]
    per_shard = metas[0].images_per_shard
    if any(m.identity() != metas[0].identity() or not m.complete for m in metas):
        raise ValueError(f"cannot merge {[str(p) for p in parts]}: stores differ or are incomplete")
    work = target.with_name(target.name + ".merging")
    for stale in (work, target):
        if stale.exists():
            shutil.rmtree(stale)
    work.mkdir(parents=True)
    if all(m.n_images % per_shard == 0 for m in metas[:-1]):
        _link_shards(parts, metas, work)
    else:  # a rank skipped images: shard boundaries move, so write the shards anew
        writer = ShardWriter(work, metas[0], per_shard)
        for part, meta in zip(parts, metas):
            store = ActivationStore(part)
            for entry, first in zip(meta.shards, np.cumsum([0] + [s.n_images for s in meta.shards])):
                stored = np.load(part / entry.file, mmap_mode="r")
                # bf16 → float32 → bf16 round-trips exactly, so the bytes are unchanged
                writer.add(store.image_indices[first:first + entry.n_images], from_storage(np.array(stored), meta.dtype))
            for skipped in meta.skipped:
                writer.skip(skipped.image_idx, skipped.path, skipped.reason)
        writer.close()
    os.replace(work, target)
    return target


def _link_shards(parts: Sequence[Path], metas: list, work: Path) -> None:
    shards: list[ShardEntry] = []
    for part, meta in zip(parts, metas):
        for entry in meta.shards:
            name = shard_name(len(shards))
            try:
                os.link(part / entry.file, work / name)
            except OSError:  # no hard links on this filesystem
                shutil.copy2(part / entry.file, work / name)
            shards.append(ShardEntry(name, entry.n_images))
    merged = dataclasses.replace(
        metas[0], shards=shards, image_indices=[i for m in metas for i in m.image_indices],
        skipped=[s for m in metas for s in m.skipped], complete=True,
    )
    tmp = work / (META_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(merged.to_json().encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, work / META_FILE)


def train_across_ranks(store: BatchSource, sae_spec: SAESpec, configs: Sequence[SAEConfig], out_dir: Path,
                       device: torch.device | str, spec_hash: str, sae_id_prefix: str, *, data_seed: int,
                       shard: Shard) -> list[TrainedSAE]:
    """Spread the sweep over the ranks; with fewer SAEs than ranks, train them data-parallel.

    Returns the SAEs this rank trained (data-parallel: all of them, on every rank).
    """
    common = dict(data_seed=data_seed)
    if shard.world == 1:
        return train_saes(store, sae_spec, configs, out_dir, device, spec_hash, sae_id_prefix, **common)
    if len(configs) >= shard.world:
        return train_saes(store, sae_spec, shard.items(list(configs)), out_dir, device, spec_hash, sae_id_prefix, **common)
    return train_saes(store, sae_spec, configs, out_dir, device, spec_hash, sae_id_prefix, data_parallel=shard, **common)
