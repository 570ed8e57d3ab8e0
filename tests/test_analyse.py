"""analyse.py against a plain numpy reference.

Most tests use *dyadic* data: activations and weights are small multiples of
powers of two, so every encode/decode is exact in float32 whatever the batch
shape or summation order. That lets the tests demand exact equality for counts,
histograms, exemplar order, ties and patch maps, and makes batch-size
invariance an exact property rather than a tolerance.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gloo import random_cuts, run_on_ranks
from saev_report import analyse
from saev_report.analyse import FINE_PER_DECADE, LOG10_RANGE, analyse_sae, coarse_histograms, label_stats
from saev_report.spec import AnalysisSpec
from saev_report.tables import TABLES

CPU = torch.device("cpu")


class StandInSAE(torch.nn.Module):
    """ReLU SAE with the sae.py interface; dyadic weights unless `gaussian`."""

    def __init__(self, d: int, n_features: int, seed: int = 0, gaussian: bool = False,
                 act_mean: float = 0.25, act_scale: float = 2.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if gaussian:
            W_enc = torch.randn(d, n_features, generator=g) / math.sqrt(d)
            W_dec = torch.randn(n_features, d, generator=g) / math.sqrt(n_features)
            b_enc = torch.randn(n_features, generator=g) * 0.1 - 0.2
            b_dec = torch.randn(d, generator=g) * 0.1
        else:
            W_enc = torch.randint(-4, 5, (d, n_features), generator=g) / 8
            W_dec = torch.randint(-4, 5, (n_features, d), generator=g) / 8
            b_enc = torch.randint(-24, 9, (n_features,), generator=g) / 64
            b_dec = torch.randint(-2, 3, (d,), generator=g) / 8
        self.W_enc_df, self.W_dec_fd = torch.nn.Parameter(W_enc), torch.nn.Parameter(W_dec)
        self.b_enc_f, self.b_dec_d = torch.nn.Parameter(b_enc), torch.nn.Parameter(b_dec)
        self.register_buffer("act_mean_d", torch.full((d,), act_mean))
        self.register_buffer("act_scale", torch.tensor(act_scale))

    @property
    def n_features(self) -> int:
        return self.W_enc_df.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_enc_df.shape[0]

    def normalize(self, x_nd):
        return (x_nd - self.act_mean_d) / self.act_scale

    def encode_normalized(self, xn_nd):
        return torch.relu((xn_nd - self.b_dec_d) @ self.W_enc_df + self.b_enc_f)

    def encode(self, x_nd):
        return self.encode_normalized(self.normalize(x_nd))

    def decode_normalized(self, f_nf):
        return f_nf @ self.W_dec_fd + self.b_dec_d


def dyadic_acts(n_images: int, n_patches: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(-8, 9, size=(n_images, n_patches, d)) / 4).astype(np.float32)


def batches(acts_ipd: np.ndarray, image_idx: np.ndarray, images_per_batch: int):
    for i in range(0, len(acts_ipd), images_per_batch):
        yield torch.from_numpy(acts_ipd[i:i + images_per_batch]), image_idx[i:i + images_per_batch]


def run(acts_ipd, image_idx, sae, spec, labels=None, images_per_batch=3, grid=None):
    n_patches = acts_ipd.shape[1]
    grid = grid or (1, n_patches)
    return analyse_sae(batches(acts_ipd, image_idx, images_per_batch), sae, grid, labels, spec, "s", "ds", CPU)


# --------------------------------------------------------------------------- the reference


def reference(acts_ipd: np.ndarray, image_idx: np.ndarray, sae: StandInSAE, spec: AnalysisSpec, labels=None) -> dict:
    """Everything computed densely in numpy from one whole-set encode."""
    n_images, n_patches, d = acts_ipd.shape
    with torch.no_grad():
        xn_t = sae.normalize(torch.from_numpy(acts_ipd.reshape(-1, d)))
        f_t = sae.encode_normalized(xn_t)
        xhat_t = sae.decode_normalized(f_t)
    xn, f, xhat = (t.numpy().astype(np.float64) for t in (xn_t, f_t, xhat_t))
    n = len(xn)
    sq_err = ((xn - xhat) ** 2).sum()
    out: dict = {
        "metrics": {
            "n_patches_eval": n,
            "mse": sq_err / (n * d),
            "l0": (f > 0).sum(1).mean(),
            "fvu": sq_err / total_var if (total_var := ((xn - xn.mean(0)) ** 2).sum()) > 0 else math.nan,
        }
    }
    n_fire = (f > 0).sum(0)
    freq = n_fire / n
    out["metrics"]["n_dead"] = int((n_fire == 0).sum())
    out["metrics"]["n_dense"] = int((freq > spec.dense_threshold).sum())
    out["n_fire"], out["freq"], out["max_act"] = n_fire, freq, f.max(0)
    out["mean_act"] = np.array([f[f[:, j] > 0, j].mean() if n_fire[j] else 0.0 for j in range(f.shape[1])])

    # shared edges: span of occupied 1/8-decade bins, whole fine bins per coarse bin
    log_vals = np.log10(f[f > 0])
    fine = np.floor((log_vals - LOG10_RANGE[0]) * FINE_PER_DECADE)
    width = math.ceil((fine.max() - fine.min() + 1) / spec.histogram_bins)
    edges = LOG10_RANGE[0] + (fine.min() + width * np.arange(spec.histogram_bins + 1)) / FINE_PER_DECADE
    out["edges"] = edges
    out["hist"] = np.stack([np.histogram(np.log10(f[f[:, j] > 0, j]), bins=edges)[0] for j in range(f.shape[1])])

    f_ipf = f.reshape(n_images, n_patches, -1)
    img_max = f_ipf.max(1)
    exemplars = []
    label_rows = []
    for j in range(f.shape[1]):
        order = np.lexsort((np.arange(n_images), -img_max[:, j]))  # by activation, then stream order
        order = [p for p in order[: spec.top_k] if img_max[p, j] > 0]
        for rank, p in enumerate(order):
            exemplars.append((j, rank, int(image_idx[p]), img_max[p, j], f_ipf[p, :, j]))
        names = [labels.get(int(image_idx[p])) for p in order] if labels else []
        names = [x for x in names if x is not None]
        if names:
            counts = Counter(names)
            top = max(counts, key=lambda name: (counts[name], -names.index(name)))
            probs = np.array(list(counts.values())) / len(names)
            label_rows.append((top, counts[top] / len(names), float(-(probs * np.log2(probs)).sum())))
        else:
            label_rows.append((None, None, None))
    out["exemplars"] = exemplars
    out["labels"] = label_rows
    return out


def check_against_reference(result: analyse.AnalysisResult, ref: dict) -> None:
    for key, value in ref["metrics"].items():
        assert result.metrics[key] == pytest.approx(value, rel=1e-12, abs=0, nan_ok=True), key
    feats = result.features.to_pydict()
    np.testing.assert_array_equal(feats["n_fire"], ref["n_fire"])
    np.testing.assert_allclose(feats["freq"], ref["freq"], rtol=1e-15)
    np.testing.assert_allclose(feats["mean_act"], ref["mean_act"], rtol=1e-12)
    np.testing.assert_array_equal(feats["max_act"], ref["max_act"])
    np.testing.assert_array_equal(feats["dead"], ref["n_fire"] == 0)
    np.testing.assert_array_equal(np.array(feats["hist_counts"]), ref["hist"])
    for edges in feats["hist_edges"]:
        np.testing.assert_allclose(edges, ref["edges"], rtol=0, atol=1e-12)
    assert [(t, p, e) for t, p, e in zip(feats["top_label"], feats["label_purity"], feats["label_entropy"])] == [
        (t, pytest.approx(p), pytest.approx(e, abs=1e-12)) if t is not None else (None, None, None) for t, p, e in ref["labels"]
    ]
    ex = result.exemplars.to_pydict()
    got = list(zip(ex["feature"], ex["rank"], ex["image_idx"], ex["act"]))
    assert got == [(j, r, i, a) for j, r, i, a, _ in ref["exemplars"]]
    np.testing.assert_array_equal(np.array(ex["patch_acts"]).reshape(len(got), -1), np.array([m for *_, m in ref["exemplars"]]))
    assert ex["patch"] == [int(np.argmax(m)) for *_, m in ref["exemplars"]]


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def demo():
    acts = dyadic_acts(n_images=23, n_patches=6, d=12, seed=1)
    image_idx = np.arange(23, dtype=np.int64) * 3 + 100  # dataset indices differ from stream positions
    sae = StandInSAE(12, 40, seed=2)
    with torch.no_grad():  # one dead feature, one firing everywhere
        sae.b_enc_f[5] = -1000.0
        sae.b_enc_f[7] = 1000.0
    labels = {int(i): ["cat", "dog", "bird"][k % 3] for k, i in enumerate(image_idx) if k % 5 != 4}  # some unlabelled
    return acts, image_idx, sae, labels


def test_matches_numpy_reference(demo):
    acts, image_idx, sae, labels = demo
    spec = AnalysisSpec(top_k=5, histogram_bins=10, dense_threshold=0.5)
    result = run(acts, image_idx, sae, spec, labels, images_per_batch=4, grid=(2, 3))
    ref = reference(acts, image_idx, sae, spec, labels)
    check_against_reference(result, ref)
    # the data exercise what they should: a dead and a dense feature, non-trivial labels
    assert result.metrics["n_dead"] >= 1 and result.metrics["n_dense"] >= 1
    feats = result.features.to_pydict()
    assert feats["dead"][5] and feats["log10_freq"][5] is None and feats["top_label"][5] is None
    assert feats["dense"][7] and feats["freq"][7] == 1.0
    assert 0 < min(p for p in feats["label_purity"] if p is not None) < 1
    assert not any(r[0] == 5 for r in ref["exemplars"])
    assert set(result.exemplars.column("grid_h").to_pylist()) == {2}


@pytest.mark.parametrize("images_per_batch", [1, 2, 5, 23])
def test_batch_size_invariance(demo, images_per_batch):
    acts, image_idx, sae, labels = demo
    spec = AnalysisSpec(top_k=4, histogram_bins=8)
    base = run(acts, image_idx, sae, spec, labels, images_per_batch=7)
    other = run(acts, image_idx, sae, spec, labels, images_per_batch=images_per_batch)
    assert other.features.equals(base.features)
    assert other.exemplars.equals(base.exemplars)
    for key, value in base.metrics.items():
        assert other.metrics[key] == pytest.approx(value, rel=1e-12)


def test_ties_are_deterministic_and_each_image_is_used_once():
    # Images 0, 2 and 3 are identical; image 1 repeats one patch, so its max is reached at two patches.
    acts = dyadic_acts(n_images=6, n_patches=4, d=8, seed=5)
    acts[2] = acts[0]
    acts[3] = acts[0]
    acts[1, 3] = acts[1, 0]
    image_idx = np.array([50, 40, 30, 20, 10, 0])  # stream order, not index order, breaks ties
    sae = StandInSAE(8, 16, seed=6)
    spec = AnalysisSpec(top_k=6, histogram_bins=4)
    result = run(acts, image_idx, sae, spec, images_per_batch=4)
    check_against_reference(result, reference(acts, image_idx, sae, spec))
    rows = result.exemplars.select(["feature", "rank", "image_idx"]).to_pylist()
    pairs = [(r["feature"], r["image_idx"]) for r in rows]
    assert len(pairs) == len(set(pairs))
    tied = [r for r in rows if r["image_idx"] in (50, 30, 20)]  # already ordered by feature, rank
    for feature in {r["feature"] for r in tied}:
        order = [r["image_idx"] for r in tied if r["feature"] == feature]
        assert order == [50, 30, 20]  # identical images rank together, first read first
    assert tied


def test_fvu_is_centred_and_survives_a_huge_mean():
    rng = np.random.default_rng(0)
    d, n_images, n_patches, offset = 16, 40, 16, 1e4
    acts = (offset + rng.standard_normal((n_images, n_patches, d))).astype(np.float32)
    sae = StandInSAE(d, 32, seed=1, gaussian=True, act_mean=0.0, act_scale=1.0)
    with torch.no_grad():
        sae.b_dec_d.fill_(offset)  # reconstructions near the data: residuals O(1) on values O(1e4)
    result = run(acts, np.arange(n_images), sae, AnalysisSpec(), images_per_batch=3)

    x = acts.reshape(-1, d).astype(np.float64)
    with torch.no_grad():
        xhat = sae.decode_normalized(sae.encode(torch.from_numpy(acts.reshape(-1, d)))).numpy().astype(np.float64)
    sq_err = ((x - xhat) ** 2).sum()
    centred = sq_err / ((x - x.mean(0)) ** 2).sum()
    assert result.metrics["fvu"] == pytest.approx(centred, rel=1e-9)
    assert 0.5 < centred < 100  # the SAE explains little: FVU of order one
    # The formulas this guards against are badly wrong on these data:
    assert sq_err / (x ** 2).sum() < 1e-6  # uncentred: "explains everything"
    x32 = acts.reshape(-1, d)
    naive32 = float((x32 * x32).sum(0, dtype=np.float32).sum() - (x32.sum(0, dtype=np.float32) ** 2 / len(x32)).sum())
    assert abs(sq_err / naive32 - centred) > 0.5 * centred  # float32 E[x²]−E[x]² cancels


def test_gaussian_data_metrics_match_reference_within_float_tolerance():
    rng = np.random.default_rng(3)
    acts = (rng.standard_normal((30, 9, 12)) * 2 + 0.5).astype(np.float32)
    sae = StandInSAE(12, 48, seed=4, gaussian=True)
    spec = AnalysisSpec(top_k=3)
    result = run(acts, np.arange(30), sae, spec, images_per_batch=4, grid=(3, 3))
    ref = reference(acts, np.arange(30), sae, spec)
    for key in ("mse", "l0", "fvu"):
        assert result.metrics[key] == pytest.approx(ref["metrics"][key], rel=1e-5)
    np.testing.assert_allclose(result.features.column("max_act").to_numpy(), ref["max_act"], rtol=1e-5)
    np.testing.assert_allclose(result.features.column("mean_act").to_numpy(), ref["mean_act"], rtol=1e-5)
    maps = np.array(result.exemplars.column("patch_acts").to_pylist())
    np.testing.assert_allclose(maps.max(1), result.exemplars.column("act").to_numpy(), rtol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_images=st.integers(1, 12),
    n_patches=st.integers(1, 5),
    d=st.integers(1, 6),
    n_features=st.integers(1, 20),
    top_k=st.integers(1, 6),
    images_per_batch=st.integers(1, 13),
    bins=st.integers(2, 12),
    seed=st.integers(0, 1000),
)
def test_property_matches_reference(n_images, n_patches, d, n_features, top_k, images_per_batch, bins, seed):
    acts = dyadic_acts(n_images, n_patches, d, seed)
    sae = StandInSAE(d, n_features, seed=seed + 1)
    with torch.no_grad():
        sae.b_enc_f[0] = 16.0  # fires everywhere, so the reference histogram has a range
    image_idx = np.random.default_rng(seed).permutation(n_images) * 2
    labels = {int(i): "ab"[int(i) % 3 == 0] for i in image_idx}
    spec = AnalysisSpec(top_k=top_k, histogram_bins=bins, dense_threshold=0.3)
    result = run(acts, image_idx, sae, spec, labels, images_per_batch=images_per_batch)
    check_against_reference(result, reference(acts, image_idx, sae, spec, labels))


def test_label_stats_tie_break_and_entropy():
    labels = {0: "a", 1: "b", 2: "b", 3: "a", 4: None, 5: "c"}
    images_fk = np.array([
        [1, 0, 3, 2],     # a:2 b:2, tie → b holds rank 0
        [5, -1, -1, -1],  # one exemplar: pure
        [4, -1, -1, -1],  # only an unlabelled image
        [0, 1, 5, 4],     # a, b, c (+ unlabelled, left out)
    ])
    stats = label_stats(images_fk, labels)
    assert stats.top_label == ["b", "c", None, "a"]
    np.testing.assert_allclose(stats.purity, [0.5, 1.0, np.nan, 1 / 3])
    np.testing.assert_allclose(stats.entropy, [1.0, 0.0, np.nan, math.log2(3)])
    assert label_stats(images_fk, None).top_label == [None] * 4


def test_coarse_histograms_keep_every_count():
    rng = np.random.default_rng(0)
    fine = np.zeros((5, analyse.N_FINE_BINS), dtype=np.int64)
    fine[:, 40:71] = rng.integers(0, 5, size=(5, 31))
    fine[2, 40] = fine[3, 70] = 7  # the occupied range is exactly 40..70
    edges, counts = coarse_histograms(fine, 6)
    np.testing.assert_array_equal(counts.sum(1), fine.sum(1))
    width = math.ceil(31 / 6)
    np.testing.assert_allclose(np.diff(edges), width / FINE_PER_DECADE)
    assert edges[0] == LOG10_RANGE[0] + 40 / FINE_PER_DECADE and edges[-1] >= LOG10_RANGE[0] + 71 / FINE_PER_DECADE
    np.testing.assert_array_equal(counts[:, 0], fine[:, 40:40 + width].sum(1))
    edges0, counts0 = coarse_histograms(np.zeros((2, analyse.N_FINE_BINS), dtype=np.int64), 4)
    assert counts0.sum() == 0 and len(edges0) == 5


def test_tiny_and_huge_activations_land_in_the_end_bins():
    vals = torch.tensor([1e-30, 1e-8, 1.0, 1e5, 1e30])
    bins = analyse.fine_bins(vals).tolist()
    assert bins[0] == bins[1] == 0 and bins[-1] == analyse.N_FINE_BINS - 1
    assert bins[2] == -LOG10_RANGE[0] * FINE_PER_DECADE  # 1.0 opens its bin
    # exactly floor((log10 v − lo) · 8) on float32 values either side of every edge
    edges = 10.0 ** (LOG10_RANGE[0] + np.arange(1, analyse.N_FINE_BINS) / FINE_PER_DECADE)
    near = np.concatenate([edges * (1 - 1e-7), edges, edges * (1 + 1e-7)]).astype(np.float32)
    want = np.clip(np.floor((np.log10(near.astype(np.float64)) - LOG10_RANGE[0]) * FINE_PER_DECADE), 0, analyse.N_FINE_BINS - 1)
    np.testing.assert_array_equal(analyse.fine_bins(torch.from_numpy(near)).numpy(), want)


def test_tables_have_exactly_the_declared_columns(demo, tmp_path):
    acts, image_idx, sae, labels = demo
    result = run(acts, image_idx, sae, AnalysisSpec(top_k=2), labels, grid=(2, 3))
    paths = analyse.write_analysis(result, tmp_path, spec_hash="abc")
    for name, path in paths.items():
        table = pq.read_table(path)
        assert table.schema.names == TABLES[name].schema.names
        assert table.schema.metadata[b"saev_report.spec_hash"] == b"abc"
    assert set(result.metrics) == {"n_patches_eval", "mse", "l0", "fvu", "n_dead", "n_dense"}
    assert set(result.metrics) <= set(TABLES["saes"].schema.names)


def test_grid_must_match_patches(demo):
    acts, image_idx, sae, _ = demo
    with pytest.raises(ValueError, match="grid"):
        run(acts, image_idx, sae, AnalysisSpec(), grid=(2, 2))


class FakeStore:
    """The slice of `activations.ActivationStore` that `analyse_store` reads: one CLS token, then patches."""

    def __init__(self, acts_itd: np.ndarray, image_indices: np.ndarray, grid: tuple[int, int]):
        self.acts_itd, self.image_indices = acts_itd, image_indices
        self.n_images, self.tokens_per_image, self.d_model = acts_itd.shape
        self.dir = "fake"

        class Meta:
            n_patches = grid[0] * grid[1]
            grid_h, grid_w = grid
        self.meta = Meta

    def row_image_token(self, rows):
        return np.divmod(np.asarray(rows), self.tokens_per_image)

    def iter_batches(self, batch_rows, *, patches_only=False, images=None):
        assert patches_only
        images = images or range(self.n_images)
        rows = (np.array(images)[:, None] * self.tokens_per_image + np.arange(1, self.tokens_per_image)).reshape(-1)
        acts = torch.from_numpy(self.acts_itd[images.start:images.stop, 1:].reshape(-1, self.d_model))
        for i in range(0, len(rows), batch_rows):
            yield acts[i:i + batch_rows], rows[i:i + batch_rows]


def test_store_adapter_reads_patch_tokens_only(demo):
    acts, image_idx, sae, labels = demo
    cls = np.full((len(acts), 1, acts.shape[2]), 100.0, dtype=np.float32)  # would dominate every statistic
    store = FakeStore(np.concatenate([cls, acts], axis=1), image_idx, grid=(2, 3))
    spec = AnalysisSpec(top_k=3, batch_size=13)  # 2 images per batch
    got = analyse.analyse_store(store, sae, labels, spec, "s", "ds", CPU)
    want = run(acts, image_idx, sae, spec, labels, grid=(2, 3))
    assert got.features.equals(want.features) and got.exemplars.equals(want.exemplars)


# --------------------------------------------------------------------------- with the real modules


@pytest.mark.parametrize("kind", ["relu", "batchtopk"])
def test_real_sparse_autoencoder(kind):
    from saev_report.sae import SparseAutoencoder

    d, n_features = 12, 40
    stand_in = StandInSAE(d, n_features, seed=8)
    sae = SparseAutoencoder(d, n_features, kind=kind, k=4)
    with torch.no_grad():  # dyadic weights, so the comparison can be exact
        for name in ("W_enc_df", "W_dec_fd", "b_enc_f", "b_dec_d"):
            getattr(sae, name).copy_(getattr(stand_in, name))
        sae.act_mean_d.fill_(0.25)
        sae.act_scale.fill_(0.5)
        sae.threshold.fill_(0.25)
    acts = dyadic_acts(17, 6, d, seed=9)
    image_idx = np.arange(17)
    spec = AnalysisSpec(top_k=4, histogram_bins=6)
    result = run(acts, image_idx, sae, spec, images_per_batch=5, grid=(2, 3))
    check_against_reference(result, reference(acts, image_idx, sae, spec))


def test_real_activation_store(demo, tmp_path):
    from saev_report.activations import ActivationStore, ShardWriter, StoreMeta

    acts, image_idx, sae, labels = demo
    cls = np.full((len(acts), 1, acts.shape[2]), 100.0, dtype=np.float32)

    class Layout:
        n_cls, n_registers, grid = 1, 0, (2, 3)

    meta = StoreMeta.create(model="m", layer=3, dataset="ds", d_model=acts.shape[2], dtype="float32",
                            token_kinds=["cls", "patches"], layout=Layout)
    writer = ShardWriter(tmp_path, meta, images_per_shard=5)
    writer.add(image_idx, torch.from_numpy(np.concatenate([cls, acts], axis=1)))
    writer.close()
    spec = AnalysisSpec(top_k=3, batch_size=13)
    got = analyse.analyse_store(ActivationStore(tmp_path), sae, labels, spec, "s", "ds", CPU)
    want = run(acts, image_idx, sae, spec, labels, grid=(2, 3))
    assert got.features.equals(want.features) and got.exemplars.equals(want.exemplars)
    assert got.metrics == pytest.approx(want.metrics, rel=1e-12)


# --------------------------------------------------------------------------- panels


def _encode_all(acts_ipd: np.ndarray, sae) -> np.ndarray:
    n_images, n_patches, d = acts_ipd.shape
    with torch.no_grad():
        f = sae.encode_normalized(sae.normalize(torch.from_numpy(acts_ipd.reshape(-1, d)))).numpy()
    return f.reshape(n_images, n_patches, -1)


def _priority_reference(image: int, feature: int) -> int:
    """analyse.sample_priority in plain Python integers."""
    m31 = (1 << 31) - 1
    x = ((image & m31) * 0x5BD1E995 + feature * 0x1B873593) & m31
    for shift, mult in ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, 0x3C6EF372)):
        x = ((x ^ (x >> shift)) * mult) & m31
    return x ^ (x >> 16)


def quantile_reference(f_ipf: np.ndarray, image_idx: np.ndarray, bands: int, per_band: int) -> list[tuple]:
    """(feature, band, rank, image_idx, act, map) from the whole set: the R firing images of highest priority
    (a hash of dataset index and feature; ties: the later image), sorted by activation, cut into equal bands
    with numpy's array_split sizes."""
    img_max = f_ipf.max(1)
    rows = []
    for j in range(f_ipf.shape[2]):
        firing = [p for p in range(len(image_idx)) if img_max[p, j] > 0]
        sample = sorted(firing, key=lambda p: (-_priority_reference(int(image_idx[p]), j), -p))[: bands * per_band]
        by_act = sorted(range(len(sample)), key=lambda s: (-img_max[sample[s], j], s))  # ties: higher priority first
        ascending = by_act[::-1]
        for band, members in enumerate(np.array_split(np.array(ascending, dtype=int), bands)):
            ranked = sorted(members.tolist(), key=by_act.index)
            for rank, s in enumerate(ranked):
                p = sample[s]
                rows.append((j, band, rank, int(image_idx[p]), float(img_max[p, j]), f_ipf[p, :, j]))
    return rows


