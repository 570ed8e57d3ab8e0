"""Work splits, and the exact merges on a real 2-process gloo group (analyse's scan merge included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gloo import random_cuts, run_on_ranks
from saev_report import distributed
from saev_report.analyse import scan
from saev_report.compare import match_features
from saev_report.distributed import Shard


@given(n=st.integers(0, 500), world=st.integers(1, 9), align=st.integers(1, 40))
def test_ranges_partition_the_items_at_aligned_cuts(n: int, world: int, align: int) -> None:
    ranges = [Shard(r, world).range(n, align) for r in range(world)]
    assert [i for r in ranges for i in r] == list(range(n))
    for r in ranges:
        assert r.start % align == 0 or r.start == n
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= align  # as even as whole blocks allow


@pytest.mark.parametrize("n", [0, 1, 5, 23])
def test_random_cuts_partition_unevenly_and_leave_ranks_empty(n: int) -> None:
    """The gloo rank cases' splits (tests/gloo.py): valid partitions that exercise empty and uneven shares."""
    splits = []
    for seed in range(8):
        cuts = random_cuts(np.random.default_rng(seed), n, 3, rank_0_empty=seed == 1)
        assert cuts[0] == 0 and cuts[-1] == n and cuts == sorted(cuts) and len(cuts) == 4
        splits.append(np.diff(cuts))
    assert splits[1][0] == 0  # rank 0 gets nothing
    if n >= 5:
        assert any(len(set(s.tolist())) == 3 for s in splits)  # three different share sizes


def test_items_are_dealt_round_robin() -> None:
    assert [Shard(r, 3).items(list("abcdefg")) for r in range(3)] == [list("adg"), list("be"), list("cf")]


def test_one_process_helpers_are_identities() -> None:
    t = torch.arange(4.0)
    assert distributed.current() == distributed.ONE
    assert distributed.sum_(t) is t and distributed.gather(3) == [3] and distributed.broadcast("x") == "x"
    keys, source = distributed.topk_keys(torch.tensor([[5, 3, -1]]))
    assert keys.tolist() == [[5, 3, -1]] and source.tolist() == [[0, 1, 2]]


# --------------------------------------------------------------------------- on a 2-process group


class TinySAE:
    """ReLU encoder with fixed random weights, enough for `scan`."""

    def __init__(self, d: int, f: int):
        g = torch.Generator().manual_seed(1)
        self.n_features, self.d_model = f, d
        self.w_df = torch.randn(d, f, generator=g)
        self.b_f = torch.randn(f, generator=g) - 1.0
        self.w_fd = torch.randn(f, d, generator=g) / f

    def normalize(self, x_nd):
        return x_nd

    def encode_normalized(self, xn_nd):
        return torch.relu(xn_nd @ self.w_df + self.b_f)

    def decode_normalized(self, f_nf):
        return f_nf @ self.w_fd


def _batches(images: range, acts_ipd: torch.Tensor, per_batch: int):
    for start in range(images.start, images.stop, per_batch):
        stop = min(start + per_batch, images.stop)
        yield acts_ipd[start:stop], np.arange(start, stop) + 100


def _data():
    g = torch.Generator().manual_seed(0)
    acts_ipd = torch.randn(23, 6, 8, generator=g)
    acts_ipd[5] = acts_ipd[17]  # equal activations in two images: the tie must break as in one pass
    return acts_ipd


def _collectives_on_rank(rank: int) -> dict:
    """Every collective and merge this module checks, as this rank sees it."""
    shard = distributed.current()
    results = {}
    t = torch.tensor([rank + 1.0, -rank])
    results["sum"] = distributed.sum_(t.clone()).tolist()
    results["max"] = distributed.max_(t.clone()).tolist()
    results["min"] = distributed.min_(t.clone()).tolist()
    results["gather"] = distributed.gather(rank * 10)
    keys = torch.tensor([[90 - rank, 50 - rank, -1]]) if rank == 0 else torch.tensor([[70, 60, 10]])
    results["topk"] = [x.tolist() for x in distributed.topk_keys(keys)]
    acts_ipd, sae = _data(), TinySAE(8, 5)
    mine = shard.range(acts_ipd.shape[0], align=4)
    merged = scan(_batches(mine, acts_ipd, 4), sae, 3, torch.device("cpu")).merge_ranks(5, 3, 6, torch.device("cpu"))
    results["scan"] = _summary(merged)
    maps_a, maps_b = _maps()
    mine = shard.range(len(maps_a), align=1)  # batches of 4 images, as the compare stage cuts them
    results["match"] = _match_summary(match_features(maps_a[mine.start:mine.stop], maps_b[mine.start:mine.stop],
                                                     block=3, step_rows=64, shard=shard))
    return results


