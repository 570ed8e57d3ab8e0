"""open_clip adapters: its own VisionTransformer (the paper's CLIP path) and towers whose trunk is
a timm model (`PE-Core-*`: timm's Eva; `ViT-*-SigLIP2*`: timm's VisionTransformer), which use the
timm family's adapter for the trunk with open_clip's preprocessing (its mean, std, interpolation).

Follows `VisionTransformer._embeds` and `forward`: conv1 → CLS + position embedding →
patch_dropout → ln_pre → transformer.resblocks → ln_post. open_clip ≥ 2.24 runs the blocks
batch-first (`transformer.batch_first`, default True); older builds run them sequence-first,
which `run_blocks` handles by transposing around the blocks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from saev_report.backbones.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Backbone, ModelUnavailable, seeded
from saev_report.backbones.hf import hub_offline, missing_hub_message


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise ModelUnavailable(
            f"the `open_clip` model family needs open_clip_torch ({exc}); "
            'install it with `pip install "saev-report[open_clip]"`'
        ) from None
    return open_clip


class OpenClipViTBackbone(Backbone):
    """The image tower (`model.visual`) of an open_clip CLIP model."""

    def __init__(self, visual: nn.Module, *, name: str, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"{name}: the open_clip adapter supports open_clip's VisionTransformer, not {type(visual).__name__} "
                "(timm-trunk towers: use the `timm` family)"
            )
        image_h, image_w = visual.image_size
        patch_h, _ = visual.patch_size
        if image_h != image_w:
            raise ValueError(f"{name}: only square inputs are supported ({image_h}×{image_w})")
        super().__init__(
            name=name,
            d_model=int(visual.conv1.out_channels),
            n_layers=len(visual.transformer.resblocks),
            patch_size=int(patch_h),
            image_size=int(image_h),
            n_cls=1,
            n_registers=0,
            mean=mean,
            std=std,
        )
        self.visual = visual.eval()
        self.set_photometry(self.mean, self.std, "bicubic", "pil")  # open_clip's transform resizes the PIL image
        self._batch_first = bool(getattr(visual.transformer, "batch_first", True))

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        visual = self.visual
        x_bdhw = visual.conv1(pixels_b3hw)
        patches_btd = x_bdhw.flatten(2).transpose(1, 2)
        cls_b1d = visual.class_embedding.to(patches_btd.dtype).expand(patches_btd.shape[0], 1, -1)
        tokens_btd = torch.cat([cls_b1d, patches_btd], dim=1) + visual.positional_embedding.to(patches_btd.dtype)
        return visual.ln_pre(visual.patch_dropout(tokens_btd))

    def run_blocks(self, tokens_btd: Tensor, start: int, stop: int) -> Tensor:
        x = tokens_btd if self._batch_first else tokens_btd.transpose(0, 1)
        for block in self.visual.transformer.resblocks[start:stop]:
            x = block(x)
        return x if self._batch_first else x.transpose(0, 1)

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        return self.visual.ln_post(tokens_btd)


def parse_source(source: str) -> tuple[str, str | None]:
    """`ARCH/PRETRAINED` → (arch, pretrained); PRETRAINED is a tag (`openai`) or a file path
    (`ViT-B-16//data/clip.pt`); `hf-hub:org/repo` passes through whole."""
    if source.startswith("hf-hub:"):
        return source, None
    arch, sep, pretrained = source.partition("/")
    return arch, (pretrained if sep and pretrained else None)



def load_open_clip(
    source: str,
    *,
    random_init: bool = False,
    image_size: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
) -> Backbone:
    open_clip = _import_open_clip()
    local = Path(source).expanduser()
    if local.is_dir():
        return _load_local_dir(open_clip, local, random_init=random_init, image_size=image_size, seed=seed, device=device)
    arch, pretrained = parse_source(source)
    if not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} in {source!r} (format: ARCH/PRETRAINED, e.g. ViT-B-16/openai)")
    if not random_init and pretrained is None and not arch.startswith("hf-hub:"):
        raise ValueError(f"open_clip source {source!r} names no weights: use ARCH/PRETRAINED (ViT-B-16/openai) or `random_init: true`")
    tag_cfg: dict[str, Any] = {}
    is_file = pretrained is not None and Path(pretrained).expanduser().is_file()
    if pretrained is not None and not is_file:
        if pretrained.startswith(("/", "./", "../", "~")):
            raise ModelUnavailable(f"open_clip weights file {pretrained!r} does not exist")
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
        if not tag_cfg:
            tags = [tag for name, tag in open_clip.list_pretrained() if name == arch]
            raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {arch} (known: {', '.join(tags) or 'none'})")
    kwargs: dict[str, Any] = {"force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
    if image_size is not None:
        kwargs["force_image_size"] = image_size
    if random_init:
        with seeded(seed):
            model = open_clip.create_model(arch, pretrained=None, **kwargs)
    else:
        url = str(tag_cfg.get("url") or "")
        url_cached = bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()
        if tag_cfg and not tag_cfg.get("hf_hub") and hub_offline() and not url_cached:
            raise ModelUnavailable(
                f"open_clip weights for {source!r} come from {url} and HF_HUB_OFFLINE=1: download that file on a "
                f"machine with network and set `source: {arch}//path/to/{os.path.basename(url) or 'weights.pt'}`"
            )
        weights = str(Path(pretrained).expanduser()) if is_file and pretrained else pretrained
        try:
            model = open_clip.create_model(arch, pretrained=weights, **kwargs)
        except (OSError, RuntimeError) as exc:
            # open_clip wraps failed downloads in RuntimeError("Failed to download ..."); other
            # RuntimeErrors (a checkpoint that does not fit) are real errors.
            if isinstance(exc, RuntimeError) and "download" not in str(exc).lower():
                raise
            repo = "/".join(str(tag_cfg.get("hf_hub") or arch.removeprefix("hf-hub:")).split("/")[:2])
            hint = f"download the weights file and set `source: {arch}//path/to/the/file`"
            raise ModelUnavailable(missing_hub_message(repo, f"open_clip weights for {source!r}", exc, hint)) from None
    return _backbone(open_clip, model, f"{source} (random)" if random_init else source, device)


def _backbone(open_clip: Any, model: nn.Module, name: str, device: torch.device | str) -> Backbone:
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
    backbone = open_clip_backbone(model.visual, name=name, preprocess_cfg=preprocess_cfg)
    return backbone.to(device).eval().requires_grad_(False)


def open_clip_backbone(visual: nn.Module, *, name: str, preprocess_cfg: dict[str, Any]) -> Backbone:
    """An open_clip image tower behind its adapter: open_clip's own ViT, or a timm trunk."""
    mean = tuple(preprocess_cfg.get("mean", OPENAI_CLIP_MEAN))
    std = tuple(preprocess_cfg.get("std", OPENAI_CLIP_STD))
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return OpenClipViTBackbone(visual, name=name, mean=mean, std=std)
    from saev_report.backbones.timm_family import timm_backbone

    backbone = timm_backbone(trunk, name=name)
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    backbone.set_photometry(mean, std, interpolation if interpolation in ("bicubic", "bilinear") else "bicubic", "pil")
    return backbone


def _load_local_dir(open_clip: Any, folder: Path, *, random_init: bool, image_size: int | None, seed: int,
                    device: torch.device | str) -> Backbone:
    """A checkpoint folder in open_clip's own format (`open_clip_config.json` beside the weights, as
    `hf-hub:` repos hold them), loaded through open_clip's `local-dir:` schema."""
    if not (folder / "open_clip_config.json").is_file():
        raise ModelUnavailable(f"{folder} is not an open_clip checkpoint folder: open_clip_config.json is missing "
                               "(or use `source: ARCH//path/to/weights.pt` for a bare weights file)")
    kwargs: dict[str, Any] = {} if image_size is None else {"force_image_size": image_size}
    with seeded(seed):
        model = open_clip.create_model(f"local-dir:{folder}", pretrained=None, load_weights=not random_init, **kwargs)
    return _backbone(open_clip, model, f"{folder} (random)" if random_init else str(folder), device)
