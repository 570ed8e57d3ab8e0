"""HF transformers vision towers: the shared loader and base class; one file per model type.

Each adapter (`hf_dinov2.py`, `hf_clip.py`, `hf_siglip.py`, `hf_siglip2.py`, `hf_dinov3.py`) subclasses
`HFBackbone` and drives the library's own modules (embeddings, encoder layers, final norm), so
`capture(L)` equals `output_hidden_states=True`'s `hidden_states[L]`. `HF_ADAPTERS` maps a hub
config's `model_type` to its adapter; `load_hf` reads the config and picks it from there.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from saev_report.backbones.base import Backbone, Interpolation, ModelUnavailable, ResizeOn, seeded

HF_ADAPTERS: dict[str, str] = {
    "dinov2": "saev_report.backbones.hf_dinov2:Dinov2Backbone",
    "dinov2_with_registers": "saev_report.backbones.hf_dinov2:Dinov2WithRegistersBackbone",
    "clip": "saev_report.backbones.hf_clip:CLIPBackbone",
    "clip_vision_model": "saev_report.backbones.hf_clip:CLIPBackbone",
    "siglip": "saev_report.backbones.hf_siglip:SiglipBackbone",
    "siglip_vision_model": "saev_report.backbones.hf_siglip:SiglipBackbone",
    "siglip2": "saev_report.backbones.hf_siglip2:Siglip2Backbone",
    "siglip2_vision_model": "saev_report.backbones.hf_siglip2:Siglip2Backbone",
    "dinov3_vit": "saev_report.backbones.hf_dinov3:DINOv3Backbone",
}
"""Hub config `model_type` → `module:class` of its adapter (imported only when used)."""

# PIL resampling ids in a preprocessor_config.json → interpolation
PIL_RESAMPLE: dict[int, Interpolation] = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ModelUnavailable(
            f"the `hf` model family needs the transformers library ({exc}); "
            'install it with `pip install "saev-report[hf]"`'
        ) from None
    return transformers


def import_object(path: str) -> Any:
    """`package.module:Name` → the object."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def adapter_class(model_type: str) -> type["HFBackbone"]:
    if model_type not in HF_ADAPTERS:
        raise ValueError(f"the `hf` family supports model types {sorted(HF_ADAPTERS)}, not {model_type!r}")
    return import_object(HF_ADAPTERS[model_type])


class HFBackbone(Backbone):
    """A transformers vision tower; subclasses say which modules are its parts."""

    model_class: ClassVar[str]
    """Name of the transformers class that holds the vision tower alone."""
    mean_std: ClassVar[tuple[tuple[float, float, float], tuple[float, float, float]]]
    """The library processor's defaults, used when the checkpoint has no preprocessor_config.json."""
    interpolation: ClassVar[Interpolation] = "bicubic"
    resize_on: ClassVar[ResizeOn] = "uint8"
    has_cls: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        image_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        interpolation: Interpolation | None = None,
    ):
        config = model.config
        self.native_size = self.native_image_size(config)
        default_mean, default_std = self.mean_std
        super().__init__(
            name=name,
            d_model=int(config.hidden_size),
            n_layers=int(config.num_hidden_layers),
            patch_size=int(config.patch_size),
            image_size=int(image_size or self.default_image_size()),
            n_cls=int(self.has_cls),
            n_registers=int(getattr(config, "num_register_tokens", 0) or 0),
            mean=mean or default_mean,
            std=std or default_std,
            interpolation=interpolation or self.interpolation,
            resize_on=self.resize_on,
        )
        self.model = model.eval()
        self._interpolate = self.image_size != self.native_size
        params = inspect.signature(self.layers()[0].forward).parameters
        self._layer_kwargs = {key: None for key in ("attention_mask", "causal_attention_mask") if key in params}

    @classmethod
    def native_image_size(cls, config: Any) -> int:
        """The input side the checkpoint was built for."""
        return int(config.image_size)

    def default_image_size(self) -> int:
        return self.native_size

    # The tower's parts, looked up rather than stored so they are not registered twice.
    def tower(self) -> nn.Module:
        return getattr(self.model, "vision_model", self.model)  # transformers < 5 nests it

    def layers(self) -> nn.ModuleList:
        return self.tower().encoder.layers

    def block_kwargs(self, tokens_btd: Tensor) -> dict[str, Any]:
        """Keyword arguments every encoder layer takes besides the tokens."""
        return self._layer_kwargs

    def run_blocks(self, tokens_btd: Tensor, start: int, stop: int) -> Tensor:
        kwargs = self.block_kwargs(tokens_btd)
        for layer in self.layers()[start:stop]:
            out = layer(tokens_btd, **kwargs)
            tokens_btd = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns tuples
        return tokens_btd


def hf_backbone(model: nn.Module, **kwargs: Any) -> HFBackbone:
    """`model` (a transformers vision tower) behind the adapter its `config.model_type` names."""
    return adapter_class(model.config.model_type)(model, **kwargs)


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
    cache_dir: Path | None = None,
) -> HFBackbone:
    """Load an HF vision tower from a hub id or a local checkpoint folder (`cache_dir` is unused:
    weights come from the hub cache or the folder)."""
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
    if config.model_type not in HF_ADAPTERS:
        raise ValueError(f"HF model {source!r} has model_type {config.model_type!r}; the `hf` family supports {sorted(HF_ADAPTERS)}")
    adapter = adapter_class(config.model_type)
    model_class = getattr(transformers, adapter.model_class, None)
    if model_class is None:
        raise ModelUnavailable(
            f"HF model {source!r} needs transformers' {adapter.model_class}, which transformers "
            f"{transformers.__version__} lacks; upgrade it with `pip install -U transformers`"
        )
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
    backbone = adapter(
        model,
        name=name,
        image_size=image_size,
        mean=tuple(pre["image_mean"]) if "image_mean" in pre else None,
        std=tuple(pre["image_std"]) if "image_std" in pre else None,
        interpolation=PIL_RESAMPLE.get(pre.get("resample", -1)),
    )
    return backbone.to(device).eval().requires_grad_(False)
