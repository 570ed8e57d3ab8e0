"""HF `Dinov2Model` and `Dinov2WithRegistersModel` (CLS, then 4 registers for the latter; learned
absolute positions, which the library's embeddings interpolate to any input size)."""

from __future__ import annotations

from torch import Tensor, nn

from saev_report.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from saev_report.backbones.hf import HFBackbone

# DINOv2 checkpoints say 518, far too slow on a CPU; 224 (a 16×16 grid) is the usual choice.
DINOV2_DEFAULT_IMAGE_SIZE = 224


class Dinov2Backbone(HFBackbone):
    model_class = "Dinov2Model"
    mean_std = (IMAGENET_MEAN, IMAGENET_STD)

    def default_image_size(self) -> int:
        return DINOV2_DEFAULT_IMAGE_SIZE

    def layers(self) -> nn.ModuleList:
        return self.tower().encoder.layer

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        return self.tower().embeddings(pixels_b3hw)  # interpolates positions itself

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        return self.tower().layernorm(tokens_btd)


class Dinov2WithRegistersBackbone(Dinov2Backbone):
    model_class = "Dinov2WithRegistersModel"
