"""Record residual-stream activations: images × backbone → one shard store per layer.

One forward pass per batch captures every requested layer. Decoding and
preprocessing run in a DataLoader worker so the forward pass is never waiting
on PIL. Bad images (corrupt, tiny) and images whose activations are not finite
are skipped, logged and listed in each store's metadata. A killed recording
resumes after the last complete shard of every layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from rich.markup import escape
from torch.utils.data import DataLoader, Dataset

from saev_report.activations import ShardWriter, StoreMeta, images_per_shard_for
from saev_report.backbones import Backbone, TokenLayout
from saev_report.datasets import BadImage, ImageDataset, ImageRecord, load_image
from saev_report.datasets.base import relative_to_cache, resolve_in_cache
from saev_report.fsutil import atomic_write_text
from saev_report.progress import bar, log, track
from saev_report.spec import TOKEN_KINDS


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


@dataclass(frozen=True)
class StoreRequest:
    """One store to fill: its folder name under `out_dir`, what it captures and which token kinds."""

    name: str
    source: int | Literal["final"]
    """A residual-stream layer (HF `hidden_states` numbering) or `final`: the final-norm tokens."""
    tokens: tuple[str, ...]


def layer_stores(layers: Sequence[int], tokens: Sequence[str]) -> list[StoreRequest]:
    """The plain case: one store `L<layer>` per layer, with the same token kinds."""
    return [StoreRequest(f"L{layer}", layer, tuple(tokens)) for layer in layers]


def shard_images(tokens_per_image: int, d_model: int, dtype: str, batch_size: int, shard_mb: int) -> int:
    """Images per shard: about `shard_mb` MiB, and whole batches, so a resumed run (or a rank
    starting at a shard boundary) sees exactly the batches of an uninterrupted one and
    produces bit-identical shards."""
    per_shard = images_per_shard_for(tokens_per_image, d_model, dtype, shard_mb)
    return max(batch_size, per_shard // batch_size * batch_size)


def source_shape(backbone: Backbone, source: int | str) -> tuple[TokenLayout, int]:
    """Token layout and width of a store's source: a layer's (a CNN's differ per stage) or the final tokens'."""
    if source == "final":
        return backbone.layout, backbone.d_model
    return backbone.layer_layout(int(source)), backbone.layer_width(int(source))


def record_activations(
    backbone: Backbone,
    dataset: ImageDataset,
    *,
    model_key: str,
    stores: Sequence[StoreRequest],
    out_dir: Path,
    dtype: str,
    batch_size: int,
    shard_mb: int,
    device: torch.device,
    num_workers: int | None = None,
) -> dict[str, Path]:
    """Fill every store in `stores` for every image of `dataset`, one forward pass per batch."""
    writers: dict[str, ShardWriter] = {}
    for request in stores:
        layout, width = source_shape(backbone, request.source)
        meta = StoreMeta.create(model=model_key, layer=request.source, dataset=dataset.key, d_model=width,
                                dtype=dtype, token_kinds=list(request.tokens), layout=layout)
        per_shard = shard_images(meta.tokens_per_image, width, dtype, batch_size, shard_mb)
        writers[request.name] = ShardWriter(out_dir / request.name, meta, per_shard)
    token_idx = {r.name: source_shape(backbone, r.source)[0].indices(r.tokens) for r in stores}
    layers = sorted({r.source for r in stores if r.source != "final"})
    final = any(r.source == "final" for r in stores)
    # Stores are written shard by shard in lock-step; after a kill, align them on the shortest.
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
                captured = backbone.capture(pixels_b3hw, layers, final=final)
                finite_b = torch.ones(len(good), dtype=torch.bool)
                for tokens_btd in captured.values():
                    finite_b &= torch.isfinite(tokens_btd).flatten(1).all(1).cpu()
                keep = [i for i, ok in enumerate(finite_b.tolist()) if ok]
                for i, ok in enumerate(finite_b.tolist()):
                    if not ok:
                        n_skipped += _skip(writers, good[i].index, good[i].path, "non-finite activations", n_skipped)
                if keep:
                    idx_b = np.array([good[i].index for i in keep])
                    for request in stores:
                        acts_btd = captured[request.source][keep][:, token_idx[request.name], :].float().cpu()
                        writers[request.name].add(idx_b, acts_btd)
            progress.advance(len(batch))
    for writer in writers.values():
        writer.close()
    if n_skipped:
        log(f"  [yellow]skipped {n_skipped} image(s)[/]; see `skipped` in {escape(str(out_dir))}/*/meta.json")
    return {r.name: out_dir / r.name for r in stores}


def _skip(writers: dict[int, ShardWriter], index: int, path: str, reason: str, n_before: int) -> int:
    for writer in writers.values():
        writer.skip(index, path, reason)
    if n_before < 5:
        log(f"  [yellow]skip[/] {escape(path)}: {escape(reason)}")
    return 1


# --------------------------------------------------------------------------- one pass for every reader

IMAGES_FILE = "images.json"
"""Which file each recorded image came from (`[[dataset index, resolved path], ...]`) and the
model's input size, so readers find images by path whatever dataset names them."""


def rest_kinds(layout: TokenLayout, tokens: Sequence[str]) -> tuple[str, ...]:
    """The token kinds the model has but `tokens` leaves out (CLS, registers when only patches are asked for)."""
    return tuple(k for k in TOKEN_KINDS if k not in tokens and layout.indices([k]))


def all_kinds(layout: TokenLayout) -> tuple[str, ...]:
    return tuple(k for k in TOKEN_KINDS if layout.indices([k]))


def layer_requests(layout: TokenLayout, layers: Sequence[int], tokens: Sequence[str]) -> list[StoreRequest]:
    """The record stage's stores: `L<layer>` with `tokens` and `L<layer>-rest` with the other kinds."""
    rest = rest_kinds(layout, tokens)
    return layer_stores(layers, tokens) + [StoreRequest(f"L{layer}-rest", layer, rest) for layer in layers if rest]


def record_layers(
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
) -> None:
    """The record stage: per layer, `L<layer>` with `tokens` (what SAEs train on) and `L<layer>-rest`
    with the other kinds (a few tokens, so heads and edits can resume the forward pass from any
    recorded layer instead of running the model again)."""
    stores = layer_requests(backbone.layout, layers, tokens)
    record_activations(backbone, dataset, model_key=model_key, stores=stores, out_dir=out_dir, dtype=dtype,
                       batch_size=batch_size, shard_mb=shard_mb, device=device)
    write_image_index(out_dir, backbone.image_size, dataset.records)


def write_image_index(out_dir: Path, image_size: int, records: Sequence[ImageRecord], cache_dir: Path | None = None) -> None:
    """`images.json`: the model input size and [dataset index, resolved path] of every image.

    Paths under `cache_dir` (the shared cache: the generated demo set, say) are stored relative to
    it, so a finished stage still finds its images after the cache moves or another cache is used;
    `read_image_index` resolves them against the cache of the build reading them. Every other path
    is absolute. JSON's `\\udcNN` escapes keep the bytes of a name that is not UTF-8.
    """
    index = {"image_size": image_size, "relative_to": "cache", "images": [[r.index, relative_to_cache(_resolved(r.path), cache_dir)] for r in records]}
    atomic_write_text(out_dir / IMAGES_FILE, json.dumps(index))


def relocate_image_index(folder: Path, cache_dir: Path) -> None:
    """Rewrite `folder`'s `images.json` with paths under `cache_dir` relative to it (idempotent)."""
    image_size, images = read_image_index(folder, cache_dir)
    write_image_index(folder, image_size, [ImageRecord(i, p) for i, p in images], cache_dir)


def read_image_index(folder: Path, cache_dir: Path | None = None) -> tuple[int, list[tuple[int, str]]]:
    """(model input size, [(dataset index, resolved path)]) of a folder `write_image_index` wrote;
    relative paths are resolved against `cache_dir`, the shared cache of the build reading them."""
    index = json.loads((Path(folder) / IMAGES_FILE).read_text(encoding="utf-8"))
    return int(index["image_size"]), [(int(i), resolve_in_cache(p, cache_dir)) for i, p in index["images"]]


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


@dataclass(frozen=True)
class TokenSet:
    """Stores that together hold every token kind of one source for one set of images."""

    stores: tuple[Path, ...]
    images: tuple[tuple[int, str], ...]
    """(dataset index, resolved path) of the images of the set, as `read_image_index` returns."""


class RecordedTokens:
    """Every token of every recorded image at one source (a layer, or the final norm), by file path.

    Joins kind-split stores (`L<layer>` + `L<layer>-rest`) back into the model's
    full token layout, over several image sets (the record dataset, the extra
    images of head and edit datasets). Images a recording skipped (unreadable,
    non-finite) are not found: `get` returns None for them.
    """

    def __init__(self, sets: Sequence[TokenSet], image_size: int):
        from saev_report.activations import ActivationStore

        self.image_size = image_size
        self.layout: TokenLayout | None = None
        self._where: dict[str, tuple[list[ActivationStore], int]] = {}
        for token_set in sets:
            stores = [ActivationStore(d) for d in token_set.stores if (d / "meta.json").is_file()]
            if not stores:
                continue
            metas = [s.meta for s in stores]
            layout = TokenLayout(sum(m.n_cls for m in metas), sum(m.n_registers for m in metas), (metas[0].grid_h, metas[0].grid_w))
            if self.layout is not None and layout != self.layout:
                raise ValueError(f"{token_set.stores[0]}: stores disagree on the token layout")
            self.layout = layout
            position = {int(i): p for p, i in enumerate(stores[0].image_indices)}
            for image_idx, path in token_set.images:
                if image_idx in position:
                    self._where[path] = (stores, position[image_idx])
        if self.layout is None:
            raise FileNotFoundError(f"no recording in {[str(d) for s in sets for d in s.stores]}")

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, path: str) -> bool:
        return _resolved(path) in self._where

    def get(self, path: str) -> torch.Tensor | None:
        """[tokens, d] float32 in layout order (CLS, registers, patches), or None if not recorded."""
        found = self._where.get(_resolved(path))
        if found is None:
            return None
        stores, position = found
        by_kind: dict[str, torch.Tensor] = {}
        for store in stores:
            acts_td, meta = store.image_acts(position), store.meta
            spans = {"cls": (0, meta.n_cls), "registers": (meta.n_cls, meta.patch_offset), "patches": (meta.patch_offset, meta.tokens_per_image)}
            for kind in meta.token_kinds:
                start, stop = spans[kind]
                by_kind[kind] = acts_td[start:stop]
        return torch.cat([by_kind[k] for k in TOKEN_KINDS if k in by_kind])


