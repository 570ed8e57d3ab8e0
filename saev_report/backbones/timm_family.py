"""The `timm` family: one loader, and one adapter file per timm model class (`TIMM_ADAPTERS`).

`timm_vit.py` (VisionTransformer), `timm_eva.py` (Eva: Perception Encoder PE-Core and
PE-Spatial), `timm_convnext.py` (ConvNeXt). Preprocessing follows timm's own transform
(`timm.data.create_transform` of the model's `pretrained_cfg`): PIL resize with the config's
interpolation, its mean and std; the geometry is the project's (`base.Preprocessing`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saev_report.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, ModelUnavailable, seeded
from saev_report.backbones.hf import hub_offline, import_object, missing_hub_message

TIMM_ADAPTERS: dict[str, str] = {
    "VisionTransformer": "saev_report.backbones.timm_vit:TimmViTBackbone",
    "Eva": "saev_report.backbones.timm_eva:TimmEvaBackbone",
    "ConvNeXt": "saev_report.backbones.timm_convnext:TimmConvNeXtBackbone",
}
"""timm model class name → `module:class` of its adapter (imported only when used)."""


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ModelUnavailable(
            f'the `timm` model family needs the timm library ({exc}); install it with `pip install "saev-report[timm]"`'
        ) from None
    return timm


def timm_preprocessing(model: nn.Module) -> dict[str, Any]:
    """Backbone keyword arguments for timm's own photometry: mean, std, interpolation, PIL resize."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    interpolation = cfg.get("interpolation", "bicubic")
    return dict(
        mean=cfg.get("mean", IMAGENET_MEAN),
        std=cfg.get("std", IMAGENET_STD),
        interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic",
        resize_on="pil",
    )


def token_model_args(model: nn.Module, name: str) -> dict[str, Any]:
    """`Backbone` constructor arguments of a timm token model (ViT, Eva): width, depth, patch, input
    size, CLS and register tokens, and the model's own preprocessing."""
    patch = model.patch_embed.patch_size
    return dict(
        name=name,
        d_model=int(model.embed_dim),
        n_layers=len(model.blocks),
        patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        image_size=square_image_size(model, name),
        n_cls=0 if model.cls_token is None else 1,
        n_registers=int(getattr(model, "num_reg_tokens", 0) or 0),
        **timm_preprocessing(model),
    )


def square_image_size(model: nn.Module, name: str) -> int:
    """The model's input side (its `patch_embed.img_size`); the project's geometry is square."""
    height, width = model.patch_embed.img_size
    if height != width:
        raise ValueError(f"{name}: only square inputs are supported ({height}×{width})")
    return int(height)


def timm_backbone(model: nn.Module, *, name: str, image_size: int | None = None) -> Backbone:
    """`model` behind the adapter of its class (or of the nearest registered base class).
    `image_size` matters only to models not built at a size (CNNs); others know theirs."""
    for cls in type(model).__mro__:
        if cls.__name__ in TIMM_ADAPTERS:
            return import_object(TIMM_ADAPTERS[cls.__name__])(model, name=name, image_size=image_size)
    raise ValueError(f"{name}: the timm family supports {sorted(TIMM_ADAPTERS)}, not {type(model).__name__}")


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
    cache_dir: Path | None = None,
) -> Backbone:
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
    if random_init:
        try:
            with seeded(seed):
                model = _create_model(timm, model_name, False, image_size)
        except OSError as exc:  # an `hf-hub:` config that is not cached
            repo = source.removeprefix("hf-hub:")
            raise ModelUnavailable(missing_hub_message(repo, f"timm model config {source!r}", exc)) from None
    else:
        repo = _weights_repo(timm, model_name, source)
        try:
            model = _create_model(timm, model_name, True, image_size)
        except OSError as exc:  # huggingface_hub's LocalEntryNotFoundError is one
            hint = "save the model with timm into a folder and set `source:` to that folder"
            raise ModelUnavailable(missing_hub_message(repo, f"timm weights for {source!r}", exc, hint)) from None
    name = f"{source} (random)" if random_init else source
    return timm_backbone(model, name=name, image_size=image_size).to(device).eval().requires_grad_(False)


def _create_model(timm: Any, model_name: str, pretrained: bool, image_size: int | None) -> nn.Module:
    """`timm.create_model` without a classifier, built at `image_size` where the model takes one
    (timm resamples a ViT's position embedding on load); a CNN takes none and runs at any size."""
    if image_size is not None:
        try:
            return timm.create_model(model_name, pretrained=pretrained, num_classes=0, img_size=image_size)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return timm.create_model(model_name, pretrained=pretrained, num_classes=0)
