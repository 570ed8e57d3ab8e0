"""timm `Eva`: the Perception Encoder (`vit_pe_core_*` — PE-Core — and `vit_pe_spatial_*` —
PE-Spatial; timm ships the architecture, and open_clip's `PE-Core-*` towers are these timm models
as a trunk), and EVA-02.

Follows `Eva.forward_features`: patch_embed → _pos_embed (prepends CLS and registers, adds the
absolute positions, and returns the rotary table of the patch grid) → norm_pre → blocks, each given
the rotary table (`rope_mixed` models give each block its own) → norm. `run_blocks` gets the rotary
table from the library's own `_pos_embed`, run on a zero patch grid, so resuming from any layer
uses exactly the forward pass's positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saev_report.backbones.base import Backbone
from saev_report.backbones.timm_family import token_model_args


class TimmEvaBackbone(Backbone):
    """A `timm.models.eva.Eva`."""

    def __init__(self, model: nn.Module, *, name: str, image_size: int | None = None):
        super().__init__(**token_model_args(model, name))
        self.model = model.eval()

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        model = self.model
        tokens_btd, _ = model._pos_embed(model.patch_embed(pixels_b3hw))
        return model.norm_pre(tokens_btd)

    def _rope(self, tokens_btd: Tensor) -> Tensor | None:
        """The rotary table `_pos_embed` returns for this grid (None without RoPE)."""
        model = self.model
        if model.rope is None:
            return None
        rows, cols = self.layout.grid
        shape = (1, rows, cols, self.d_model) if model.dynamic_img_size else (1, rows * cols, self.d_model)
        _, rope = model._pos_embed(torch.zeros(shape, device=tokens_btd.device, dtype=tokens_btd.dtype))
        return rope

    def run_blocks(self, tokens_btd: Tensor, start: int, stop: int) -> Tensor:
        rope = self._rope(tokens_btd)
        per_block = bool(getattr(self.model, "rope_mixed", False)) and rope is not None
        for index in range(start, stop):
            tokens_btd = self.model.blocks[index](tokens_btd, rope=rope[index] if per_block else rope)
        return tokens_btd

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        return self.model.norm(tokens_btd)