@pytest.mark.parametrize("images_per_batch", [1, 4, 23])
def test_quantile_samples_match_reference(demo, images_per_batch):
    acts, image_idx, sae, labels = demo
    result = run(acts, image_idx, sae, AnalysisSpec(top_k=3), labels, images_per_batch=images_per_batch, grid=(2, 3))
    ref = quantile_reference(_encode_all(acts, sae), image_idx, analyse.QUANTILE_BANDS, analyse.SAMPLES_PER_BAND)
    q = result.quantile_exemplars.to_pydict()
    got = list(zip(q["feature"], q["band"], q["rank"], q["image_idx"], q["act"]))
    assert got == [r[:5] for r in ref]
    np.testing.assert_allclose(np.array(q["patch_acts"]), np.array([r[5] for r in ref]), rtol=1e-3)  # float16 maps
    # 23 images > 12 slots: the dense feature's sample is a strict subset, spread over all four bands
    dense = [r for r in got if r[0] == 7]
    assert len(dense) == 12 and sorted({r[1] for r in dense}) == [0, 1, 2, 3]
    assert max(r[4] for r in dense if r[1] == 0) <= min(r[4] for r in dense if r[1] == 3)
    assert not any(r[0] == 5 for r in got)  # dead: no samples


def test_sample_priority_matches_python_integers():
    images = torch.tensor([0, 1, 7, 2**31 + 5, 2**32 - 1])
    feats = torch.tensor([0, 3, 24575, 2**24])
    got = analyse.sample_priority(images, feats).numpy()
    want = [[_priority_reference(int(i), int(f)) for f in feats] for i in images]
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() < 2**31


