"""Concept-suppression experiments and spliced metrics: feature ranking and controls, pixel and
probability measurements against plain numpy, a planted concept that its edit removes while the
controls do not, and spliced scores that are exactly clean (perfect SAE) or ablated (useless SAE)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from saev_report import claims
from saev_report import experiments as ex
from saev_report.datasets import ImageDataset, ImageRecord
from saev_report.heads import LinearHead
from saev_report.sae import SparseAutoencoder
from saev_report.spec import SpecError, parse_spec_text
from saev_report.tables import to_arrow

transformers = pytest.importorskip("transformers")
from saev_report.backbones.hf import HFBackbone  # noqa: E402
from tiny_models import tiny_dinov2, orthonormal_sae  # noqa: E402

IMAGE, D, N_LAYERS = 56, 32, 3  # 4×4 patch grid
SID = "tiny/L3/x"


@pytest.fixture(scope="module")
def backbone(one_thread) -> HFBackbone:
    return tiny_dinov2(D, N_LAYERS, IMAGE)


# --------------------------------------------------------------------------- choosing features


def concept_row(feature: int, concept: str, ap: float, level: str = "patch", sae_id: str = SID) -> dict:
    return {"sae_id": sae_id, "feature": feature, "concept": concept, "level": level, "ap": ap}


def test_ranked_features_sort_by_ap_within_one_sae_and_level():
    rows = [concept_row(3, "cat", 0.2), concept_row(1, "cat", 0.9), concept_row(2, "cat", 0.9), concept_row(7, "dog", 0.5),
            concept_row(9, "cat", float("nan")), concept_row(4, "cat", 0.99, level="image"), concept_row(5, "cat", 1.0, sae_id="other")]
    assert ex.ranked_features(rows, SID, "patch") == {"cat": [1, 2, 3], "dog": [7]}
    assert ex.ranked_features(rows, SID, "image") == {"cat": [4]}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["cat", "dog", "sky"]), st.sampled_from([0.1, 0.5, 0.9, float("nan"), None]),
                          st.sampled_from(["patch", "image"]), st.sampled_from([SID, "other"])), max_size=30))
def test_ranked_features_of_a_table_equal_those_of_its_rows(rows):
    rows = [{**concept_row(f, c, ap, level, sid)} for f, c, ap, level, sid in {(r[0], r[1], r[3], r[4]): r for r in rows}.values()]
    from_rows = ex.ranked_features([r for r in rows if r["ap"] is not None], SID, "patch")
    assert ex.ranked_features(to_arrow("concepts", rows), SID, "patch") == from_rows


def test_other_concept_is_the_next_name_wrapping():
    assert ex.other_concept("b", ["c", "a", "b"]) == "c"
    assert ex.other_concept("c", ["c", "a", "b"]) == "a"
    assert ex.other_concept("a", ["a"]) is None


def test_plan_arms_sizes_nesting_and_disjoint_random_controls():
    ranked = {"cat": list(range(0, 10)), "dog": list(range(10, 13))}
    freq = {f: {"freq": 10 ** (-1 - f / 20), "dead": False} for f in range(60)}
    arms = ex.plan_arms(ranked, "cat", [1, 4, 16], ["random", "other"], freq, seed=0)
    by = {(a.arm, a.m): a for a in arms}
    assert set(by) == {("concept", 1), ("random", 1), ("other", 1), ("concept", 4), ("random", 4)}  # no m=16: only 10 features; dog has 3
    assert by[("concept", 4)].features == (0, 1, 2, 3) and by[("other", 1)].features == (10,) and by[("other", 1)].source == "dog"
    assert by[("random", 4)].features[:1] == by[("random", 1)].features  # nested like the concept's own
    assert not set(by[("random", 4)].features) & set(ranked["cat"][:4])
    assert len(set(by[("random", 4)].features)) == 4
    again = ex.plan_arms(ranked, "cat", [1, 4, 16], ["random", "other"], freq, seed=0)
    assert again == arms
    assert [a.arm for a in ex.plan_arms(ranked, "cat", [4], [], freq, seed=0)] == ["concept"]
    many = {f: {"freq": 10 ** (-1 - f / 400), "dead": False} for f in range(1000)}  # more than one sample of candidates
    drawn = ex.plan_arms(ranked, "cat", [1, 4, 16], ["random"], many, seed=0, random_draws=3)
    assert [a.features for a in drawn if a.arm == "random" and a.draw == 0] == [
        a.features for a in ex.plan_arms(ranked, "cat", [1, 4, 16], ["random"], many, seed=0) if a.arm == "random"]
    draws = {a.draw: a.features for a in drawn if a.arm == "random" and a.m == 4}
    assert sorted(draws) == [0, 1, 2]  # draw 0 is the single-draw build's (above)
    assert len(set(draws.values())) == 3  # independent draws, none of them the concept's own features
    assert all(not set(f) & set(ranked["cat"][:4]) for f in draws.values())


# --------------------------------------------------------------------------- measurements against numpy


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(0, 10_000))
def test_segmentation_measure_matches_numpy(n_classes, seed):
    rng = np.random.default_rng(seed)
    before, after = rng.normal(size=(2, n_classes, 3, 5))
    concept = int(rng.integers(n_classes))
    got = ex.segmentation_measure(torch.tensor(before), torch.tensor(after), (3, 5), concept)  # same size: no upsampling
    pb, pa = before.argmax(0).ravel(), after.argmax(0).ravel()
    removed = int(((pb == concept) & (pa != concept)).sum())
    assert got["concept_px_before"] == int((pb == concept).sum()) and got["concept_px_removed"] == removed
    assert got["other_px_changed"] == int(((pb != concept) & (pa != pb)).sum())
    assert got["other_changed_frac"] == pytest.approx(got["other_px_changed"] / 15)
    assert got["class_px_delta"] == (np.bincount(pa, minlength=n_classes) - np.bincount(pb, minlength=n_classes)).tolist()
    if (pb == concept).any():
        assert got["removed_frac"] == pytest.approx(removed / (pb == concept).sum())
    else:
        assert got["removed_frac"] is None


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(0, 10_000))
def test_classification_measure_matches_numpy(n_classes, seed):
    rng = np.random.default_rng(seed)
    before, after = rng.normal(size=(2, n_classes)) * 3
    concept = int(rng.integers(n_classes))
    got = ex.classification_measure(torch.tensor(before), torch.tensor(after), concept)

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    pb, pa = softmax(before), softmax(after)
    others = np.arange(n_classes) != concept
    assert got["p_delta"] == pytest.approx(pa[concept] - pb[concept])
    assert got["other_p_delta"] == pytest.approx(np.abs(pa - pb)[others].mean())
    assert got["flipped"] == (before.argmax() != after.argmax())


def test_the_summary_pools_pixels_over_images_and_random_draws_image_by_image():
    base = {"experiment": "e", "sae_id": SID, "head": "seg", "task": "segmentation", "level": "patch", "concept": "cat",
            "m": 1, "factor": 0.0, "where": "all"}
    rows = [{**base, "arm": "concept", "draw": 0, "image_idx": 0, "concept_px_before": 100, "concept_px_removed": 90, "other_changed_frac": 0.0},
            {**base, "arm": "concept", "draw": 0, "image_idx": 1, "concept_px_before": 10, "concept_px_removed": 0, "other_changed_frac": 0.1},
            {**base, "arm": "random", "draw": 0, "image_idx": 0, "concept_px_before": 100, "concept_px_removed": 10, "other_changed_frac": 0.0},
            {**base, "arm": "random", "draw": 1, "image_idx": 0, "concept_px_before": 100, "concept_px_removed": 30, "other_changed_frac": 0.2},
            {**base, "arm": "random", "draw": 0, "image_idx": 1, "concept_px_before": 10, "concept_px_removed": 2, "other_changed_frac": 0.0},
            {**base, "arm": "random", "draw": 1, "image_idx": 1, "concept_px_before": 10, "concept_px_removed": 0, "other_changed_frac": 0.0}]
    summary = {s["arm"]: s for s in claims.summarise_rows(rows)}
    assert summary["concept"]["removed_frac"] == pytest.approx(90 / 110) and summary["concept"]["other_changed_frac"] == pytest.approx(0.05)
    assert summary["concept"]["n_images"] == 2 and summary["random"]["n_draws"] == 2
    assert summary["random"]["removed_frac"] == pytest.approx(42 / 220)  # every draw's pixels pooled
    assert summary["random"]["other_changed_frac"] == pytest.approx(0.05)  # draws averaged per image, then images
    assert summary["concept"]["removed_frac_lo"] <= summary["concept"]["removed_frac"] <= summary["concept"]["removed_frac_hi"]


# --------------------------------------------------------------------------- a planted concept, end to end


def _masked_dataset(tmp_path: Path, n: int = 4) -> ImageDataset:
    """Photos with a mask: the left half of every image is `cat` (class 1), the rest background."""
    from skimage import data as skdata

    records = []
    for i, name in enumerate(["chelsea", "astronaut", "coffee", "rocket", "horse", "camera"][:n]):
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((IMAGE, IMAGE)).save(tmp_path / f"{name}.png")
        mask = np.zeros((IMAGE, IMAGE), np.uint8)
        mask[:, : IMAGE // 2] = 1
        Image.fromarray(mask).save(tmp_path / f"{name}-mask.png")
        records.append(ImageRecord(i, str(tmp_path / f"{name}.png"), "cat", str(tmp_path / f"{name}-mask.png")))
    return ImageDataset("photos", records, ["cat"], ["background", "cat"], 255)


def planted(backbone, dataset):
    """An orthonormal SAE at the last layer; a head whose `cat` logit reads one feature's decoder
    direction, and a concepts table naming that feature cat's best."""
    sae = orthonormal_sae(D)
    q_fd = sae.W_dec_fd.detach()  # row f: feature f's decoder direction
    pixels = torch.stack([backbone.preprocess(dataset.image(i)) for i in range(len(dataset))])
    with torch.no_grad():
        f = sae.encode(backbone.capture(pixels, [N_LAYERS])[N_LAYERS][:, backbone.layout.patch_slice].flatten(0, 1))
    order = f.mean(0).argsort(descending=True).tolist()
    cat, bg = order[0], order[1]
    linear = torch.nn.Linear(D, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[1] = 8 * q_fd[cat]
        linear.bias[0] = 0.0
    head = LinearHead(linear, "segmentation", dataset.seg_classes).eval().requires_grad_(False)
    freq = (f > 0).double().mean(0)
    features = {j: {"freq": float(freq[j]) or 1e-4, "dead": False} for j in range(D)}
    concepts = [concept_row(cat, "cat", 0.95), concept_row(bg, "background", 0.9)]
    concepts += [concept_row(j, c, 0.1) for j in range(D) if j not in (cat, bg) for c in ("cat", "background")]
    return sae, head, features, concepts, cat


def test_editing_a_planted_concept_removes_it_and_the_controls_do_not(backbone, tmp_path):
    dataset = _masked_dataset(tmp_path)
    sae, head, features, concepts, cat = planted(backbone, dataset)
    rows = ex.run_experiment(
        name="plant", backbone=backbone, sae=sae, sae_id=SID, head=head, head_key="seg", dataset=dataset, layer=N_LAYERS,
        concept_rows=concepts, feature_rows=features, level="patch", ms=[1, 2], factors=[1.0, 0.0, -2.0],
        wheres=["all", "concept"], controls=["random", "other"], n_images=3, seed=0,
    )
    to_arrow("experiments", rows)  # every row fits the declared schema
    summary = {(s["concept"], s["arm"], s["m"], s["factor"], s["where"]): s for s in claims.summarise_rows(rows)}
    assert {r["image_idx"] for r in rows} == {0, 1, 2}  # n_images per concept, first in dataset order
    assert {s["n_images"] for s in summary.values()} == {3}
    for arm in ("concept", "random", "other"):
        identity = summary[("cat", arm, 1, 1.0, "all")]
        assert identity["removed_frac"] == 0 and identity["other_changed_frac"] == 0  # factor 1 is no edit
    hit = summary[("cat", "concept", 1, -2.0, "all")]
    assert hit["removed_frac"] > 0.5
    assert summary[("cat", "random", 1, -2.0, "all")]["removed_frac"] < 0.5 * hit["removed_frac"]
    assert summary[("cat", "other", 1, -2.0, "all")]["removed_frac"] < 0.5 * hit["removed_frac"]
    assert [r["features"] for r in rows if r["arm"] == "concept" and r["concept"] == "cat" and r["m"] == 1][0] == [cat]
    # Only the concept's patches: the head reads the last layer, so patches outside it keep their class.
    n_cat_patches = 8  # the left half of a 4×4 grid
    for r in rows:
        if r["where"] == "concept" and r["concept"] == "cat":
            assert r["n_patches_edited"] == n_cat_patches
            right = [p for p in range(16) if p % 4 >= 2]
            assert [r["after_map"][p] for p in right] == [r["before_map"][p] for p in right]
    again = ex.run_experiment(
        name="plant", backbone=backbone, sae=sae, sae_id=SID, head=head, head_key="seg", dataset=dataset, layer=N_LAYERS,
        concept_rows=concepts, feature_rows=features, level="patch", ms=[1, 2], factors=[1.0, 0.0, -2.0],
        wheres=["all", "concept"], controls=["random", "other"], n_images=3, seed=0, tokens_cache=(cache := {}),
    )
    assert again == rows  # deterministic, controls included, and a shared forward pass changes nothing
    assert sorted(cache) == [0, 1, 2]


def test_image_level_concepts_score_the_class_probability(backbone, tmp_path):
    dataset = _masked_dataset(tmp_path, n=2)
    sae, _, features, concepts, cat = planted(backbone, dataset)
    linear = torch.nn.Linear(D, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[0] = 20 * sae.W_dec_fd[cat]  # the CLS token reads the planted direction
    head = LinearHead(linear, "classification", ["cat", "dog"]).eval().requires_grad_(False)
    image_concepts = [{**r, "level": "image"} for r in concepts if r["concept"] == "cat"]
    image_concepts += [concept_row(j, "dog", 0.5, level="image") for j in range(3)]
    rows = ex.run_experiment(
        name="cls", backbone=backbone, sae=sae, sae_id=SID, head=head, head_key="cls", dataset=dataset, layer=N_LAYERS - 1,
        concept_rows=image_concepts, feature_rows=features, level="image", ms=[1], factors=[1.0, -2.0],
        wheres=["all"], controls=["random"], n_images=4, seed=0,
    )
    to_arrow("experiments", rows)
    assert {r["concept"] for r in rows} == {"cat"}  # no image is labelled dog
    assert all(r["p_before"] is not None and r.get("removed_frac") is None for r in rows)
    identity = [r for r in rows if r["factor"] == 1.0]
    assert all(r["p_delta"] == 0.0 and not r["flipped"] for r in identity)


# --------------------------------------------------------------------------- spliced metrics


class IdentitySAE:
    """Perfect reconstruction: the spliced forward pass is the clean one."""

    def encode(self, x_nd):
        return x_nd.clone()

    def decode(self, f_nf):
        return f_nf.clone()


class MeanSAE:
    """Reconstructs every patch as the mean: the spliced forward pass is the mean-ablated one."""

    def __init__(self, mean_d):
        self.mean_d = mean_d

    def encode(self, x_nd):
        return torch.zeros(len(x_nd), 1)

    def decode(self, f_nf):
        return self.mean_d.expand(len(f_nf), -1).clone()


def test_spliced_scores_are_clean_for_a_perfect_sae_and_ablated_for_a_useless_one(backbone, tmp_path):
    dataset = _masked_dataset(tmp_path, n=6)
    dataset.records[3] = ImageRecord(3, dataset.records[3].path, "dog", dataset.records[3].mask_path)
    dataset.records[4] = ImageRecord(4, dataset.records[4].path, None, dataset.records[4].mask_path)  # unlabelled
    dataset.classes = ["cat", "dog"]
    torch.manual_seed(1)
    heads = {"cls": LinearHead(torch.nn.Linear(D, 2), "classification", ["cat", "dog"]),
             "seg": LinearHead(torch.nn.Linear(D, 2), "segmentation", dataset.seg_classes)}
    heads = {k: h.eval().requires_grad_(False) for k, h in heads.items()}
    mean_d = torch.randn(D, generator=torch.Generator().manual_seed(2))
    scores = ex.spliced_scores(backbone, {"perfect": IdentitySAE(), "useless": MeanSAE(mean_d)}, mean_d, heads, dataset,
                               layer=1, batch_size=4)
    pixels = torch.stack([backbone.preprocess(dataset.image(i)) for i in range(6)])
    final = backbone.forward_final(pixels)
    for head_key, head in heads.items():
        perfect, useless = scores[("perfect", head_key)], scores[("useless", head_key)]
        assert perfect.metric == ("accuracy" if head.task == "classification" else "miou")
        assert perfect.n_images == (5 if head.task == "classification" else 6)
        assert perfect.spliced == perfect.clean and useless.spliced == useless.ablated
        assert perfect.clean == useless.clean and perfect.ablated == useless.ablated
        if perfect.clean != perfect.ablated:
            assert perfect.recovered == 1.0 and useless.recovered == 0.0
        # Per image, what the intervals resample: one entry per scored image, pooling back to the score.
        from saev_report import stats

        assert perfect.image_idx == ([0, 1, 2, 3, 5] if head.task == "classification" else [0, 1, 2, 3, 4, 5])
        for arm in ("clean", "spliced", "ablated"):
            per_image = perfect.per_image[arm]
            assert len(per_image) == perfect.n_images
            pooled = stats.STATISTICS["score"].value((per_image,), np.arange(len(per_image))[None])[0]
            assert pooled == pytest.approx(getattr(perfect, arm))
        # The clean score against a direct computation of the head on the full forward pass.
        logits = head(final, backbone.layout)
        if head.task == "classification":
            keep = [i for i, r in enumerate(dataset.records) if r.label is not None]
            labels = torch.tensor([dataset.classes.index(dataset.records[i].label) for i in keep])
            assert perfect.clean == pytest.approx(float((logits[keep].argmax(1) == labels).double().mean()))
        else:
            from saev_report.heads import confusion_matrix, scores_from_confusion, upsampled_logits

            masks = torch.stack([ex.patch_classes(dataset, i, IMAGE, (4, 4), 2)[0] for i in range(6)]).long()
            pred = upsampled_logits(logits, (IMAGE, IMAGE)).argmax(1)
            assert perfect.clean == pytest.approx(scores_from_confusion(confusion_matrix(pred, masks, 2))["miou"])


def test_spliced_scores_from_stored_tokens_equal_a_fresh_forward_pass(backbone, tmp_path, monkeypatch):
    """The splice stage reads the recorded layer-L and final tokens instead of re-running the
    backbone; stored in float32, the scores must be those of the capture path."""
    from saev_report.record import RecordedTokens, record_layers, record_reach
    from saev_report.stages.record import RecordOut
    from saev_report.stages.tokens import TokensOut

    dataset = _masked_dataset(tmp_path, n=6)
    dataset.classes = ["cat"]
    common = dict(model_key="tiny", dtype="float32", batch_size=4, shard_mb=1, device=torch.device("cpu"))
    record_layers(backbone, dataset, layers=[1], tokens=["cls", "patches"], out_dir=tmp_path / "record", **common)
    record = RecordOut(tmp_path / "record")
    recorded = RecordedTokens([record.token_set(1)], backbone.image_size)
    record_reach(backbone, recorded, record.image_index()[1], [dataset], [], from_layer=1, edit_layers=[], final=True,
                 out_dir=tmp_path / "tokens", **common)
    found = TokensOut(tmp_path / "tokens")
    stored = (found.layer(record, 1), found.final(record))
    torch.manual_seed(1)
    heads = {"cls": LinearHead(torch.nn.Linear(D, 1), "classification", ["cat"]),
             "seg": LinearHead(torch.nn.Linear(D, 2), "segmentation", dataset.seg_classes)}
    mean_d = torch.randn(D, generator=torch.Generator().manual_seed(2))
    saes = {"useless": MeanSAE(mean_d), "noisy": NoisySAE()}
    fresh = ex.spliced_scores(backbone, saes, mean_d, heads, dataset, layer=1, batch_size=4)

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("every image is stored: nothing should be captured")

    monkeypatch.setattr(backbone, "capture", no_forward_pass)
    read = ex.spliced_scores(backbone, saes, mean_d, heads, dataset, layer=1, batch_size=4, tokens=stored)
    assert fresh.keys() == read.keys()
    for key in fresh:
        for arm in ("clean", "spliced", "ablated"):
            assert getattr(read[key], arm) == pytest.approx(getattr(fresh[key], arm), abs=1e-6), (key, arm)


class NoisySAE:
    """A reconstruction that is neither perfect nor the mean (x·0.7 + a fixed offset)."""

    def encode(self, x_nd):
        return x_nd * 0.7

    def decode(self, f_nf):
        return f_nf + 0.05


def test_recovered_is_undefined_without_a_gap():
    assert ex.SplicedScores("accuracy", 0.5, 0.4, 0.5, 10).recovered is None
    assert ex.SplicedScores("accuracy", 0.9, 0.7, 0.1, 10).recovered == pytest.approx(0.75)
    assert math.isnan(ex.SplicedScores("miou", float("nan"), 0.1, 0.1, 0).clean)


# --------------------------------------------------------------------------- spec


SPEC = """
run: {name: t}
datasets:
  imgs: {kind: image_folder, root: /nowhere}
  demo: {kind: demo}
models:
  m: {family: imgfocus, layers: [11]}
record: {dataset: demo}
heads:
  cls: {task: classification, model: m, train: imgs}
  seg: {task: segmentation, model: m, train: demo}
experiments:
"""


def test_experiment_specs_validate_their_references():
    ok = parse_spec_text(SPEC + "  - {name: e, model: m, head: seg, where: [all, concept]}\n", check_paths=False)
    assert ok.experiments[0].m == [1, 4, 16] and ok.experiments[0].factors == [1.0, 0.0, -1.0, -2.0]
    with pytest.raises(SpecError) as err:
        parse_spec_text(SPEC + "  - {name: e, model: m, head: cls, where: [concept], saes: [3], layer: 4, m: [0]}\n", check_paths=False)
    text = str(err.value)
    assert "experiments.0.m" in text
    with pytest.raises(SpecError) as err:
        parse_spec_text(SPEC + "  - {name: e, model: m, head: cls, where: [concept], saes: [3], layer: 4}\n", check_paths=False)
    text = str(err.value)
    assert "experiments.0.saes.0" in text and "experiments.0.layer" in text and "no masks" in text
    with pytest.raises(SpecError, match="experiments.0.head"):
        parse_spec_text(SPEC + "  - {name: e, model: m, head: nope}\n", check_paths=False)


# --------------------------------------------------------------------------- ranking on the head's training data


def _red_block_dataset(tmp_path: Path, key: str, n: int, seed: int) -> ImageDataset:
    """Photos where a solid red quadrant (mask class 1, `cat`) is pasted into every other image;
    those images are labelled `cat`, the others `dog`. Quadrants are 2×2 patches of the 4×4 grid."""
    from skimage import data as skdata

    photos = ["chelsea", "astronaut", "coffee", "rocket", "horse", "camera", "hubble_deep_field", "immunohistochemistry"]
    rng = np.random.default_rng(seed)
    folder = tmp_path / key
    folder.mkdir(exist_ok=True)
    records = []
    for i in range(n):
        pixels = np.asarray(Image.fromarray(getattr(skdata, photos[(i + seed) % len(photos)])()).convert("RGB").resize((IMAGE, IMAGE))).copy()
        mask = np.zeros((IMAGE, IMAGE), np.uint8)
        if i % 2 == 0:
            r, c = (int(v) * IMAGE // 2 for v in rng.integers(0, 2, size=2))
            pixels[r : r + IMAGE // 2, c : c + IMAGE // 2] = (220, 20, 20)
            mask[r : r + IMAGE // 2, c : c + IMAGE // 2] = 1
        Image.fromarray(pixels).save(folder / f"{i}.png")
        Image.fromarray(mask).save(folder / f"{i}-mask.png")
        records.append(ImageRecord(i, str(folder / f"{i}.png"), "cat" if i % 2 == 0 else "dog", str(folder / f"{i}-mask.png")))
    return ImageDataset(key, records, ["cat", "dog"], ["background", "cat"], 255)


def _patch_tokens(backbone, dataset: ImageDataset, layer: int) -> torch.Tensor:
    pixels = torch.stack([backbone.preprocess(dataset.image(i)) for i in range(len(dataset))])
    with torch.no_grad():
        return backbone.capture(pixels, [layer])[layer][:, backbone.layout.patch_slice]  # [images, patches, d]


def red_detector_sae(backbone, dataset: ImageDataset, layer: int) -> tuple[SparseAutoencoder, int]:
    """An orthonormal SAE (x̂ = x) whose feature `planted` points from the mean background patch to
    the mean red-block patch; the other features are a random rotation."""
    tokens_ipd = _patch_tokens(backbone, dataset, layer)
    masks_ip = torch.stack([torch.from_numpy(np.asarray(Image.open(r.mask_path))[::14, ::14].copy()).flatten() for r in dataset.records])
    red, other = tokens_ipd[masks_ip == 1], tokens_ipd[masks_ip == 0]
    u_d = red.mean(0) - other.mean(0)
    u_d = u_d / u_d.norm()
    planted = 7
    basis = torch.randn(D, D, generator=torch.Generator().manual_seed(3))
    basis[:, 0] = u_d
    q_dd, _ = torch.linalg.qr(basis)
    q_dd[:, 0] *= torch.sign(q_dd[:, 0] @ u_d)
    q_fd = q_dd.T[torch.tensor([*range(1, planted + 1), 0, *range(planted + 1, D)])]  # row `planted` is u
    sae = orthonormal_sae(D)
    with torch.no_grad():
        sae.W_dec_fd.copy_(q_fd)
        sae.W_enc_df.copy_(q_fd.T)
    return sae, planted


def brute_force_aps(f_ipf: torch.Tensor, patch_concept_ip: np.ndarray, image_concept_i: np.ndarray, n_patch: int, n_image: int) -> dict:
    """(level, feature, concept) → sklearn's AP of the binned activations: every patch (image max) kept."""
    from sklearn.metrics import average_precision_score

    from saev_report.concepts import activation_bins

    out = {}
    binned = {"patch": activation_bins(f_ipf.reshape(-1, f_ipf.shape[-1])).numpy(), "image": activation_bins(f_ipf.amax(1)).numpy()}
    for level, labels, n in (("patch", patch_concept_ip.reshape(-1), n_patch), ("image", image_concept_i, n_image)):
        for c in range(n):
            if (labels == c).any():
                for f in range(f_ipf.shape[-1]):
                    out[(level, f, c)] = average_precision_score(labels == c, binned[level][:, f])
    return out


@pytest.mark.parametrize("level", ["patch", "image"])
def test_head_data_concepts_equal_a_brute_force_computation(backbone, tmp_path, level):
    dataset = _red_block_dataset(tmp_path, "train", n=7, seed=0)
    sae, planted = red_detector_sae(backbone, dataset, N_LAYERS)
    other = orthonormal_sae(D, seed=9)
    tables = ex.head_data_concepts(backbone, {"a": sae, "b": other}, {"a": "A", "b": "B"}, dataset, N_LAYERS, level, seed=0,
                                   batch_size=3, patch_path=tmp_path / "labels.npy")  # 3 + 3 + 1 images
    tokens_ipd = _patch_tokens(backbone, dataset, N_LAYERS)
    masks_ip = np.stack([np.asarray(Image.open(r.mask_path))[7::14, 7::14].flatten() for r in dataset.records])  # patch centres
    image_i = dataset.label_ids()
    for key, model in (("a", sae), ("b", other)):
        table = tables[key]
        assert set(table.column("level").to_pylist()) == {level} and set(table.column("sae_id").to_pylist()) == {key.upper()}
        with torch.no_grad():
            f_ipf = model.encode(tokens_ipd.reshape(-1, D)).reshape(len(dataset), -1, D)
        expected = brute_force_aps(f_ipf, masks_ip, image_i, 2, 2)
        names = dataset.seg_classes if level == "patch" else dataset.classes
        got = {(level, r["feature"], names.index(r["concept"])): r["ap"] for r in table.to_pylist()}
        assert got.keys() == {k for k in expected if k[0] == level}
        for k, ap in got.items():
            assert ap == pytest.approx(expected[k], abs=1e-9), k
        # and the ranking read from those rows is the brute-force order: every feature, AP descending
        ranked = ex.ranked_features(table, key.upper(), level)
        for c, name in enumerate(names):
            aps = [expected[(level, f, c)] for f in ranked[name]]
            assert sorted(ranked[name]) == list(range(D)) and all(a >= b - 1e-9 for a, b in zip(aps, aps[1:]))
    assert ex.ranked_features(tables["a"], "A", level)["cat"][0] == planted  # the red detector ranks first


def test_level_labels_keep_one_level(tmp_path):
    dataset = _red_block_dataset(tmp_path, "train", n=4, seed=0)
    image = ex.level_labels(dataset, "image", (4, 4), seed=0)
    patch = ex.level_labels(dataset, "patch", (4, 4), seed=0)
    assert image.has_image and not image.has_patch and image.image_names == ["cat", "dog"]
    assert patch.has_patch and not patch.has_image and patch.patch_names == ["background", "cat"]
    unlabelled = ImageDataset("u", [ImageRecord(0, dataset.records[0].path, None, None)])
    assert ex.level_labels(unlabelled, "image", (4, 4), 0) is None and ex.level_labels(unlabelled, "patch", (4, 4), 0) is None


def test_rank_batch_size_bounds_the_codes_held():
    assert ex.rank_batch_size(256, 24_576) == 10  # the paper's SAEs: 10 × 256 × 24,576 ≤ 2**26
    assert ex.rank_batch_size(16, 32) == ex.RANK_MAX_BATCH
    assert ex.rank_batch_size(10_000, 10_000) == 1


def _stage_params(rank_on: str, tmp_path: Path):
    from saev_report.spec import ExperimentSpec, ImageFolderDataset, ModelSpec
    from saev_report.stages.experiments import ExperimentParams, SAEChoice

    folder = {key: ImageFolderDataset(kind="image_folder", root=tmp_path / key) for key in ("imagenet", "train", "val")}
    exp = ExperimentSpec(name="e", model="m", head="seg", layer=N_LAYERS, dataset="val", m=[1], factors=[1.0, -2.0],
                         controls=["random"], n_images=3, rank_on=rank_on)
    return ExperimentParams(
        experiment=exp, layer=N_LAYERS, level="patch", saes=[SAEChoice(sae_tag="x", sae_id=SID)],
        model=ModelSpec(family="imgfocus", layers=[N_LAYERS]), dataset_key="val", dataset=folder["val"],
        record_dataset_key="imagenet", rank_dataset_key=None if rank_on == "analysis" else "train",
        rank_dataset=None if rank_on == "analysis" else folder["train"], seed=0, device="cpu")


def test_the_stage_ranks_on_the_heads_training_data_when_the_record_dataset_lacks_its_concepts(backbone, tmp_path, monkeypatch):
    """The paper spec's case: the analysis scored ImageNet labels only, the head segments `cat`.
    The stage ranks on the head's training images, finds the planted red-block feature, and its
    edit removes the head's `cat` pixels on the validation images."""
    import pyarrow.parquet as pq

    from saev_report.stages import experiments as stage
    from saev_report.stages.analyse import AnalyseOut
    from saev_report.stages.base import table_part
    from saev_report.stages.heads import HeadOut
    from saev_report.stages.train import TrainOut
    from saev_report.tables import write_table

    datasets = {"train": _red_block_dataset(tmp_path, "train", n=8, seed=0), "val": _red_block_dataset(tmp_path, "val", n=6, seed=1)}
    sae, planted = red_detector_sae(backbone, datasets["train"], N_LAYERS)
    # A head whose `cat` logit reads the planted direction of the final tokens, cut between red and the rest.
    u_d = sae.W_dec_fd[planted].detach()
    pixels = torch.stack([backbone.preprocess(datasets["train"].image(i)) for i in range(8)])
    with torch.no_grad():
        proj_ip = backbone.forward_final(pixels)[:, backbone.layout.patch_slice] @ u_d
    masks_ip = torch.stack([torch.from_numpy(np.asarray(Image.open(r.mask_path))[7::14, 7::14].copy()).flatten() for r in datasets["train"].records])
    cut = float((proj_ip[masks_ip == 1].min() + proj_ip[masks_ip == 0].max()) / 2)
    linear = torch.nn.Linear(D, 2)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[1] = 8 * u_d
        linear.bias[1] = -8 * cut
    head = LinearHead(linear, "segmentation", ["background", "cat"]).eval().requires_grad_(False)

    class Head(HeadOut):
        def head(self, device="cpu"):
            return head

    class Train(TrainOut):
        def sae(self, tag, device="cpu"):
            return sae

    analysis_dir = tmp_path / "analyse"
    write_table(table_part(analysis_dir, "concepts", "x"), "concepts",
                [concept_row(f, "n01440764", 0.5 + f / 100, level="image") for f in range(D)], "h")
    write_table(table_part(analysis_dir, "features", "x"), "features",
                [{"sae_id": SID, "feature": f, "freq": 0.05 + f / 1000, "dead": False} for f in range(D)], "h")
    inputs = {"head": Head(tmp_path / "head"), "train": Train(tmp_path / "train-stage"), "analyse": AnalyseOut(analysis_dir)}
    monkeypatch.setattr(stage, "open_backbone", lambda *args: (backbone, torch.device("cpu")))
    monkeypatch.setattr(stage, "open_dataset", lambda key, spec, cache_dir: datasets[key])

    out = tmp_path / "out"
    stage.experiment(_stage_params("auto", tmp_path), inputs, out)
    rows = pq.read_table(table_part(out, "experiments", "x")).to_pylist()
    ranked_on = pq.read_table(table_part(out, "experiment_concepts", "x")).to_pylist()
    assert {r["rank_dataset"] for r in rows} == {"train"} and {r["dataset"] for r in rows} == {"val"}
    assert {(r["experiment"], r["dataset"], r["level"]) for r in ranked_on} == {("e", "train", "patch")}
    best = max((r for r in ranked_on if r["concept"] == "cat"), key=lambda r: r["ap"])
    assert best["feature"] == planted and best["ap"] > 0.9
    assert not (out / "work").exists()  # the memory-mapped labels are gone
    summary = {(s["concept"], s["arm"], s["factor"]): s for s in claims.summarise_rows(rows)}
    assert [r["features"] for r in rows if (r["concept"], r["arm"]) == ("cat", "concept")][0] == [planted]
    assert summary[("cat", "concept", -2.0)]["removed_frac"] > 0.9
    assert summary[("cat", "random", -2.0)]["removed_frac"] < 0.5

    # `analysis` refuses, rather than silently testing nothing; `head_train` ranks the same way as the fallback.
    with pytest.raises(ValueError, match="scores none of head seg's patch-level concepts"):
        stage.experiment(_stage_params("analysis", tmp_path), inputs, tmp_path / "refused")
    stage.experiment(_stage_params("head_train", tmp_path), inputs, tmp_path / "forced")
    assert pq.read_table(table_part(tmp_path / "forced", "experiments", "x")).to_pylist() == rows
