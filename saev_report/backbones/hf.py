"""HF transformers adapters: Dinov2Model, Dinov2WithRegistersModel, CLIPVisionModel, SiglipVisionModel.

The adapter drives the library's own modules (embeddings, encoder layers, final norm), so
`capture(L)` equals `output_hidden_states=True`'s `hidden_states[L]`. CLIP's `pre_layrnorm`
belongs to the embedding (HF's hidden_states[0] is taken after it) and its `post_layernorm`
is the final norm, applied here to every token rather than to the pooled CLS only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from saev_report.backbones.base import (
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Backbone,
    ModelUnavailable,
    seeded,
)

# model_type of a hub config → (adapter kind, vision model class name)
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "dinov2": ("dinov2", "Dinov2Model"),
    "dinov2_with_registers": ("dinov2", "Dinov2WithRegistersModel"),
    "clip": ("clip", "CLIPVisionModel"),
    "clip_vision_model": ("clip", "CLIPVisionModel"),
    "siglip": ("siglip", "SiglipVisionModel"),
    "siglip_vision_model": ("siglip", "SiglipVisionModel"),
}
DEFAULT_MEAN_STD = {
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip": (HALF_MEAN, HALF_STD),
}
# DINOv2 checkpoints say 518, far too slow on a CPU; 224 (a 16×16 grid) is the usual choice.
DINOV2_DEFAULT_IMAGE_SIZE = 224


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ModelUnavailable(
            f"the `hf` model family needs the transformers library ({exc}); "
            'install it with `pip install "saev-report[hf]"`'
        ) from None
    return transformers


class HFBackbone(Backbone):
    """One of Dinov2Model / Dinov2WithRegistersModel / CLIPVisionModel / SiglipVisionModel."""

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        *,
        name: str,
        image_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        config = model.config
        native_size = int(config.image_size)
        if image_size is None:
            image_size = DINOV2_DEFAULT_IMAGE_SIZE if kind == "dinov2" else native_size
        default_mean, default_std = DEFAULT_MEAN_STD[kind]
        super().__init__(
            name=name,
            d_model=int(config.hidden_size),
            n_layers=int(config.num_hidden_layers),
            patch_size=int(config.patch_size),
            image_size=int(image_size),
            n_cls=0 if kind == "siglip" else 1,
            n_registers=int(getattr(config, "num_register_tokens", 0) or 0),
            mean=mean or default_mean,
            std=std or default_std,
        )
        self.kind = kind
        self.model = model.eval()
        self._interpolate = self.image_size != native_size
        params = inspect.signature(self._layers()[0].forward).parameters
        self._layer_kwargs = {key: None for key in ("attention_mask", "causal_attention_mask") if key in params}

    # The tower's parts, looked up rather than stored so they are not registered twice.
    def _tower(self) -> nn.Module:
        return getattr(self.model, "vision_model", self.model)  # transformers < 5 nests it

    def _layers(self) -> nn.ModuleList:
        encoder = self._tower().encoder
        return encoder.layer if self.kind == "dinov2" else encoder.layers

    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        tower = self._tower()
        if self.kind == "dinov2":
            return tower.embeddings(pixels_b3hw)  # interpolates positions itself
        tokens_btd = tower.embeddings(pixels_b3hw, interpolate_pos_encoding=self._interpolate)
        if self.kind == "clip":
            tokens_btd = tower.pre_layrnorm(tokens_btd)  # HF's hidden_states[0] is taken after it
        return tokens_btd

    def run_blocks(self, tokens_btd: Tensor, start: int, stop: int) -> Tensor:
        for layer in self._layers()[start:stop]:
            out = layer(tokens_btd, **self._layer_kwargs)
            tokens_btd = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns tuples
        return tokens_btd

    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        tower = self._tower()
        return tower.layernorm(tokens_btd) if self.kind == "dinov2" else tower.post_layernorm(tokens_btd)


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar (a full CLIP checkpoint loaded as
    CLIPVisionModel lists every text weight as unexpected); real problems are checked instead."""
    logging = import_transformers().utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def from_pretrained_checked(model_class: Any, where: Any, **kwargs: Any) -> nn.Module:
    """`model_class.from_pretrained` in float32 that fails if any of the model's weights are
    missing or mis-shaped (extra weights, such as a text tower, are fine)."""
    model, info = model_class.from_pretrained(where, dtype=torch.float32, output_loading_info=True, **kwargs)
    problems = {key: list(info.get(key) or []) for key in ("missing_keys", "mismatched_keys")}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        raise ValueError(f"{where}: checkpoint does not fit {model_class.__name__}: {problems}")
    return model


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub sees it (it reads the variable once, at import)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def missing_hub_message(repo_id: str, what: str, cause: BaseException | None = None, local_hint: str | None = None) -> str:
    """Says which hub repo is missing, where it is looked for and how to get it there."""
    folder = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    offline = " and HF_HUB_OFFLINE=1 forbids downloading it" if hub_offline() else ""
    local_hint = local_hint or "download it to a folder and set `source:` to that folder"
    lines = [
        f"{what} unavailable: hub repo {repo_id!r} is not in the local Hugging Face cache{offline}.",
        f"  Looked for: {folder}",
        f"  On a machine with network run `huggingface-cli download {repo_id}` (or `hf download {repo_id}`),",
        f"  then copy {folder.name} into {folder.parent}; or {local_hint}.",
    ]
    if cause is not None and str(cause):
        lines.append(f"  ({type(cause).__name__}: {str(cause).splitlines()[0]})")
    return "\n".join(lines)


