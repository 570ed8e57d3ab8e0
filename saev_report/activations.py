"""Activation shard store: a crash-safe writer and sequential + shuffled readers.

A store directory holds `meta.json` and shards `shard-00000.npy`, ...; each
shard is `[images_in_shard, tokens_per_image, d]` in the storage dtype (bf16 is
kept as its uint16 bit pattern, since numpy has no bfloat16). Every shard but
the last holds exactly `images_per_shard` images.

Crash safety: a shard is written atomically (`fsutil.atomic_write`: temp name,
fsync, rename); then `meta.json` is rewritten the same way. `meta.json` is the single source of
truth: a shard file it does not list is debris from a killed run. So a killed
writer resumes after the last shard listed in `meta.json`.

Rows: row `r` is token `r % tokens_per_image` of stored image
`r // tokens_per_image`. Readers yield float32 torch tensors `acts_nd` (and
the global row index of every row): `iter_batches` in store order,
`shuffled` as a seeded shuffle for SAE training. Both read in a background
thread; numpy/torch copies release the GIL, so reading overlaps the consumer.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from saev_report.errors import UserError
from saev_report.spec import TOKEN_KINDS
from saev_report.fsutil import atomic_write, atomic_write_text, remove_temp_files

FORMAT_VERSION = 1
META_FILE = "meta.json"
_SHARD_RE = re.compile(r"^shard-\d{5,}\.npy$")

STORAGE_NUMPY_DTYPE: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),  # bf16 bit pattern
}
TORCH_DTYPE: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

T = TypeVar("T")

# Views of read-only memory maps are only read from (copied into new tensors), so torch's
# warning about them is noise; the filter is scoped to calls made from this module.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)


class StoreError(UserError):
    """A store directory that cannot be read or resumed; the message names the file."""


# --------------------------------------------------------------------------- metadata


@dataclass
class ShardEntry:
    file: str
    n_images: int


@dataclass
class SkippedImage:
    image_idx: int
    path: str
    reason: str


@dataclass
class StoreMeta:
    """Everything needed to read a store, serialised to `meta.json`.

    The layout fields describe the *stored* tokens of one image, in order:
    `n_cls` CLS tokens, `n_registers` registers, then `n_patches` patch tokens
    (row-major over the `grid_h × grid_w` patch grid, or 0 when patches are not
    recorded). Build one with `StoreMeta.create(...)`.
    """

    model: str
    layer: int | str
    dataset: str
    d_model: int
    dtype: str
    token_kinds: list[str]
    n_cls: int
    n_registers: int
    n_patches: int
    grid_h: int
    grid_w: int
    images_per_shard: int = 0
    shards: list[ShardEntry] = field(default_factory=list)
    image_indices: list[int] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    complete: bool = False
    format_version: int = FORMAT_VERSION

    @classmethod
    def create(
        cls,
        *,
        model: str,
        layer: int | str,
        dataset: str,
        d_model: int,
        dtype: str,
        token_kinds: Sequence[str],
        layout: Any,
    ) -> "StoreMeta":
        """Meta for recording `token_kinds` of a model whose token layout is `layout`
        (anything with `n_cls`, `n_registers` and `grid`, e.g. a `backbones.TokenLayout`)."""
        if dtype not in STORAGE_NUMPY_DTYPE:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(STORAGE_NUMPY_DTYPE)}")
        unknown = set(token_kinds) - set(TOKEN_KINDS)
        if unknown or not token_kinds:
            raise ValueError(f"token kinds {list(token_kinds)} must be a non-empty subset of {TOKEN_KINDS}")
        grid_h, grid_w = layout.grid
        return cls(
            model=model,
            layer=layer,
            dataset=dataset,
            d_model=int(d_model),
            dtype=dtype,
            token_kinds=[k for k in TOKEN_KINDS if k in token_kinds],
            n_cls=int(layout.n_cls) if "cls" in token_kinds else 0,
            n_registers=int(layout.n_registers) if "registers" in token_kinds else 0,
            n_patches=grid_h * grid_w if "patches" in token_kinds else 0,
            grid_h=int(grid_h),
            grid_w=int(grid_w),
        )

    # ---- derived layout
    @property
    def tokens_per_image(self) -> int:
        return self.n_cls + self.n_registers + self.n_patches

    @property
    def patch_offset(self) -> int:
        """Index of the first patch token among the stored tokens of an image."""
        return self.n_cls + self.n_registers

    @property
    def patch_slice(self) -> slice:
        """Stored-token positions of the patches (empty when patches are not recorded)."""
        return slice(self.patch_offset, self.patch_offset + self.n_patches)

    @property
    def cls_index(self) -> int | None:
        return 0 if self.n_cls else None

    @property
    def n_images(self) -> int:
        return sum(s.n_images for s in self.shards)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def storage_dtype(self) -> np.dtype:
        return STORAGE_NUMPY_DTYPE[self.dtype]

    def identity(self) -> dict[str, Any]:
        """The fields that must match for a writer to resume an existing store."""
        keys = ("model", "layer", "dataset", "d_model", "dtype", "token_kinds", "n_cls", "n_registers",
                "n_patches", "grid_h", "grid_w", "images_per_shard", "format_version")
        return {k: getattr(self, k) for k in keys}

    # ---- JSON
    def to_json(self) -> str:
        data = asdict(self)
        # Runs keep meta.json small (rewritten after every shard) for million-image sets.
        data["image_indices"] = _encode_runs(self.image_indices)
        data.update(tokens_per_image=self.tokens_per_image, patch_offset=self.patch_offset,
                    n_images=self.n_images, n_skipped=self.n_skipped)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "StoreMeta":
        data = json.loads(text)
        for derived in ("tokens_per_image", "patch_offset", "n_images", "n_skipped"):
            data.pop(derived, None)
        data["shards"] = [ShardEntry(**s) for s in data["shards"]]
        data["skipped"] = [SkippedImage(**s) for s in data["skipped"]]
        data["image_indices"] = _decode_runs(data["image_indices"])
        return cls(**data)


def _encode_runs(values: Sequence[int]) -> list[list[int]]:
    """[3,4,5,9] → [[3,3],[9,1]]: (first, length) of each run of consecutive integers."""
    runs: list[list[int]] = []
    for v in values:
        v = int(v)
        if runs and runs[-1][0] + runs[-1][1] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return runs


def _decode_runs(runs: Sequence[Sequence[int]]) -> list[int]:
    return [first + i for first, length in runs for i in range(length)]


def read_meta(store_dir: str | Path) -> StoreMeta:
    path = Path(store_dir) / META_FILE
    try:
        return StoreMeta.from_json(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: missing; {store_dir} is not an activation store") from None
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{path}: corrupt store metadata ({err})") from err


def images_per_shard_for(tokens_per_image: int, d: int, dtype: str, shard_mb: float) -> int:
    """Images per shard so that a shard is about `shard_mb` MiB (at least one image)."""
    image_bytes = tokens_per_image * d * STORAGE_NUMPY_DTYPE[dtype].itemsize
    return max(1, int(shard_mb * 2**20) // image_bytes)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


# --------------------------------------------------------------------------- metadata


def _write_meta(store_dir: Path, meta: StoreMeta) -> None:
    atomic_write_text(store_dir / META_FILE, meta.to_json())


def _open_shard(path: Path, meta: StoreMeta, n_images: int) -> np.ndarray:
    """Memory-map one shard and check it against the metadata."""
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise StoreError(f"{path}: shard file listed in {META_FILE} is missing") from None
    except (ValueError, OSError, EOFError) as err:
        raise StoreError(f"{path}: corrupt shard ({err})") from err
    expected = (n_images, meta.tokens_per_image, meta.d_model)
    if arr.shape != expected or arr.dtype != meta.storage_dtype:
        raise StoreError(f"{path}: shard is {arr.dtype}{list(arr.shape)}, {META_FILE} says {meta.storage_dtype}{list(expected)}")
    return arr


# --------------------------------------------------------------------------- dtype conversion


def to_storage(acts_btd: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """Activations → numpy array in the storage dtype (bf16 as uint16 bits)."""
    acts = torch.from_numpy(np.asarray(acts_btd)) if isinstance(acts_btd, np.ndarray) else acts_btd
    acts = acts.detach().to("cpu", TORCH_DTYPE[dtype])
    if dtype == "bfloat16":
        return acts.view(torch.int16).numpy().view(np.uint16)
    return acts.numpy()


def _as_torch(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """Zero-copy torch view of a stored (possibly read-only, memory-mapped) array; only ever read."""
    if dtype == "bfloat16":
        return torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(stored)


def from_storage(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored array → float32 torch tensor (a copy)."""
    return _as_torch(stored, dtype).float()


