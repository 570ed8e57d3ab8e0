"""Run a test function on a real multi-process gloo group and collect what each rank returns."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def run_on_ranks(fn: Callable[..., Any], world: int, tmp: Path, *args: Any) -> list[Any]:
    """`fn(rank, *args)` in `world` spawned processes joined in one gloo group (one torch thread each);
    returns every rank's return value, by rank. `fn` must be a module-level function (spawn pickles it
    by name) and its value picklable."""
    import torch.multiprocessing as mp

    mp.spawn(_on_rank, args=(fn, world, str(tmp), args), nprocs=world, join=True)
    return [pickle.loads((tmp / f"rank{rank}.pkl").read_bytes()) for rank in range(world)]


def _on_rank(rank: int, fn: Callable[..., Any], world: int, tmp: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        result = fn(rank, *args)
    finally:
        dist.destroy_process_group()
    (Path(tmp) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def random_cuts(rng: np.random.Generator, n: int, world: int, rank_0_empty: bool = False) -> list[int]:
    """A random split of n items over `world` ranks as cut points [0, …, n]: uneven, and a rank may get
    nothing (rank 0 surely does with `rank_0_empty`). The rank cases of test_analyse and test_concepts use it."""
    cuts = [0, *np.sort(rng.integers(0, n + 1, size=world - 1)).tolist(), n]
    if rank_0_empty:
        cuts[1] = 0
    return cuts
