"""The rehearsal: miniature trees read by the real readers, tiny twins of the real model classes,
the paper spec's own graph, and (`slow`, still in the default suite) the paper spec built end to
end on CPU with every table checked for the paper's shapes and the site in a browser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from saev_report.datasets.folders import ADE20K_CLASSES, ade20k, cub200, image_folder
from saev_report.graph import build_stages
from saev_report.rehearsal import (
    RehearsalScale,
    _capped_distinct,
    rehearsal_spec,
    write_ade20k,
    write_cub200,
    write_image_folder,
)
from saev_report.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "specs/clip_vs_dino.yaml"
SMALL = RehearsalScale(folder_classes=3, folder_images_per_class=2, cub_classes=200, cub_train_per_class=1,
                       cub_test_per_class=1, ade_training=10, ade_validation=10)


def test_cub_tree_is_read_by_the_cub_reader(tmp_path: Path) -> None:
    write_cub200(tmp_path, SMALL)
    for name in ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt"):
        assert (tmp_path / name).is_file()
    train, test = cub200("t", tmp_path, "train"), cub200("v", tmp_path, "test")
    assert len(train.classes) == len(test.classes) == 200
    assert len(train) == len(test) == 200
    assert {r.label for r in train.records} == set(train.classes)  # every species in both splits
    assert not {r.path for r in train.records} & {r.path for r in test.records}
    assert all(Path(r.path).is_file() and Path(r.path).parent.parent == tmp_path / "images" for r in train.records)


def test_ade_tree_has_150_classes_and_every_class_in_each_split(tmp_path: Path) -> None:
    write_ade20k(tmp_path, SMALL)
    for split in ("training", "validation"):
        dataset = ade20k(split, tmp_path, split)
        assert dataset.seg_classes == list(ADE20K_CLASSES)  # read from the generated objectInfo150.csv
        assert len(dataset) == 10
        seen = set()
        for i in range(len(dataset)):
            mask_hw = dataset.mask(i)
            image = Image.open(dataset.records[i].path)
            assert mask_hw.shape == (image.height, image.width)
            seen |= set(np.unique(mask_hw).tolist())
        assert seen == set(range(150)) | {dataset.ignore_index}  # 0 became ignore, k became k-1


def test_image_folder_tree_is_imagenet_style(tmp_path: Path) -> None:
    write_image_folder(tmp_path, SMALL)
    dataset = image_folder("i", tmp_path)
    assert len(dataset.classes) == 3 and len(dataset) == 6
    assert all(c.startswith("n") and len(c) == 9 for c in dataset.classes)
    assert all(Path(r.path).suffix == ".JPEG" for r in dataset.records)


def test_capped_sweep_keeps_its_length_and_order() -> None:
    assert _capped_distinct([32], 4) == [4]
    assert _capped_distinct([16, 32], 4) == [2, 4]
    assert _capped_distinct([2, 3], 4) == [2, 3]  # already small: unchanged
    assert _capped_distinct([8, 9, 10], 2) == [1, 2, 3]  # would collide: still distinct, in order


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    paper = load_spec(PAPER, check_paths=False)
    return paper, rehearsal_spec(paper, cache, SMALL), cache


def test_rehearsal_keeps_the_paper_graph(rehearsed) -> None:
    paper, spec, cache = rehearsed
    assert [s.name for s in build_stages(spec, cache)] == [s.name for s in build_stages(paper, cache)]
    assert spec.run.name == "clip_vs_dino-rehearsal" and spec.run.device == "cpu"
    assert [e.rank_on for e in spec.experiments] == ["head_train", "head_train"]
    assert [(e.m, e.factors, e.where) for e in spec.experiments] == [(e.m, e.factors, e.where) for e in paper.experiments]
    assert spec.heads["cub"].lrs == paper.heads["cub"].lrs and spec.heads["ade"].weight_decays == paper.heads["ade"].weight_decays
    assert spec.sae.n_patches == SMALL.max_n_patches < paper.sae.n_patches
    assert {m.tokens == ["cls", "patches"] and m.layers == [11] for m in spec.models.values()} == {True}


def test_tiny_twins_are_the_paper_classes_with_its_grids(rehearsed) -> None:
    import open_clip
    import torch
    import transformers

    from saev_report.backbones import load_backbone

    _, spec, cache = rehearsed
    clip = load_backbone(spec.models["clip"], cache, torch.device("cpu"))
    dino = load_backbone(spec.models["dinov2"], cache, torch.device("cpu"))
    assert isinstance(clip.visual, open_clip.transformer.VisionTransformer)
    assert type(dino.model) is transformers.Dinov2Model
    assert (clip.patch_size, clip.layout.grid, clip.layout.n_tokens, clip.n_layers) == (16, (14, 14), 197, 12)
    assert (dino.patch_size, dino.layout.grid, dino.layout.n_tokens, dino.n_layers) == (14, (16, 16), 257, 12)
    image = Image.new("RGB", (120, 96), (200, 40, 40))
    for backbone, n_tokens in ((clip, 197), (dino, 257)):
        acts = backbone.capture(backbone.preprocess(image)[None], [11])[11]
        assert acts.shape == (1, n_tokens, SMALL.d_model)
    # The checkpoint is read back, not redrawn: a second load gives the same weights.
    again = load_backbone(spec.models["clip"], cache, torch.device("cpu"))
    assert torch.equal(again.visual.conv1.weight, clip.visual.conv1.weight)


def test_rehearse_refuses_what_it_has_no_miniature_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from saev_report.cli import app

    monkeypatch.setenv("SAEV_REPORT_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "timm.yaml"
    spec.write_text("run: {name: t}\ndatasets: {d: {kind: demo}}\nmodels: {m: {family: timm, source: vit_small_patch16_224, layers: [11]}}\n"
                    "record: {dataset: d}\n")
    result = CliRunner().invoke(app, ["validate", str(spec), "--rehearse"])
    assert result.exit_code == 2, result.output
    assert "--rehearse: models.m: no tiny twin for model family 'timm'" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["build", str(spec), "--rehearse", "--executor", "slurm"])
    assert result.exit_code == 2 and "does not combine" in result.output


# --------------------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("rehearsal")
    cache = os.environ.get("SAEV_REPORT_CACHE") or str(work / "cache")
    env = {**os.environ, "SAEV_REPORT_CACHE": cache, "HF_HUB_OFFLINE": "1", "SAEV_REPORT_PROGRESS": "0"}
    result = subprocess.run([sys.executable, "-m", "saev_report", "build", str(PAPER), "--rehearse"], cwd=work, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "runs" / "clip_vs_dino-rehearsal"


def _rows(run: Path, sql: str) -> list[dict]:
    from saev_report.tables import query

    return query(run, sql).to_pylist()


@pytest.mark.slow
def test_every_table_has_rows(built: Path) -> None:
    from saev_report.tables import TABLES

    paper = load_spec(PAPER, check_paths=False)
    # Tables of a section the paper spec leaves empty have nothing to hold; every other one has rows.
    unused = {"claims", "claim_evidence"} if not paper.claims else set()
    from saev_report.sae.registry import KINDS as SAE_KINDS
    from saev_report.spec import sae_sweep

    nested = any(SAE_KINDS[c.kind].sub_models(c.params, 4096) for m in paper.recorded_models() for c in sae_sweep(paper.sweep_for(m)))
    unused |= set() if nested else {"sub_models"}  # only kinds with nested dictionaries (Matryoshka) fill it
    counts = {t: _rows(built, f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}
    assert {t for t, n in counts.items() if n == 0} == unused & set(TABLES), counts


@pytest.mark.slow
def test_tables_have_the_paper_shapes(built: Path) -> None:
    from saev_report.activations import ActivationStore

    stores = {d.parent.name.split("-")[0]: ActivationStore(d) for d in (built / "cache" / "record").glob("*/L11")}
    assert {model: store.tokens_per_image for model, store in stores.items()} == {"clip": 197, "dinov2": 257}
    grids = {r["model"]: (r["grid_h"], r["grid_w"], r["n"]) for r in _rows(
        built, "SELECT split_part(sae_id, '/', 1) AS model, grid_h, grid_w, max(len(patch_acts)) AS n FROM exemplars GROUP BY ALL")}
    assert grids == {"clip": (14, 14, 196), "dinov2": (16, 16, 256)}
    heads = {r["head"]: r for r in _rows(built, "SELECT head, task, len(classes) AS n FROM heads")}
    assert (heads["cub"]["task"], heads["cub"]["n"]) == ("classification", 200)
    assert (heads["ade"]["task"], heads["ade"]["n"]) == ("segmentation", 150)
    # Ranked on the heads' training data: every species and every ADE20K class scored.
    ranked = {r["experiment"]: r for r in _rows(built, "SELECT experiment, dataset, level, count(DISTINCT concept) AS n "
                                                       "FROM experiment_concepts GROUP BY ALL")}
    assert (ranked["cub-concepts"]["dataset"], ranked["cub-concepts"]["level"], ranked["cub-concepts"]["n"]) == ("cub_train", "image", 200)
    assert (ranked["ade-concepts"]["dataset"], ranked["ade-concepts"]["level"], ranked["ade-concepts"]["n"]) == ("ade_train", "patch", 150)
    arms = _rows(built, "SELECT experiment, list(DISTINCT arm ORDER BY arm) AS arms, list(DISTINCT \"where\" ORDER BY \"where\") AS w, "
                        "list(DISTINCT factor ORDER BY factor) AS f, max(len(before_map)) AS n_map FROM experiments GROUP BY ALL ORDER BY 1")
    assert [a["arms"] for a in arms] == [["concept", "other", "random"]] * 2
    assert [a["w"] for a in arms] == [["all", "concept"], ["all"]]
    assert arms[0]["f"] == [-2.0, -1.0, 0.0, 1.0] and arms[0]["n_map"] == 256  # ADE maps on DINOv2's 16 × 16 grid
    # Generated by attribution on CUB labels and on ADE20K mask classes, each with its random control.
    edited = {(r["edit"], r["is_control"]): r["n"] for r in _rows(built, "SELECT edit, is_control, count(*) AS n FROM edits GROUP BY ALL")}
    assert set(edited) == {(e, c) for e in ("cub-suppress", "ade-suppress") for c in (False, True)}
    assert {len(r["before_map"]) for r in _rows(built, "SELECT before_map FROM edits WHERE edit = 'ade-suppress'")} == {256}
    # Across the two grids, each way: every feature of one SAE gets its best match in the other.
    matched = _rows(built, "SELECT split_part(sae_a, '/', 1) AS a, split_part(sae_b, '/', 1) AS b, count(*) AS n FROM matches GROUP BY ALL")
    assert sorted((r["a"], r["b"], r["n"]) for r in matched) == [("clip", "dinov2", 256), ("dinov2", "clip", 256)]
    spliced = {r["model"]: r for r in _rows(built, "SELECT model, cls_spliced, seg_spliced FROM saes")}
    assert spliced["clip"]["cls_spliced"] is not None and spliced["dinov2"]["seg_spliced"] is not None


@pytest.mark.slow
def test_rehearsal_site_loads_cleanly_in_a_browser(built: Path, browser) -> None:
    from urllib.parse import unquote, urlsplit

    from headless import no_xss, open_page, severe

    site = built / "site"
    features = sorted((site / "features").rglob("[0-9]*.html"))
    pages = [site / "index.html", *(site / "features").rglob("index.html"), *features[:: max(1, len(features) // 6)],
             site / "edits" / "index.html", *(site / "edits").rglob("[0-9]*.html"), *(site / "compare").glob("*.html"),
             *(site / "experiments").rglob("*.html")]
    assert len(features) > 0 and list((site / "compare").glob("*.html"))
    for page in pages:
        logs = open_page(browser, page)
        links = browser.execute_script("return Array.from(document.querySelectorAll('a[href], img[src]')).map(a => a.href || a.src)")
        for link in links:
            parts = urlsplit(link)
            assert parts.scheme == "file" and Path(unquote(parts.path)).is_file(), (page.relative_to(site), link)
        broken = browser.execute_script("return Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)")
        assert not broken and not severe(logs + browser.get_log("browser")), (page, broken, logs)
        no_xss(browser)
