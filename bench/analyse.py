"""Cost of the concept statistics: the analysis pass with them, as a ratio of the same pass without.

Both arms run `analyse.analyse_sae` end to end (encode, decode, metrics,
feature statistics, top-k exemplars, tables) over the same batches; the
concept arm adds `concept_labels` (patch-level mask classes and image-level
class labels, each with its permuted-label null) and builds the `concepts`
table. Rounds alternate between the arms and the best of each is kept, so a
noisy neighbour cannot flatter the ratio. Goal: ≤ 1.3×.

Two workloads:

- `synthetic` (default): a random ReLU SAE (≈ 2.9 % of features fire per
  patch, as in bench/exemplars.py) at d=384/F=6,144 and the paper's
  d=768/F=24,576, with labels drawn independently per patch from C concepts
  (C = 9 like the demo's masks, 150 like ADE20K) and per image from 8 classes.
  Independent labels are the worst case for the sparse positive histograms
  (the most distinct (feature, concept, bin) keys).
- `--run runs/demo`: the demo's first DINOv2 SAE over its real activation
  store, with the real masks and labels.

    python bench/analyse.py                 # synthetic, both scales
    python bench/analyse.py --quick         # synthetic, 65,536 patches, d=384 only
    python bench/analyse.py --run runs/demo --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from exemplars import BATCH_PATCHES, GRID, PATCHES_PER_IMAGE, TOP_K, Batches, RandomSAE  # noqa: E402
from _timing import Timer  # noqa: E402  (bench/ is on sys.path when run as a script)

from saev_report import analyse, concepts  # noqa: E402
from saev_report.spec import AnalysisSpec  # noqa: E402

CPU = torch.device("cpu")


def synthetic_labels(n_images: int, n_concepts: int, n_classes: int, seed: int = 0) -> concepts.ConceptLabels:
    rng = np.random.default_rng(seed)
    patch_ip = rng.integers(0, n_concepts, size=(n_images, PATCHES_PER_IMAGE)).astype(np.int16)
    image_i = rng.integers(0, n_classes, size=n_images).astype(np.int16)
    return concepts.make_labels([f"c{i}" for i in range(n_concepts)], patch_ip, [f"k{i}" for i in range(n_classes)], image_i, seed)


def timed_rounds(run_plain, run_concepts, rounds: int) -> tuple[Timer, Timer]:
    """Best (by CPU time) of alternating rounds of each arm."""
    best: dict[str, Timer] = {}
    for _ in range(rounds):
        for name, fn in (("plain", run_plain), ("concepts", run_concepts)):
            with Timer() as t:
                fn()
            if name not in best or t.cpu < best[name].cpu:
                best[name] = t
    return best["plain"], best["concepts"]


def report(label: str, plain: Timer, with_concepts: Timer, n_patches: int) -> None:
    print(f"{label}: {n_patches:,} patches, threads {torch.get_num_threads()}")
    print(f"  without concepts  {plain.wall:7.2f} s wall {plain.cpu:7.2f} s cpu")
    print(f"  with concepts     {with_concepts.wall:7.2f} s wall {with_concepts.cpu:7.2f} s cpu")
    print(f"  ratio             {with_concepts.wall / plain.wall:7.3f}× wall {with_concepts.cpu / plain.cpu:7.3f}× cpu  (goal ≤ 1.3×)", flush=True)


def bench_synthetic(d: int, n_features: int, n_concepts: int, n_patches: int, rounds: int) -> None:
    sae = RandomSAE(d, n_features)
    batches = Batches(d, n_patches, CPU)
    labels = synthetic_labels(batches.n_batches * batches.images_per_batch, n_concepts, 8)
    spec = AnalysisSpec(top_k=TOP_K, batch_size=BATCH_PATCHES)

    def run(with_labels: bool):
        return lambda: analyse.analyse_sae(batches(), sae, GRID, None, spec, "bench", "bench", CPU,
                                           concept_labels=labels if with_labels else None)

    plain, with_concepts = timed_rounds(run(False), run(True), rounds)
    report(f"synthetic d={d} F={n_features} C={n_concepts}", plain, with_concepts, batches.n_patches)


def bench_run(run_dir: Path, rounds: int) -> None:
    """The first SAE of the first analysed model of a built run, on its own store and labels."""
    from saev_report.activations import ActivationStore
    from saev_report.datasets import open_dataset
    from saev_report.sae import load_sae
    from saev_report.spec import load_spec

    spec = load_spec(run_dir / "spec.yaml") if (run_dir / "spec.yaml").exists() else None
    store_dir = next((run_dir / "cache" / "record").glob("dinov2-*/L*"))
    sae_dir = next(p.parent for p in sorted((run_dir / "cache" / "train").glob("dinov2-*/*/sae.safetensors")))
    store, sae = ActivationStore(store_dir), load_sae(sae_dir, CPU)
    if spec is None:
        from saev_report.spec import DemoDataset

        dataset = open_dataset("demo", DemoDataset(kind="demo", n_images=600), Path.home() / ".cache" / "saev-report")
    else:
        dataset = open_dataset(spec.record.dataset, spec.datasets[spec.record.dataset], Path.home() / ".cache" / "saev-report")
    labels = concepts.dataset_labels(dataset, (store.meta.grid_h, store.meta.grid_w), seed=0)
    spec_a = AnalysisSpec(top_k=TOP_K)

    def run(with_labels: bool):
        return lambda: analyse.analyse_store(store, sae, None, spec_a, "bench", "demo", CPU,
                                             concept_labels=labels if with_labels else None)

    plain, with_concepts = timed_rounds(run(False), run(True), rounds)
    report(f"{store_dir.parent.name} × {sae_dir.name} (F={sae.n_features}, C={len(labels.patch_names)})", plain, with_concepts,
           store.n_images * store.meta.n_patches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="65,536 patches, d=384/F=6,144 only")
    parser.add_argument("--patches", type=int, default=None, help="patches per synthetic configuration (default 200,704)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per arm (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--run", type=Path, default=None, help="a built run directory (e.g. runs/demo) instead of synthetic data")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.run is not None:
        bench_run(args.run, args.rounds)
        return
    n_patches = args.patches or (65_536 if args.quick else 200_704)
    configs = [(384, 6144, 9)] if args.quick else [(384, 6144, 9), (768, 24576, 150)]
    for d, n_features, n_concepts in configs:
        bench_synthetic(d, n_features, n_concepts, n_patches, args.rounds)


if __name__ == "__main__":
    main()