# --------------------------------------------------------------------------- what heads and edits add


EXTRA = "extra"
"""Sub-folder of the images that head and edit datasets add to the record dataset."""


def record_reach(
    backbone: Backbone,
    recorded: RecordedTokens | None,
    recorded_images: Sequence[tuple[int, str]],
    final_datasets: Sequence[ImageDataset],
    edit_datasets: Sequence[ImageDataset],
    *,
    model_key: str,
    from_layer: int | None,
    edit_layers: Sequence[int],
    final: bool,
    out_dir: Path,
    dtype: str,
    batch_size: int,
    shard_mb: int,
    device: torch.device,
) -> None:
    """The tokens stage: what heads and edits read beyond the recording, without re-running it.

    - `final/`: final-norm tokens of the recorded images that `final_datasets`
      (the heads' data) show, by resuming the forward pass from their recorded
      `from_layer`: only the blocks after it run;
    - `extra/`: images of `final_datasets` and `edit_datasets` that the recording
      lacks (matched by resolved file path, so a split or subset of the same files
      costs nothing), in one forward pass: every token kind at `edit_layers`, and final.
    """
    kinds = all_kinds(backbone.layout)
    backbone.to(device).eval()
    if final and recorded is not None and from_layer is not None:
        wanted = {_resolved(r.path) for ds in final_datasets for r in ds.records}
        _resume_to_final(backbone, recorded, [(i, p) for i, p in recorded_images if p in wanted], model_key=model_key,
                         from_layer=from_layer, out_dir=out_dir / "final", dtype=dtype, batch_size=batch_size,
                         shard_mb=shard_mb, device=device)
    seen = {path for _, path in recorded_images}
    extra: list[ImageRecord] = []
    for other in [*final_datasets, *edit_datasets]:
        for record in other.records:
            path = _resolved(record.path)
            if path not in seen:
                seen.add(path)
                extra.append(ImageRecord(len(extra), record.path, record.label, record.mask_path))
    stores = [StoreRequest(f"L{layer}", layer, kinds) for layer in edit_layers]
    stores += [StoreRequest("final", "final", kinds)] if final else []
    (out_dir / EXTRA).mkdir(parents=True, exist_ok=True)
    if extra and stores:
        log(f"  {len(extra)} image(s) of head/edit datasets are not in the record dataset: recording them")
        record_activations(backbone, ImageDataset(EXTRA, extra), model_key=model_key, stores=stores, out_dir=out_dir / EXTRA,
                           dtype=dtype, batch_size=batch_size, shard_mb=shard_mb, device=device)
    write_image_index(out_dir / EXTRA, backbone.image_size, extra)


@torch.inference_mode()
def _resume_to_final(backbone: Backbone, recorded: RecordedTokens, images: Sequence[tuple[int, str]], *, model_key: str,
                     from_layer: int, out_dir: Path, dtype: str, batch_size: int, shard_mb: int, device: torch.device) -> None:
    meta = StoreMeta.create(model=model_key, layer="final", dataset="record", d_model=backbone.d_model, dtype=dtype,
                            token_kinds=list(all_kinds(backbone.layout)), layout=backbone.layout)
    per_shard = max(batch_size, images_per_shard_for(meta.tokens_per_image, backbone.d_model, dtype, shard_mb) // batch_size * batch_size)
    writer = ShardWriter(out_dir, meta, per_shard)
    found = [(index, path) for index, path in images if path in recorded]
    for start in track(range(0, len(found), batch_size), f"final tokens {model_key}", unit="batch"):
        chunk = found[start:start + batch_size]
        acts_btd = torch.stack([recorded.get(path) for _, path in chunk]).to(device)
        writer.add(np.array([index for index, _ in chunk]), backbone.resume(acts_btd, from_layer).float().cpu())
    writer.close()
