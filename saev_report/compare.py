"""Cross-model (and cross-seed) feature matching by activation-map correlation.

Two SAEs see the same images in the same order. For every feature of A we find
the feature of B whose activation map correlates best with it (Pearson r over
all images × positions), and the other way round. `<a>~<b>` compares two
models; `<model>~seeds` compares one model's SAEs trained with seeds 0 and 1
(stability: how many features a second run finds again).

Spatial alignment. Models with different patch sizes see the same crop on
different grids (CLIP B/16 at 224 px: 14×14; DINOv2 B/14: 16×16). Both sides
are resampled to a common grid, by default the smaller one on each axis, with
exact area weights: each coarse cell becomes the average of the fine cells
under it, weighted by how much of its area each covers (patch activations
treated as constant over their pixels). This keeps a feature's mean activation,
aligns cells to the same pixels, and invents no resolution; for integer ratios
it equals `F.adaptive_avg_pool2d`, which for non-integer ratios (16→14) would
weight overlapping windows equally instead.

Streaming statistics. Over n positions we accumulate Σa, Σa², Σb, Σb² and the
cross products C = Σ aᵀb, in float64. Values are first shifted by a
per-feature constant (the mean of the first batch) so the cov = C/n − āb̄
subtraction does not cancel catastrophically for features with a large mean;
Pearson r is unchanged by the shift, and a constant (or never-firing) feature
becomes exactly zero, so its variance is exactly 0 and it is marked dead (score
NaN, never matched, never chosen as anyone's match). Each step's product is a
float32 matmul over `step_rows` buffered positions, added into the float64
accumulator, so rounding error grows with `step_rows`, not with n.

Memory. C for 24K × 24K features is 4.6 GB in float64, too much to hold. B's
features are split into blocks of `block` columns and each block takes one
pass over both streams; after a pass the [F_a × block] correlations update a
running best per row of A and give the final best per column of the block.
Peak memory ≈ 12·F_a·block bytes (the float64 C block, which then holds r,
and a float32 scratch for each step's product) plus
about 8·step_rows·(F_a + F_b) bytes of buffered positions (the pieces and
their concatenation). With more than one block
the map iterables must be re-iterable (a list, or an object whose `__iter__`
starts a fresh pass, e.g. re-reading the activation store); each pass must
yield the same positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from saev_report import distributed, progress
from saev_report.distributed import ONE, Shard

Grid = tuple[int, int]


class Encoder(Protocol):
    def encode(self, x_nd: Tensor) -> Tensor: ...


# --------------------------------------------------------------------------- feature maps


@torch.no_grad()
def feature_maps(acts_bpd: Tensor, sae: Encoder, grid: Grid) -> Tensor:
    """SAE features of patch tokens as maps: [images, patches, d] → [images, F, grid_h, grid_w].

    `acts_bpd` holds only the patch tokens of each image, row-major over `grid`.
    """
    n_images, n_patches, d = acts_bpd.shape
    grid_h, grid_w = grid
    if n_patches != grid_h * grid_w:
        raise ValueError(f"{n_patches} patch tokens per image do not fill a {grid_h}×{grid_w} grid")
    f_nf = sae.encode(acts_bpd.reshape(n_images * n_patches, d))
    return f_nf.reshape(n_images, grid_h, grid_w, -1).permute(0, 3, 1, 2)


class Repeatable:
    """Re-iterable maps for `match_features`: every `iter()` calls `make()` for a fresh pass (re-read the store, re-encode)."""

    def __init__(self, make: Callable[[], Iterable[Tensor]]):
        self.make = make

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.make())


def area_weights(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in]: overlap of output cell i with input cell j, as a fraction of cell i (rows sum to 1)."""
    edges_in = torch.arange(n_in + 1, dtype=torch.float64) / n_in
    edges_out = torch.arange(n_out + 1, dtype=torch.float64) / n_out
    lo = torch.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = torch.minimum(edges_out[1:, None], edges_in[None, 1:])
    return (hi - lo).clamp(min=0) * n_out


def resample_maps(f_bfhw: Tensor, grid: Grid) -> Tensor:
    """Resample maps to `grid` with exact area weights (see the module doc); a no-op on the same grid."""
    grid_h, grid_w = f_bfhw.shape[-2:]
    if (grid_h, grid_w) == tuple(grid):
        return f_bfhw
    w_h = area_weights(grid_h, grid[0]).to(f_bfhw.device, f_bfhw.dtype)
    w_w = area_weights(grid_w, grid[1]).to(f_bfhw.device, f_bfhw.dtype)
    return torch.einsum("ih,bfhw,jw->bfij", w_h, f_bfhw, w_w)