def test_class_split_matches_reference(demo):
    acts, image_idx, sae, labels = demo
    result = run(acts, image_idx, sae, AnalysisSpec(top_k=3), labels, images_per_batch=5, grid=(2, 3))
    img_max = _encode_all(acts, sae).max(1)
    names = sorted(set(labels.values()))
    expected = []
    for j in range(img_max.shape[1]):
        stats = []
        for name in names:
            members = [p for p, i in enumerate(image_idx) if labels.get(int(i)) == name]
            firing = [p for p in members if img_max[p, j] > 0]
            if firing:
                stats.append((name, len(members), len(firing), len(firing) / len(members), float(np.mean(np.array([img_max[p, j] for p in firing], dtype=np.float64)))))
        stats.sort(key=lambda s: (-s[3], names.index(s[0])))
        expected += [(j, rank, *s) for rank, s in enumerate(stats[: analyse.CLASS_SPLIT_LABELS])]
    c = result.class_split.to_pydict()
    got = list(zip(c["feature"], c["rank"], c["label"], c["n_images"], c["n_fire_images"], c["rate"], c["mean_act"]))
    assert [g[:5] for g in got] == [e[:5] for e in expected]
    np.testing.assert_allclose([g[5:] for g in got], [e[5:] for e in expected], rtol=1e-12)
    assert any(g[5] < 1 for g in got) and not any(g[0] == 5 for g in got)
    # without labels there is nothing to split
    assert run(acts, image_idx, sae, AnalysisSpec(top_k=3), None, grid=(2, 3)).class_split.num_rows == 0


