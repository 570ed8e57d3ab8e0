"""concepts.py against sklearn and a brute-force numpy reference.

The histogram scores are exact for the binned activations (each activation
replaced by its bin), so the tests demand equality with
`sklearn.metrics.average_precision_score` on the bins, and that the AP of the
raw activations lies inside the reported bounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.metrics import average_precision_score

from gloo import random_cuts, run_on_ranks
from saev_report import concepts as C
from saev_report.analyse import analyse_sae
from saev_report.spec import AnalysisSpec

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def binned(acts: np.ndarray) -> np.ndarray:
    return C.activation_bins(torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32))).numpy()


def scores_of(acts_nf: np.ndarray, concept_sn: np.ndarray, n_concepts: int) -> tuple[C.Scores, ...]:
    """Scores of one batch of samples through DetectionHistograms (every label set)."""
    n_features = acts_nf.shape[1]
    hist = C.DetectionHistograms(n_features, n_concepts, len(concept_sn), CPU)
    flat = torch.from_numpy(acts_nf.astype(np.float32)).reshape(-1)
    idx = torch.nonzero(flat > 0).squeeze(1)
    bins = C.activation_bins(flat[idx])
    hist.update(idx % n_features, bins, idx // n_features, torch.from_numpy(concept_sn.astype(np.int64)))
    return tuple(hist.scores(s) for s in range(len(concept_sn)))


def brute_iou(bins_n: np.ndarray, positive_n: np.ndarray) -> tuple[float, int]:
    """Best IoU over thresholds 'bin ≥ b', b ≥ 1, and the bin where it is reached (the highest on ties)."""
    best, at = -1.0, 1
    for b in range(C.N_BINS - 1, 0, -1):
        fire = bins_n >= b
        iou = (fire & positive_n).sum() / (fire | positive_n).sum()
        if iou > best:
            best, at = iou, b
    return best, at


# --------------------------------------------------------------------------- labels


def test_patch_concepts_majority_rule():
    # A 2×2 grid: the aligned mask is 32×32 (16 px per patch). A 37×37 mask is not resized
    # (37 = 32·8/7 rounded) and its centre crop starts at row/column 2, so lay the design out there.
    design = np.zeros((32, 32), dtype=np.int64)
    design[:16, 16:] = 2  # top-right patch: all class 2
    design[16:, :16] = 1
    design[16:, 8:16] = 3  # bottom-left: half 1, half 3 → the lower id
    design[16:, 16:] = 255
    design[16:20, 16:] = 1  # bottom-right: a quarter 1, the rest unlabelled → no concept
    mask = np.full((37, 37), 255, dtype=np.int64)
    mask[2:34, 2:34] = design
    got = C.patch_concepts(mask, (2, 2), 255, 4)
    assert got.dtype == np.int16
    assert got.tolist() == [0, 2, 1, C.NO_CONCEPT]


def test_patch_concepts_counts_unlabelled_pixels_against_the_half():
    mask = np.full((32, 32), 255, dtype=np.int64)
    mask[:, :15] = 1  # 15 of 32 columns: under half of every patch of a 1×1 grid
    assert C.patch_concepts(mask, (1, 1), 255, 2, image_wh=(32, 32)).tolist() == [C.NO_CONCEPT]
    mask[:, :18] = 1
    assert C.patch_concepts(mask, (1, 1), 255, 2, image_wh=(32, 32)).tolist() == [1]


def test_null_permutation_moves_only_labelled_images():
    labelled = np.array([True, False, True, True, False, True])
    perm = C.null_permutation(labelled, seed=3)
    assert sorted(perm[labelled]) == list(np.flatnonzero(labelled))
    assert (perm[~labelled] == np.flatnonzero(~labelled)).all()
    assert (C.null_permutation(labelled, seed=3) == perm).all()


# --------------------------------------------------------------------------- bins and counters


def test_bins_are_monotone_and_exact_at_edges():
    edges = C.bin_lower_edges()
    assert (np.diff(edges[1:]) > 0).all()
    inner = edges[2:].astype(np.float32)
    assert (binned(inner) == np.arange(2, C.N_BINS)).all()  # an edge belongs to its own bin
    assert (binned(np.nextafter(inner, np.float32(0))) == np.arange(1, C.N_BINS - 1)).all()
    assert binned(np.array([0.0, -1.0, 1e-30, 1e30])).tolist() == [0, 0, 1, C.N_BINS - 1]
    assert edges[2] == 2.0 ** C.OCTAVES[0] * (1 + 2.0 ** -C.MANTISSA_BITS)
    assert (edges[3:] / edges[2:-1]).max() <= 1 + 2.0 ** -C.MANTISSA_BITS  # every bin ≤ 6.25 % wide


@given(st.lists(st.lists(st.integers(0, 50), max_size=40), max_size=12))
@settings(max_examples=50, deadline=None)
def test_sparse_counts_equal_numpy_unique(batches):
    counter = C.SparseCounts()
    for keys in batches:
        counter.add(torch.tensor(keys, dtype=torch.int64))
    allkeys = np.array([k for keys in batches for k in keys], dtype=np.int64)
    uniq, counts = np.unique(allkeys, return_counts=True)
    keys, got = counter.range(0, 51)
    assert keys.tolist() == uniq.tolist() and got.tolist() == counts.tolist()


def test_sparse_counts_merge_across_compactions():
    counter = C.SparseCounts()
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 5_000_000, size=(40, 200_000))
    for row in keys:  # 8M keys, ~4M distinct: merges in rounds
        counter.add(torch.from_numpy(row))
    uniq, counts = np.unique(keys, return_counts=True)
    got_keys, got = counter.range(0, 5_000_000)
    assert (got_keys == uniq).all() and (got == counts).all()
    sub_keys, sub = counter.range(1000, 2000)
    inside = (uniq >= 1000) & (uniq < 2000)
    assert (sub_keys == uniq[inside]).all() and (sub == counts[inside]).all()


# --------------------------------------------------------------------------- scores


@st.composite
def detection_data(draw):
    n = draw(st.integers(2, 300))
    n_concepts = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    concept = rng.integers(-1, n_concepts, size=n)
    # zeros (not firing), repeated values (ties), a signal for concept 0, and wide magnitudes
    acts = np.where(rng.random((n, 3)) < draw(st.floats(0.1, 1.0)), rng.lognormal(0, draw(st.floats(0.1, 4.0)), (n, 3)), 0.0)
    acts[:, 1] = np.round(acts[:, 1], 1)
    acts[:, 2] += (concept == 0) * rng.random(n)
    return acts.astype(np.float32), concept, n_concepts


@given(detection_data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_ap_equals_sklearn_on_bins_and_bounds_hold_for_raw_scores(data):
    acts, concept, n_concepts = data
    (scores,) = scores_of(acts, concept[None], n_concepts)
    bins = binned(acts)
    for c in range(n_concepts):
        y = concept == c
        for f in range(acts.shape[1]):
            if not y.any():
                assert np.isnan(scores.ap[f, c])
                continue
            assert scores.ap[f, c] == pytest.approx(average_precision_score(y, bins[:, f]), abs=1e-12)
            raw = average_precision_score(y, acts[:, f])
            assert scores.ap_low[f, c] - 1e-9 <= raw <= scores.ap_high[f, c] + 1e-9
            assert scores.ap_low[f, c] - 1e-9 <= scores.ap[f, c]


@given(detection_data())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_iou_and_threshold_equal_brute_force(data):
    acts, concept, n_concepts = data
    (scores,) = scores_of(acts, concept[None], n_concepts)
    bins = binned(acts)
    edges = C.bin_lower_edges()
    for c in range(n_concepts):
        y = concept == c
        if not y.any():
            continue
        for f in range(acts.shape[1]):
            iou, at = brute_iou(bins[:, f], y)
            assert scores.iou[f, c] == pytest.approx(iou, abs=1e-12)
            if iou == 0:  # never fires on the concept: no threshold
                assert np.isnan(scores.threshold[f, c])
                continue
            assert scores.threshold[f, c] == edges[at]
            assert ((acts[:, f] >= edges[at]) & (acts[:, f] > 0)).sum() == (bins[:, f] >= at).sum()


def test_sparse_and_dense_counters_give_the_same_scores(monkeypatch):
    rng = np.random.default_rng(2)
    concept = rng.integers(-1, 3, size=(2, 500))
    acts = np.where(rng.random((500, 4)) < 0.5, rng.lognormal(0, 2, (500, 4)), 0.0)
    dense = scores_of(acts, concept, 3)
    monkeypatch.setattr(C, "DENSE_COUNTERS", 0)
    sparse = scores_of(acts, concept, 3)
    for a, b in zip(dense, sparse):
        for field in ("ap", "ap_low", "ap_high", "iou", "threshold"):
            assert np.array_equal(getattr(a, field), getattr(b, field), equal_nan=True)


def test_bounds_are_tight_on_a_smooth_detector():
    """The approximation error is bounded by ap_high − ap_low; on continuous activations at 32 bins per
    decade that width is small, and the true AP sits inside it."""
    rng = np.random.default_rng(1)
    concept = rng.integers(0, 2, size=20_000)
    acts = rng.lognormal(0.0, 1.0, size=(20_000, 1)) * np.where(concept == 1, 2.0, 1.0)[:, None]
    (scores,) = scores_of(acts, concept[None], 2)
    raw = average_precision_score(concept == 1, acts[:, 0])
    width = scores.ap_high[0, 1] - scores.ap_low[0, 1]
    assert scores.ap_low[0, 1] <= raw <= scores.ap_high[0, 1]
    assert width < 0.03  # measured 0.024: ~ the share of positives per bin times the precision change across it
    assert abs(scores.ap[0, 1] - raw) < 0.005


# --------------------------------------------------------------------------- the streaming pass


class Identity(torch.nn.Module):
    """An 'SAE' whose features are the (non-negative) activations themselves."""

    def __init__(self, d: int):
        super().__init__()
        self.n_features = self.d_model = d

    def normalize(self, x):
        return x

    def encode_normalized(self, x):
        return torch.relu(x)

    def decode_normalized(self, f):
        return f


def synthetic_labels(n_images: int, n_patches: int, n_patch_concepts: int, n_classes: int, seed: int) -> C.ConceptLabels:
    rng = np.random.default_rng(seed)
    patch_ip = rng.integers(-1, n_patch_concepts, size=(n_images, n_patches)).astype(np.int16)
    patch_ip[0] = C.NO_CONCEPT  # an image without a mask
    image_i = rng.integers(-1, n_classes, size=n_images).astype(np.int16)
    return C.make_labels([f"p{i}" for i in range(n_patch_concepts)], patch_ip, [f"c{i}" for i in range(n_classes)], image_i, seed)


@given(st.integers(0, 10_000), st.integers(1, 7))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_streamed_concepts_equal_brute_force(seed, images_per_batch):
    n_images, n_patches, d = 13, 6, 4
    rng = np.random.default_rng(seed)
    acts_ipd = np.where(rng.random((n_images, n_patches, d)) < 0.4, rng.lognormal(0, 1, (n_images, n_patches, d)), 0).astype(np.float32)
    labels = synthetic_labels(n_images, n_patches, 3, 2, seed)
    order = rng.permutation(n_images)  # the stream visits images in any order
    stats = C.ConceptStats(labels, d, CPU)
    for i in range(0, n_images, images_per_batch):
        idx = order[i:i + images_per_batch]
        f_bpf = torch.from_numpy(acts_ipd[idx])
        stats.update(f_bpf, f_bpf.amax(1), idx)
    check_rows_against_brute_force(stats.table("sae").to_pylist(), acts_ipd, labels)


def test_several_null_permutations_keep_the_first_and_score_each_by_brute_force():
    n_images, n_patches, d = 15, 5, 4
    rng = np.random.default_rng(7)
    acts_ipd = np.where(rng.random((n_images, n_patches, d)) < 0.4, rng.lognormal(0, 1, (n_images, n_patches, d)), 0).astype(np.float32)
    one = synthetic_labels(n_images, n_patches, 3, 2, 7)
    three = C.make_labels(one.patch_names, one.patch_ip, one.image_names, one.image_i, 7, n_null=3)
    assert (three.null_i == one.null_i).all() and three.null_sets.shape == (3, n_images)
    assert len({tuple(p) for p in three.null_sets}) == 3  # distinct permutations
    tables = {}
    for labels in (one, three):
        stats = C.ConceptStats(labels, d, CPU)
        f_bpf = torch.from_numpy(acts_ipd)
        stats.update(f_bpf, f_bpf.amax(1), np.arange(n_images))
        tables[labels.null_sets.shape[0]] = stats
    assert tables[1].table("s").to_pylist() == tables[3].table("s").to_pylist()  # `concepts` is unchanged
    nulls = tables[3].null_table("s").to_pylist()
    assert sorted({(r["level"], r["permutation"]) for r in nulls}) == [(lv, k) for lv in ("image", "patch") for k in range(3)]
    patch_acts = acts_ipd.reshape(-1, d)
    for r in (r for r in nulls if r["level"] == "patch"):
        y = three.patch_ip[three.null_sets[r["permutation"]]].reshape(-1)
        scores = binned(patch_acts[:, r["feature"]])
        lifts = [(average_precision_score(y == c, scores) - (y == c).mean()) / (1 - (y == c).mean())
                 for c in range(3) if (y == c).any()]
        assert r["best_lift"] == pytest.approx(max(lifts), abs=1e-12)


def check_rows_against_brute_force(rows: list[dict], acts_ipd: np.ndarray, labels: C.ConceptLabels) -> None:
    """Every `concepts` row is sklearn's AP and a brute-force IoU over all samples, and every concept with support has its rows."""
    d = acts_ipd.shape[2]
    n_patch_concepts, n_classes = len(labels.patch_names), len(labels.image_names)
    patch_acts, patch_y = acts_ipd.reshape(-1, d), labels.patch_ip.reshape(-1)
    null_patch_y = labels.patch_ip[labels.null_i].reshape(-1)
    image_acts, image_y, null_image_y = acts_ipd.max(1), labels.image_i, labels.image_i[labels.null_i]
    seen = set()
    for row in rows:
        a, y, ny = (patch_acts, patch_y, null_patch_y) if row["level"] == "patch" else (image_acts, image_y, null_image_y)
        c = int(row["concept"][1:])
        f = row["feature"]
        scores = binned(a[:, f])
        assert row["support"] == (y == c).sum() > 0
        assert row["base_rate"] == pytest.approx((y == c).mean())
        assert row["ap"] == pytest.approx(average_precision_score(y == c, scores), abs=1e-12)
        assert row["ap_low"] - 1e-9 <= average_precision_score(y == c, a[:, f]) <= row["ap_high"] + 1e-9
        assert row["iou"] == pytest.approx(brute_iou(scores, y == c)[0], abs=1e-12)
        assert row["fire_rate"] == pytest.approx((a[y == c, f] > 0).mean(), abs=1e-12)
        if (ny == c).any():
            assert row["null_ap"] == pytest.approx(average_precision_score(ny == c, scores), abs=1e-12)
        seen.add((row["level"], f, c))
    expected = {("patch", f, c) for f in range(d) for c in range(n_patch_concepts) if (patch_y == c).any()}
    expected |= {("image", f, c) for f in range(d) for c in range(n_classes) if (image_y == c).any()}
    assert seen == expected


