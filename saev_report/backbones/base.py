"""The `Backbone` interface every model family implements, its token layout and its preprocessing.

An adapter implements three primitives — `embed`, `run_blocks`, `final_norm` — and says how its
library preprocesses images (`Preprocessing`); the base class derives the rest: capturing the
residual stream at any layers, resuming the forward pass from a layer with replaced activations
(for heads and edits), and the plain final forward. Layer L means HF's `hidden_states[L]`: 0 is
the embeddings, L ≥ 1 the output of block L (of stage L for a CNN).

A ViT's stream has one layout and one width at every layer. A CNN's has its own per stage
(`layer_layout`, `layer_width`): the stage's feature map, flattened row-major, is the patch grid.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2 as T

from saev_report.errors import InputUnavailable
from saev_report.spec import TOKEN_KINDS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)



class ModelUnavailable(InputUnavailable):
    """A model cannot be loaded here: a library or its weights are missing. The message says
    what is missing and where to put it."""


@dataclass(frozen=True)
class TokenLayout:
    """Where each kind of token sits in a `[batch, tokens, d]` residual stream."""

    n_cls: int
    """0 or 1; the CLS token comes first."""
    n_registers: int
    """Register tokens, right after CLS."""
    grid: tuple[int, int]
    """Patch grid (rows, cols); patches follow the registers, row-major."""

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_prefix(self) -> int:
        return self.n_cls + self.n_registers

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    @property
    def patch_slice(self) -> slice:
        return slice(self.n_prefix, self.n_tokens)

    @property
    def cls_index(self) -> int | None:
        return 0 if self.n_cls else None

    def indices(self, kinds: Sequence[str]) -> list[int]:
        """Token indices of the given kinds ("cls", "registers", "patches"), in layout order."""
        unknown = set(kinds) - set(TOKEN_KINDS)
        if unknown:
            raise ValueError(f"unknown token kinds {sorted(unknown)}; use {TOKEN_KINDS}")
        spans = {
            "cls": range(0, self.n_cls),
            "registers": range(self.n_cls, self.n_prefix),
            "patches": range(self.n_prefix, self.n_tokens),
        }
        return [i for kind in TOKEN_KINDS if kind in kinds for i in spans[kind]]


def resize_size(image_size: int) -> int:
    """Shorter side before the centre crop: image_size·8/7 (256 for 224), as in the paper."""
    return round(image_size * 8 / 7)


Interpolation = Literal["bicubic", "bilinear", "nearest"]
ResizeOn = Literal["uint8", "float", "pil"]
INTERPOLATIONS: dict[str, T.InterpolationMode] = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """How a PIL image becomes a model input: the project's geometry (resize the shorter side to
    image_size·8/7, centre-crop image_size — masks, heat-maps and thumbnails are aligned by it),
    with the model library's own photometry: mean/std, interpolation, and where the resize
    happens, which changes the pixels by a few levels."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bicubic"
    resize_on: ResizeOn = "uint8"
    """`uint8`: a uint8 tensor, antialiased (transformers' image processors, this project's
    default); `float`: a [0, 1] float tensor, after rescaling (transformers' DINOv3 processor);
    `pil`: the PIL image (timm's and open_clip's transforms)."""

    def transform(self) -> T.Compose:
        """PIL image → normalised [3, image_size, image_size] float32 tensor."""
        resize = T.Resize(resize_size(self.image_size), interpolation=INTERPOLATIONS[self.interpolation], antialias=True)
        crop = T.CenterCrop(self.image_size)
        to_float = T.ToDtype(torch.float32, scale=True)
        steps = {
            "uint8": [T.ToImage(), resize, crop, to_float],
            "float": [T.ToImage(), to_float, resize, crop],
            "pil": [resize, crop, T.ToImage(), to_float],
        }[self.resize_on]
        return T.Compose([*steps, T.Normalize(mean=list(self.mean), std=list(self.std))])


