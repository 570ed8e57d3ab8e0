"""Record residual-stream activations: images × backbone → one shard store per layer.

One forward pass per batch captures every requested layer. Decoding and
preprocessing run in a DataLoader worker so the forward pass is never waiting
on PIL. Bad images (corrupt, tiny) and images whose activations are not finite
are skipped, logged and listed in each store's metadata. A killed recording
resumes after the last complete shard of every layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.markup import escape
from torch.utils.data import DataLoader, Dataset

from saev_report.activations import ShardWriter, StoreMeta, images_per_shard_for
from saev_report.backbones import Backbone
from saev_report.datasets import BadImage, ImageDataset, ImageRecord, load_image
from saev_report.progress import bar, log


@dataclass(frozen=True)
class LoadedImage:
    index: int
    path: str
    pixels_3hw: torch.Tensor | None
    error: str | None


class _PreprocessedImages(Dataset):
    """Decoded, preprocessed images; failures come back as values, never exceptions."""

    def __init__(self, records: Sequence[ImageRecord], backbone: Backbone):
        self.records = records
        self.preprocess = backbone.preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> LoadedImage:
        record = self.records[i]
        try:
            return LoadedImage(record.index, record.path, self.preprocess(load_image(record.path)), None)
        except BadImage as exc:
            return LoadedImage(record.index, record.path, None, str(exc))
        except Exception as exc:  # a preprocessing bug on one odd file must not kill a long recording
            return LoadedImage(record.index, record.path, None, f"unreadable: {type(exc).__name__}: {exc}")


def _collate(items: list[LoadedImage]) -> list[LoadedImage]:
    return items


def default_workers() -> int:
    """One decoding worker on small machines; more where there are cores to spare."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def record_activations(
    backbone: Backbone,
    dataset: ImageDataset,
    *,
    model_key: str,
    layers: Sequence[int],
    tokens: Sequence[str],
    out_dir: Path,
    dtype: str,
    batch_size: int,
    shard_mb: int,
    device: torch.device,
    num_workers: int | None = None,
) -> dict[int, Path]:
    """Record `tokens` at every layer in `layers` for every image of `dataset` into `out_dir/L<layer>/`."""
    layout = backbone.layout
    token_idx = layout.indices(tokens)
    writers: dict[int, ShardWriter] = {}
    for layer in layers:
        meta = StoreMeta.create(model=model_key, layer=layer, dataset=dataset.key, d_model=backbone.d_model,
                                dtype=dtype, token_kinds=list(tokens), layout=layout)
        per_shard = images_per_shard_for(meta.tokens_per_image, backbone.d_model, dtype, shard_mb)
        # Shards hold whole batches, so a resumed run sees exactly the batches an uninterrupted
        # one would, and produces bit-identical shards.
        per_shard = max(batch_size, per_shard // batch_size * batch_size)
        writers[layer] = ShardWriter(out_dir / f"L{layer}", meta, per_shard)
    # Layers are written shard by shard in lock-step; after a kill, align them on the shortest.
    done = min(w.n_images_done for w in writers.values())
    for writer in writers.values():
        writer.rollback(done)
    first = next(iter(writers.values()))
    last_index = first.image_indices[-1] if done else -1
    todo = [r for r in dataset.records if r.index > last_index]
    if done:
        log(f"  resuming after {done} recorded image(s); {len(todo)} to go")

    loader = DataLoader(
        _PreprocessedImages(todo, backbone), batch_size=batch_size, shuffle=False,
        num_workers=default_workers() if num_workers is None else num_workers, collate_fn=_collate,
    )
    n_skipped = 0
    backbone.to(device).eval()
    with bar(f"record {model_key}", total=len(todo), unit="img") as progress, torch.inference_mode():
        for batch in loader:
            good = [item for item in batch if item.pixels_3hw is not None]
            for item in batch:
                if item.error is not None:
                    n_skipped += _skip(writers, item.index, item.path, item.error, n_skipped)
            if good:
                pixels_b3hw = torch.stack([item.pixels_3hw for item in good]).to(device)
                captured = backbone.capture(pixels_b3hw, list(layers))
                finite_b = torch.ones(len(good), dtype=torch.bool)
                for layer in layers:
                    finite_b &= torch.isfinite(captured[layer]).flatten(1).all(1).cpu()
                keep = [i for i, ok in enumerate(finite_b.tolist()) if ok]
                for i, ok in enumerate(finite_b.tolist()):
                    if not ok:
                        n_skipped += _skip(writers, good[i].index, good[i].path, "non-finite activations", n_skipped)
                if keep:
                    idx_b = np.array([good[i].index for i in keep])
                    for layer, writer in writers.items():
                        acts_btd = captured[layer][keep][:, token_idx, :].float().cpu()
                        writer.add(idx_b, acts_btd)
            progress.advance(len(batch))
    for writer in writers.values():
        writer.close()
    if n_skipped:
        log(f"  [yellow]skipped {n_skipped} image(s)[/]; see `skipped` in {escape(str(out_dir))}/L*/meta.json")
    return {layer: out_dir / f"L{layer}" for layer in layers}


def _skip(writers: dict[int, ShardWriter], index: int, path: str, reason: str, n_before: int) -> int:
    for writer in writers.values():
        writer.skip(index, path, reason)
    if n_before < 5:
        log(f"  [yellow]skip[/] {escape(path)}: {escape(reason)}")
    return 1