# --------------------------------------------------------------------------- writer


class ShardWriter:
    """Appends images' activations to a store, one shard at a time.

    `ShardWriter(dir, meta, images_per_shard)` creates the store, or resumes a
    killed one: it keeps the shards listed in `meta.json` (the metadata of the
    directory must match `meta`), deletes temp files and unlisted shards, and
    sets `n_images_done`; the caller continues with the images after
    `image_indices[-1]`. Activations are buffered in memory until a shard is
    full; `close()` writes the last, partial shard and marks the store complete.
    """

    def __init__(self, store_dir: str | Path, meta: StoreMeta, images_per_shard: int):
        if images_per_shard < 1:
            raise ValueError("images_per_shard must be >= 1")
        self.dir = Path(store_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = StoreMeta(**{**meta.__dict__, "images_per_shard": images_per_shard, "shards": [],
                                 "image_indices": [], "skipped": [], "complete": False})
        self._buf_ntd: np.ndarray | None = None  # one shard's worth, allocated on first use
        self._buf_idx: list[int] = []
        self._closed = False
        self._resume()

    # ---- public
    @property
    def n_images_done(self) -> int:
        """Images added so far (stored or buffered)."""
        return self.meta.n_images + len(self._buf_idx)

    @property
    def image_indices(self) -> list[int]:
        """Dataset index of every image added so far, in order."""
        return self.meta.image_indices + self._buf_idx

    @property
    def skipped_indices(self) -> set[int]:
        return {s.image_idx for s in self.meta.skipped}

    def add(self, image_idx_b: Sequence[int] | np.ndarray, acts_btd: torch.Tensor | np.ndarray) -> None:
        """Add a batch: `acts_btd[i]` holds the stored tokens (layout order) of dataset image `image_idx_b[i]`."""
        self._check_open()
        expected = (self.meta.tokens_per_image, self.meta.d_model)
        if acts_btd.ndim != 3 or tuple(acts_btd.shape[1:]) != expected:
            raise ValueError(f"acts_btd has shape {tuple(acts_btd.shape)}, expected [batch, {expected[0]}, {expected[1]}]")
        indices = [int(i) for i in np.asarray(image_idx_b).reshape(-1)]
        if len(indices) != acts_btd.shape[0]:
            raise ValueError(f"{len(indices)} image indices for {acts_btd.shape[0]} images")
        stored_btd = to_storage(acts_btd, self.meta.dtype)
        done = 0
        while done < len(indices):
            take = min(len(indices) - done, self.meta.images_per_shard - len(self._buf_idx))
            self._buffer(indices[done:done + take], stored_btd[done:done + take])
            done += take
            if len(self._buf_idx) == self.meta.images_per_shard:
                self._flush()

    def skip(self, image_idx: int, path: str, reason: str) -> None:
        """Record an image that could not be used (a re-skip after resume is ignored)."""
        self._check_open()
        if image_idx not in self.skipped_indices:
            self.meta.skipped.append(SkippedImage(int(image_idx), str(path), str(reason)))

    def rollback(self, n_images: int) -> None:
        """Keep only the first `n_images` images (to align the layers of one recording after a kill).

        Any `n_images` works: whole shards past it are dropped, and the images of a
        shard that `n_images` cuts through go back into the in-memory buffer, so
        every shard but the last still holds `images_per_shard` images.
        """
        self._check_open()
        if not 0 <= n_images <= self.n_images_done:
            raise ValueError(f"cannot roll back to {n_images} images; {self.n_images_done} are done")
        stored = self.meta.n_images
        if n_images >= stored:
            keep = n_images - stored
            self._buf_idx = self._buf_idx[:keep]
            return
        ips = self.meta.images_per_shard
        keep_shards, remainder = divmod(n_images, ips)
        dropped = [self.dir / s.file for s in self.meta.shards[keep_shards:]]
        self._buf_idx = []
        if remainder:  # reload the head of the shard being cut (before its file is deleted)
            head = np.array(_open_shard(dropped[0], self.meta, ips)[:remainder])
            self._buffer(self.meta.image_indices[keep_shards * ips:n_images], head)
        self.meta.shards = self.meta.shards[:keep_shards]
        self.meta.image_indices = self.meta.image_indices[:keep_shards * ips]
        self.meta.complete = False
        _write_meta(self.dir, self.meta)  # metadata first: a kill now leaves only unlisted debris
        for path in dropped:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Write the last partial shard and mark the store complete."""
        if self._closed:
            return
        if self._buf_idx:
            self._flush()
        self.meta.complete = True
        _write_meta(self.dir, self.meta)
        self._buf_ntd = None
        self._closed = True

    # ---- internals
    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"{self.dir}: writer is closed")

    def _buffer(self, indices: list[int], stored_btd: np.ndarray) -> None:
        if self._buf_ntd is None:
            shape = (self.meta.images_per_shard, self.meta.tokens_per_image, self.meta.d_model)
            self._buf_ntd = np.empty(shape, self.meta.storage_dtype)
        start = len(self._buf_idx)
        self._buf_ntd[start:start + len(indices)] = stored_btd
        self._buf_idx.extend(indices)

    def _flush(self) -> None:
        assert self._buf_ntd is not None
        n = len(self._buf_idx)
        name = shard_name(len(self.meta.shards))
        atomic_write(self.dir / name, lambda f: np.save(f, self._buf_ntd[:n]))
        self.meta.shards.append(ShardEntry(name, n))
        self.meta.image_indices.extend(self._buf_idx)
        self._buf_idx = []
        _write_meta(self.dir, self.meta)

    def _resume(self) -> None:
        remove_temp_files(self.dir)  # half-written by a killed writer
        if (self.dir / META_FILE).exists():
            old = read_meta(self.dir)
            if old.identity() != self.meta.identity():
                diff = {k: (v, self.meta.identity()[k]) for k, v in old.identity().items() if self.meta.identity()[k] != v}
                raise StoreError(f"{self.dir / META_FILE}: the store there was written with different settings "
                                 f"(field: (on disk, requested)) {diff}; delete the directory or use another one")
            self._adopt(old)
        listed = {s.file for s in self.meta.shards}
        for path in self.dir.iterdir():
            if _SHARD_RE.match(path.name) and path.name not in listed:
                path.unlink()  # renamed by a killed writer before meta.json listed it
        _write_meta(self.dir, self.meta)

    def _adopt(self, old: StoreMeta) -> None:
        """Keep the valid listed shards of an earlier run; a partial last shard goes back to the buffer."""
        ips = old.images_per_shard
        self.meta.skipped = list(old.skipped)
        for i, entry in enumerate(old.shards):
            try:
                _open_shard(self.dir / entry.file, old, entry.n_images)
            except StoreError:
                break  # lost or damaged: re-record from here
            if entry.n_images == ips:
                self.meta.shards.append(entry)
                continue
            if i == len(old.shards) - 1:  # only a closed store has a partial last shard
                head = np.array(_open_shard(self.dir / entry.file, old, entry.n_images))
                self._buffer(old.image_indices[i * ips:i * ips + entry.n_images], head)
            break
        self.meta.image_indices = old.image_indices[:len(self.meta.shards) * ips]


# --------------------------------------------------------------------------- reader


class ActivationStore:
    """Read-only view of a complete store (memory-mapped shards)."""

    def __init__(self, store_dir: str | Path, *, allow_incomplete: bool = False):
        self.dir = Path(store_dir)
        self.meta = read_meta(self.dir)
        if not self.meta.complete and not allow_incomplete:
            raise StoreError(f"{self.dir / META_FILE}: store is incomplete (its writer was killed or never closed)")
        self._shards = [_open_shard(self.dir / s.file, self.meta, s.n_images) for s in self.meta.shards]
        self._shard_start = np.cumsum([0] + [s.n_images for s in self.meta.shards])  # first image of each shard
        self.image_indices = np.asarray(self.meta.image_indices, dtype=np.int64)
        if len(self.image_indices) != self.n_images:
            raise StoreError(f"{self.dir / META_FILE}: {len(self.image_indices)} image indices for {self.n_images} stored images")

    @property
    def n_images(self) -> int:
        return int(self._shard_start[-1])

    @property
    def tokens_per_image(self) -> int:
        return self.meta.tokens_per_image

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    @property
    def n_rows(self) -> int:
        return self.n_images * self.tokens_per_image

    def __len__(self) -> int:
        return self.n_images

    # ---- rows and tokens
    def token_slice(self, patches_only: bool = False) -> slice:
        """Stored-token positions read per image."""
        if not patches_only:
            return slice(0, self.tokens_per_image)
        if not self.meta.n_patches:
            raise StoreError(f"{self.dir}: patches were not recorded (token kinds {self.meta.token_kinds})")
        return self.meta.patch_slice

    def row_image_token(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row indices → (stored image position, stored token position)."""
        return np.divmod(np.asarray(rows, dtype=np.int64), self.tokens_per_image)

    def patch_rows(self, image_pos: np.ndarray | None = None) -> np.ndarray:
        """Global row indices of the patch tokens of the given (default: all) stored images."""
        images = np.arange(self.n_images) if image_pos is None else np.asarray(image_pos, dtype=np.int64)
        return self._rows(images, self.token_slice(patches_only=True))

    def _rows(self, images: np.ndarray, tokens: slice) -> np.ndarray:
        return (images[:, None] * self.tokens_per_image + np.arange(tokens.start, tokens.stop)[None, :]).reshape(-1)

    # ---- random access
    def image_acts(self, pos: int) -> torch.Tensor:
        """[tokens_per_image, d] float32 activations of stored image `pos` (0 ≤ pos < n_images)."""
        if not 0 <= pos < self.n_images:
            raise IndexError(f"image position {pos} out of range [0, {self.n_images})")
        shard = int(np.searchsorted(self._shard_start, pos, side="right")) - 1
        return from_storage(np.asarray(self._shards[shard][pos - self._shard_start[shard]]), self.meta.dtype)

    def _read_rows(self, start: int, stop: int, tokens: slice) -> tuple[torch.Tensor, np.ndarray]:
        """Selected rows start:stop (counting only `tokens` of each image) as float32 [n, d] and global row indices.

        Copies whole-image runs in one call and partial images token-wise, straight from the
        memory map into the float32 output: one read-and-convert pass, any batch/shard alignment.
        """
        n_tok = tokens.stop - tokens.start
        out_nd = torch.empty(stop - start, self.d_model)
        k = start
        while k < stop:
            image, tok = divmod(k, n_tok)
            shard = int(np.searchsorted(self._shard_start, image, side="right")) - 1
            local = image - int(self._shard_start[shard])
            arr = self._shards[shard]
            if tok == 0 and stop - k >= n_tok:  # whole images, up to the batch or shard end
                n_img = min((stop - k) // n_tok, arr.shape[0] - local)
                src = _as_torch(arr[local:local + n_img, tokens], self.meta.dtype)
                step = n_img * n_tok
                out_nd[k - start:k - start + step].view(src.shape).copy_(src)  # the read happens here, GIL released
            else:  # part of one image
                step = min(n_tok - tok, stop - k)
                src = _as_torch(arr[local, tokens.start + tok:tokens.start + tok + step], self.meta.dtype)
                out_nd[k - start:k - start + step].copy_(src)
            k += step
        image, tok = np.divmod(np.arange(start, stop, dtype=np.int64), n_tok)
        return out_nd, image * self.tokens_per_image + tokens.start + tok

    # ---- sequential
    def iter_batches(self, batch_rows: int, *, patches_only: bool = False, prefetch: int = 2,
                     images: range | None = None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """Every row (or every patch row) in store order: `(acts_nd float32, global row indices)`.

        Batches hold `batch_rows` rows (the last may be shorter); they are read
        ahead by `prefetch` batches in a background thread (0: no thread).
        `images` (stored positions, step 1) restricts the read to those images, e.g. one rank's share.
        """
        if batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        tokens = self.token_slice(patches_only)
        n_tok = tokens.stop - tokens.start
        images = range(self.n_images) if images is None else images
        first, n_selected = images.start * n_tok, min(images.stop, self.n_images) * n_tok
        batches = (self._read_rows(start, min(start + batch_rows, n_selected), tokens)
                   for start in range(first, n_selected, batch_rows))
        return _in_background(batches, prefetch) if prefetch > 0 else batches

    # ---- shuffled
    def shuffled(self, batch_rows: int, seed: int, buffer_rows: int, *, patches_only: bool = False,
                 epochs: int | None = None, block_images: int | None = None,
                 prefetch_batches: int | None = None, reader_threads: int | None = None) -> Iterator[torch.Tensor]:
        """Shuffled float32 batches `acts_nd` for training; endless unless `epochs` is given.

        Each epoch visits the store's blocks (runs of `block_images` consecutive
        images within one shard) in a random order, reads `buffer_rows` rows'
        worth of blocks into a buffer, scattering each row to a random slot, and
        emits the buffer in slot order (converted to float32 batch by batch). The
        row stream is therefore one permutation of all rows per epoch, back to
        back: batches are cut from that stream, so a batch may straddle two
        epochs, and with `epochs` set only the very last batch is short. The
        stream depends only on `seed` (and the store), not on timing.

        Reading, scattering and conversion run in a background thread that keeps
        up to `prefetch_batches` batches ready (default: one buffer's worth), so
        peak memory is about buffer_rows × d × (storage bytes + 4); the scatter
        of a buffer's blocks is spread over `reader_threads` threads (default:
        up to 4 cores), since random row writes cost ~2x a sequential read.
        """
        batches = self.shuffled_with_rows(batch_rows, seed, buffer_rows, patches_only=patches_only, epochs=epochs,
                                          block_images=block_images, prefetch_batches=prefetch_batches,
                                          reader_threads=reader_threads)

        def acts_only() -> Iterator[torch.Tensor]:
            with closing(batches):  # closing this iterator stops the reader threads at once
                for acts_nd, _rows in batches:
                    yield acts_nd

        return acts_only()

    def shuffled_with_rows(self, batch_rows: int, seed: int, buffer_rows: int, *, patches_only: bool = False,
                           epochs: int | None = None, block_images: int | None = None,
                           prefetch_batches: int | None = None,
                           reader_threads: int | None = None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """`shuffled`, also yielding the global row index of every row."""
        if batch_rows < 1 or buffer_rows < 1:
            raise ValueError("batch_rows and buffer_rows must be >= 1")
        if self.n_images == 0:
            raise StoreError(f"{self.dir}: store is empty")
        tokens = self.token_slice(patches_only)
        n_tok = tokens.stop - tokens.start
        if block_images is None:
            image_bytes = n_tok * self.d_model * self.meta.storage_dtype.itemsize
            block_images = _default_block_images(image_bytes, buffer_rows // n_tok)
        blocks = [(shard, i0, min(i0 + block_images, arr.shape[0]))
                  for shard, arr in enumerate(self._shards) for i0 in range(0, arr.shape[0], block_images)]
        block_rows = np.array([(i1 - i0) * n_tok for _, i0, i1 in blocks])
        reader_threads = reader_threads or min(4, os.cpu_count() or 1)

        def buffers() -> Iterator[tuple[torch.Tensor, np.ndarray]]:
            # Kept in the storage dtype and reused: the scatter moves half the bytes of fp32 for fp16/bf16,
            # and the float32 conversion happens once, when a batch is cut.
            buffer_rd = np.empty((max(buffer_rows, int(block_rows.max())), self.d_model), self.meta.storage_dtype)
            rows_r = np.empty(len(buffer_rd), dtype=np.int64)
            with ThreadPoolExecutor(reader_threads, thread_name_prefix="saev-report-scatter") as pool:
                yield from fill(pool, buffer_rd, rows_r)

        def fill(pool: ThreadPoolExecutor, buffer_rd: np.ndarray, rows_r: np.ndarray) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
            epoch = 0
            while epochs is None or epoch < epochs:
                rng = np.random.default_rng([seed, epoch])
                for group in _group_blocks(rng.permutation(len(blocks)), block_rows, buffer_rows):
                    group = sorted(group)  # store order within a buffer: sequential-ish reads
                    slot_r = rng.permutation(int(block_rows[group].sum()))  # where each row read lands
                    starts = np.cumsum([0] + [int(block_rows[b]) for b in group])

                    def scatter(j: int) -> None:
                        shard, i0, i1 = blocks[group[j]]
                        slots_nt = slot_r[starts[j]:starts[j + 1]].reshape(i1 - i0, n_tok)
                        # numpy's scatter is ~2x torch's index_put_ here and releases the GIL
                        buffer_rd[slots_nt] = self._shards[shard][i0:i1, tokens]  # reads the page cache/disk
                        first = int(self._shard_start[shard])
                        rows_r[slots_nt.reshape(-1)] = self._rows(np.arange(first + i0, first + i1), tokens)

                    list(pool.map(scatter, range(len(group))))  # blocks land in disjoint slots: no races
                    yield _as_torch(buffer_rd[:len(slot_r)], self.meta.dtype), rows_r[:len(slot_r)]
                epoch += 1

        if prefetch_batches is None:
            prefetch_batches = max(2, math.ceil(buffer_rows / batch_rows))
        return _in_background(_cut_batches(buffers(), batch_rows), prefetch_batches)


def _default_block_images(image_bytes: int, buffer_images: int) -> int:
    """Blocks of about 1 MiB (efficient reads) but at least 16 per buffer (mixing across the store)."""
    return max(1, min(math.ceil(2**20 / image_bytes), buffer_images // 16))


def _group_blocks(order: np.ndarray, block_rows: np.ndarray, buffer_rows: int) -> Iterator[list[int]]:
    """Consecutive runs of `order` holding at most `buffer_rows` rows (a lone larger block is its own run)."""
    group: list[int] = []
    rows = 0
    for b in order.tolist():
        if group and rows + block_rows[b] > buffer_rows:
            yield group
            group, rows = [], 0
        group.append(b)
        rows += int(block_rows[b])
    if group:
        yield group


def _cut_batches(pieces: Iterable[tuple[torch.Tensor, np.ndarray]], batch_rows: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Cut a stream of row pieces `(acts_rd, rows_r)` into fresh float32 batches of exactly `batch_rows`.

    Batches never alias a piece, so a piece's memory may be reused once the next piece is requested.
    """
    pending: list[tuple[torch.Tensor, np.ndarray]] = []
    n_pending = 0
    for acts_rd, rows_r in pieces:
        pos = 0
        while pos < len(rows_r):
            take = min(batch_rows - n_pending, len(rows_r) - pos)
            pending.append((acts_rd[pos:pos + take], rows_r[pos:pos + take]))
            n_pending += take
            pos += take
            if n_pending == batch_rows:
                yield _join(pending)
                pending, n_pending = [], 0
        if pending:  # the rest of this piece must outlive the piece's memory
            pending = [_join(pending)]
    if n_pending:
        yield _join(pending)


def _join(parts: list[tuple[torch.Tensor, np.ndarray]]) -> tuple[torch.Tensor, np.ndarray]:
    """Copy parts into one new float32 tensor (converting) and one new row array."""
    rows = np.concatenate([r for _, r in parts])
    acts_nd = torch.empty(len(rows), parts[0][0].shape[1])
    start = 0
    for part, _ in parts:
        acts_nd[start:start + len(part)].copy_(part)
        start += len(part)
    return acts_nd, rows


# --------------------------------------------------------------------------- background reading


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def _in_background(items: Iterator[T], maxsize: int) -> Iterator[T]:
    """Run `items` in a daemon thread, `maxsize` items ahead; errors re-raise in the consumer.

    numpy/torch copies release the GIL, so the reading overlaps with the consumer's work.
    Closing the returned generator stops the thread after its current item.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, maxsize))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # noqa: BLE001 — handed to the consumer
            put(_Failure(err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator's cleanup (its thread pool, say) runs now, in this thread

    def consume() -> Iterator[T]:
        # Started on first use, so an iterator that is never iterated leaves no thread behind.
        thread = threading.Thread(target=work, name="saev-report-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()

    return consume()
