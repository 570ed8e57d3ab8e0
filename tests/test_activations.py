"""Shard store: round-trips, crash resume, rollback, shuffled coverage, patch-only reads, errors."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saev_report.activations import (
    ActivationStore,
    ShardWriter,
    StoreError,
    StoreMeta,
    _in_background,
    images_per_shard_for,
    read_meta,
)

# pytest resets warning filters per test; the module's own filter covers this outside pytest.
pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

DTYPES = ["float32", "float16", "bfloat16"]
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_meta(d: int = 4, dtype: str = "float32", kinds=("cls", "registers", "patches"),
              n_cls: int = 1, n_registers: int = 2, grid=(2, 3)) -> StoreMeta:
    layout = SimpleNamespace(n_cls=n_cls, n_registers=n_registers, grid=grid)
    return StoreMeta.create(model="vit", layer=3, dataset="demo", d_model=d, dtype=dtype, token_kinds=list(kinds), layout=layout)


def write(store_dir: Path, meta: StoreMeta, ips: int, acts_ntd: torch.Tensor, indices: np.ndarray,
          batch: int = 3, close: bool = True) -> ShardWriter:
    writer = ShardWriter(store_dir, meta, ips)
    for start in range(0, len(indices), batch):
        writer.add(indices[start:start + batch], acts_ntd[start:start + batch])
    if close:
        writer.close()
    return writer


def rounded(acts: torch.Tensor, dtype: str) -> torch.Tensor:
    return acts.to(TORCH_DTYPES[dtype]).float()


def store_files(store_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store_dir.iterdir())}


def row_coded_store(store_dir: Path, n_images: int, ips: int, meta: StoreMeta | None = None) -> ActivationStore:
    """fp32 store whose first feature is the global row index (exact in fp32)."""
    meta = meta or make_meta()
    t, d = meta.tokens_per_image, meta.d_model
    acts = torch.randn(n_images, t, d)
    acts[:, :, 0] = torch.arange(n_images * t, dtype=torch.float32).view(n_images, t)
    write(store_dir, meta, ips, acts, np.arange(n_images))
    return ActivationStore(store_dir)


# --------------------------------------------------------------------------- layout and sizing


def test_meta_keeps_recorded_kinds_in_layout_order():
    meta = make_meta(kinds=["patches", "cls"], n_cls=1, n_registers=4, grid=(3, 5))
    assert meta.token_kinds == ["cls", "patches"]
    assert (meta.n_cls, meta.n_registers, meta.n_patches) == (1, 0, 15)
    assert meta.tokens_per_image == 16 and meta.patch_offset == 1 and meta.patch_slice == slice(1, 16)
    patches = make_meta(kinds=["patches"], grid=(3, 5))
    assert patches.tokens_per_image == 15 and patches.patch_slice == slice(0, 15) and patches.cls_index is None
    with pytest.raises(ValueError):
        make_meta(kinds=["pixels"])
    with pytest.raises(ValueError):
        make_meta(dtype="int8")


def test_images_per_shard_for():
    # 257 tokens × 384 × 2 bytes = 197,376 bytes per image; 256 MiB / that = 1360.
    assert images_per_shard_for(257, 384, "float16", 256) == 1360
    assert images_per_shard_for(257, 384, "float32", 256) == 680
    assert images_per_shard_for(257, 384, "bfloat16", 256) == 1360
    assert images_per_shard_for(257, 768, "float32", 0.001) == 1  # never zero


def test_meta_json_round_trip_with_gappy_indices(tmp_path):
    meta = make_meta()
    acts = torch.randn(6, meta.tokens_per_image, meta.d_model)
    indices = np.array([0, 1, 2, 7, 8, 20])
    writer = write(tmp_path, meta, 4, acts, indices, close=False)
    writer.skip(3, "a.png", "corrupt")
    writer.skip(3, "a.png", "corrupt")  # re-skip after a resume is not counted twice
    writer.close()
    back = read_meta(tmp_path)
    assert back.image_indices == indices.tolist()
    assert back.n_skipped == 1 and back.skipped[0].reason == "corrupt"
    assert back.complete and back.n_images == 6 and [s.n_images for s in back.shards] == [4, 2]


# --------------------------------------------------------------------------- round trips


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    d=st.integers(1, 6),
    kinds=st.sets(st.sampled_from(["cls", "registers", "patches"]), min_size=1),
    n_registers=st.integers(0, 2),
    grid=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    n_images=st.integers(0, 23),
    ips=st.integers(1, 7),
    add_batch=st.integers(1, 6),
    batch_rows=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_round_trip(dtype, d, kinds, n_registers, grid, n_images, ips, add_batch, batch_rows, seed):
    meta = make_meta(d, dtype, kinds, 1, n_registers, grid)
    if meta.tokens_per_image == 0:
        return  # only registers recorded of a model without registers
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(n_images, meta.tokens_per_image, d, generator=gen) * 10
    indices = np.arange(n_images) * 2 + 5
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), meta, ips, acts, indices, batch=add_batch)
        store = ActivationStore(tmp)
        expected = rounded(acts, dtype)
        assert store.n_images == n_images and store.n_rows == n_images * meta.tokens_per_image
        assert store.image_indices.tolist() == indices.tolist()
        assert len(store.meta.shards) == -(-n_images // ips)
        for pos in range(n_images):
            assert torch.equal(store.image_acts(pos), expected[pos])
        batches = list(store.iter_batches(batch_rows))
        assert all(len(a) == batch_rows for a, _ in batches[:-1])
        got = torch.cat([a for a, _ in batches]) if batches else torch.empty(0, d)
        rows = np.concatenate([r for _, r in batches]) if batches else np.empty(0, int)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected.reshape(-1, d))
        assert rows.tolist() == list(range(store.n_rows))


def test_bfloat16_bits_match_numpy_rounding(tmp_path):
    """Stored bf16 bits equal round-to-nearest-even of the float32 bits, computed in plain numpy."""
    meta = make_meta(d=8, dtype="bfloat16")
    acts = torch.randn(5, meta.tokens_per_image, 8) * 100
    write(tmp_path, meta, 2, acts, np.arange(5))
    stored = np.concatenate([np.load(tmp_path / s.file) for s in read_meta(tmp_path).shards])
    u32 = acts.numpy().view(np.uint32).astype(np.uint64)
    reference = ((u32 + 0x7FFF + ((u32 >> 16) & 1)) >> 16).astype(np.uint16)
    assert stored.dtype == np.uint16 and np.array_equal(stored, reference)
    back = ActivationStore(tmp_path).image_acts(0).numpy()
    assert np.array_equal(back, (reference[0].astype(np.uint32) << 16).view(np.float32))


# --------------------------------------------------------------------------- resume and rollback


@pytest.mark.parametrize("dtype", DTYPES)
def test_resume_after_kill_matches_uninterrupted_write(tmp_path, dtype):
    meta = make_meta(dtype=dtype)
    acts = torch.randn(11, meta.tokens_per_image, meta.d_model)
    indices = np.arange(11) + 100
    write(tmp_path / "clean", meta, 3, acts, indices, batch=2)

    killed = tmp_path / "killed"
    writer = write(killed, meta, 3, acts[:8], indices[:8], batch=2, close=False)
    assert writer.n_images_done == 8  # 6 in two shards, 2 buffered
    del writer  # killed: the buffer is lost
    (killed / ".shard-00002.npy.x1y2z3.tmp").write_bytes(b"half a shard")  # fsutil.atomic_write's temp names
    (killed / ".meta.json.a1b2c3.tmp").write_bytes(b"{")
    np.save(killed / "shard-00002.npy", np.zeros(3))  # renamed but never listed in meta.json

    resumed = ShardWriter(killed, meta, 3)
    assert resumed.n_images_done == 6 and resumed.image_indices == indices[:6].tolist()
    assert sorted(p.name for p in killed.iterdir()) == ["meta.json", "shard-00000.npy", "shard-00001.npy"]
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(killed)
    for start in range(6, 11, 4):
        resumed.add(indices[start:start + 4], acts[start:start + 4])
    resumed.close()
    assert store_files(killed) == store_files(tmp_path / "clean")


def test_reopening_a_closed_store_can_continue_it(tmp_path):
    meta = make_meta()
    acts = torch.randn(9, meta.tokens_per_image, meta.d_model)
    write(tmp_path / "clean", meta, 4, acts, np.arange(9))
    write(tmp_path / "two", meta, 4, acts[:6], np.arange(6))  # closed with a partial shard of 2
    writer = ShardWriter(tmp_path / "two", meta, 4)
    assert writer.n_images_done == 6
    writer.add(np.arange(6, 9), acts[6:])
    writer.close()
    assert store_files(tmp_path / "two") == store_files(tmp_path / "clean")


def test_resume_refuses_a_different_store(tmp_path):
    write(tmp_path, make_meta(), 3, torch.randn(4, 9, 4), np.arange(4), close=False)
    with pytest.raises(StoreError, match="d_model"):
        ShardWriter(tmp_path, make_meta(d=5), 3)
    with pytest.raises(StoreError, match="images_per_shard"):
        ShardWriter(tmp_path, make_meta(), 4)


@pytest.mark.parametrize("target", [0, 3, 4, 5, 8, 9, 10])
def test_rollback_then_continue_matches_uninterrupted_write(tmp_path, target):
    meta = make_meta(dtype="float16")
    acts = torch.randn(13, meta.tokens_per_image, meta.d_model)
    write(tmp_path / "clean", meta, 4, acts, np.arange(13))
    writer = write(tmp_path / "rb", meta, 4, acts[:10], np.arange(10), close=False)  # 8 stored + 2 buffered
    writer.rollback(target)
    assert writer.n_images_done == target and writer.image_indices == list(range(target))
    on_disk = read_meta(tmp_path / "rb")
    assert on_disk.n_images == target // 4 * 4  # only whole shards stay on disk
    assert sorted(p.name for p in (tmp_path / "rb").glob("shard-*")) == [f"shard-{i:05d}.npy" for i in range(target // 4)]
    writer.add(np.arange(target, 13), acts[target:])
    writer.close()
    assert store_files(tmp_path / "rb") == store_files(tmp_path / "clean")


def test_rollback_survives_a_kill(tmp_path):
    meta = make_meta()
    writer = write(tmp_path, meta, 4, torch.randn(12, 9, 4), np.arange(12), close=False)
    writer.rollback(6)
    del writer
    assert ShardWriter(tmp_path, meta, 4).n_images_done == 4  # the 2 re-buffered images were not durable


def test_rollback_and_add_errors(tmp_path):
    writer = write(tmp_path, make_meta(), 4, torch.randn(5, 9, 4), np.arange(5), close=False)
    with pytest.raises(ValueError, match="roll back"):
        writer.rollback(6)
    with pytest.raises(ValueError, match="shape"):
        writer.add([5], torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="indices"):
        writer.add([5, 6], torch.randn(1, 9, 4))
    writer.close()
    with pytest.raises(StoreError, match="closed"):
        writer.add([5], torch.randn(1, 9, 4))


# --------------------------------------------------------------------------- readers


def test_patch_only_iteration_skips_cls_and_registers(tmp_path):
    store = row_coded_store(tmp_path, n_images=7, ips=3)  # 1 CLS + 2 registers + 6 patches
    batches = list(store.iter_batches(5, patches_only=True))
    rows = np.concatenate([r for _, r in batches])
    acts = torch.cat([a for a, _ in batches])
    image, token = store.row_image_token(rows)
    assert np.array_equal(rows, store.patch_rows())
    assert len(rows) == 7 * 6 and set(token.tolist()) == set(range(3, 9))
    assert np.array_equal(image, np.repeat(np.arange(7), 6))
    assert np.array_equal(acts[:, 0].numpy().astype(np.int64), rows)  # the values really come from those rows
    assert np.array_equal(store.patch_rows([2]), 2 * 9 + np.arange(3, 9))


def test_patch_only_needs_recorded_patches(tmp_path):
    store = row_coded_store(tmp_path, 3, 2, make_meta(kinds=["cls"]))
    with pytest.raises(StoreError, match="patches were not recorded"):
        next(iter(store.iter_batches(4, patches_only=True)))


@settings(max_examples=25, deadline=None)
@given(n_images=st.integers(1, 17), ips=st.integers(1, 6), batch_rows=st.integers(1, 50),
       buffer_rows=st.integers(1, 80), block_images=st.one_of(st.none(), st.integers(1, 4)),
       patches_only=st.booleans(), seed=st.integers(0, 1000))
def test_shuffled_covers_every_row_once_per_epoch(n_images, ips, batch_rows, buffer_rows, block_images, patches_only, seed):
    with tempfile.TemporaryDirectory() as tmp:
        store = row_coded_store(Path(tmp), n_images, ips)
        kwargs = dict(patches_only=patches_only, block_images=block_images)
        epoch_rows = store.patch_rows() if patches_only else np.arange(store.n_rows)
        batches = list(store.shuffled_with_rows(batch_rows, seed, buffer_rows, epochs=3, **kwargs))
        assert all(len(r) == batch_rows for _, r in batches[:-1])
        rows = np.concatenate([r for _, r in batches])
        values = torch.cat([a for a, _ in batches])[:, 0].numpy().astype(np.int64)
        assert np.array_equal(values, rows)  # each emitted row holds that row's activations
        n = len(epoch_rows)
        assert len(rows) == 3 * n
        for epoch in range(3):
            assert np.array_equal(np.sort(rows[epoch * n:(epoch + 1) * n]), epoch_rows)
        again = np.concatenate([r for _, r in store.shuffled_with_rows(batch_rows, seed, buffer_rows, epochs=3, **kwargs)])
        assert np.array_equal(rows, again)


def test_shuffled_is_endless_seeded_and_mixes(tmp_path):
    store = row_coded_store(tmp_path, n_images=40, ips=7)  # 360 rows
    stream = store.shuffled(batch_rows=32, seed=1, buffer_rows=120, block_images=1)
    first = torch.cat([next(stream) for _ in range(30)])[:, 0].long().numpy()  # 960 rows: past two epochs
    stream.close()
    assert np.array_equal(np.sort(first[:360]), np.arange(360))
    assert np.array_equal(np.sort(first[360:720]), np.arange(360))
    assert not np.array_equal(first[:360], first[360:720])  # each epoch is a fresh permutation
    same = torch.cat(list(store.shuffled(32, seed=1, buffer_rows=120, block_images=1, epochs=1)))[:, 0].long().numpy()
    other = torch.cat(list(store.shuffled(32, seed=2, buffer_rows=120, block_images=1, epochs=1)))[:, 0].long().numpy()
    assert np.array_equal(same, first[:360]) and not np.array_equal(same, other)
    # a batch mixes rows from several images spread over the store, not one contiguous run
    images = first[:32] // 9
    assert len(set(images.tolist())) > 8 and images.max() - images.min() > 10


def test_closing_a_reader_stops_its_thread(tmp_path):
    store = row_coded_store(tmp_path, n_images=20, ips=4)
    before = threading.active_count()
    stream = store.shuffled(8, seed=0, buffer_rows=40, prefetch_batches=2)
    next(stream)
    assert threading.active_count() > before  # the reader and its scatter threads
    stream.close()
    assert threading.active_count() == before
    batches = store.iter_batches(8)
    next(batches)
    batches.close()
    assert threading.active_count() == before


def test_background_errors_reach_the_consumer():
    def failing():
        yield 1
        raise OSError("disk on fire")

    stream = _in_background(failing(), 2)
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk on fire"):
        next(stream)


# --------------------------------------------------------------------------- damaged stores


def test_missing_or_corrupt_shards_are_named(tmp_path):
    row_coded_store(tmp_path, n_images=8, ips=3)
    (tmp_path / "shard-00001.npy").unlink()
    with pytest.raises(StoreError, match="shard-00001.npy.*missing"):
        ActivationStore(tmp_path)
    shard = tmp_path / "shard-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    (tmp_path / "shard-00001.npy").write_bytes(b"not numpy")
    with pytest.raises(StoreError, match="shard-00001.npy.*corrupt"):
        ActivationStore(tmp_path)
    np.save(tmp_path / "shard-00001.npy", np.zeros((3, 9, 4), np.float32))
    with pytest.raises(StoreError, match="shard-00002.npy"):
        ActivationStore(tmp_path)
    np.save(tmp_path / "shard-00002.npy", np.zeros((2, 9, 5), np.float32))
    with pytest.raises(StoreError, match=r"shard-00002.npy.*float32\[2, 9, 4\]"):
        ActivationStore(tmp_path)


def test_missing_or_corrupt_meta_is_named(tmp_path):
    with pytest.raises(StoreError, match="meta.json.*missing"):
        ActivationStore(tmp_path)
    (tmp_path / "meta.json").write_text("{ nope")
    with pytest.raises(StoreError, match="meta.json.*corrupt"):
        ActivationStore(tmp_path)


def test_resume_re_records_from_a_damaged_shard(tmp_path):
    meta = make_meta()
    acts = torch.randn(9, 9, 4)
    write(tmp_path, meta, 3, acts, np.arange(9), close=False)
    (tmp_path / "shard-00001.npy").write_bytes(b"garbage")
    writer = ShardWriter(tmp_path, meta, 3)
    assert writer.n_images_done == 3 and not (tmp_path / "shard-00002.npy").exists()
    writer.add(np.arange(3, 9), acts[3:])
    writer.close()
    assert torch.equal(torch.cat(list(a for a, _ in ActivationStore(tmp_path).iter_batches(81))), acts.reshape(-1, 4))