@settings(max_examples=25, deadline=None)
@given(n_features=st.integers(2, 70), d=st.integers(1, 9), k=st.integers(1, 10), block=st.integers(1, 80), seed=st.integers(0, 1000))
def test_similar_features_match_dense_numpy(n_features, d, k, block, seed):
    w = np.random.default_rng(seed).normal(size=(n_features, d))
    w[0] = 0.0  # a zero decoder row: cosine 0 with everything
    idx, cos = analyse.similar_features(torch.from_numpy(w), k=k, block_rows=block)
    unit = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    full = unit @ unit.T
    np.fill_diagonal(full, -np.inf)
    want = np.sort(full, axis=1)[:, ::-1][:, : min(k, n_features - 1)]
    np.testing.assert_allclose(cos, want, atol=1e-5)  # float32 inside
    np.testing.assert_allclose(np.take_along_axis(full, idx, 1), cos, atol=1e-5)  # the indices carry those cosines
    assert not (idx == np.arange(n_features)[:, None]).any()


def test_panel_tables_are_written(demo, tmp_path):
    acts, image_idx, sae, labels = demo
    result = run(acts, image_idx, sae, AnalysisSpec(top_k=2), labels, grid=(2, 3))
    paths = analyse.write_analysis(result, tmp_path, spec_hash="abc")
    assert set(paths) == {"features", "exemplars", "quantile_exemplars", "class_split", "similar_features"}
    similar = pq.read_table(paths["similar_features"]).to_pydict()
    assert len(similar["feature"]) == 40 * analyse.SIMILAR_FEATURES and similar["rank"][:8] == list(range(8))


