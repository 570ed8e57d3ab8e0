"""Cross-model matching on synthetic feature maps whose true matching is known."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saev_report import tables
from saev_report.compare import (
    MatchResult,
    Repeatable,
    area_weights,
    comparison_name,
    feature_maps,
    match_features,
    match_rows,
    resample_maps,
    stability_name,
)


def sparse_maps(n_images: int, n_features: int, grid: tuple[int, int], seed: int) -> torch.Tensor:
    """Non-negative, sparse-ish maps like SAE features: ReLU of shifted gaussians."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n_images, n_features, *grid, generator=g) - 0.5)


def batches(f_bfhw: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(f_bfhw.split(size))


def reference_r(a_bfhw: torch.Tensor, b_bfhw: torch.Tensor) -> np.ndarray:
    """[F_a, F_b] Pearson r over images × positions with numpy's corrcoef."""
    a_nf = a_bfhw.permute(0, 2, 3, 1).reshape(-1, a_bfhw.shape[1]).double().numpy()
    b_nf = b_bfhw.permute(0, 2, 3, 1).reshape(-1, b_bfhw.shape[1]).double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(a_nf.T, b_nf.T)
    return r[: a_nf.shape[1], a_nf.shape[1] :]


def permuted_noisy_copy(a_bfhw: torch.Tensor, seed: int, noise: float = 0.1) -> tuple[torch.Tensor, np.ndarray]:
    """B[:, j] = scale_j · A[:, perm[j]] + noise; returns B and, per A feature, its index in B."""
    g = torch.Generator().manual_seed(seed)
    n_features = a_bfhw.shape[1]
    perm = torch.randperm(n_features, generator=g)
    scale = 0.5 + 2 * torch.rand(n_features, generator=g)
    b = a_bfhw[:, perm] * scale[None, :, None, None] + noise * torch.randn(a_bfhw[:, perm].shape, generator=g)
    where_in_b = torch.argsort(perm).numpy()
    return b, where_in_b


def test_recovers_permutation_of_noisy_scaled_copy():
    a = sparse_maps(24, 40, (6, 6), seed=0)
    b, where_in_b = permuted_noisy_copy(a, seed=1)
    result = match_features(batches(a, 5), batches(b, 5), min_score=0.5, block=16)
    np.testing.assert_array_equal(result.best_b_for_a, where_in_b)
    np.testing.assert_array_equal(result.best_a_for_b, np.argsort(where_in_b))
    assert result.score_a.min() > 0.9 and result.score_b.min() > 0.9
    assert result.mutual_a.all() and result.mutual_b.all()
    assert result.n_positions == 24 * 36


def test_unrelated_features_do_not_match():
    a = sparse_maps(24, 20, (6, 6), seed=0)
    b = sparse_maps(24, 20, (6, 6), seed=99)
    result = match_features(batches(a, 8), batches(b, 8), min_score=0.5)
    assert np.nanmax(result.score_a) < 0.3  # 864 positions: chance correlations stay small
    assert not any(r["matched"] for r in match_rows(result, "a~b", "A", "B"))


@pytest.mark.parametrize("block", [1, 3, 7, 50])
def test_blocked_scores_equal_numpy_corrcoef(block):
    g = torch.Generator().manual_seed(3)
    a = sparse_maps(10, 9, (5, 5), seed=4)
    b = sparse_maps(10, 13, (5, 5), seed=5)
    b[:, :9] += 0.7 * a[:, torch.randperm(9, generator=g)]  # some real correlation to find
    a[:, 2] += 50.0  # a large mean must not cancel the covariance away
    r = reference_r(a, b)
    result = match_features(batches(a, 3), batches(b, 3), block=block, step_rows=40)
    np.testing.assert_allclose(result.score_a, r.max(axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.score_b, r.max(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(result.best_b_for_a, r.argmax(axis=1))
    np.testing.assert_array_equal(result.best_a_for_b, r.argmax(axis=0))


def test_streaming_over_batches_equals_one_shot():
    a = sparse_maps(21, 12, (4, 4), seed=6)
    b, _ = permuted_noisy_copy(a, seed=7, noise=1.0)
    one_shot = match_features([a], [b], block=100, step_rows=10**6)
    streamed = match_features(batches(a, 2), batches(b, 2), block=5, step_rows=7, label="compare test")
    # a generator is fine while one block covers B
    generated = match_features((x for x in batches(a, 4)), (x for x in batches(b, 4)), block=12)
    for other in (streamed, generated):
        np.testing.assert_array_equal(other.best_b_for_a, one_shot.best_b_for_a)
        np.testing.assert_array_equal(other.best_a_for_b, one_shot.best_a_for_b)
        np.testing.assert_allclose(other.score_a, one_shot.score_a, atol=1e-6)
        np.testing.assert_allclose(other.score_b, one_shot.score_b, atol=1e-6)


def test_one_shot_iterators_with_several_blocks_are_refused():
    a = sparse_maps(4, 6, (3, 3), seed=0)
    with pytest.raises(TypeError, match="re-iterable"):
        match_features(iter([a]), iter([a]), block=2)


def test_repeatable_gives_a_fresh_pass_per_block():
    a = sparse_maps(6, 8, (3, 3), seed=1)
    b, where_in_b = permuted_noisy_copy(a, seed=2)
    passes = []

    def make_a():
        passes.append(1)
        return (x for x in batches(a, 2))

    result = match_features(Repeatable(make_a), Repeatable(lambda: (x for x in batches(b, 2))), block=3)
    assert len(passes) == 3  # ceil(8 / 3) passes
    np.testing.assert_array_equal(result.best_b_for_a, where_in_b)


def test_misaligned_streams_are_refused():
    a = sparse_maps(6, 4, (3, 3), seed=0)
    with pytest.raises(ValueError, match="same images"):
        match_features(batches(a, 3), batches(a, 2))
    with pytest.raises(ValueError):
        match_features(batches(a, 3), batches(a, 3)[:1])


def test_extra_feature_without_counterpart_is_unmatched():
    shared = sparse_maps(30, 10, (5, 5), seed=8)
    extra = sparse_maps(30, 1, (5, 5), seed=9)
    a = torch.cat([shared, extra], dim=1)  # A's feature 10 exists only in A
    b, where_in_b = permuted_noisy_copy(shared, seed=10)
    result = match_features(batches(a, 10), batches(b, 10), min_score=0.5)
    rows = match_rows(result, "a~b", "A", "B")
    unmatched = [(r["sae_a"], r["feature_a"]) for r in rows if not r["matched"]]
    assert unmatched == [("A", 10)]
    np.testing.assert_array_equal(result.best_b_for_a[:10], where_in_b)
    assert not result.mutual_a[10]


def test_dead_features_score_nan_and_are_never_chosen():
    a = sparse_maps(12, 6, (4, 4), seed=11)
    b, where_in_b = permuted_noisy_copy(a, seed=12)
    a[:, 1] = 0.0  # never fires
    b[:, where_in_b[3]] = 2.5  # constant: zero variance too
    result = match_features(batches(a, 4), batches(b, 4), block=2)
    assert result.best_b_for_a[1] == -1 and math.isnan(result.score_a[1])
    assert result.best_a_for_b[where_in_b[3]] == -1 and math.isnan(result.score_b[where_in_b[3]])
    assert 1 not in result.best_a_for_b  # the dead A feature is nobody's match
    assert where_in_b[3] not in result.best_b_for_a
    live = [i for i in range(6) if i not in (1, 3)]
    np.testing.assert_array_equal(result.best_b_for_a[live], where_in_b[live])


def test_different_grids_nearest_upsampled_copy_matches_exactly():
    a = sparse_maps(8, 10, (7, 7), seed=13)
    b, where_in_b = permuted_noisy_copy(a, seed=14, noise=0.0)
    b = F.interpolate(b, size=(14, 14), mode="nearest")
    result = match_features(batches(a, 3), batches(b, 3))
    assert result.grid == (7, 7)
    np.testing.assert_array_equal(result.best_b_for_a, where_in_b)
    np.testing.assert_allclose(result.score_a, 1.0, atol=1e-5)  # float32 products


def test_different_grids_non_integer_ratio_like_clip_vs_dino():
    """One smooth pixel field seen through a 14×14 and a permuted 16×16 patch grid, as CLIP B/16 vs DINOv2 B/14 at 224 px."""
    g = torch.Generator().manual_seed(15)
    field = F.interpolate(torch.randn(16, 12, 8, 8, generator=g), size=(224, 224), mode="bilinear", align_corners=False).relu()
    a = F.adaptive_avg_pool2d(field, (14, 14))
    b, where_in_b = permuted_noisy_copy(F.adaptive_avg_pool2d(field, (16, 16)), seed=16, noise=0.0)
    result = match_features(batches(a, 4), batches(b, 4))
    assert result.grid == (14, 14)
    np.testing.assert_array_equal(result.best_b_for_a, where_in_b)
    assert result.score_a.min() > 0.97


def test_area_weights_and_resample():
    w = area_weights(16, 14)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0)
    np.testing.assert_allclose(w.sum(0).numpy(), 14 / 16)  # every input cell is spent exactly once
    x = torch.rand(2, 3, 16, 16)
    y = resample_maps(x, (14, 14))
    assert y.shape == (2, 3, 14, 14)
    torch.testing.assert_close(y.mean((-2, -1)), x.mean((-2, -1)))  # area weights keep the mean
    torch.testing.assert_close(resample_maps(x, (8, 4)), F.adaptive_avg_pool2d(x, (8, 4)))  # integer ratios
    assert resample_maps(x, (16, 16)) is x


class TinyReluSAE(torch.nn.Module):
    def __init__(self, d: int, n_features: int):
        super().__init__()
        self.enc = torch.nn.Linear(d, n_features)

    def encode(self, x_nd: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.enc(x_nd))


def test_feature_maps_puts_each_patch_at_its_grid_position():
    torch.manual_seed(0)
    sae = TinyReluSAE(d=6, n_features=5)
    acts_bpd = torch.randn(3, 2 * 4, 6)
    f_bfhw = feature_maps(acts_bpd, sae, (2, 4))
    assert f_bfhw.shape == (3, 5, 2, 4)
    # patch p is row p // 4, column p % 4 (row-major)
    torch.testing.assert_close(f_bfhw[1, :, 1, 2], sae.encode(acts_bpd[1, 1 * 4 + 2]))
    with pytest.raises(ValueError):
        feature_maps(acts_bpd, sae, (3, 3))


def test_rows_write_to_matches_table_and_query_unmatched(tmp_path):
    result = MatchResult(
        best_b_for_a=np.array([2, -1, 0]),
        score_a=np.array([0.9, np.nan, 0.3]),
        best_a_for_b=np.array([2, -1, 0]),
        score_b=np.array([0.3, np.nan, 0.9]),
        n_positions=10,
        grid=(2, 2),
        min_score=0.5,
    )
    name = comparison_name("clip", "dino")
    assert name == "clip~dino" and stability_name("dino") == "dino~seeds"
    rows = match_rows(result, name, "clip/L11/x", "dino/L11/x")
    assert len(rows) == 6
    assert rows[0] == {"comparison": "clip~dino", "sae_a": "clip/L11/x", "feature_a": 0, "sae_b": "dino/L11/x", "feature_b": 2, "score": 0.9, "matched": True, "mutual": True}
    assert rows[1]["feature_b"] is None and rows[1]["score"] is None and not rows[1]["matched"]
    assert rows[2]["mutual"] is True and rows[2]["matched"] is False  # mutual but weak
    assert rows[3]["sae_a"] == "dino/L11/x" and rows[3]["feature_b"] == 2

    path = tables.write_table(tmp_path / "matches.parquet", "matches", rows, spec_hash="h")
    unmatched = duckdb.sql(f"SELECT sae_a, feature_a FROM read_parquet('{path}') WHERE NOT matched ORDER BY sae_a, feature_a").fetchall()
    assert unmatched == [("clip/L11/x", 1), ("clip/L11/x", 2), ("dino/L11/x", 0), ("dino/L11/x", 1)]
    # stricter threshold at row time
    assert sum(r["matched"] for r in match_rows(result, name, "A", "B", min_score=0.95)) == 0
