"""Linear probes: reproducible sweeps, segmentation metrics against numpy, feature extraction."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saev_report import heads
from saev_report.datasets import ImageDataset, ImageRecord
from saev_report.heads import IGNORE
from saev_report.record import RecordedTokens, record_layers, record_reach
from saev_report.stages.record import RecordOut
from saev_report.stages.tokens import TokensOut
from saev_report.spec import HeadSpec
from saev_report.tables import to_arrow

transformers = pytest.importorskip("transformers")
from saev_report.backbones.hf import HFBackbone, hf_backbone  # noqa: E402

IMAGE = 56  # 4×4 grid of 14-px patches


def tiny_dinov2(image_size: int = IMAGE, seed: int = 0) -> HFBackbone:
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                       image_size=image_size, patch_size=14)
    return hf_backbone(transformers.Dinov2Model(config), name="tiny-dinov2", image_size=image_size).eval().requires_grad_(False)


def tiny_siglip() -> HFBackbone:
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    return hf_backbone(transformers.SiglipVisionModel(config), name="tiny-siglip").eval().requires_grad_(False)


def clusters(n: int, d: int, n_classes: int, seed: int, spread: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=torch.Generator().manual_seed(1234)) * 2
    labels = torch.arange(n) % n_classes
    return centres[labels] + spread * torch.randn(n, d, generator=generator), labels


def recorded_final(backbone: HFBackbone, dataset: ImageDataset, out_dir: Path) -> RecordedTokens:
    """The dataset's final-norm tokens as the record and tokens stages make them (float32 here)."""
    common = dict(model_key="tiny", dtype="float32", batch_size=4, shard_mb=1, device=torch.device("cpu"))
    record_layers(backbone, dataset, layers=[2], tokens=["patches"], out_dir=out_dir / "record", **common)
    record = RecordOut(out_dir / "record")
    recorded = RecordedTokens([record.token_set(2)], backbone.image_size)
    record_reach(backbone, recorded, record.image_index()[1], [dataset], [], from_layer=2, edit_layers=[], final=True,
                 out_dir=out_dir / "tokens", **common)
    return TokensOut(out_dir / "tokens").final(record)


SMALL_SPEC = HeadSpec(task="classification", model="m", train="t", lrs=[1e-3, 3e-2], weight_decays=[1e-3, 1e-1], epochs=5, batch_size=16)


# --------------------------------------------------------------------------- training


def test_training_is_reproducible_with_a_seed():
    x, y = clusters(80, 12, 3, seed=0)
    first = heads.train_head(x, y, SMALL_SPEC, seed=7, n_classes=3)
    again = heads.train_head(x, y, SMALL_SPEC, seed=7, n_classes=3)
    other = heads.train_head(x, y, SMALL_SPEC, seed=8, n_classes=3)
    assert torch.equal(first.linear.weight, again.linear.weight) and torch.equal(first.linear.bias, again.linear.bias)
    assert (first.lr, first.weight_decay) == (again.lr, again.weight_decay)
    assert not torch.equal(first.linear.weight, other.linear.weight)
    assert len(first.sweep) == 4 and first.n_train + first.n_val == 80 and first.n_val == 16


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_fitting_settings_together_equals_fitting_them_one_by_one(task, monkeypatch):
    """`_fit_many` shares batches and one matmul across settings; each run must still be its own
    AdamW run (a plain per-setting loop is the reference). A small logits budget forces groups."""
    gen = torch.Generator().manual_seed(0)
    shape = (24, 16) if task == "classification" else (12, 2, 2, 16)
    x = torch.randn(*shape, generator=gen)
    y = torch.randint(0, 3, shape[:-1], generator=gen)
    if task == "segmentation":
        y[0] = IGNORE  # an unlabelled image: its patches carry no gradient
    settings = [(1e-3, 1e-3), (3e-2, 1e-1), (1e-2, 0.0)]
    args = (task, 3, settings)
    together = heads._fit_many(x, y, *args, epochs=3, batch_size=5, seed=4, device=torch.device("cpu"))
    monkeypatch.setattr(heads, "FIT_LOGITS_BYTES", 1)  # one setting per group
    alone = heads._fit_many(x, y, *args, epochs=3, batch_size=5, seed=4, device=torch.device("cpu"))
    for a, b in zip(together, alone):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-5, atol=1e-6)
    assert not torch.equal(together[0].weight, together[1].weight)  # the settings did differ


def test_class_map_is_argmax_with_first_index_on_ties():
    logits = torch.randint(0, 3, (4, 5, 7, 6)).float()  # many ties
    assert torch.equal(heads.class_map(logits), logits.argmax(1))
    assert torch.equal(heads.pixel_classes(logits, (14, 12)), heads.upsampled_logits(logits, (14, 12)).argmax(1))