# --------------------------------------------------------------------------- across ranks (3 gloo processes)

WORLD = 3
RANK_SEEDS = range(6)


def rank_case(seed: int):
    """Activations, labels, a random split over WORLD ranks (cuts; a rank may get nothing), and whether
    the positives are counted sparse (odd seeds) or dense."""
    rng = np.random.default_rng(seed)
    n_images, n_patches, d = int(rng.integers(1, 25)), int(rng.integers(1, 7)), int(rng.integers(1, 6))
    acts_ipd = np.where(rng.random((n_images, n_patches, d)) < 0.4, rng.lognormal(0, 1, (n_images, n_patches, d)), 0).astype(np.float32)
    labels = synthetic_labels(n_images, n_patches, int(rng.integers(1, 5)), int(rng.integers(1, 4)), seed)
    cuts = random_cuts(rng, n_images, WORLD, rank_0_empty=seed == 1)  # rank 0 gets nothing at seed 1
    return acts_ipd, labels, cuts, seed % 2 == 1


def stream(labels: C.ConceptLabels, acts_ipd: np.ndarray, images: np.ndarray, per_batch: int, sparse: bool) -> C.ConceptStats:
    """ConceptStats over `images` (positions into acts_ipd, also their dataset indices), in that order."""
    dense = C.DENSE_COUNTERS
    C.DENSE_COUNTERS = 0 if sparse else dense
    try:
        stats = C.ConceptStats(labels, acts_ipd.shape[2], CPU)
    finally:
        C.DENSE_COUNTERS = dense
    assert isinstance(stats.image.positives, C.SparseCounts if sparse else C.DenseCounts)
    for i in range(0, len(images), per_batch):
        idx = images[i:i + per_batch]
        f_bpf = torch.from_numpy(acts_ipd[idx])
        stats.update(f_bpf, f_bpf.amax(1), idx)
    return stats