def common_grid(grid_a: Grid, grid_b: Grid) -> Grid:
    """The coarser grid on each axis: upsampling would invent resolution neither side has."""
    return (min(grid_a[0], grid_b[0]), min(grid_a[1], grid_b[1]))


# --------------------------------------------------------------------------- streaming correlation


@dataclass
class MatchResult:
    """Best matches in both directions. Dead features (and features with no live candidate) have index -1 and score NaN."""

    best_b_for_a: np.ndarray  # [F_a] int64
    score_a: np.ndarray  # [F_a] float64, Pearson r of that pair
    best_a_for_b: np.ndarray  # [F_b] int64
    score_b: np.ndarray  # [F_b] float64
    n_positions: int
    grid: Grid
    min_score: float = 0.5

    @property
    def mutual_a(self) -> np.ndarray:
        """[F_a] bool: A's best match in B has this A feature as its own best match."""
        return _mutual(self.best_b_for_a, self.best_a_for_b)

    @property
    def mutual_b(self) -> np.ndarray:
        return _mutual(self.best_a_for_b, self.best_b_for_a)


def _mutual(best_y_for_x: np.ndarray, best_x_for_y: np.ndarray) -> np.ndarray:
    found = best_y_for_x >= 0
    out = np.zeros(len(best_y_for_x), dtype=bool)
    out[found] = best_x_for_y[best_y_for_x[found]] == np.flatnonzero(found)
    return out


@dataclass
class _BlockStats:
    """Sums over one pass, in the shifted space, for all of A and a block of B's columns."""

    n: int
    n_features_b: int  # all of B, not just the block
    grid: Grid
    sum_a: Tensor
    sumsq_a: Tensor
    sum_b: Tensor
    sumsq_b: Tensor
    cross_ab: Tensor  # [F_a, block]
    product_ab: Tensor | None  # [F_a, block] float32 scratch for one step's matmul, reused to spare allocations


def _positions_nf(f_bfhw: Tensor, grid: Grid) -> Tensor:
    """[images, F, h, w] → [images·grid_h·grid_w, F] on the common grid."""
    f_bfhw = resample_maps(f_bfhw.float(), grid)
    return f_bfhw.permute(0, 2, 3, 1).reshape(-1, f_bfhw.shape[1])


def _aligned_batches(maps_a: Iterable[Tensor], maps_b: Iterable[Tensor], grid: Grid | None, step_rows: int, device: torch.device | None) -> Iterator[tuple[Tensor, Tensor, int, Grid]]:
    """Pairs of [rows, F] position matrices of about `step_rows` rows, the images they came from, and their grid."""
    buf_a: list[Tensor] = []
    buf_b: list[Tensor] = []
    rows = images = 0
    for step, (a_bfhw, b_bfhw) in enumerate(zip(maps_a, maps_b, strict=True)):
        if a_bfhw.shape[0] != b_bfhw.shape[0]:
            raise ValueError(f"batch {step}: {a_bfhw.shape[0]} images from A but {b_bfhw.shape[0]} from B; both sides must yield the same images")
        if device is not None:
            a_bfhw, b_bfhw = a_bfhw.to(device), b_bfhw.to(device)
        target = grid or common_grid(tuple(a_bfhw.shape[-2:]), tuple(b_bfhw.shape[-2:]))
        buf_a.append(_positions_nf(a_bfhw, target))
        buf_b.append(_positions_nf(b_bfhw, target))
        rows += buf_a[-1].shape[0]
        images += a_bfhw.shape[0]
        if rows >= step_rows:
            yield torch.cat(buf_a), torch.cat(buf_b), images, target
            buf_a, buf_b, rows, images = [], [], 0, 0
    if buf_a:
        yield torch.cat(buf_a), torch.cat(buf_b), images, target


