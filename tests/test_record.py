"""Recording: one pass fills every store, tokens are found by path, final tokens by resuming, resume is exact."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saev_report.activations import ActivationStore
from saev_report.datasets import ImageDataset, ImageRecord
from saev_report.record import (
    EXTRA,
    RecordedTokens,
    StoreRequest,
    TokenSet,
    read_image_index,
    record_activations,
    record_layers,
    record_reach,
)

transformers = pytest.importorskip("transformers")
from saev_report.backbones.hf import HFBackbone  # noqa: E402
from tiny_models import tiny_dinov2  # noqa: E402

IMAGE, D, N_LAYERS = 56, 32, 3
CPU = torch.device("cpu")
COMMON = dict(model_key="tiny", dtype="float32", batch_size=2, shard_mb=1, device=CPU)


@pytest.fixture(scope="module")
def backbone() -> HFBackbone:
    return tiny_dinov2(D, N_LAYERS, IMAGE)


def _images(folder: Path, n: int, seed: int = 0, key: str = "toy") -> ImageDataset:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        path = folder / f"{key}{i}.png"
        Image.fromarray(rng.integers(0, 255, (60, 64, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(i, str(path), f"c{i % 2}"))
    return ImageDataset(key, records, ["c0", "c1"])


def _forward(backbone: HFBackbone, dataset: ImageDataset, layer: int | None) -> torch.Tensor:
    pixels = torch.stack([backbone.preprocess(dataset.image(i)) for i in range(len(dataset))])
    with torch.no_grad():
        if layer is None:
            return backbone.forward_final(pixels)
        return backbone.capture(pixels, [layer])[layer]


def test_record_layers_splits_kinds_and_joins_them_back_by_path(backbone, tmp_path):
    dataset = _images(tmp_path / "img", 5)
    dataset.records.append(ImageRecord(5, str(tmp_path / "missing.png"), "c0"))
    record_layers(backbone, dataset, layers=[1, 3], tokens=["patches"], out_dir=tmp_path / "rec", **COMMON)
    patches = ActivationStore(tmp_path / "rec" / "L3")
    rest = ActivationStore(tmp_path / "rec" / "L3-rest")
    assert patches.meta.token_kinds == ["patches"] and rest.meta.token_kinds == ["cls"]
    assert patches.image_indices.tolist() == rest.image_indices.tolist() == [0, 1, 2, 3, 4]  # the missing file skipped
    image_size, images = read_image_index(tmp_path / "rec")
    assert image_size == IMAGE and [i for i, _ in images] == list(range(6))
    tokens = RecordedTokens([TokenSet((tmp_path / "rec" / "L3", tmp_path / "rec" / "L3-rest"), tuple(images))], image_size)
    expected = _forward(backbone, replace(dataset, records=dataset.records[:5]), 3)
    for i, record in enumerate(dataset.records[:5]):
        assert torch.allclose(tokens.get(record.path), expected[i], atol=1e-5)  # CLS first, then patches
    assert tokens.get(dataset.records[5].path) is None
    assert tokens.layout.n_cls == 1 and tokens.layout.n_patches == 16


def test_final_tokens_by_resuming_equal_a_full_forward_and_extras_are_recorded_once(backbone, tmp_path):
    dataset = _images(tmp_path / "img", 4)
    record_layers(backbone, dataset, layers=[2], tokens=["patches"], out_dir=tmp_path / "rec", **COMMON)
    image_size, images = read_image_index(tmp_path / "rec")
    recorded = RecordedTokens([TokenSet((tmp_path / "rec" / "L2", tmp_path / "rec" / "L2-rest"), tuple(images))], image_size)
    # A "split" naming two of the same files (other indices), and a dataset of new files.
    split = ImageDataset("split", [ImageRecord(0, dataset.records[3].path), ImageRecord(1, dataset.records[1].path)], [])
    other = _images(tmp_path / "other", 3, seed=1, key="other")
    record_reach(backbone, recorded, images, [dataset, split, other], [], from_layer=2, edit_layers=[2], final=True,
                 out_dir=tmp_path / "tok", **COMMON)
    assert ActivationStore(tmp_path / "tok" / EXTRA / "final").n_images == 3  # only the new files
    final_sets = [TokenSet((tmp_path / "tok" / "final",), tuple(images)),
                  TokenSet((tmp_path / "tok" / EXTRA / "final",), tuple(read_image_index(tmp_path / "tok" / EXTRA)[1]))]
    final = RecordedTokens(final_sets, image_size)
    for source in (dataset, other):
        expected = _forward(backbone, source, None)
        for i, record in enumerate(source.records):
            assert torch.allclose(final.get(record.path), expected[i], atol=1e-5)
    assert len(final) == 7 and split.records[0].path in final


def _digests(store: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store.glob("shard-*.npy"))}


class Killed(Exception):
    pass


def test_a_recording_killed_mid_way_resumes_bit_identical(backbone, tmp_path, monkeypatch):
    dataset = _images(tmp_path / "img", 9)
    stores = [StoreRequest("L2", 2, ("patches",)), StoreRequest("final", "final", ("cls", "patches"))]
    small = dict(COMMON, shard_mb=0.0001)  # one batch (2 images) per shard
    capture, calls = backbone.capture, []

    def dying_capture(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed()  # dies in the third batch: two complete shards per store on disk
        return capture(*args, **kwargs)

    monkeypatch.setattr(backbone, "capture", dying_capture)
    with pytest.raises(Killed):
        record_activations(backbone, dataset, stores=stores, out_dir=tmp_path / "killed", num_workers=0, **small)
    monkeypatch.setattr(backbone, "capture", capture)
    assert all(len(_digests(tmp_path / "killed" / name)) == 2 for name in ("L2", "final"))
    record_activations(backbone, dataset, stores=stores, out_dir=tmp_path / "killed", num_workers=0, **small)
    record_activations(backbone, dataset, stores=stores, out_dir=tmp_path / "fresh", num_workers=0, **small)
    for name in ("L2", "final"):
        assert _digests(tmp_path / "killed" / name) == _digests(tmp_path / "fresh" / name)
        assert ActivationStore(tmp_path / "killed" / name).image_indices.tolist() == list(range(9))


def test_final_tokens_are_made_only_for_images_a_head_reads(backbone, tmp_path):
    dataset = _images(tmp_path / "img", 4)
    record_layers(backbone, dataset, layers=[2], tokens=["patches"], out_dir=tmp_path / "rec", **COMMON)
    image_size, images = read_image_index(tmp_path / "rec")
    recorded = RecordedTokens([TokenSet((tmp_path / "rec" / "L2", tmp_path / "rec" / "L2-rest"), tuple(images))], image_size)
    head_data = ImageDataset("val", [ImageRecord(0, dataset.records[2].path)], [])
    record_reach(backbone, recorded, images, [head_data], [dataset], from_layer=2, edit_layers=[2], final=True,
                 out_dir=tmp_path / "tok", **COMMON)
    assert ActivationStore(tmp_path / "tok" / "final").image_indices.tolist() == [2]  # not the whole recording
    assert read_image_index(tmp_path / "tok" / EXTRA)[1] == []  # every edit image was recorded already


def test_images_with_names_that_are_not_utf8_are_recorded_and_found_again(backbone, tmp_path):
    # A class folder and a file named in Latin-1, as old archives are: every image is recorded.
    import os

    from saev_report.datasets.folders import image_folder

    folder = os.fsencode(tmp_path / "img") + b"/gar\xe7on"
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    for name in (b"a.png", b"caf\xe9.png", b"b.png"):
        Image.fromarray(rng.integers(0, 255, (60, 64, 3), dtype=np.uint8)).save(os.fsdecode(folder + b"/" + name))
    dataset = image_folder("odd", tmp_path / "img")
    record_layers(backbone, dataset, layers=[2], tokens=["patches"], out_dir=tmp_path / "rec", **COMMON)
    store = ActivationStore(tmp_path / "rec" / "L2")
    assert store.image_indices.tolist() == [0, 1, 2] and store.meta.n_skipped == 0
    image_size, images = read_image_index(tmp_path / "rec")
    assert {os.fsencode(p) for _, p in images} == {os.fsencode(r.path) for r in dataset.records}  # the bytes survive JSON
    tokens = RecordedTokens([TokenSet((tmp_path / "rec" / "L2", tmp_path / "rec" / "L2-rest"), tuple(images))], image_size)
    expected = _forward(backbone, dataset, 2)
    for i, record in enumerate(dataset.records):
        assert torch.allclose(tokens.get(record.path), expected[i], atol=1e-5)


def test_the_image_index_stores_cache_paths_relative_to_the_cache(tmp_path):
    from saev_report.record import write_image_index

    cache, elsewhere = tmp_path / "cache", tmp_path / "photos"
    records = [ImageRecord(0, str(cache / "demo-1" / "a.png")), ImageRecord(1, str(elsewhere / "b.png"))]
    (tmp_path / "idx").mkdir()
    write_image_index(tmp_path / "idx", 56, records, cache_dir=cache)
    import json

    stored = json.loads((tmp_path / "idx" / "images.json").read_text())["images"]
    assert stored == [[0, "demo-1/a.png"], [1, str(elsewhere.resolve() / "b.png")]]
    moved = tmp_path / "moved-cache"
    assert read_image_index(tmp_path / "idx", moved)[1] == [(0, str(moved.resolve() / "demo-1" / "a.png")), (1, str(elsewhere.resolve() / "b.png"))]
    with pytest.raises(ValueError, match="relative to the shared cache"):
        read_image_index(tmp_path / "idx")
