"""timm `ConvNeXt`: a CNN, whose stages are the layers.

Layer 0 is the stem's output and layer L the output of stage L (4 stages: strides 4, 8, 16, 32).
A stage's feature map `[batch, C, h, w]` is its patch grid: flattened row-major it is the token
stream `[batch, h·w, C]` — no CLS, no registers, possibly not square, its own width C per stage
(`layer_layout`, `layer_width`). `layout` and `d_model` are the last stage's, which the final norm
(`norm_pre`, the identity unless the head norms first) sees and heads read: a classification
head on a model without CLS averages the patches, as timm's own head pools before its norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saev_report.backbones.base import Backbone, TokenLayout
from saev_report.backbones.timm_family import timm_preprocessing

DEFAULT_IMAGE_SIZE = 224


def to_tokens(x_bchw: Tensor) -> Tensor:
    return x_bchw.flatten(2).transpose(1, 2)


def to_map(tokens_btc: Tensor, grid: tuple[int, int]) -> Tensor:
    return tokens_btc.transpose(1, 2).reshape(tokens_btc.shape[0], tokens_btc.shape[2], *grid)


class TimmConvNeXtBackbone(Backbone):
    """A `timm.models.convnext.ConvNeXt`."""

    def __init__(self, model: nn.Module, *, name: str, image_size: int | None = None):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = int(image_size or cfg.get("input_size", (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))[-1])
        # Each stage's grid and width, from one forward pass of a blank image (exact whatever the padding).
        with torch.no_grad():
            x_bchw = model.stem(torch.zeros(1, 3, size, size))
            shapes = [tuple(x_bchw.shape[1:])]
            for stage in model.stages:
                x_bchw = stage(x_bchw)
                shapes.append(tuple(x_bchw.shape[1:]))
        self._layouts = [TokenLayout(n_cls=0, n_registers=0, grid=(int(h), int(w))) for _, h, w in shapes]
        self._widths = [int(c) for c, _, _ in shapes]
        final = self._layouts[-1]
        super().__init__(
            name=name,
            d_model=self._widths[-1],
            n_layers=len(model.stages),
            patch_size=size // final.grid[0],
            image_size=size,
            n_cls=0,
            n_registers=0,
            grid=final.grid,
            **timm_preprocessing(model),
        )
        self.model = model.eval()

    def layer_layout(self, layer: int) -> TokenLayout:
        self._check_layer(layer)
        return self._layouts[layer]

    def layer_width(self, layer: int) -> int:
        self._check_layer(layer)
        return self._widths[layer]

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        return to_tokens(self.model.stem(pixels_b3hw))

    def run_blocks(self, tokens_btd: Tensor, start: int, stop: int) -> Tensor:
        if start == stop:
            return tokens_btd
        x_bchw = to_map(tokens_btd, self._layouts[start].grid)
        for stage in self.model.stages[start:stop]:
            x_bchw = stage(x_bchw)
        return to_tokens(x_bchw)

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        return to_tokens(self.model.norm_pre(to_map(tokens_btd, self.layout.grid)))