def _accumulate_block(maps_a: Iterable[Tensor], maps_b: Iterable[Tensor], cols: slice, grid: Grid | None, step_rows: int, device: torch.device | None, bar: progress.Bar | None, shard: Shard = ONE) -> _BlockStats | None:
    """One pass over both streams: sums for A and for B's columns `cols`.

    Under torchrun (`shard`) each rank passes its share of the images (every rank some);
    all shift by rank 0's first-batch means, so the sums add up across ranks (`_merge_ranks`)."""
    stats: _BlockStats | None = None
    shift_a = shift_b = None
    for a_nf, b_nf, images, used_grid in _aligned_batches(maps_a, maps_b, grid, step_rows, device):
        n_features_b = b_nf.shape[1]
        b_nf = b_nf[:, cols]
        if stats is None:
            shift_a, shift_b = a_nf.mean(0), b_nf.mean(0)
            if shard.world > 1:  # rank 0's first batch is the one-process run's first batch
                shift_a, shift_b = (t.to(a_nf.device) for t in distributed.broadcast((shift_a.cpu(), shift_b.cpu())))
            f64 = dict(dtype=torch.float64, device=a_nf.device)
            stats = _BlockStats(
                0,
                n_features_b,
                used_grid,
                torch.zeros(a_nf.shape[1], **f64),
                torch.zeros(a_nf.shape[1], **f64),
                torch.zeros(b_nf.shape[1], **f64),
                torch.zeros(b_nf.shape[1], **f64),
                torch.zeros(a_nf.shape[1], b_nf.shape[1], **f64),
                torch.empty(a_nf.shape[1], b_nf.shape[1], dtype=torch.float32, device=a_nf.device),
            )
        a_nf.sub_(shift_a)  # in place: _aligned_batches hands out fresh buffers
        b_nf.sub_(shift_b)
        stats.n += a_nf.shape[0]
        # float32 within a step (sum(dtype=float64) is several times slower), float64 across steps
        stats.sum_a += a_nf.sum(0)
        stats.sumsq_a += a_nf.square().sum(0)
        stats.sum_b += b_nf.sum(0)
        stats.sumsq_b += b_nf.square().sum(0)
        torch.matmul(a_nf.T, b_nf, out=stats.product_ab)
        stats.cross_ab += stats.product_ab
        if bar is not None:
            bar.advance(images)
    if stats is not None and shard.world > 1:
        _merge_ranks(stats)
    return stats


def _merge_ranks(stats: _BlockStats) -> None:
    """Sum every rank's shifted sums into `stats` (the same shift on all ranks, so they add)."""
    stats.n = sum(distributed.gather(stats.n))
    for total in (stats.sum_a, stats.sumsq_a, stats.sum_b, stats.sumsq_b, stats.cross_ab):
        distributed.sum_(total)


def _correlation(stats: _BlockStats) -> Tensor:
    """[F_a, block] Pearson r, computed in the memory of `stats.cross_ab`; NaN wherever either feature has zero variance."""
    n = stats.n
    mean_a, mean_b = stats.sum_a / n, stats.sum_b / n
    var_a = (stats.sumsq_a / n - mean_a.square()).clamp(min=0)
    var_b = (stats.sumsq_b / n - mean_b.square()).clamp(min=0)
    r = stats.cross_ab.div_(n)  # cov = E[ab] − E[a]E[b]
    r.sub_(mean_a[:, None] * mean_b[None, :])
    std_a = torch.where(var_a > 0, var_a.sqrt(), torch.nan)
    std_b = torch.where(var_b > 0, var_b.sqrt(), torch.nan)
    r.div_(std_a[:, None]).div_(std_b[None, :])
    return r.clamp_(-1.0, 1.0)


