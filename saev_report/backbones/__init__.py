"""Model adapters behind one interface (`Backbone`) and `load_backbone`, which picks the
adapter from `ModelSpec.family`. Optional libraries are imported only when their family is used."""

from __future__ import annotations

from pathlib import Path

import torch

from saev_report.backbones.base import Backbone, ModelUnavailable, TokenLayout, make_transform, resize_size
from saev_report.spec import ModelSpec

__all__ = ["Backbone", "ModelUnavailable", "TokenLayout", "load_backbone", "make_transform", "resize_size"]


def load_backbone(spec: ModelSpec, cache_dir: Path, device: torch.device, seed: int = 0) -> Backbone:
    """The model `spec` describes, in eval mode with frozen weights, on `device`.

    `random_init` builds the same architecture with weights drawn from `seed` (the control
    "random twin"). A missing optional library, or weights absent offline, raises
    `ModelUnavailable` at once with what is missing and where to put it.
    """
    kwargs = dict(random_init=spec.random_init, image_size=spec.image_size, seed=seed, device=device)
    if spec.family == "imgfocus":
        from saev_report.backbones.imgfocus import load_imgfocus

        return load_imgfocus(Path(cache_dir), **kwargs)
    assert spec.source, "ModelSpec validation guarantees a source for this family"
    if spec.family == "hf":
        from saev_report.backbones.hf import load_hf

        return load_hf(spec.source, **kwargs)
    if spec.family == "timm":
        from saev_report.backbones.timm_vit import load_timm

        return load_timm(spec.source, **kwargs)
    if spec.family == "open_clip":
        from saev_report.backbones.open_clip_vit import load_open_clip

        return load_open_clip(spec.source, **kwargs)
    raise ValueError(f"unknown model family {spec.family!r}")
