"""timm `VisionTransformer` adapter (also SigLIP and SigLIP 2 as timm ships them: no CLS token,
attention pooling in the head).

Follows `VisionTransformer.forward_features`: patch_embed → _pos_embed (prepends CLS and
register tokens, adds positions) → patch_drop → norm_pre → blocks → norm. A model built at an
image size other than its checkpoint's gets its position embedding resampled by timm on load.
"""

from __future__ import annotations

from torch import Tensor, nn

from saev_report.backbones.base import Backbone
from saev_report.backbones.timm_family import token_model_args


class TimmViTBackbone(Backbone):
    """A `timm.models.vision_transformer.VisionTransformer`."""

    def __init__(self, model: nn.Module, *, name: str, image_size: int | None = None):
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise ValueError(f"{name}: the timm adapter supports VisionTransformer, not {type(model).__name__}")
        super().__init__(**token_model_args(model, name))
        self.model = model.eval()

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        model = self.model
        tokens_btd = model._pos_embed(model.patch_embed(pixels_b3hw))
        return model.norm_pre(model.patch_drop(tokens_btd))

    def run_blocks(self, tokens_btd: Tensor, start: int, stop: int) -> Tensor:
        for block in self.model.blocks[start:stop]:
            tokens_btd = block(tokens_btd)
        return tokens_btd

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        return self.model.norm(tokens_btd)
