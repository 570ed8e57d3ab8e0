"""Model adapters behind one interface (`Backbone`) and `load_backbone`, which picks the
family's loader from the registry `spec.MODEL_FAMILIES`; each loader picks one adapter file. Optional libraries are imported only when their family is used."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from saev_report.backbones.base import Backbone, ModelUnavailable, Preprocessing, TokenLayout, make_transform, resize_size
from saev_report.spec import MODEL_FAMILIES, ModelSpec

__all__ = ["Backbone", "ModelUnavailable", "Preprocessing", "TokenLayout", "load_backbone", "make_transform", "resize_size"]


def load_backbone(spec: ModelSpec, cache_dir: Path, device: torch.device, seed: int = 0) -> Backbone:
    """The model `spec` describes, in eval mode with frozen weights, on `device`.

    The family's loader comes from `spec.MODEL_FAMILIES`. `random_init` builds the same
    architecture with weights drawn from `seed` (the control "random twin"). A missing optional
    library, or weights absent offline, raises `ModelUnavailable` at once with what is missing
    and where to put it.
    """
    module, _, name = MODEL_FAMILIES[spec.family].loader.partition(":")
    loader = getattr(importlib.import_module(module), name)
    return loader(source=spec.source, cache_dir=Path(cache_dir), random_init=spec.random_init,
                  image_size=spec.image_size, seed=seed, device=device)