# --------------------------------------------------------------------------- across ranks (3 gloo processes)

WORLD = 3
RANK_SEEDS = range(8)


def rank_case(seed: int):
    """Data, SAE, labels and spec of one case, and its random split over WORLD ranks: (cuts, images per batch).

    Seed 0 is the `demo` data (23 images > 12 sample slots); the others are random. The data are
    dyadic, so even the float64 sums come out the same whatever the split."""
    rng = np.random.default_rng(seed)
    if seed == 0:
        acts = dyadic_acts(n_images=23, n_patches=6, d=12, seed=1)
        image_idx = np.arange(23, dtype=np.int64) * 3 + 100
        sae = StandInSAE(12, 40, seed=2)
        with torch.no_grad():
            sae.b_enc_f[5], sae.b_enc_f[7] = -1000.0, 1000.0
        spec = AnalysisSpec(top_k=5, histogram_bins=10, dense_threshold=0.5)
    else:
        n_images, n_patches, d, n_features = (int(x) for x in (rng.integers(1, 30), rng.integers(1, 6), rng.integers(1, 7), rng.integers(1, 25)))
        acts = dyadic_acts(n_images, n_patches, d, seed)
        sae = StandInSAE(d, n_features, seed=seed + 1)
        with torch.no_grad():
            sae.b_enc_f[0] = 16.0  # fires everywhere: histograms have a range, samples fill up
        image_idx = rng.permutation(3 * n_images)[:n_images].astype(np.int64)  # any dataset indices, in any order
        spec = AnalysisSpec(top_k=int(rng.integers(1, 7)), histogram_bins=int(rng.integers(2, 12)), dense_threshold=0.3)
    labels = {int(i): ["cat", "dog", "bird"][k % 3] for k, i in enumerate(image_idx) if k % 5 != 4}
    cuts = random_cuts(rng, len(acts), WORLD, rank_0_empty=seed == 1)  # ranks may get nothing, rank 0 too
    per_batch = rng.integers(1, 6, size=WORLD).tolist()
    return acts, image_idx, sae, labels, spec, cuts, per_batch


