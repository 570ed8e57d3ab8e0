"""HF `CLIPVisionModel`. `pre_layrnorm` belongs to the embedding (HF's hidden_states[0] is taken
after it) and `post_layernorm` is the final norm, applied here to every token rather than to the
pooled CLS only."""

from __future__ import annotations

from torch import Tensor

from saev_report.backbones.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from saev_report.backbones.hf import HFBackbone


class CLIPBackbone(HFBackbone):
    model_class = "CLIPVisionModel"
    mean_std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        tower = self.tower()
        return tower.pre_layrnorm(tower.embeddings(pixels_b3hw, interpolate_pos_encoding=self._interpolate))

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        return self.tower().post_layernorm(tokens_btd)
