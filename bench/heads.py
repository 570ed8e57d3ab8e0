"""Head training and pixel scoring, against the way they were done before, in one run.

- `fit`: the segmentation probe's (lr, weight decay) sweep at the demo's size (480 images of
  16×16 patches, d = 384, 9 classes, 18 settings, 20 epochs, batch 512), fitted together
  (`heads._fit_many`: one gather and one stacked matmul per batch for every setting) against
  fitted one setting at a time (the same code with one setting per group, which is what the
  per-setting loop did).
- `pixels`: the predicted class of every pixel of a 9 × 224 × 224 upsampled logit map,
  `heads.class_map` (`max(1).indices`) against `argmax(1)` (the same answer, ties included).

    python bench/heads.py            # the demo's size
    python bench/heads.py --quick    # 120 images, 6 settings, 5 epochs

Ratios are by wall time and by process-CPU time; on a busy machine the CPU ratios are the ones
to trust. Run with the machine otherwise idle for the absolute figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Timer  # noqa: E402

from saev_report import heads  # noqa: E402


def fit_figures(n_images: int, n_settings: int, epochs: int) -> tuple[Timer, Timer]:
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(n_images, 16, 16, 384, generator=gen)
    targets = torch.randint(0, 9, (n_images, 16, 16), generator=gen)
    settings = [(lr, wd) for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2) for wd in (1e-3, 1e-2, 1e-1)][:n_settings]
    args = dict(task="segmentation", n_classes=9, settings=settings, epochs=epochs, batch_size=512, seed=0, device=torch.device("cpu"))
    with Timer() as together:
        heads._fit_many(inputs, targets, **args)
    budget = heads.FIT_LOGITS_BYTES
    heads.FIT_LOGITS_BYTES = 1  # one setting per group: the old per-setting loop
    try:
        with Timer() as alone:
            heads._fit_many(inputs, targets, **args)
    finally:
        heads.FIT_LOGITS_BYTES = budget
    return together, alone


def pixel_figures(repeats: int) -> tuple[Timer, Timer]:
    logits = torch.nn.functional.interpolate(torch.randn(1, 9, 16, 16), size=(224, 224), mode="bilinear")
    assert torch.equal(heads.class_map(logits), logits.argmax(1))
    with Timer() as fast:
        for _ in range(repeats):
            heads.class_map(logits)
    with Timer() as slow:
        for _ in range(repeats):
            logits.argmax(1)
    return fast, slow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_images, n_settings, epochs = (120, 6, 5) if args.quick else (480, 18, 20)
    together, alone = fit_figures(n_images, n_settings, epochs)
    print(f"fit    {n_settings} settings × {epochs} epochs, {n_images} images: together {together.wall:.1f} s wall "
          f"({together.cpu:.1f} CPU-s), one at a time {alone.wall:.1f} s ({alone.cpu:.1f} CPU-s): "
          f"{alone.wall / together.wall:.2f}× wall, {alone.cpu / together.cpu:.2f}× CPU")
    fast, slow = pixel_figures(50 if args.quick else 200)
    print(f"pixels class_map {fast.wall * 1e3 / (50 if args.quick else 200):.2f} ms/map, argmax "
          f"{slow.wall * 1e3 / (50 if args.quick else 200):.2f} ms/map: {slow.wall / fast.wall:.1f}× wall, "
          f"{slow.cpu / max(fast.cpu, 1e-9):.1f}× CPU")


if __name__ == "__main__":
    main()
