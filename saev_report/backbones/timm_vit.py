"""timm VisionTransformer adapter.

Follows `VisionTransformer.forward_features`: patch_embed → _pos_embed (prepends CLS and
register tokens, adds positions) → patch_drop → norm_pre → blocks → norm. A model built at an
image size other than its checkpoint's gets its position embedding resampled by timm on load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from saev_report.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, ModelUnavailable, seeded
from saev_report.backbones.hf import hub_offline, missing_hub_message


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ModelUnavailable(
            f'the `timm` model family needs the timm library ({exc}); install it with `pip install "saev-report[timm]"`'
        ) from None
    return timm


class TimmViTBackbone(Backbone):
    """A `timm.models.vision_transformer.VisionTransformer`."""

    def __init__(self, model: nn.Module, *, name: str):
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise ValueError(f"{name}: the timm adapter supports VisionTransformer, not {type(model).__name__}")
        grid = tuple(model.patch_embed.grid_size)
        if grid[0] != grid[1]:
            raise ValueError(f"{name}: only square inputs are supported (grid {grid})")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        patch = model.patch_embed.patch_size
        super().__init__(
            name=name,
            d_model=int(model.embed_dim),
            n_layers=len(model.blocks),
            patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
            image_size=int(model.patch_embed.img_size[0]),
            n_cls=0 if model.cls_token is None else 1,
            n_registers=int(getattr(model, "num_reg_tokens", 0)),
            mean=cfg.get("mean", IMAGENET_MEAN),
            std=cfg.get("std", IMAGENET_STD),
        )
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


def _url_weights_cached(url: str) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()



def _weights_repo(timm: Any, model_name: str, source: str) -> str:
    """The hub repo timm will fetch `model_name`'s weights from (for messages); raises at once
    when there are no weights or when they would come from a URL while offline."""
    if model_name.startswith(("local-dir:", "hf-hub:")):
        return source.removeprefix("hf-hub:")
    if not timm.is_model(model_name.split(".")[0]):
        raise ValueError(f"unknown timm model {source!r}")
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ModelUnavailable(f"timm has no pretrained weights for {source!r}; use `random_init: true` or a local folder")
    if not cfg.hf_hub_id and cfg.url and hub_offline() and not _url_weights_cached(cfg.url):
        raise ModelUnavailable(
            f"timm weights for {source!r} are not cached and HF_HUB_OFFLINE=1: download {cfg.url} "
            f"into {Path(torch.hub.get_dir()) / 'checkpoints'} on a machine with network"
        )
    return cfg.hf_hub_id or source


def load_timm(
    source: str,
    *,
    random_init: bool = False,
    image_size: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> TimmViTBackbone:
    """`source`: a timm model name (`vit_base_patch16_224[.tag]`), `hf-hub:org/repo`, or a local
    folder saved by timm (`config.json` + weights)."""
    timm = _import_timm()
    local = Path(source).expanduser()
    if local.is_dir():
        model_name = f"local-dir:{local}"
    elif source.startswith(("/", "./", "../", "~")):
        raise ModelUnavailable(f"local timm model folder {source!r} does not exist")
    else:
        model_name = source
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size is not None:
        kwargs["img_size"] = image_size  # timm resamples the position embedding on load
    if random_init:
        try:
            with seeded(seed):
                model = timm.create_model(model_name, pretrained=False, **kwargs)
        except OSError as exc:  # an `hf-hub:` config that is not cached
            repo = source.removeprefix("hf-hub:")
            raise ModelUnavailable(missing_hub_message(repo, f"timm model config {source!r}", exc)) from None
    else:
        repo = _weights_repo(timm, model_name, source)
        try:
            model = timm.create_model(model_name, pretrained=True, **kwargs)
        except OSError as exc:  # huggingface_hub's LocalEntryNotFoundError is one
            hint = "save the model with timm into a folder and set `source:` to that folder"
            raise ModelUnavailable(missing_hub_message(repo, f"timm weights for {source!r}", exc, hint)) from None
    name = f"{source} (random)" if random_init else source
    return TimmViTBackbone(model, name=name).to(device).eval().requires_grad_(False)
