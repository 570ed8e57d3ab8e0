"""Several processes on one build: ranks, the process group, work splits and exact merges.

A build started by `torchrun` (or `saev-report build --launcher torchrun`) runs
the same pipeline in every process. `process_group()` reads the rank and world
size that torchrun puts in the environment, joins the group (gloo for CPU
tensors, NCCL for CUDA ones) and makes every rank but 0 quiet: no progress
bars, its log lines go to `<run>/logs/rank-<r>.log`. Without torchrun it does
nothing and every helper here degrades to the one-process case, so stage code
calls them unconditionally.

Splits are contiguous index ranges cut at multiples of an alignment (a shard,
a batch), so every rank reads the same batches a one-process run would read:
that is what makes sharded outputs bit-identical. Merges are exact by
construction: sums (integer counts exactly; float64 sums up to summation
order), maxima, and top-k over keys that carry a global position, so ties
break the same way as in one pass (uniform samples too: their priorities hash
the item, not its place in a rank's stream).
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Rank-0-only stages (heads, edits, the site) can run for hours while the other ranks
# wait in a barrier; the default 30-minute collective timeout would kill them.
DEFAULT_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Shard:
    """This process's place in the group: rank `rank` of `world`."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def range(self, n: int, align: int = 1) -> range:
        """This rank's contiguous part of `range(n)`, cut only at multiples of `align`.

        The `ceil(n / align)` blocks are dealt out as evenly as possible, earlier ranks
        first; a rank can get nothing when there are fewer blocks than ranks.
        """
        if align < 1:
            raise ValueError("align must be >= 1")
        n_blocks = -(-n // align)
        first = self.rank * n_blocks // self.world
        last = (self.rank + 1) * n_blocks // self.world
        return range(min(first * align, n), min(last * align, n))

    def items(self, items: list[T]) -> list[T]:
        """Round-robin share of `items` (e.g. the SAEs of a sweep): items rank, rank + world, ..."""
        return items[self.rank::self.world]


ONE = Shard()


def current() -> Shard:
    """The shard of this process: from the joined group, else the one-process shard."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return ONE


def env_world() -> int:
    """World size torchrun announced in the environment (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device_name: str) -> str:
    """gloo for CPU tensors always; NCCL for CUDA tensors when the run uses CUDA."""
    wants_cuda = device_name in ("cuda", "auto") and torch.cuda.is_available()
    return "cpu:gloo,cuda:nccl" if wants_cuda else "gloo"


@contextmanager
def process_group(device_name: str, log_dir: Path | None = None) -> Iterator[Shard]:
    """Join the torchrun group for the duration of a build (a no-op outside torchrun)."""
    if env_world() <= 1 or (dist.is_initialized()):
        yield current()
        return
    backend = backend_for(device_name)
    if "nccl" in backend:
        # "cuda" then means this rank's own GPU everywhere (`pick_device("cuda")`).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=DEFAULT_TIMEOUT)
    shard = current()
    log_file = None
    try:
        if not shard.is_main:
            log_file = _quiet(shard, log_dir)
        yield shard
    finally:
        if log_file is not None:
            log_file.close()
        dist.destroy_process_group()


def _quiet(shard: Shard, log_dir: Path | None):
    """No progress bars on this rank; its log lines go to `log_dir/rank-<r>.log`."""
    from saev_report import progress

    os.environ["SAEV_REPORT_PROGRESS"] = "0"
    if log_dir is None:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(log_dir / f"rank-{shard.rank}.log", "a", buffering=1)
    progress.console.file = log_file
    return log_file


# --------------------------------------------------------------------------- collectives


def barrier() -> None:
    if current().world > 1:
        dist.barrier()


def broadcast(value: T, src: int = 0) -> T:
    """Rank `src`'s value on every rank (any picklable object)."""
    if current().world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's value, in rank order, on every rank (any picklable object)."""
    shard = current()
    if shard.world == 1:
        return [value]
    out: list[Any] = [None] * shard.world
    dist.all_gather_object(out, value)
    return out


def _reduce(tensor: torch.Tensor, op: "dist.ReduceOp.RedOpType") -> torch.Tensor:
    if current().world > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (counts, float64 sums, histograms)."""
    return _reduce(tensor, dist.ReduceOp.SUM)


def max_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place element-wise maximum over ranks."""
    return _reduce(tensor, dist.ReduceOp.MAX)


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (DDP gradients of equal-sized local batches)."""
    world = current().world
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world
    return tensor


def topk_keys(keys_fk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank sorted top-k int64 keys [F, k] into the global top-k.

    Returns `(keys_fk, source_fk)`: the merged keys and, per slot, the index into the
    concatenation of all ranks' slots, `rank * k + slot`, so callers can fetch what
    belongs to each winner (an exemplar's map). Keys must already be globally
    unique and ordered (e.g. activation bits over a global stream position).
    """
    world = current().world
    if world == 1:
        return keys_fk, torch.arange(keys_fk.shape[1], device=keys_fk.device).expand_as(keys_fk).clone()
    parts = [torch.empty_like(keys_fk) for _ in range(world)]
    dist.all_gather(parts, keys_fk.contiguous())
    merged_fk, source_fk = torch.cat(parts, dim=1).topk(keys_fk.shape[1], dim=1)
    return merged_fk, source_fk


def gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (same shape on every rank), in rank order."""
    world = current().world
    if world == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def min_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place element-wise minimum over ranks."""
    return _reduce(tensor, dist.ReduceOp.MIN)


def gather_varying(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor, in rank order, on every rank, where the first dimension may differ
    (sparse counters, the exemplar maps a rank won): one broadcast per rank, so nothing is padded."""
    shard = current()
    if shard.world == 1:
        return [tensor]
    lengths = gather(tensor.shape[0])
    parts = []
    for rank, n in enumerate(lengths):
        part = tensor.contiguous() if rank == shard.rank else tensor.new_empty((n, *tensor.shape[1:]))
        if n:
            dist.broadcast(part, src=rank)
        parts.append(part)
    return parts
