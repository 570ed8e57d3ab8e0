"""Feature matching throughput against the float32 matmul peak measured in the same run.

The work of `match_features` is dominated by the cross-product matmul
(2·F_a·F_b FLOPs per position). This times a match of F_a × F_b features over
about 100K positions (512 images on a 14×14 grid) and reports its effective
FLOP rate as a fraction of a bare float32 matmul of the same shape
([F_a × step_rows] @ [step_rows × F_b]) — the ratio says how much the
streaming, shifting, float64 accumulation and correlation cost on top.

    python bench/compare.py            # F = 6144 vs 6144, ~100K positions
    python bench/compare.py --quick    # F = 1024, ~10K positions
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import numpy as np
import torch

from saev_report.compare import match_features
from _timing import Timer  # noqa: E402  (bench/ is on sys.path when run as a script)


class CycledMaps:
    """Re-iterable stream of [images, F, h, w] batches cycling a small pool, so inputs cost no time or memory to make."""

    def __init__(self, pool: list[torch.Tensor], n_batches: int):
        self.pool, self.n_batches = pool, n_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.n_batches):
            yield self.pool[i % len(self.pool)]


def make_pools(n_features: int, images_per_batch: int, grid: tuple[int, int], pool_size: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], np.ndarray]:
    """Sparse A maps (ReLU(z − 1.5): ~7% active, like SAE features) and B = permuted, scaled, noisy copies."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_features, generator=g)
    scale = 0.5 + torch.rand(n_features, generator=g)
    pool_a, pool_b = [], []
    for _ in range(pool_size):
        a = torch.relu(torch.randn(images_per_batch, n_features, *grid, generator=g) - 1.5)
        b = a[:, perm] * scale[None, :, None, None]
        b += 0.05 * torch.relu(torch.randn(b.shape, generator=g))
        pool_a.append(a)
        pool_b.append(b)
    return pool_a, pool_b, torch.argsort(perm).numpy()




def matmul_peak(f_a: int, f_b: int, rows: int, reps: int) -> Timer:
    """Time of one float32 [f_a × rows] @ [rows × f_b] matmul (per rep)."""
    a = torch.randn(rows, f_a)
    b = torch.randn(rows, f_b)
    out = torch.empty(f_a, f_b)
    torch.matmul(a.T, b, out=out)  # warm-up
    with Timer() as timer:
        for _ in range(reps):
            torch.matmul(a.T, b, out=out)
    timer.wall /= reps
    timer.cpu /= reps
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="F=1024 over ~10K positions")
    parser.add_argument("--features", type=int, default=None)
    parser.add_argument("--block", type=int, default=None, help="B features per pass (default: all in one pass)")
    parser.add_argument("--step-rows", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=None, help="batches of 16 images (default 32, quick 4)")
    args = parser.parse_args()

    n_features = args.features or (1024 if args.quick else 6144)
    grid = (14, 14)
    images_per_batch = 16
    n_batches = args.batches or (4 if args.quick else 32)  # 64 or 512 images
    block = args.block or n_features
    n_positions = n_batches * images_per_batch * grid[0] * grid[1]
    print(f"F_a = F_b = {n_features}, {n_positions:,} positions, block {block}, step_rows {args.step_rows}, torch threads {torch.get_num_threads()}")

    step_flops = 2 * n_features * n_features * args.step_rows
    peak = matmul_peak(n_features, n_features, args.step_rows, reps=3 if args.quick else 5)
    print(f"baseline: float32 matmul [{n_features}×{args.step_rows}]@[{args.step_rows}×{n_features}]: {step_flops / peak.wall / 1e9:,.1f} GFLOP/s wall, {step_flops / peak.cpu / 1e9:,.1f} GFLOP/s per CPU-second")

    pool_a, pool_b, where_in_b = make_pools(n_features, images_per_batch, grid, pool_size=4)
    match_features(pool_a[:1], pool_b[:1], block=block, step_rows=args.step_rows)  # warm-up: thread pool, allocator
    maps_a, maps_b = CycledMaps(pool_a, n_batches), CycledMaps(pool_b, n_batches)
    with Timer() as timer:
        result = match_features(maps_a, maps_b, min_score=0.5, block=block, step_rows=args.step_rows)

    n_passes = -(-n_features // block)
    useful_flops = 2 * n_features * n_features * n_positions
    recovered = float((result.best_b_for_a == where_in_b).mean())
    print(
        f"match_features: {timer.wall:.1f} s wall, {timer.cpu:.1f} CPU-s ({n_passes} pass{'es' if n_passes > 1 else ''}); "
        f"{useful_flops / timer.wall / 1e9:,.1f} GFLOP/s wall, {useful_flops / timer.cpu / 1e9:,.1f} per CPU-second; {n_positions / timer.wall:,.0f} positions/s"
    )
    print(f"permutation recovered for {recovered:.1%} of features, median score {np.median(result.score_a):.3f}")
    # the FLOPs are the same, so each ratio is the bare matmul's time scaled to the match's work over the match's time
    ideal = peak.wall * useful_flops / step_flops, peak.cpu * useful_flops / step_flops
    print(f"ratio effective / matmul peak: {ideal[0] / timer.wall:.2f} (wall), {ideal[1] / timer.cpu:.2f} (CPU time)")


if __name__ == "__main__":
    main()
