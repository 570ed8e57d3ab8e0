"""Datasets: robust image loading, folder layouts, subsets and the offline demo set."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from saev_report.datasets import BadImage, ImageDataset, ImageRecord, display_path, image_rows, inspect_image, load_image, load_mask, open_dataset
from saev_report.datasets import demo
from saev_report.datasets.base import ALPHA_BACKGROUND, MIN_SIDE
from saev_report.datasets.folders import ADE20K_CLASSES, ade20k, cub200, image_folder, prettify_cub_class, seg_folder
from saev_report.tables import to_arrow
from saev_report.spec import Ade20kDataset, Cub200Dataset, DemoDataset, ImageFolderDataset, SegFolderDataset


def _photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colourful test picture [h, w, 3] uint8 (JPEG-friendly)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(h + w - 2, 1) + 64], -1)
    return rgb.astype(np.uint8)


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# --------------------------------------------------------------------------- load_image


def test_rgb_roundtrip(tmp_path):
    pixels = _photo()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_cmyk_jpeg(tmp_path):
    pixels = _photo()
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = load_image(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB" and image.size == (64, 48)
    assert np.abs(np.asarray(image).astype(int) - pixels).mean() < 8


def test_16bit_png_scaled_to_8bit(tmp_path):
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(load_image(tmp_path / "deep.png")).astype(int)
    expected = np.round(values / 257.0)
    assert np.abs(rgb[..., 0] - expected).max() <= 1
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_float_tiff_in_unit_range(tmp_path):
    values = np.linspace(0, 1, 20 * 20, dtype=np.float32).reshape(20, 20)
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    rgb = np.asarray(load_image(tmp_path / "float.tif")).astype(int)
    assert np.abs(rgb[..., 0] - np.round(values * 255)).max() <= 1


def test_palette_with_transparency_on_grey(tmp_path):
    index = np.zeros((20, 20), dtype=np.uint8)
    index[5:15, 5:15] = 1
    image = Image.fromarray(index, "P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.info["transparency"] = 0
    image.save(tmp_path / "pal.png", transparency=0)
    rgb = np.asarray(load_image(tmp_path / "pal.png"))
    assert tuple(rgb[0, 0]) == ALPHA_BACKGROUND  # transparent → grey, not the palette's black
    assert tuple(rgb[10, 10]) == (255, 0, 0)


def test_rgba_and_la_composited_on_grey(tmp_path):
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., :3] = (0, 0, 255)
    rgba[:, 10:, 3] = 255  # right half opaque blue
    rgba[:, :5, 3] = 0  # left quarter transparent
    rgba[:, 5:10, 3] = 128  # half-transparent strip
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    rgb = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    assert tuple(rgb[0, 0]) == ALPHA_BACKGROUND
    assert tuple(rgb[0, 15]) == (0, 0, 255)
    blend = np.array(ALPHA_BACKGROUND) * (1 - 128 / 255) + np.array([0, 0, 255]) * 128 / 255
    assert np.abs(rgb[0, 7] - blend).max() <= 1

    la = Image.fromarray(np.stack([np.full((20, 20), 255, np.uint8), rgba[..., 3]], -1), "LA")
    la.save(tmp_path / "la.png")
    rgb = np.asarray(load_image(tmp_path / "la.png"))
    assert tuple(rgb[0, 0]) == ALPHA_BACKGROUND and tuple(rgb[0, 15]) == (255, 255, 255)


def test_greyscale_and_bilevel(tmp_path):
    grey = _photo()[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    rgb = np.asarray(load_image(tmp_path / "g.png"))
    np.testing.assert_array_equal(rgb[..., 1], grey)
    Image.fromarray(grey > 128).save(tmp_path / "b.png")
    assert set(np.unique(np.asarray(load_image(tmp_path / "b.png")))) <= {0, 255}


def test_exif_orientation_applied(tmp_path):
    image = Image.fromarray(_photo(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert Image.open(tmp_path / "rot.jpg").size == (40, 20)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_bmp_and_webp(tmp_path):
    for fmt in ("BMP", "WEBP"):
        path = tmp_path / f"x.{fmt.lower()}"
        Image.fromarray(_photo()).save(path, fmt)
        assert load_image(path).size == (64, 48)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = _png_bytes(Image.fromarray(_photo(64, 64)))
    jpeg = _png_bytes(Image.fromarray(_photo(64, 64)), "JPEG")
    files = {
        "truncated.png": good[: len(good) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image, just text renamed to .jpg\n" * 10,
        "tiny.png": _png_bytes(Image.new("RGB", (4, 4), "red")),
        "thin.png": _png_bytes(Image.new("RGB", (200, MIN_SIDE - 1), "red")),
    }
    paths = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = tmp_path / name
    return paths


def test_bad_files_raise_bad_image(tmp_path):
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(BadImage) as info:
            load_image(path)
        assert info.value.reason and str(path) in str(info.value), name
    with pytest.raises(BadImage, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(BadImage, match="too small"):
        load_image(_bad_files(tmp_path)["tiny.png"])


def test_minimum_side_is_accepted(tmp_path):
    Image.new("RGB", (MIN_SIDE, MIN_SIDE), "blue").save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").size == (MIN_SIDE, MIN_SIDE)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt EXIF it survives
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), cut=st.floats(0, 1), fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
def test_any_bytes_give_rgb_or_bad_image(tmp_path, data, cut, fmt):
    """Random bytes and cut-off real files: never any exception but BadImage."""
    real = _png_bytes(Image.fromarray(_photo(32, 32)), fmt)
    for payload in (data, real[: int(len(real) * cut)], real[:16] + data):
        path = tmp_path / "fuzz.img"
        path.write_bytes(payload)
        try:
            image = load_image(path)
        except BadImage:
            continue
        assert image.mode == "RGB" and min(image.size) >= MIN_SIDE
        assert inspect_image(path).status == "ok"  # the images table agrees with the record stage


# --------------------------------------------------------------------------- the images table's status


def _odd_folder(root: Path) -> dict[bytes, str]:
    """An image folder with every kind of file the record stage skips; file name → expected status start."""
    root.mkdir()
    good = _png_bytes(Image.fromarray(_photo(32, 32)), "JPEG")
    files = {
        b"good.jpg": (good, "ok"),
        b"caf\xe9.jpg": (good, "ok"),  # Latin-1 bytes, as an old camera writes: read, shown escaped
        b"truncated.jpg": (good[: len(good) // 2], "corrupt image"),
        b"one.png": (_png_bytes(Image.new("RGB", (1, 1))), "too small (1x1 px"),
        b"fifteen.png": (_png_bytes(Image.new("RGB", (15, 15))), "too small (15x15 px"),
        b"still.gif": (_png_bytes(Image.new("P", (20, 20)), "GIF"), "ok"),
    }
    frames = [Image.new("RGB", (20, 20), (80 * i, 40, 200 - 60 * i)) for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    files[b"animated.gif"] = (animated.getvalue(), "animated (3 frames)")
    for name, (data, _) in files.items():
        Path(os.fsdecode(os.fsencode(root) + b"/" + name)).write_bytes(data)
    os.symlink(os.fsencode(root) + b"/gone.jpg", os.fsencode(root) + b"/dangling.jpg")
    expected = {name: status for name, (_, status) in files.items()}
    expected[b"dangling.jpg"] = "broken symlink"
    return expected


def test_every_skipped_image_is_listed_with_the_record_stages_reason(tmp_path):
    expected = _odd_folder(tmp_path / "odd")
    dataset = image_folder("odd", tmp_path / "odd", labels="none")
    rows = image_rows(dataset, workers=2)
    table = to_arrow("images", rows)  # the table takes every name, UTF-8 or not
    assert table.num_rows == len(expected)
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert set(by_name) == {name.decode("utf-8", "backslashreplace") for name in expected}
    for name, status in expected.items():
        row = by_name[name.decode("utf-8", "backslashreplace")]
        assert row["status"].startswith(status), (name, row["status"])
    assert by_name["fifteen.png"]["width"] == 15 and by_name["good.jpg"]["width"] == 32
    for record, row in zip(dataset.records, rows):  # the record stage skips exactly the rows not `ok`
        try:
            load_image(record.path)
            loaded = True
        except BadImage as exc:
            loaded = False
            assert row["status"] == exc.reason
        assert loaded == (row["status"] == "ok"), row


def test_display_path_round_trips_to_the_bytes_for_display():
    name = os.fsdecode(b"/data/caf\xe9.jpg")
    assert display_path(name) == "/data/caf\\xe9.jpg"
    assert display_path("/data/café.jpg") == "/data/café.jpg"
    display_path(name).encode("utf-8")  # storable anywhere


def test_folder_labels_from_non_utf8_folder_names(tmp_path):
    folder = os.fsencode(tmp_path) + b"/gar\xe7on"
    os.mkdir(folder)
    Image.fromarray(_photo()).save(os.fsdecode(folder + b"/a.png"))
    Image.fromarray(_photo()).save(os.fsdecode(folder + b"/caf\xe9.png"))
    dataset = image_folder("d", tmp_path)
    assert dataset.classes == ["gar\\xe7on"]  # a valid string: the odd byte escaped
    assert [r.label for r in dataset.records] == ["gar\\xe7on"] * 2
    rows = image_rows(dataset)
    assert [r["status"] for r in rows] == ["ok", "ok"]  # no image of the class is lost
    assert {os.path.basename(r["path"]) for r in rows} == {"a.png", "caf\\xe9.png"}
    to_arrow("images", rows)
    for record in dataset.records:  # opened by its bytes
        assert os.fsencode(record.path).startswith(folder)
        assert load_image(record.path).size == Image.open(os.fsdecode(os.fsencode(record.path))).size


# --------------------------------------------------------------------------- load_mask


def test_load_mask_modes(tmp_path):
    ids = np.arange(20 * 20).reshape(20, 20) % 7
    Image.fromarray(ids.astype(np.uint8), "L").save(tmp_path / "l.png")
    mask = load_mask(tmp_path / "l.png")
    assert mask.dtype == np.int64 and mask.shape == (20, 20)
    np.testing.assert_array_equal(mask, ids)

    palette = Image.fromarray(ids.astype(np.uint8), "P")
    palette.putpalette(list(np.random.default_rng(0).integers(0, 255, 768)))
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "p.png"), ids)  # palette indices, not colours

    wide = (ids * 1000).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "w.png"), ids * 1000)

    Image.fromarray(_photo(20, 20)).save(tmp_path / "rgb.png")
    with pytest.raises(BadImage, match="single-channel"):
        load_mask(tmp_path / "rgb.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(BadImage):
        load_mask(tmp_path / "bad.png")


# --------------------------------------------------------------------------- folder layouts


def _save(path: Path, seed: int = 0, size: tuple[int, int] = (24, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF"}[path.suffix.lower()]
    Image.fromarray(pixels).save(path, fmt)


def test_image_folder_layout(tmp_path):
    root = tmp_path / "imgs"
    for rel in ["dog/b.jpg", "dog/a.png", "cat/x/deep.webp", "cat/y.BMP", "loose.tif", "bird/z.jpeg", ".hidden/h.png", "dog/.h.png"]:
        _save(root / rel)
    (root / "dog" / "notes.txt").write_text("not an image")
    dataset = image_folder("f", root)
    rels = [Path(r.path).relative_to(root.resolve()).as_posix() for r in dataset.records]
    assert rels == ["bird/z.jpeg", "cat/x/deep.webp", "cat/y.BMP", "dog/a.png", "dog/b.jpg", "loose.tif"]
    assert [r.label for r in dataset.records] == ["bird", "cat", "cat", "dog", "dog", None]
    assert [r.index for r in dataset.records] == list(range(6))
    assert dataset.classes == ["bird", "cat", "dog"]
    assert dataset.label_ids().tolist() == [0, 1, 1, 2, 2, -1]
    assert dataset.image(1).mode == "RGB"

    unlabelled = image_folder("f", root, labels="none")
    assert all(r.label is None for r in unlabelled.records) and unlabelled.classes == []
    with pytest.raises(FileNotFoundError):
        image_folder("f", tmp_path / "nope")


def test_seg_folder_layout(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for stem, top in [("a", 3), ("b", 5), ("c", 1)]:
        _save(images / f"{stem}.jpg")
        if stem != "c":  # c has no mask and is left out
            masks.mkdir(exist_ok=True)
            ids = np.full((24, 24), top, dtype=np.uint8)
            ids[0, 0] = 255  # ignore_index is not a class
            Image.fromarray(ids, "L").save(masks / f"{stem}.png")
    dataset = seg_folder("s", images, masks)
    assert [Path(r.path).stem for r in dataset.records] == ["a", "b"]
    assert dataset.seg_classes == [f"class_{i}" for i in range(6)]
    assert dataset.mask(1)[5, 5] == 5 and dataset.mask(1)[0, 0] == 255

    named = seg_folder("s", images, masks, classes=["bg", "x"], ignore_index=0)
    assert named.seg_classes == ["bg", "x"] and named.ignore_index == 0


def _cub_fixture(root: Path) -> None:
    classes = ["001.Black_footed_Albatross", "002.Blue_Jay", "003.Cardinal"]
    images, labels, split = [], [], []
    for ident in range(1, 7):
        cls = (ident - 1) % 3
        rel = f"{classes[cls]}/{classes[cls].split('.')[1]}_{ident:04d}.jpg"
        _save(root / "images" / rel, seed=ident)
        images.append(f"{ident} {rel}")
        labels.append(f"{ident} {cls + 1}")
        split.append(f"{ident} {int(ident <= 4)}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i + 1} {c}" for i, c in enumerate(classes)) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")


def test_cub200_layout(tmp_path):
    root = tmp_path / "CUB_200_2011"
    _cub_fixture(root)
    train = cub200("cub", root, "train")
    test = cub200("cub", root, "test")
    assert [r.label for r in train.records] == ["Black footed Albatross", "Blue Jay", "Cardinal", "Black footed Albatross"]
    assert [r.label for r in test.records] == ["Blue Jay", "Cardinal"]
    assert train.classes == test.classes == ["Black footed Albatross", "Blue Jay", "Cardinal"]
    assert Path(test.records[0].path).name == "Blue_Jay_0005.jpg"
    assert prettify_cub_class("200.Common_Yellowthroat") == "Common Yellowthroat"
    (root / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        cub200("cub", root)


def _ade_fixture(root: Path) -> None:
    for split in ("training", "validation"):
        for i in range(3):
            _save(root / "images" / split / f"ADE_{split[:5]}_{i:08d}.jpg", seed=i)
            ids = np.zeros((24, 24), dtype=np.uint8)
            ids[:, 12:] = 1 + i  # wall (1), building (2), sky (3); left half unlabelled
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids, "L").save(root / "annotations" / split / f"ADE_{split[:5]}_{i:08d}.png")


def test_ade20k_layout(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _ade_fixture(root)
    dataset = ade20k("ade", root, "validation")
    assert len(dataset) == 3 and "validation" in dataset.records[0].path
    assert dataset.seg_classes == list(ADE20K_CLASSES)
    assert dataset.seg_classes[0] == "wall" and dataset.seg_classes[149] == "flag" and dataset.seg_classes[12] == "person"
    mask = dataset.mask(2)
    assert mask.dtype == np.int64
    assert (mask[:, :12] == dataset.ignore_index).all()  # 0 = unlabelled → ignore
    assert (mask[:, 12:] == 2).all() and dataset.seg_classes[2] == "sky"  # value 3 → class 2

    rows = ["Idx,Ratio,Train,Val,Name"] + [f"{i + 1},0.1,1,1,name{i};alias" for i in range(150)]
    (root / "objectInfo150.csv").write_text("\n".join(rows) + "\n")
    assert ade20k("ade", root).seg_classes[:2] == ["name0", "name1"]


def test_open_dataset_every_folder_kind(tmp_path):
    _save(tmp_path / "f" / "a" / "1.png")
    _save(tmp_path / "f" / "b" / "2.png")
    _save(tmp_path / "s" / "images" / "1.png")
    (tmp_path / "s" / "masks").mkdir()
    Image.fromarray(np.ones((24, 24), np.uint8)).save(tmp_path / "s" / "masks" / "1.png")
    _cub_fixture(tmp_path / "cub")
    _ade_fixture(tmp_path / "ade")
    specs = {
        "image_folder": (ImageFolderDataset(kind="image_folder", root=tmp_path / "f"), 2),
        "seg_folder": (SegFolderDataset(kind="seg_folder", images=tmp_path / "s" / "images", masks=tmp_path / "s" / "masks"), 1),
        "cub200": (Cub200Dataset(kind="cub200", root=tmp_path / "cub", split="test"), 2),
        "ade20k": (Ade20kDataset(kind="ade20k", root=tmp_path / "ade"), 3),
    }
    for key, (spec, n) in specs.items():
        dataset = open_dataset(key, spec, tmp_path / "cache")
        assert dataset.key == key and len(dataset) == n
        assert open_dataset(key, spec.model_copy(update={"max_images": 1}), tmp_path / "cache").records[0].index == 0


# --------------------------------------------------------------------------- subsets


def _toy(n: int) -> ImageDataset:
    records = [ImageRecord(i, f"/x/{i:04d}.png", f"c{i % 3}", None) for i in range(n)]
    return ImageDataset("toy", records, ["c0", "c1", "c2"])


@given(n=st.integers(1, 300), small=st.integers(1, 300), large=st.integers(1, 300))
def test_subsets_deterministic_nested_ordered(n, small, large):
    small, large = min(small, large), max(small, large)
    full = _toy(n)
    a, b = full.subset(small), full.subset(small)
    assert [r.path for r in a.records] == [r.path for r in b.records]  # deterministic
    assert len(a) == min(small, n)
    assert [r.index for r in a.records] == list(range(len(a)))  # re-indexed
    paths = [r.path for r in a.records]
    assert paths == sorted(paths)  # dataset order kept
    assert set(paths) <= {r.path for r in full.subset(large).records}  # nested
    assert a.classes == full.classes
    assert full.subset(None) is full


def test_subset_is_spread_not_a_prefix():
    picked = [int(Path(r.path).stem) for r in _toy(1000).subset(100).records]
    assert max(picked) > 500  # not just the first 100 (which would be in sorted-folder order)


# --------------------------------------------------------------------------- demo: pure parts


def test_image_plan_balanced_with_twenty_percent_val():
    for n_classes in (2, 5, 8):
        plans = [demo.image_plan(i, n_classes) for i in range(n_classes * 50)]
        for c in range(n_classes):
            splits = [s for k, s in plans if k == c]
            assert len(splits) == 50 and splits.count("val") == 10


def test_is_photo_rejects_flat_drawings():
    rng = np.random.default_rng(0)
    photo = np.concatenate([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), np.full((64, 64, 1), 255, np.uint8)], -1)
    assert demo.is_photo(photo)
    drawing = photo.copy()
    drawing[..., :3] = 0
    drawing[:, 32:, :3] = (250, 200, 10)  # two flat colours
    assert not demo.is_photo(drawing)
    ghost = photo.copy()
    ghost[..., 3] = 120  # see-through everywhere
    assert not demo.is_photo(ghost)


def test_compose_matches_numpy_reference():
    size = 64
    background = Image.fromarray(np.full((128, 160, 3), (10, 200, 30), np.uint8))
    stamp_rgba = np.zeros((20, 10, 4), np.uint8)
    stamp_rgba[..., :3] = (250, 5, 5)
    stamp_rgba[..., 3] = 255
    stamp = demo.Stamp("x/red.png", Image.fromarray(stamp_rgba, "RGBA"), mirrorable=True)
    image, mask, placement = demo.compose(background, stamp, 3, size, np.random.default_rng(1))
    x0, y0, x1, y1 = placement["box"]
    assert image.shape == (size, size, 3) and mask.shape == (size, size)
    # A uniform opaque stamp keeps its aspect ratio and fills its box exactly.
    assert (y1 - y0) / (x1 - x0) == pytest.approx(2, abs=0.15)
    expected_mask = np.zeros((size, size), np.uint8)
    expected_mask[y0:y1, x0:x1] = 3
    np.testing.assert_array_equal(mask, expected_mask)
    assert (np.abs(image[mask == 3].astype(int) - (250, 5, 5)) <= 1).all()
    assert (np.abs(image[mask == 0].astype(int) - (10, 200, 30)) <= 1).all()
    assert demo.STAMP_SCALE[0] * size - 1 <= max(x1 - x0, y1 - y0) <= demo.STAMP_SCALE[1] * size + 1


def test_missing_stamps_give_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv(demo.STAMPS_ENV, str(tmp_path / "no-stamps"))
    with pytest.raises(demo.DemoDataUnavailable, match="apt-get install tuxpaint-stamps-default"):
        open_dataset("demo", DemoDataset(kind="demo"), tmp_path)


# --------------------------------------------------------------------------- demo: built sets

needs_demo_sources = pytest.mark.skipif(
    not demo.DEFAULT_STAMPS_DIR.is_dir() or demo.importlib.util.find_spec("mvtbdata") is None,
    reason="demo sources missing: sudo apt-get install tuxpaint-stamps-default; pip install mvtb-data",
)
SMALL_DEMO = DemoDataset(kind="demo", n_images=48, size=64, seed=3)


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built_demo(tmp_path_factory) -> Path:
    return demo.ensure_demo(SMALL_DEMO, tmp_path_factory.mktemp("demo-a"))


@needs_demo_sources
def test_demo_is_deterministic(built_demo, tmp_path):
    again = demo.ensure_demo(SMALL_DEMO, tmp_path)
    assert again.name == built_demo.name
    first, second = _file_hashes(built_demo), _file_hashes(again)
    assert len(first) == 2 * 48 + 1 and first == second


@needs_demo_sources
def test_demo_threads_do_not_change_the_bytes(built_demo, tmp_path):
    sources = demo.demo_sources(SMALL_DEMO.categories)
    demo.build_demo(tmp_path / "serial", sources, SMALL_DEMO.n_images, SMALL_DEMO.size, SMALL_DEMO.seed, workers=1)
    assert _file_hashes(tmp_path / "serial") == _file_hashes(built_demo)


@needs_demo_sources
def test_demo_other_seed_differs(built_demo, tmp_path):
    other = demo.ensure_demo(SMALL_DEMO.model_copy(update={"seed": 4, "n_images": 8}), tmp_path)
    assert other.name != built_demo.name
    assert _file_hashes(other)["images/00000.png"] != _file_hashes(built_demo)["images/00000.png"]


@needs_demo_sources
def test_demo_masks_agree_with_labels(built_demo):
    dataset = open_dataset("demo", SMALL_DEMO, built_demo.parent)
    assert len(dataset) == 48
    assert dataset.classes == sorted(dataset.classes) and len(dataset.classes) == 8
    assert dataset.seg_classes == ["background", *dataset.classes]
    for i, record in enumerate(dataset.records):
        image, mask = dataset.image(i), dataset.mask(i)
        assert image.size == (64, 64) and mask.shape == (64, 64)
        class_value = dataset.classes.index(record.label) + 1
        values = set(np.unique(mask).tolist())
        assert class_value in values and values <= {0, class_value, dataset.ignore_index}
        assert (mask == class_value).sum() > 0.005 * mask.size  # the object is there (thin ones cover ~1 %)


@needs_demo_sources
def test_demo_splits_share_a_build_and_use_disjoint_stamps(built_demo):
    cache = built_demo.parent
    train = open_dataset("t", SMALL_DEMO.model_copy(update={"split": "train"}), cache)
    val = open_dataset("v", SMALL_DEMO.model_copy(update={"split": "val"}), cache)
    built = [p.name for p in cache.iterdir() if p.suffix != ".lock"]  # lock files stay, empty of data
    assert built == [built_demo.name]  # one build serves every split
    assert len(train) + len(val) == 48 and len(val) == 8  # 1 round in 5 of 8 classes
    index = json.loads((built_demo / "index.json").read_text())
    used = {split: {e["stamp"] for e in index["images"] if e["split"] == split} for split in ("train", "val")}
    assert used["val"] and not used["train"] & used["val"]
    for label in index["classes"]:
        listed_train, listed_val = set(index["stamps"]["train"][label]), set(index["stamps"]["val"][label])
        assert listed_val and listed_train and not listed_train & listed_val
    assert {Path(r.path).name for r in train.records}.isdisjoint(Path(r.path).name for r in val.records)


@needs_demo_sources
def test_demo_is_reused_not_rebuilt(built_demo, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt an existing demo set")

    monkeypatch.setattr(demo, "build_demo", no_build)
    spec = SMALL_DEMO.model_copy(update={"max_images": 10})
    a, b = open_dataset("d", spec, built_demo.parent), open_dataset("d", spec, built_demo.parent)
    assert len(a) == 10 and [r.path for r in a.records] == [r.path for r in b.records]


@needs_demo_sources
def test_default_categories_have_enough_photo_stamps():
    sources = demo.demo_sources(None)
    for category in sources.categories:
        stamps = [demo.load_stamp(p, sources.stamps_root) for p in sources.candidates[category]]
        assert sum(s is not None for s in stamps) >= 15, category
    rels = [p for c in sources.categories for p in sources.candidates[c]]
    assert len(rels) == len(set(rels))  # bovines are not also counted as mammals