def _read_preprocessor_config(source: str, local_dir: Path | None) -> dict[str, Any]:
    """The checkpoint's `preprocessor_config.json` if it is on disk (mean/std), else {}."""
    path: Path | None = None
    if local_dir is not None:
        path = local_dir / "preprocessor_config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "preprocessor_config.json")
            path = Path(found) if isinstance(found, str) else None
        except Exception:
            path = None
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_hf(
    source: str,
    *,
    random_init: bool = False,
    image_size: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> HFBackbone:
    """Load an HF vision tower from a hub id or a local checkpoint folder."""
    transformers = import_transformers()
    local = Path(source).expanduser()
    local_dir = local if local.is_dir() else None
    where = str(local_dir) if local_dir else source
    if local_dir is None and source.startswith(("/", "./", "../", "~")):
        raise ModelUnavailable(f"local model folder {source!r} does not exist")
    try:
        config = transformers.AutoConfig.from_pretrained(where)
    except OSError as exc:
        if local_dir is not None:
            raise ModelUnavailable(f"{local_dir} is not an HF checkpoint folder (no config.json): {exc}") from None
        raise ModelUnavailable(missing_hub_message(source, f"HF model {source!r}", exc)) from None
    if config.model_type not in MODEL_TYPES:
        raise ValueError(
            f"HF model {source!r} has model_type {config.model_type!r}; the `hf` family supports "
            f"{sorted(MODEL_TYPES)} (Dinov2Model, Dinov2WithRegistersModel, CLIPVisionModel, SiglipVisionModel)"
        )
    kind, class_name = MODEL_TYPES[config.model_type]
    model_class = getattr(transformers, class_name)
    if random_init:
        vision_config = getattr(config, "vision_config", config)  # full CLIP/SigLIP configs nest it
        with seeded(seed):
            model = model_class(vision_config)
    else:
        try:
            with quiet_transformers():
                model = from_pretrained_checked(model_class, where)
        except OSError as exc:
            raise ModelUnavailable(missing_hub_message(source, f"weights of HF model {source!r}", exc)) from None
    pre = _read_preprocessor_config(source, local_dir)
    name = f"{source} (random)" if random_init else source
    backbone = HFBackbone(
        model,
        kind,
        name=name,
        image_size=image_size,
        mean=tuple(pre["image_mean"]) if "image_mean" in pre else None,
        std=tuple(pre["image_std"]) if "image_std" in pre else None,
    )
    return backbone.to(device).eval().requires_grad_(False)