def _summary(result) -> dict:
    return {
        "n_patches": result.n_patches, "image_idx": result.image_idx.tolist(),
        "n_fire": result.stats.n_fire_f.tolist(), "act_sum": result.stats.act_sum_f.tolist(),
        "max": result.stats.max_act_f.tolist(), "hist": result.stats.fine_hist_fh.tolist(),
        "keys": result.top.keys_fk.tolist(), "maps": result.top.maps(*_all_slots(result.top)).tolist(),
        "sq_err": float(result.recon.sq_err), "mean": result.recon.mean_d.tolist(), "m2": result.recon.m2_d.tolist(),
        "n_active": result.recon.n_active,
    }


def _maps() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Feature maps of 5 batches of 4 images: A on a 4×4 grid (6 features), B on 3×3 (7), B partly A's."""
    g = torch.Generator().manual_seed(2)
    a = [torch.randn(4, 6, 4, 4, generator=g).relu_() + 3.0 for _ in range(5)]  # a large mean: the shift matters
    b = [torch.nn.functional.adaptive_avg_pool2d(torch.cat([x[:, [2, 0, 5]], torch.randn(4, 4, 4, 4, generator=g)], 1), 3)
         for x in a]
    return a, b


def _match_summary(result) -> dict:
    return {"best_b": result.best_b_for_a.tolist(), "best_a": result.best_a_for_b.tolist(), "n": result.n_positions,
            "score_a": result.score_a.tolist(), "score_b": result.score_b.tolist()}


def _all_slots(top):
    f, k = top.keys_fk.shape
    return torch.arange(f).repeat_interleave(k), torch.arange(k).repeat(f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_on_ranks(_collectives_on_rank, 2, tmp_path_factory.mktemp("gloo"))


@pytest.mark.slow  # a 2-process gloo group
def test_collectives_reduce_over_ranks(two_ranks: list[dict]) -> None:
    for r in two_ranks:
        assert r["sum"] == [3.0, -1.0] and r["max"] == [2.0, 0.0] and r["min"] == [1.0, -1.0]
        assert r["gather"] == [0, 10]
        # keys [90, 50, -1] and [70, 60, 10] → top 3 = 90 (rank 0 slot 0), 70, 60 (rank 1 slots 0, 1)
        assert r["topk"] == [[[90, 70, 60]], [[0, 3, 4]]]


@pytest.mark.slow  # a 2-process gloo group
def test_scan_merged_over_ranks_equals_one_pass(two_ranks: list[dict]) -> None:
    acts_ipd, sae = _data(), TinySAE(8, 5)
    one = _summary(scan(_batches(range(acts_ipd.shape[0]), acts_ipd, 4), sae, 3, torch.device("cpu")))
    for merged in two_ranks:
        for key in ("n_patches", "image_idx", "n_fire", "max", "hist", "keys", "maps", "n_active"):
            assert merged["scan"][key] == one[key], key  # integer counts, maxima, top-k: exactly equal
        for key in ("act_sum", "mean", "m2"):  # float64 sums: equal up to summation order
            np.testing.assert_allclose(merged["scan"][key], one[key], rtol=1e-12)
        assert merged["scan"]["sq_err"] == pytest.approx(one["sq_err"], rel=1e-12)


@pytest.mark.slow  # a 2-process gloo group
def test_matching_merged_over_ranks_equals_one_pass(two_ranks: list[dict]) -> None:
    maps_a, maps_b = _maps()
    one = _match_summary(match_features(maps_a, maps_b, block=3, step_rows=64))
    assert one["best_b"][0] == 1 and one["best_b"][2] == 0  # B's features 0 and 1 are A's 2 and 0, pooled
    for merged in two_ranks:
        assert merged["match"]["best_b"] == one["best_b"] and merged["match"]["best_a"] == one["best_a"]
        assert merged["match"]["n"] == one["n"] == 20 * 9
        np.testing.assert_allclose(merged["match"]["score_a"], one["score_a"], rtol=1e-6)
        np.testing.assert_allclose(merged["match"]["score_b"], one["score_b"], rtol=1e-6)
