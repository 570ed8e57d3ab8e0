"""HF `Siglip2VisionModel` (SigLIP 2 NaFlex) run at a fixed resolution.

NaFlex takes pre-cut patches, `[batch, patches, 16·16·3]` (channels last within a patch, as the
library's `convert_image_to_patches` cuts them), with each image's patch grid (`spatial_shapes`),
to which it resizes its learned position grid (`config.num_patches`, 16×16 for the released
models) bilinearly. Here every image is the same square (the project's geometry), so every
`spatial_shapes` is the layout's grid and no patch is padding: the attention mask is all ones,
which the layers take as none. No CLS token; mean/std 0.5, bilinear (the processor's defaults).
The fixed-resolution SigLIP 2 checkpoints are `SiglipModel`s instead (`hf_siglip.py`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from saev_report.backbones.base import HALF_MEAN, HALF_STD
from saev_report.backbones.hf import HFBackbone


def to_patches(pixels_b3hw: Tensor, patch: int) -> Tensor:
    """[b, 3, H, W] → [b, (H/p)·(W/p), p·p·3], row-major patches, channels last within each."""
    b, c, h, w = pixels_b3hw.shape
    x = pixels_b3hw.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class Siglip2Backbone(HFBackbone):
    model_class = "Siglip2VisionModel"
    mean_std = (HALF_MEAN, HALF_STD)
    interpolation = "bilinear"
    has_cls = False

    @classmethod
    def native_image_size(cls, config: Any) -> int:
        return int(math.isqrt(int(config.num_patches))) * int(config.patch_size)

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        patches_bnp = to_patches(pixels_b3hw, self.patch_size)
        shapes_b2 = torch.tensor([self.layout.grid] * pixels_b3hw.shape[0], device=pixels_b3hw.device)
        return self.tower().embeddings(patches_bnp, shapes_b2)

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        return self.tower().post_layernorm(tokens_btd)