def _concepts_on_rank(rank: int) -> dict:
    """This rank's share of every rank case, streamed and merged: the concept rows it then holds."""
    tables = {}
    for seed in RANK_SEEDS:
        acts_ipd, labels, cuts, sparse = rank_case(seed)
        mine = np.random.default_rng(rank).permutation(np.arange(cuts[rank], cuts[rank + 1]))  # any order within a rank
        stats = stream(labels, acts_ipd, mine, rank + 1, sparse)
        stats.merge_ranks()
        tables[seed] = stats.table("sae")
    return tables


@pytest.fixture(scope="module")
def merged_over_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_on_ranks(_concepts_on_rank, WORLD, tmp_path_factory.mktemp("ranks"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", RANK_SEEDS)
def test_concepts_merged_over_ranks_equal_one_pass(merged_over_ranks: list[dict], seed: int) -> None:
    acts_ipd, labels, cuts, sparse = rank_case(seed)
    one = stream(labels, acts_ipd, np.arange(len(acts_ipd)), 4, sparse).table("sae")
    for tables in merged_over_ranks:  # every rank holds the merged counters
        assert tables[seed].equals(one)  # integer counts: the scores are exactly one pass's
    check_rows_against_brute_force(one.to_pylist(), acts_ipd, labels)
    assert any(r["level"] == "patch" for r in one.to_pylist())


def test_best_concepts_rank_by_ap_above_chance_and_report_the_margin():
    import pyarrow as pa

    table = pa.table({
        "feature": pa.array([0, 0, 0, 1, 2, 2, 3], type=pa.int32()),
        "concept": ["bg", "b", "c", "a", "a", "b", "a"],
        "level": ["patch", "patch", "patch", "patch", "image", "image", "patch"],
        "ap": [0.9, 0.5, 0.2, 0.3, 0.99, 0.1, None],
        "ap_lift": [0.2, 0.45, 0.1, 0.25, 0.9, 0.0, None],
    })
    best = C.best_concepts(table, 5)
    assert best.level == "patch"  # the image level only counts without masks
    # feature 0: background has the higher AP, but b the higher AP above chance
    assert best.concept == ["b", "a", None, None, None]
    assert best.ap[:2].tolist() == [0.5, 0.3]
    assert best.margin[0] == pytest.approx(0.25)
    assert np.isnan(best.margin[1]) and np.isnan(best.ap[2]) and np.isnan(best.ap[3])


def test_chance_corrected_ap():
    got = C.chance_corrected(np.array([0.85, 1.0, 0.5, 0.3]), np.array([0.85, 0.2, 0.5, 1.0]))
    assert got[:3].tolist() == [0.0, 1.0, 0.0] and np.isnan(got[3])


def test_analyse_sae_writes_concepts_and_best_concept_columns():
    n_images, grid, d = 10, (2, 3), 5
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(n_images, 6, d)).astype(np.float32)
    labels = synthetic_labels(n_images, 6, 3, 2, 0)
    acts[:, :, 0] += 3 * (labels.patch_ip == 1)  # feature 0 detects patch concept p1
    spec = AnalysisSpec(top_k=3, batch_size=12)
    batches = ((torch.from_numpy(acts[i:i + 2]), np.arange(i, i + 2)) for i in range(0, n_images, 2))
    result = analyse_sae(batches, Identity(d), grid, None, spec, "s", "ds", CPU, concept_labels=labels)
    concepts = result.concepts.to_pylist()
    assert {r["level"] for r in concepts} == {"patch", "image"}
    features = result.features.to_pylist()
    assert features[0]["best_concept"] == "p1" and features[0]["best_concept_level"] == "patch"
    for f in features:
        patch_rows = sorted((r for r in concepts if r["feature"] == f["feature"] and r["level"] == "patch"), key=lambda r: -r["ap_lift"])
        assert f["best_concept"] == patch_rows[0]["concept"]
        assert f["best_concept_ap"] == patch_rows[0]["ap"]
        assert f["best_concept_margin"] == pytest.approx(patch_rows[0]["ap_lift"] - patch_rows[1]["ap_lift"])
        assert patch_rows[0]["ap_lift"] == pytest.approx((patch_rows[0]["ap"] - patch_rows[0]["base_rate"]) / (1 - patch_rows[0]["base_rate"]))


def test_analyse_sae_without_concept_labels_leaves_the_columns_null():
    acts = np.ones((2, 6, 3), dtype=np.float32)
    result = analyse_sae([(torch.from_numpy(acts), np.arange(2))], Identity(3), (2, 3), None, AnalysisSpec(top_k=2), "s", "ds", CPU)
    assert result.concepts is None
    assert result.features.column("best_concept").null_count == 3


def test_dataset_labels_read_masks_and_memory_map_them(tmp_path):
    from saev_report.datasets import ImageDataset, ImageRecord

    records = []
    for i in range(3):
        image, mask = tmp_path / f"{i}.png", tmp_path / f"{i}_mask.png"
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
        values = np.zeros((32, 32), dtype=np.uint8)
        values[:, 16:] = i  # right half of the image is class i
        Image.fromarray(values).save(mask)
        records.append(ImageRecord(i, str(image), f"l{i % 2}", str(mask)))
    dataset = ImageDataset("seg", records, classes=["l0", "l1"], seg_classes=["bg", "one", "two"], ignore_index=255)
    labels = C.dataset_labels(dataset, (2, 2), seed=0, patch_path=tmp_path / "labels" / "patch.npy")
    assert isinstance(labels.patch_ip, np.memmap)
    assert labels.patch_ip.tolist() == [[0, 0, 0, 0], [0, 1, 0, 1], [0, 2, 0, 2]]
    assert labels.image_i.tolist() == [0, 1, 0]
    assert labels.patch_names == ["bg", "one", "two"] and labels.image_names == ["l0", "l1"]
    assert not list((tmp_path / "labels").glob(".*tmp"))


def _readme_query(comment: str) -> str:
    """The SQL statement that follows `-- <comment>` in the docs' examples (docs/how-to/query.md)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "how-to" / "query.md").read_text(encoding="utf-8")
    start = text.index(f"-- {comment}\n") + len(comment) + 4
    return text[start:text.index(";", start) + 1]


def test_readme_concept_queries_answer_their_questions(tmp_path):
    from saev_report import tables

    rng = np.random.default_rng(0)
    rows = []
    for sae in ("a", "b"):
        for feature in range(30):
            for concept, top in (("vehicles", 0.9), ("birds", 0.45), ("background", 0.95)):
                for level in ("patch", "image"):
                    rows.append({"sae_id": sae, "feature": feature, "concept": concept, "level": level,
                                 "ap": float(rng.uniform(0, top)), "null_ap": 0.02, "base_rate": 0.02, "iou": 0.1})
    tables.write_table(tmp_path / "tables" / "concepts" / "part.parquet", "concepts", rows, "test")

    best = tables.query(tmp_path, _readme_query("the 20 features that best detect `vehicles`, next to chance and the permuted-label null")).to_pylist()
    vehicles = sorted((r for r in rows if r["concept"] == "vehicles" and r["level"] == "patch"), key=lambda r: -r["ap"])[:20]
    assert [(r["sae_id"], r["feature"], r["ap"]) for r in best] == [(r["sae_id"], r["feature"], r["ap"]) for r in vehicles]

    missing = tables.query(tmp_path, _readme_query("which concepts have no feature with AP ≥ 0.5 (per SAE and level)")).to_pylist()
    expect = set()
    for sae in ("a", "b"):
        for level in ("patch", "image"):
            for concept in ("vehicles", "birds", "background"):
                if max(r["ap"] for r in rows if (r["sae_id"], r["level"], r["concept"]) == (sae, level, concept)) < 0.5:
                    expect.add((sae, level, concept))
    assert {(r["sae_id"], r["level"], r["concept"]) for r in missing} == expect
    assert ("a", "patch", "birds") in expect  # the question has an answer here