def _rank_tables(result: analyse.AnalysisResult) -> dict:
    tables = {name: getattr(result, name) for name in ("features", "exemplars", "quantile_exemplars", "class_split", "similar_features")}
    return {"metrics": result.metrics, **tables}


def _analyse_on_rank(rank: int) -> dict:
    """This rank's share of every rank case; rank 0 returns the merged tables, the others nothing."""
    from saev_report import distributed

    merged = {}
    for seed in RANK_SEEDS:
        acts, image_idx, sae, labels, spec, cuts, per_batch = rank_case(seed)
        mine = slice(cuts[rank], cuts[rank + 1])
        result = analyse_sae(batches(acts[mine], image_idx[mine], per_batch[rank]), sae, (1, acts.shape[1]), labels, spec,
                             "s", "ds", CPU, shard=distributed.current())
        assert (result is None) == (rank != 0)
        if result is not None:
            merged[seed] = _rank_tables(result)
    return merged


@pytest.fixture(scope="module")
def merged_over_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_on_ranks(_analyse_on_rank, WORLD, tmp_path_factory.mktemp("ranks"))[0]


@pytest.mark.slow
@pytest.mark.parametrize("seed", RANK_SEEDS)
def test_analysis_merged_over_ranks_equals_one_pass(merged_over_ranks: dict, seed: int) -> None:
    acts, image_idx, sae, labels, spec, cuts, _ = rank_case(seed)
    merged = merged_over_ranks[seed]
    one = _rank_tables(run(acts, image_idx, sae, spec, labels, images_per_batch=4))
    for name in ("features", "exemplars", "quantile_exemplars", "class_split", "similar_features"):
        assert merged[name].equals(one[name]), name  # dyadic data: even the float64 sums are exact
    for key, value in one["metrics"].items():  # the FVU's means and M2 combine by division
        assert merged["metrics"][key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    # and both are the numpy reference's
    check_against_reference(SimpleNamespace(**merged), reference(acts, image_idx, sae, spec, labels))
    quantiles = quantile_reference(_encode_all(acts, sae), image_idx, analyse.QUANTILE_BANDS, analyse.SAMPLES_PER_BAND)
    q = merged["quantile_exemplars"].to_pydict()
    assert list(zip(q["feature"], q["band"], q["rank"], q["image_idx"], q["act"])) == [r[:5] for r in quantiles]