def test_classification_learns_and_selects_on_validation():
    x, y = clusters(120, 16, 4, seed=0)
    vx, vy = clusters(40, 16, 4, seed=1)
    spec = SMALL_SPEC.model_copy(update={"lrs": [1e-6, 3e-2], "weight_decays": [1e-2], "epochs": 10})
    trained = heads.train_head(x, y, spec, seed=0, n_classes=4, val=(vx, vy))
    assert trained.lr == 3e-2  # 1e-6 cannot move the random init in 10 epochs
    expected = float((trained.linear(vx).argmax(1) == vy).double().mean())
    assert trained.metrics["accuracy"] == pytest.approx(expected) and expected > 0.9
    assert math.isnan(trained.metrics["miou"]) and trained.n_val == 40


def test_holdout_split_is_seeded_and_disjoint():
    train, val = heads.holdout_split(50, seed=3)
    again, _ = heads.holdout_split(50, seed=3)
    assert torch.equal(train, again) and len(val) == 10
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == 50
    assert not torch.equal(heads.holdout_split(50, seed=4)[1], val)


# --------------------------------------------------------------------------- segmentation metrics


def bilinear_numpy(logits_chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Reference bilinear resize, half-pixel centres (align_corners=False), edges clamped."""

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, wy = axis(height, logits_chw.shape[1])
    x0, x1, wx = axis(width, logits_chw.shape[2])
    rows = logits_chw[:, y0] * (1 - wy)[None, :, None] + logits_chw[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


def miou_numpy(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> tuple[float, float]:
    valid = gt != IGNORE
    ious = []
    for c in range(n_classes):
        inter = np.sum((pred == c) & (gt == c) & valid)
        union = np.sum(((pred == c) | (gt == c)) & valid)
        if union:
            ious.append(inter / union)
    return float(np.sum((pred == gt) & valid) / np.sum(valid)), float(np.mean(ious))


def test_segmentation_metrics_match_numpy():
    rng = np.random.default_rng(0)
    n, d, n_classes, grid, size = 5, 8, 6, (3, 4), (42, 56)
    inputs = torch.from_numpy(rng.normal(size=(n, *grid, d)).astype(np.float32))
    masks = rng.integers(0, 4, size=(n, *size))  # classes 4 and 5 never in GT
    masks[rng.random(masks.shape) < 0.2] = IGNORE
    linear = torch.nn.Linear(d, n_classes)
    got = heads.evaluate(linear, inputs, torch.from_numpy(masks).to(torch.int16), "segmentation")

    with torch.no_grad():
        logits = (inputs @ linear.weight.T + linear.bias).permute(0, 3, 1, 2).numpy().astype(np.float64)
    pred = np.stack([bilinear_numpy(l, *size).argmax(0) for l in logits])
    assert (pred >= 4).any()  # predicted-only classes count in the mean
    accuracy, miou = miou_numpy(pred, masks, n_classes)
    assert got["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert got["miou"] == pytest.approx(miou, abs=1e-9)


def test_patch_targets_take_the_majority_of_labelled_pixels():
    rng = np.random.default_rng(1)
    masks = rng.integers(0, 3, size=(2, 8, 12))
    masks[0, :4, :4] = IGNORE  # one patch fully unlabelled
    masks[1, :4, 4:8] = np.where(rng.random((4, 4)) < 0.7, IGNORE, 2)  # mostly unlabelled, rest class 2
    got = heads.patch_targets(torch.from_numpy(masks), (2, 3), n_classes=3).numpy()
    for i in range(2):
        for r in range(2):
            for c in range(3):
                block = masks[i, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4].ravel()
                block = block[block != IGNORE]
                expected = IGNORE if block.size == 0 else int(np.argmax(np.bincount(block, minlength=3)))
                assert got[i, r, c] == expected
    assert got[0, 0, 0] == IGNORE and got[1, 0, 1] == 2


def test_segmentation_head_learns_a_planted_map():
    # Each patch token says its class along one axis: a linear head must reach mIoU 1 on patch-aligned masks.
    rng = np.random.default_rng(2)
    n, grid, patch, n_classes = 24, (3, 3), 4, 3
    classes_ngg = rng.integers(0, n_classes, size=(n, *grid))
    inputs = torch.from_numpy(np.eye(n_classes)[classes_ngg] * 4 + rng.normal(scale=0.1, size=(n, *grid, n_classes))).float()
    masks = torch.from_numpy(classes_ngg.repeat(patch, 1).repeat(patch, 2)).to(torch.int16)
    spec = HeadSpec(task="segmentation", model="m", train="t", lrs=[3e-2], weight_decays=[1e-3], epochs=30, batch_size=8)
    trained = heads.train_head(inputs, masks, spec, seed=0, n_classes=n_classes)
    assert trained.metrics["accuracy"] > 0.85 and trained.metrics["miou"] > 0.7


# --------------------------------------------------------------------------- extraction


def _write_dataset(tmp_path: Path, n: int = 6, size: tuple[int, int] = (70, 60)) -> ImageDataset:
    """Images whose left part is red (class 1) and right part blue (class 2); a corrupt file at the end."""
    records = []
    width, height = size
    for i in range(n):
        split = width // 3 + 4 * i
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[:, :split] = (220, 30, 30)
        pixels[:, split:] = (30, 30, 220)
        mask = np.where(np.arange(width)[None, :] < split, 1, 2).repeat(height, 0).astype(np.uint8)
        mask[height // 2 : height // 2 + 3] = 255  # an unlabelled strip
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        Image.fromarray(mask).save(tmp_path / f"mask{i}.png")
        records.append(ImageRecord(i, str(tmp_path / f"img{i}.png"), "red" if split > width // 2 else "blue", str(tmp_path / f"mask{i}.png")))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records.append(ImageRecord(n, str(tmp_path / "broken.png"), "red", str(tmp_path / "mask0.png")))
    return ImageDataset("toy", records, ["blue", "red"], ["background", "red", "blue"], 255)


def test_mask_follows_the_image_geometry(tmp_path):
    dataset = _write_dataset(tmp_path, n=1, size=(90, 50))
    backbone = tiny_dinov2()
    pixels = backbone.preprocess(dataset.image(0))
    mask = heads.mask_like_image(dataset.mask(0), dataset.image(0).size, backbone.image_size, 255, 3)
    assert mask.shape == (IMAGE, IMAGE) and mask.dtype == torch.int16
    red = pixels[0] > pixels[2]
    labelled = mask != IGNORE
    agree = (red == (mask == 1))[labelled].double().mean()
    assert agree > 0.97  # only the resampled boundary column may differ
    assert (~labelled).any() and set(mask.unique().tolist()) <= {IGNORE, 1, 2}


def test_extract_features_classification_reads_cls_and_skips_bad_images(tmp_path):
    dataset = _write_dataset(tmp_path)
    backbone = tiny_dinov2()
    data = heads.extract_head_features(recorded_final(backbone, dataset, tmp_path / "rec"), dataset, "classification")
    assert data.image_idx.tolist() == list(range(6)) and [i for i, _ in data.skipped] == [6]
    pixels = torch.stack([backbone.preprocess(dataset.image(i)) for i in range(6)])
    with torch.no_grad():
        cls = backbone.forward_final(pixels)[:, 0]
    assert torch.allclose(data.inputs, cls, atol=1e-5)
    assert data.labels.tolist() == [dataset.classes.index(r.label) for r in dataset.records[:6]]
    assert data.targets is data.labels


def test_extract_features_mean_pools_without_cls(tmp_path):
    dataset = _write_dataset(tmp_path, n=2)
    backbone = tiny_siglip()
    assert backbone.layout.n_cls == 0
    data = heads.extract_head_features(recorded_final(backbone, dataset, tmp_path / "rec"), dataset, "classification")
    with torch.no_grad():
        final = backbone.forward_final(torch.stack([backbone.preprocess(dataset.image(i)) for i in range(2)]))
    assert torch.allclose(data.inputs, final.mean(1), atol=1e-5)


def test_segmentation_head_end_to_end_save_load_and_row(tmp_path):
    dataset = _write_dataset(tmp_path)
    backbone = tiny_dinov2()
    spec = HeadSpec(task="segmentation", model="tiny", train="toy", lrs=[1e-2, 1e-1], weight_decays=[1e-3], epochs=15, batch_size=4)
    tokens = recorded_final(backbone, dataset, tmp_path / "rec")
    row = heads.build_head("seg", spec, tokens, dataset, dataset, tmp_path / "head", seed=0)
    data = heads.extract_head_features(tokens, dataset, "segmentation")
    assert data.inputs.shape == (6, 4, 4, 32) and data.masks.shape == (6, IMAGE, IMAGE)
    assert row["task"] == "segmentation" and row["classes"] == ["background", "red", "blue"]
    assert row["n_train"] == row["n_val"] == 6 and 0 <= row["val_miou"] <= 1
    assert row["val_accuracy"] > 0.8  # red vs blue is linearly readable even from a random ViT
    to_arrow("heads", [row])  # fits the declared schema

    head = heads.load_head(tmp_path / "head")
    assert head.task == "segmentation" and head.classes == row["classes"] and head.meta["head"] == "seg"
    pixels = torch.stack([backbone.preprocess(dataset.image(i)) for i in range(6)])
    with torch.no_grad():
        logits = head(backbone.forward_final(pixels), backbone.layout)
    assert logits.shape == (6, 3, 4, 4)
    again = heads.evaluate(head.linear, data.inputs, data.masks, "segmentation")
    assert again["miou"] == pytest.approx(row["val_miou"]) and again["accuracy"] == pytest.approx(row["val_accuracy"])
