"""HF `SiglipVisionModel`: SigLIP, and SigLIP 2 at a fixed resolution (the hub's
`google/siglip2-*-patch16-224` … checkpoints are `SiglipModel`s; NaFlex ones are `hf_siglip2.py`'s).
No CLS token (the head pools with attention); mean/std 0.5."""

from __future__ import annotations

from torch import Tensor

from saev_report.backbones.base import HALF_MEAN, HALF_STD
from saev_report.backbones.hf import HFBackbone


class SiglipBackbone(HFBackbone):
    model_class = "SiglipVisionModel"
    mean_std = (HALF_MEAN, HALF_STD)
    has_cls = False

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        return self.tower().embeddings(pixels_b3hw, interpolate_pos_encoding=self._interpolate)

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        return self.tower().post_layernorm(tokens_btd)