def _best(r_masked: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Max along `dim` of r with NaN replaced by -inf: (score, index); (NaN, -1) where nothing is finite."""
    score, index = r_masked.max(dim=dim)
    none = torch.isinf(score)
    return score.masked_fill(none, torch.nan), index.masked_fill(none, -1)


def _is_one_shot(maps: Iterable[Tensor]) -> bool:
    return isinstance(maps, Iterator)  # not iter(maps) is maps: that would start a Repeatable's pass


@torch.no_grad()
def match_features(
    maps_a: Iterable[Tensor],
    maps_b: Iterable[Tensor],
    min_score: float = 0.5,
    block: int = 4096,
    *,
    grid: Grid | None = None,
    step_rows: int = 4096,
    device: torch.device | str | None = None,
    label: str | None = None,
    shard: Shard = ONE,
) -> MatchResult:
    """Best match of every feature of A among B's and vice versa, by Pearson r over images × positions.

    maps_a, maps_b: the same images in the same order, as batches of [images, F, h, w]
        feature maps (grids may differ; both go to `grid`, default the coarser one).
    min_score: kept on the result as the `matched` threshold for `match_rows`.
    block: B features per pass; peak memory ≈ 12·F_a·block bytes. F_b > block needs re-iterable maps.
    step_rows: positions buffered per float32 matmul.
    label: progress-bar description (none when None).
    shard: under torchrun, this rank's maps are its share of the images (each rank at least
        one batch); the sums are merged, and every rank gets the result.
    """
    if block <= 0 or step_rows <= 0:
        raise ValueError("block and step_rows must be positive")
    device = torch.device(device) if device is not None else None
    best_b_for_a: Tensor | None = None
    score_a: Tensor | None = None
    score_b: list[Tensor] = []
    best_a_for_b: list[Tensor] = []
    n_positions: int | None = None
    n_features_b: int | None = None
    start = 0
    pass_no = 0
    while n_features_b is None or start < n_features_b:
        if pass_no == 1 and (_is_one_shot(maps_a) or _is_one_shot(maps_b)):
            raise TypeError(f"{n_features_b} features in B need {math.ceil(n_features_b / block)} passes of block={block}, but the maps are one-shot iterators: pass re-iterable maps or raise `block`")
        cols = slice(start, start + block)
        description = f"{label} [{pass_no + 1}/{math.ceil(n_features_b / block)}]" if label and n_features_b else label
        with progress.bar(description, total=None, unit="img") if label else nullcontext() as bar:
            stats = _accumulate_block(maps_a, maps_b, cols, grid, step_rows, device, bar, shard)
        if stats is None:
            raise ValueError("no feature maps to compare")
        if n_positions is not None and stats.n != n_positions:
            raise ValueError(f"pass {pass_no + 1} saw {stats.n} positions, pass 1 saw {n_positions}: the maps must yield the same images every pass")
        n_features_b, n_positions, used_grid = stats.n_features_b, stats.n, stats.grid

        stats.product_ab = None  # free the scratch before the correlation block
        r = _correlation(stats).nan_to_num_(nan=-torch.inf)  # dead features are never anyone's best
        del stats
        col_score, col_best = _best(r, dim=0)  # complete: every row of A is in the block
        score_b.append(col_score.cpu())
        best_a_for_b.append(col_best.cpu())
        row_score, row_best = _best(r, dim=1)
        del r
        row_best = torch.where(row_best >= 0, row_best + start, row_best)
        if score_a is None:
            score_a, best_b_for_a = row_score.cpu(), row_best.cpu()
        else:
            better = row_score.cpu() > torch.nan_to_num(score_a, nan=-torch.inf)  # NaN > x is False
            score_a = torch.where(better, row_score.cpu(), score_a)
            best_b_for_a = torch.where(better, row_best.cpu(), best_b_for_a)
        start += block
        pass_no += 1

    return MatchResult(
        best_b_for_a=best_b_for_a.numpy().astype(np.int64),
        score_a=score_a.numpy().astype(np.float64),
        best_a_for_b=torch.cat(best_a_for_b).numpy().astype(np.int64),
        score_b=torch.cat(score_b).numpy().astype(np.float64),
        n_positions=int(n_positions),
        grid=used_grid,
        min_score=min_score,
    )


# --------------------------------------------------------------------------- rows for the `matches` table


def comparison_name(model_a: str, model_b: str) -> str:
    return f"{model_a}~{model_b}"


def stability_name(model: str) -> str:
    return f"{model}~seeds"


def _direction_rows(comparison: str, sae_from: str, sae_to: str, best: np.ndarray, score: np.ndarray, mutual: np.ndarray, min_score: float) -> list[dict[str, Any]]:
    rows = []
    for feature, (to, s, m) in enumerate(zip(best.tolist(), score.tolist(), mutual.tolist())):
        found = to >= 0 and not math.isnan(s)
        rows.append(
            {
                "comparison": comparison,
                "sae_a": sae_from,
                "feature_a": feature,
                "sae_b": sae_to,
                # null, not NaN: DuckDB orders NaN above every number, so `score >= 0.5` would be true
                "feature_b": to if found else None,
                "score": s if found else None,
                "matched": bool(found and s >= min_score),
                "mutual": bool(found and m),
            }
        )
    return rows


def match_rows(result: MatchResult, comparison: str, sae_a: str, sae_b: str, min_score: float | None = None) -> list[dict[str, Any]]:
    """Rows of the `matches` table for both directions: A's features searched in B, then B's in A."""
    threshold = result.min_score if min_score is None else min_score
    return _direction_rows(comparison, sae_a, sae_b, result.best_b_for_a, result.score_a, result.mutual_a, threshold) + _direction_rows(
        comparison, sae_b, sae_a, result.best_a_for_b, result.score_b, result.mutual_b, threshold
    )
