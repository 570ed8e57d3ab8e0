"""HF `DINOv3ViTModel`: CLS, then `num_register_tokens` registers (4 in the released ViTs), then
16-pixel patches. Positions are rotary (RoPE) only: the embeddings add none, and every layer gets
the cos/sin tables of the patch grid, which `run_blocks` computes with the library's own
`rope_embeddings` for the layout's grid. The library's processor resizes a [0, 1] float image
with bilinear interpolation (rescale before resize)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from saev_report.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from saev_report.backbones.hf import HFBackbone


class DINOv3Backbone(HFBackbone):
    model_class = "DINOv3ViTModel"
    mean_std = (IMAGENET_MEAN, IMAGENET_STD)
    interpolation = "bilinear"
    resize_on = "float"

    def layers(self) -> nn.ModuleList:
        return self.model.model.layer

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        return self.model.embeddings(pixels_b3hw)

    def block_kwargs(self, tokens_btd: Tensor) -> dict[str, Any]:
        # The rotary tables depend only on the pixel grid's shape, device and dtype.
        rows, cols = self.layout.grid
        shape_only = torch.empty((1, 0, rows * self.patch_size, cols * self.patch_size), device=tokens_btd.device, dtype=tokens_btd.dtype)
        return {"position_embeddings": self.model.rope_embeddings(shape_only)}

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        return self.model.norm(tokens_btd)