def make_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL image → normalised [3, image_size, image_size] float tensor (bicubic, on uint8)."""
    return Preprocessing(image_size, tuple(mean), tuple(std)).transform()  # type: ignore[arg-type]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block only, so a random twin is reproducible
    without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Backbone(nn.Module, ABC):
    """A vision model seen as: embed → blocks (or stages) → final norm, on a known token layout.

    `layout` and `d_model` describe the final tokens (what heads read); `layer_layout(L)` and
    `layer_width(L)` the residual stream at layer L, the same for every layer of a ViT."""

    name: str
    d_model: int
    n_layers: int
    patch_size: int
    image_size: int
    layout: TokenLayout
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(
        self,
        *,
        name: str,
        d_model: int,
        n_layers: int,
        patch_size: int,
        image_size: int,
        n_cls: int,
        n_registers: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: Interpolation = "bicubic",
        resize_on: ResizeOn = "uint8",
        grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.name = name
        self.d_model = d_model
        self.n_layers = n_layers
        self.patch_size = patch_size
        self.image_size = image_size
        side = image_size // patch_size
        self.layout = TokenLayout(n_cls=n_cls, n_registers=n_registers, grid=grid or (side, side))
        self.mean = tuple(float(m) for m in mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in std)  # type: ignore[assignment]
        self.preprocessing = Preprocessing(image_size, self.mean, self.std, interpolation, resize_on)  # type: ignore[arg-type]
        self._transform = self.preprocessing.transform()

    # ------------------------------------------------------------------ primitives

    def preprocess(self, image: Image.Image) -> Tensor:
        """[3, H, W]: resize shorter side to image_size·8/7, centre crop, normalise (`preprocessing`)."""
        return self._transform(image.convert("RGB"))

    def set_photometry(self, mean: Sequence[float], std: Sequence[float], interpolation: Interpolation, resize_on: ResizeOn) -> None:
        """Replace mean, std, interpolation and resize stage (a tower wrapped by another library
        preprocesses as that library does)."""
        self.mean = tuple(float(m) for m in mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in std)  # type: ignore[assignment]
        self.preprocessing = Preprocessing(self.image_size, self.mean, self.std, interpolation, resize_on)  # type: ignore[arg-type]
        self._transform = self.preprocessing.transform()

    def layer_layout(self, layer: int) -> TokenLayout:
        """Token layout of hidden_states[layer]; a ViT's is `layout` at every layer."""
        self._check_layer(layer)
        return self.layout

    def layer_width(self, layer: int) -> int:
        """Width of hidden_states[layer]; a ViT's is `d_model` at every layer."""
        self._check_layer(layer)
        return self.d_model

    @abstractmethod
    def embed(self, pixels_b3hw: Tensor) -> Tensor:
        """tokens_btd == hidden_states[0]."""

    @abstractmethod
    def run_blocks(self, tokens_btd: Tensor, start: int, stop: int) -> Tensor:
        """hidden_states[start] → hidden_states[stop] (blocks start+1 … stop)."""

    @abstractmethod
    def final_norm(self, tokens_btd: Tensor) -> Tensor:
        """The model's final layer norm, applied to every token."""

    # ------------------------------------------------------------------ derived

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer {layer} is out of range for {self.name}: 0..{self.n_layers}")

    def capture(self, pixels_b3hw: Tensor, layers: Sequence[int], final: bool = False) -> dict[int | str, Tensor]:
        """{layer: hidden_states[layer]}, plus {"final": final_norm(hidden_states[n_layers])}
        with `final=True`. Runs only as many blocks as needed."""
        for layer in layers:
            self._check_layer(layer)
        wanted = set(layers)
        out: dict[int | str, Tensor] = {}
        tokens_btd = self.embed(pixels_b3hw)
        done = 0
        for layer in sorted(wanted | ({self.n_layers} if final else set())):
            tokens_btd = self.run_blocks(tokens_btd, done, layer)
            done = layer
            if layer in wanted:
                out[layer] = tokens_btd
        if final:
            out["final"] = self.final_norm(tokens_btd)
        return out

    def resume(self, acts_btd: Tensor, layer: int) -> Tensor:
        """final_norm(run_blocks(acts, layer, n_layers)): the forward pass from layer L on."""
        self._check_layer(layer)
        return self.final_norm(self.run_blocks(acts_btd, layer, self.n_layers))

    def forward_final(self, pixels_b3hw: Tensor) -> Tensor:
        """Final-norm tokens of a full forward pass."""
        return self.final_norm(self.run_blocks(self.embed(pixels_b3hw), 0, self.n_layers))

    def forward(self, pixels_b3hw: Tensor) -> Tensor:
        return self.forward_final(pixels_b3hw)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, d_model={self.d_model}, n_layers={self.n_layers}, layout={self.layout}"
