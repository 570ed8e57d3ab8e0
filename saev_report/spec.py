"""The YAML spec: every declarative input of a saev-report build.

Every type here is a pydantic model whose attribute docstrings are the field
documentation: they become the spec reference, docs/reference/spec.md (`saev-report schema
--markdown`; `python -m saev_report.docs` writes it) and the JSON schema editors use (`saev-report schema`).

`load_spec(path)` parses YAML, validates it and checks cross references
(a head naming an undeclared model, say). Every problem is reported as a
`SpecIssue` carrying file, line, column and the dotted field path, so the CLI
can print `spec.yaml:12:5: models.dino.layers.0: ...` and exit 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from saev_report.overrides import Override, OverrideError, apply_overrides, flag_for, parse_override

# --------------------------------------------------------------------------- base


class SpecModel(BaseModel):
    """Strict base: unknown fields are errors, docstrings document fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
Dtype = Literal["float32", "float16", "bfloat16"]

# --------------------------------------------------------------------------- run


class RunSpec(SpecModel):
    """Where and how a build runs."""

    name: Name
    """Run name; outputs go to `<out_dir>/<name>/`."""
    out_dir: Path = Path("runs")
    """Directory holding runs, relative to the current directory."""
    seed: int = 0
    """Global seed for data order, initialisation and sampling."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Torch device; `auto` picks CUDA, then MPS, then CPU."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for torch; default: all cores."""


# --------------------------------------------------------------------------- datasets


class _DatasetBase(SpecModel):
    max_images: int | None = Field(default=None, gt=0)
    """Use at most this many images (a deterministic subset); default all."""


class DemoDataset(_DatasetBase):
    """The offline demo set: real photo cut-outs (Debian tuxpaint-stamps) composited
    onto real background photos, with class labels and exact segmentation masks.
    Built once under the shared cache (`$SAEV_REPORT_CACHE`, default `~/.cache/saev-report`) and
    reused; never committed (the stamps are GPL-2)."""

    kind: Literal["demo"]
    """Dataset kind: `demo`."""
    n_images: int = Field(default=600, gt=0)
    """Number of composite images to generate."""
    categories: list[str] | None = None
    """Stamp categories used as classes (e.g. `animals/birds`); default: a fixed set of 8."""
    size: int = Field(default=256, ge=32)
    """Side of the square composite images in pixels."""
    split: Literal["train", "val", "all"] = "all"
    """Deterministic split of the generated set (80 % train / 20 % val)."""
    seed: int = 0
    """Seed of the composition (object placement, scale, background)."""


class ImageFolderDataset(_DatasetBase):
    """Images under `root`; with `labels: folder` each sub-folder is a class (ImageNet layout)."""

    kind: Literal["image_folder"]
    """Dataset kind: `image_folder`."""
    root: Path
    """Folder of images (searched recursively)."""
    labels: Literal["folder", "none"] = "folder"
    """Take the class from the first-level sub-folder name, or use no labels."""
    n_images: int | None = Field(default=None, gt=0)
    """Known image count, used by `plan` before the folder is available."""


class SegFolderDataset(_DatasetBase):
    """Images with same-stem single-channel PNG masks whose pixel values are class ids."""

    kind: Literal["seg_folder"]
    """Dataset kind: `seg_folder`."""
    images: Path
    """Folder of images."""
    masks: Path
    """Folder of masks; `masks/<stem>.png` belongs to `images/<stem>.*`."""
    classes: list[str] | None = None
    """Class names by id; default `class_<id>`."""
    ignore_index: int = 255
    """Mask value that is not a class (unlabelled pixels)."""


class Cub200Dataset(_DatasetBase):
    """CUB-200-2011 in its released layout (`images.txt`, `train_test_split.txt`, `images/`)."""

    kind: Literal["cub200"]
    """Dataset kind: `cub200`."""
    root: Path
    """The `CUB_200_2011` folder."""
    split: Literal["train", "test"] = "train"
    """Official split."""


class Ade20kDataset(_DatasetBase):
    """ADE20K SceneParsing (ADEChallengeData2016): 150 classes, 0 = unlabelled."""

    kind: Literal["ade20k"]
    """Dataset kind: `ade20k`."""
    root: Path
    """The `ADEChallengeData2016` folder."""
    split: Literal["training", "validation"] = "training"
    """Official split."""


DatasetSpec = Annotated[
    Union[DemoDataset, ImageFolderDataset, SegFolderDataset, Cub200Dataset, Ade20kDataset],
    Field(discriminator="kind"),
]

# Sizes of well-known datasets, for `plan` estimates before data is present.
KNOWN_DATASET_SIZES: dict[tuple[str, str], int] = {
    ("cub200", "train"): 5994,
    ("cub200", "test"): 5794,
    ("ade20k", "training"): 20210,
    ("ade20k", "validation"): 2000,
}

# --------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelFamily:
    """One entry of `MODEL_FAMILIES`."""

    loader: str
    """`module:function` that builds the family's `Backbone` (imported only when used)."""
    needs_source: bool = True
    """Whether a spec must name the model (`source`); a family of one model does not."""


MODEL_FAMILIES: dict[str, ModelFamily] = {
    "hf": ModelFamily("saev_report.backbones.hf:load_hf"),
    "timm": ModelFamily("saev_report.backbones.timm_family:load_timm"),
    "open_clip": ModelFamily("saev_report.backbones.open_clip_vit:load_open_clip"),
    "imgfocus": ModelFamily("saev_report.backbones.imgfocus:load_imgfocus", needs_source=False),
}
"""Model family → its loader. Within a family the loader picks the adapter by the model itself:
`hf` by the config's `model_type` (`backbones.hf.HF_ADAPTERS`), `timm` by the model's class
(`backbones.timm_family.TIMM_ADAPTERS`). A family without a source is its own `KNOWN_ARCHS` key."""
Family = Literal[tuple(MODEL_FAMILIES)]  # type: ignore[valid-type]
TokenKind = Literal["cls", "registers", "patches"]
TOKEN_KINDS: tuple[str, ...] = get_args(TokenKind)
"""Every token kind, in the order they sit in a ViT's residual stream (and in every store)."""


class ModelSpec(SpecModel):
    """A vision transformer to study."""

    family: Family
    """Adapter family: `hf` (transformers Dinov2Model, Dinov2WithRegistersModel, DINOv3ViTModel,
    CLIPVisionModel, SiglipVisionModel — SigLIP and fixed-resolution SigLIP 2 — and
    Siglip2VisionModel, SigLIP 2 NaFlex at a fixed size), `timm`
    (VisionTransformer, Eva — Perception Encoder PE-Core and PE-Spatial — and ConvNeXt, whose
    stages are the layers), `open_clip` (its own ViTs and timm-trunk towers), or `imgfocus` (the
    offline DINOv2 ViT-S/14)."""
    source: str | None = None
    """Hub id (`facebook/dinov2-base`), open_clip `ARCH/PRETRAINED` (`ViT-B-16/openai`), timm
    name, or a local directory. Not used by `imgfocus`."""
    random_init: bool = False
    """Same architecture with random weights (seeded): a control model."""
    layers: list[int] = Field(min_length=1)
    """Residual-stream layers to record, counted like HF `hidden_states`: layer L is the output of
    block L (1-based), so `11` on a 12-block ViT is the second-to-last block."""
    tokens: list[TokenKind] = Field(default_factory=lambda: ["patches"], min_length=1)
    """Token kinds to record; SAEs train on every recorded token."""
    image_size: int | None = Field(default=None, ge=14)
    """Input side in pixels (resize shorter side to size·8/7, centre-crop); default: the model's own."""
    n_layers: int | None = Field(default=None, ge=1)
    """Number of blocks, if the adapter cannot know it before loading weights."""
    label: str | None = None
    """Display name on the site (default: the model key), e.g. `DINOv2`."""
    # Left out of dumps, so of stage keys: the stages that train or read SAEs get it merged
    # through `Spec.sweep_for`, and recording does not depend on it.
    sae: SweepOverride | None = Field(default=None, exclude=True)
    """This model's own SAE sweep, replacing fields of the `sae` section (e.g. `{kind: [topk], seeds: [0]}`
    for a random-weights control); `edits[].sae`, `experiments[].saes` index this model's sweep."""

    @field_validator("layers")
    @classmethod
    def _layers_positive(cls, layers: list[int]) -> list[int]:
        for layer in layers:
            if layer < 1:
                raise ValueError(f"layer {layer} < 1; layers count blocks from 1")
        if len(set(layers)) != len(layers):
            raise ValueError("layers repeat")
        return layers

    @model_validator(mode="after")
    def _source_needed(self) -> "ModelSpec":
        if MODEL_FAMILIES[self.family].needs_source and not self.source:
            raise ValueError(f"family {self.family!r} needs a `source`")
        return self


@dataclass(frozen=True)
class Arch:
    """What is known of an architecture before loading it: for `validate` (layer ranges) and `plan`."""

    depth: int
    d_model: int
    patch_size: int
    image_size: int
    n_registers: int = 0
    has_cls: bool = True


KNOWN_ARCHS: dict[str, Arch] = {
    "imgfocus": Arch(12, 384, 14, 224),
    "openai/clip-vit-base-patch16": Arch(12, 768, 16, 224),
    "openai/clip-vit-base-patch32": Arch(12, 768, 32, 224),
    "openai/clip-vit-large-patch14": Arch(24, 1024, 14, 224),
    "ViT-B-16/openai": Arch(12, 768, 16, 224),
    "ViT-B-32/openai": Arch(12, 768, 32, 224),
    "ViT-L-14/openai": Arch(24, 1024, 14, 224),
    "facebook/dinov2-small": Arch(12, 384, 14, 224),
    "facebook/dinov2-base": Arch(12, 768, 14, 224),
    "facebook/dinov2-large": Arch(24, 1024, 14, 224),
    "facebook/dinov2-with-registers-base": Arch(12, 768, 14, 224, n_registers=4),
    "google/siglip-base-patch16-224": Arch(12, 768, 16, 224, has_cls=False),
    "google/siglip2-base-patch16-224": Arch(12, 768, 16, 224, has_cls=False),
    "facebook/dinov3-vits16-pretrain-lvd1689m": Arch(12, 384, 16, 224, n_registers=4),
    "facebook/dinov3-vitb16-pretrain-lvd1689m": Arch(12, 768, 16, 224, n_registers=4),
    "facebook/dinov3-vitl16-pretrain-lvd1689m": Arch(24, 1024, 16, 224, n_registers=4),
    "vit_base_patch16_siglip_224.v2_webli": Arch(12, 768, 16, 224, has_cls=False),
    "vit_pe_core_base_patch16_224": Arch(12, 768, 16, 224),
    "vit_pe_core_large_patch14_336": Arch(24, 1024, 14, 336),
    "vit_pe_spatial_base_patch16_512": Arch(12, 768, 16, 512),
    "vit_base_patch16_224": Arch(12, 768, 16, 224),
    "vit_small_patch16_224": Arch(12, 384, 16, 224),
    "vit_base_patch14_dinov2": Arch(12, 768, 14, 224),
}
"""Well-known architectures by `source` (`imgfocus` for that family); others are found out at load time."""


def known_arch(model: ModelSpec) -> Arch | None:
    return KNOWN_ARCHS.get((model.source or "") if MODEL_FAMILIES[model.family].needs_source else model.family)


def model_depth(model: ModelSpec) -> int | None:
    """Number of blocks if known without loading the model."""
    if model.n_layers:
        return model.n_layers
    arch = known_arch(model)
    return arch.depth if arch else None


# --------------------------------------------------------------------------- recording


class RecordSpec(SpecModel):
    """Recording residual-stream activations to the shard store."""

    dataset: str
    """Dataset key whose images are recorded (SAEs train on these)."""
    dtype: Dtype = "float16"
    """Storage dtype of activations; fp16 halves disk against the paper's fp32."""
    batch_size: int = Field(default=32, gt=0)
    """Images per forward pass."""
    shard_mb: int = Field(default=256, gt=0)
    """Target shard size in MiB; a killed recording resumes at shard granularity."""
    models: list[str] | None = None
    """Models to record (default: all)."""


# --------------------------------------------------------------------------- SAEs


SAEKind = Literal["relu", "topk", "batchtopk"]


def _positive_ints(values: list[int] | None) -> list[int] | None:
    for value in values or []:
        if value <= 0:
            raise ValueError(f"{value} must be positive")
    return values


def _non_negative(values: list[float] | None) -> list[float] | None:
    for value in values or []:
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{value} must be a finite number >= 0")
    return values


def _kinds_unique(kind: str | list[str] | None) -> str | list[str] | None:
    if isinstance(kind, list) and (not kind or len(set(kind)) != len(kind)):
        raise ValueError("list each SAE kind once (at least one)")
    return kind


class SAESpec(SpecModel):
    """The SAE sweep: one SAE per combination of the list-valued fields, for every recorded
    (model, layer). All SAEs of a (model, layer) train in one pass over the activations."""

    kind: SAEKind | list[SAEKind] = "relu"
    """`relu` (the paper: ReLU + L1), `topk`, or `batchtopk` (saved with a fixed threshold); a list
    (`[topk, relu]`) sweeps several kinds, each with its own sparsity list (`k` or `l1_coeff`)."""
    expansion: list[int] = Field(default_factory=lambda: [32], min_length=1)
    """Dictionary width as a multiple of the model width (paper: 32 → 24,576 for d=768)."""
    l1_coeff: list[float] = Field(default_factory=lambda: [4e-4], min_length=1)
    """Sparsity coefficient λ on ‖f‖₁ (relu only; paper 4e-4)."""
    k: list[int] = Field(default_factory=lambda: [64], min_length=1)
    """Active features per patch (topk) or mean per patch (batchtopk)."""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Initialisation seeds; two seeds measure dictionary stability."""
    lr: float = Field(default=4e-4, gt=0)
    """Adam learning rate (paper 4e-4)."""
    lr_warmup_steps: int = Field(default=500, ge=0)
    """Linear learning-rate warm-up steps (paper 500)."""
    l1_warmup_steps: int = Field(default=500, ge=0)
    """Linear λ warm-up steps (paper 500)."""
    batch_size: int = Field(default=16384, gt=0)
    """Patches per step (paper 16,384)."""
    n_patches: int = Field(default=100_000_000, gt=0)
    """Training budget in patches (paper 100M); the store is cycled if smaller."""
    normalize: bool = True
    """Subtract the mean activation and scale so the mean norm is √d before training (the reference code; the paper's "unit norm")."""
    sparse_backward: bool = True
    """Decode and back-propagate through active features only (faster; same maths)."""
    log_every: int = Field(default=20, gt=0)
    """Steps between rows of the `train_log` table."""

    @property
    def kinds(self) -> list[str]:
        """The swept kinds, in spec order."""
        return [self.kind] if isinstance(self.kind, str) else list(self.kind)

    @field_validator("kind")
    @classmethod
    def _kinds_unique(cls, kind: str | list[str]) -> str | list[str]:
        return _kinds_unique(kind)

    @field_validator("expansion", "k")
    @classmethod
    def _positive_ints(cls, values: list[int]) -> list[int]:
        return _positive_ints(values)

    @field_validator("l1_coeff")
    @classmethod
    def _non_negative(cls, values: list[float]) -> list[float]:
        return _non_negative(values)


# --------------------------------------------------------------------------- analysis



class SweepOverride(SpecModel):
    """A model's own SAE sweep: each field given here replaces the `sae` section's list for this
    model's SAEs (the training budget and optimiser stay shared). A control model often needs
    fewer SAEs than the model under study."""

    kind: SAEKind | list[SAEKind] | None = None
    """Kinds to train for this model (default: `sae.kind`)."""
    expansion: list[int] | None = Field(default=None, min_length=1)
    """Dictionary widths (default: `sae.expansion`)."""
    l1_coeff: list[float] | None = Field(default=None, min_length=1)
    """ReLU sparsity coefficients (default: `sae.l1_coeff`)."""
    k: list[int] | None = Field(default=None, min_length=1)
    """TopK/BatchTopK sparsities (default: `sae.k`)."""
    seeds: list[int] | None = Field(default=None, min_length=1)
    """Initialisation seeds (default: `sae.seeds`)."""

    @field_validator("kind")
    @classmethod
    def _kinds_unique(cls, kind: str | list[str] | None) -> str | list[str] | None:
        return _kinds_unique(kind)

    @field_validator("expansion", "k")
    @classmethod
    def _positive_ints(cls, values: list[int] | None) -> list[int] | None:
        return _positive_ints(values)

    @field_validator("l1_coeff")
    @classmethod
    def _non_negative(cls, values: list[float] | None) -> list[float] | None:
        return _non_negative(values)


ModelSpec.model_rebuild()  # its `sae` field names SweepOverride, defined after it


class AnalysisSpec(SpecModel):
    """Per-feature statistics and exemplars."""

    top_k: int = Field(default=16, gt=0)
    """Exemplar images kept per feature (each image at most once per feature)."""
    dense_threshold: float = Field(default=0.01, gt=0, lt=1)
    """A feature firing on more than this fraction of patches is `dense` (reference code: 1 %)."""
    histogram_bins: int = Field(default=24, gt=1)
    """Bins of the per-feature log10 activation histogram."""
    batch_size: int = Field(default=4096, gt=0)
    """Patches per analysis step."""
    null_permutations: int = Field(default=1, ge=1)
    """Label permutations of the concept-detection null. `concepts.null_ap` is the first; every
    one's best lift per feature goes to `concept_nulls`, the null distribution an `ap_lift` claim
    compares with. Each adds one set of concept histograms to the analysis pass."""


# --------------------------------------------------------------------------- heads


class HeadSpec(SpecModel):
    """A frozen-backbone linear probe on final-layer tokens (paper §10–11)."""

    task: Literal["classification", "segmentation"]
    """`classification` reads the CLS token; `segmentation` reads every patch token."""
    model: str
    """Model key."""
    train: str
    """Dataset key to train on (needs labels, or masks for segmentation)."""
    val: str | None = None
    """Dataset key to select hyper-parameters on; default: 20 % of `train` held out."""
    lrs: list[float] = Field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], min_length=1)
    """AdamW learning rates swept."""
    weight_decays: list[float] = Field(default_factory=lambda: [1e-3, 1e-2, 1e-1], min_length=1)
    """AdamW weight decays swept."""
    epochs: int = Field(default=20, gt=0)
    """Training epochs."""
    batch_size: int = Field(default=512, gt=0)
    """Examples per step."""


# --------------------------------------------------------------------------- edits

EditAction = Literal["suppress", "set", "scale", "clamp", "add"]
FACTOR_LIMIT = 100.0
"""Largest scale factor (either sign) an edit or an experiment accepts: a feature scaled past ±100×
leaves the range any head was trained on, so a larger one can only be a typo (`-1e12` for `-1`)."""

Factor = Annotated[float, Field(ge=-FACTOR_LIMIT, le=FACTOR_LIMIT, allow_inf_nan=False)]
"""A scale factor applied to feature activations, within ±`FACTOR_LIMIT`."""

EDIT_ACTIONS: tuple[str, ...] = get_args(EditAction)
"""Every edit action; `edits.EDIT_FUNCTIONS` implements each."""


class ExplicitEdit(SpecModel):
    """Edit named features on one image."""

    image: int | str
    """Image index in the edit dataset, or a path relative to it."""
    features: list[int] = Field(min_length=1)
    """Feature ids to modify."""
    patches: list[int] | Literal["all"] = "all"
    """Patch indices (row-major over the grid) to modify, or `all`."""


class GeneratedEdits(SpecModel):
    """Edits generated from the analysis tables."""

    top_purity: int = Field(default=8, gt=0)
    """Take this many features with the highest label purity (non-dense, alive)."""
    images_per_feature: int = Field(default=4, gt=0)
    """Edit this many images of the feature's top label (from the edit dataset)."""
    patches: Literal["all", "active"] = "all"
    """Modify every patch, or only the patches where the feature fires."""
    select: Literal["purity", "attribution"] = "purity"
    """`purity`: the `top_purity` purest features, each on `images_per_feature` images of its top
    label. `attribution`: `top_purity` × `images_per_feature` images (round-robin over labels), each
    losing its `features_per_edit` features with the largest activation × gradient towards its
    label: the head's own evidence, found through the SAE."""
    features_per_edit: int = Field(default=1, gt=0)
    """Edit the chosen feature together with up to this many minus one other features of the same
    top label, the most active on that image: a concept rather than a single atom."""


class EditSpec(SpecModel):
    """An intervention: encode, modify features, decode + error, resume the forward, run the head."""

    name: Name
    """Edit name (used in addresses)."""
    model: str
    """Model key."""
    head: str
    """Head key (its model must be this model)."""
    layer: int | None = None
    """Layer of the SAE to edit with; default: the model's first recorded layer."""
    sae: int = Field(default=0, ge=0)
    """Which SAE of the sweep (index in sweep order) to edit with."""
    dataset: str | None = None
    """Dataset of images to edit; default: the head's validation data."""
    action: EditAction = "suppress"
    """`suppress` (set to 0), `set` to value, `scale` by value, `clamp` to at most value,
    `add` value."""
    value: float = Field(default=0.0, allow_inf_nan=False)
    """Argument of the action (finite); for `scale`, a factor within ±100."""
    explicit: list[ExplicitEdit] = Field(default_factory=list)
    """Explicit edits."""
    generate: GeneratedEdits | None = None
    """Generated edits."""
    random_control: bool = True
    """Also run each edit on a frequency-matched random feature (specificity control)."""

    @field_validator("value")
    @classmethod
    def _factor_bounded(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("action") == "scale" and abs(value) > FACTOR_LIMIT:
            raise ValueError(f"a scale factor must lie within ±{FACTOR_LIMIT:g}, got {value:g} (a typo?)")
        return value

    @model_validator(mode="after")
    def _something_to_do(self) -> "EditSpec":
        if not self.explicit and self.generate is None:
            raise ValueError("an edit needs `explicit` edits or `generate`")
        return self


# --------------------------------------------------------------------------- experiments

ExperimentArm = Literal["random", "other"]


class ExperimentSpec(SpecModel):
    """Concept-suppression experiments: each concept's top-m features by AP (from the `concepts`
    table) scaled by each factor, against controls of the same size, scored by a frozen head."""

    name: Name
    """Experiment name (used in addresses and the `experiments` table)."""
    model: str
    """Model key."""
    head: str
    """Head key (its model must be this model). A segmentation head tests patch-level concepts
    (mask classes, background included), a classification head image-level ones (class labels)."""
    layer: int | None = None
    """Layer of the SAEs to edit with; default: the model's first recorded layer."""
    saes: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Which SAEs of the sweep (indices in sweep order) to test, e.g. a TopK and a ReLU one."""
    dataset: str | None = None
    """Dataset of images to edit; default: the head's validation data."""
    m: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1)
    """Numbers of top features edited together."""
    factors: list[Factor] = Field(default_factory=lambda: [1.0, 0.0, -1.0, -2.0], min_length=1)
    """Factors the features are scaled by: 1 is no edit, 0 suppresses, below 0 pushes them negative
    (each within ±100)."""
    where: list[Literal["all", "concept"]] = Field(default_factory=lambda: ["all"], min_length=1)
    """Edit every patch, and/or only the patches whose ground-truth class is the concept (needs masks)."""
    controls: list[ExperimentArm] = Field(default_factory=lambda: ["random", "other"])
    """`random`: frequency-matched random features; `other`: the same number of top features of
    another concept (the next one in name order)."""
    random_draws: int = Field(default=4, ge=1)
    """Independent frequency-matched random draws of the `random` control: the concept arm is
    compared with their distribution (pooled per image), so one lucky or unlucky draw cannot decide a verdict."""
    n_images: int = Field(default=8, gt=0)
    """Images per concept: the first ones of the dataset that show it (labelled with it, or with
    at least one patch of it)."""
    concepts: list[str] | None = None
    """Concepts to test; default every concept of the level that the head predicts."""
    rank_on: Literal["auto", "analysis", "head_train"] = "auto"
    """Where each concept's features are ranked by AP. `analysis`: the `concepts` rows of the
    analyse stage (scored on the record dataset). `head_train`: concept statistics this stage
    computes on the head's training data (one streaming pass; the rows go to the
    `experiment_concepts` table), never on the images it edits. `auto`: the analysis when it scores
    at least one of the concepts tested, else the head's training data (the paper spec records
    ImageNet, whose classes are neither CUB species nor ADE20K classes)."""

    @field_validator("m")
    @classmethod
    def _m_positive(cls, values: list[int]) -> list[int]:
        if any(v <= 0 for v in values):
            raise ValueError("every m must be positive")
        return values


# --------------------------------------------------------------------------- statistics and claims


class StatsSpec(SpecModel):
    """How intervals and tests are computed (issue #17): bootstrap over images, the unit of
    independence, seeded from `run.seed`."""

    n_resamples: int = Field(default=2000, ge=100)
    """Bootstrap resamples per interval, and the sign-flip test's Monte-Carlo resamples (exact over
    all 2^n sign vectors when 2^n is no more than this)."""
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """Confidence level of every interval."""
    interval: Literal["bca", "percentile"] = "bca"
    """`bca`: bias-corrected and accelerated (scipy's default); `percentile`: the plain percentile interval."""
    correction: Literal["holm", "bh"] = "holm"
    """Correction across the whole family of tests the claims run: `holm` (family-wise error) or
    `bh` (Benjamini–Hochberg, false discovery rate)."""
    alpha: float = Field(default=0.05, gt=0, lt=1)
    """Level at which a corrected test beats its control."""


ClaimMetric = Literal["removed_frac", "other_changed_frac", "p_delta", "other_p_delta", "flip_frac"]
ClaimArm = Literal["concept", "random", "other"]


class ClaimCondition(SpecModel):
    """One threshold on one arm's summary metric, per concept: holds when the whole interval is on
    the right side, fails when the whole interval is on the wrong side."""

    metric: ClaimMetric
    """A column of `experiment_summary`: `removed_frac` (Σ removed / Σ predicted pixels),
    `other_changed_frac` (the side effect), `p_delta`, `other_p_delta`, `flip_frac`."""
    arm: ClaimArm = "concept"
    """Whose edit: the concept's top features, the frequency-matched random draws (pooled), or another concept's."""
    min: float | None = None
    """The metric is at least this."""
    max: float | None = None
    """The metric is at most this."""
    times: float | None = Field(default=None, gt=0)
    """Compare against `times` × the random draws' value of the same metric instead of a constant:
    the condition is then on the paired difference metric − times × random (per image), against
    `min` or `max` (default 0). E.g. "lowers the probability ≥ 5× more than random features":
    `{metric: p_delta, times: 5, max: 0}`."""

    @model_validator(mode="after")
    def _one_side(self) -> "ClaimCondition":
        if self.times is None and (self.min is None) == (self.max is None):
            raise ValueError("give exactly one of `min` or `max`")
        if self.times is not None and self.min is not None and self.max is not None:
            raise ValueError("give at most one of `min` or `max`")
        if self.times is not None and self.arm != "concept":
            raise ValueError("`times` compares the concept arm with the random draws; leave `arm` at `concept`")
        return self


class FixedSetting(SpecModel):
    """The experiment setting a claim is read at, fixed before looking."""

    m: int = Field(gt=0)
    """Number of top features edited."""
    factor: float
    """Factor they are scaled by."""
    where: Literal["all", "concept"] = "all"
    """Patches edited."""


class _ClaimBase(SpecModel):
    name: Name
    """Claim name (the `claims` table and the Claims page)."""
    statement: str | None = None
    """The hypothesis in words, as the site shows it; default: generated from the fields."""
    saes: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """The replication set: SAEs of the sweep (indices in sweep order), e.g. one configuration's seeds."""
    min_replicates: int | None = Field(default=None, gt=0)
    """The claim holds when it holds for at least this many of `saes`; default: all of them."""


class ExperimentClaim(_ClaimBase):
    """A concept-suppression claim read off one experiment: for at least `min_concepts` concepts,
    every condition holds and the concept arm beats each control in a corrected paired test."""

    kind: Literal["experiment"]
    experiment: str
    """Experiment name; its `saes` must include this claim's."""
    setting: FixedSetting | None = None
    """The setting, fixed up front. Leave it out and set `select: split` to choose it on half the images."""
    select: Literal["fixed", "split"] = "fixed"
    """`fixed`: read at `setting` on every image. `split`: each concept's images are split in two
    halves (seeded); the setting is chosen on the selection half (the one where most concepts meet
    every condition's point estimate; ties: fewer features, then the factor nearest 1) and the
    headline numbers, tests and verdict come from the confirmation half alone."""
    conditions: list[ClaimCondition] = Field(min_length=1)
    """Thresholds every counted concept meets."""
    beats: list[Literal["random", "other"]] = Field(default_factory=lambda: ["random"])
    """Controls the concept arm must beat in a one-sided paired sign-flip test on the first
    condition's metric (removed_frac: more pixels; p_delta: a larger drop), corrected across the family."""
    concepts: list[str] | None = None
    """Concepts the claim counts (e.g. the classes, not `background`); default every concept the
    experiment tested. A named concept the experiment did not test counts as inconclusive."""
    min_concepts: int | None = Field(default=None, gt=0)
    """Concepts that must hold; default: every concept counted."""

    @model_validator(mode="after")
    def _setting_or_split(self) -> "ExperimentClaim":
        if self.select == "fixed" and self.setting is None:
            raise ValueError("a fixed claim needs `setting: {m, factor, where}`; or choose it on held-out images with `select: split`")
        if self.select == "split" and self.setting is not None:
            raise ValueError("`select: split` chooses the setting itself; drop `setting`")
        return self


class SplicedClaim(_ClaimBase):
    """The share of a head's skill kept when the SAE's reconstruction replaces the activations:
    (spliced − ablated) / (clean − ablated), with a bootstrap interval over the validation images."""

    kind: Literal["spliced"]
    model: str
    """Model key (a recorded model with a head)."""
    task: Literal["classification", "segmentation"]
    """Which of the model's first heads: the classification or the segmentation one."""
    min: float
    """Recovered is at least this."""


class APLiftClaim(_ClaimBase):
    """Concept detection: features whose best concept reaches `ap_lift` ≥ `threshold` are at least
    `times` as many as in a control SAE, and more than under permuted labels."""

    kind: Literal["ap_lift"]
    model: str
    """Model key of the SAEs in `saes`."""
    control_model: str
    """The control (e.g. the random-weights twin); its sweep's first SAE is counted."""
    level: Literal["patch", "image"] = "patch"
    """Concept level."""
    threshold: float = Field(default=0.2, gt=0, le=1)
    """AP lift a feature's best concept reaches: (AP − base rate) / (1 − base rate)."""
    times: float = Field(default=3.0, gt=0)
    """At least this many times the control SAE's count."""


ClaimSpec = Annotated[Union[ExperimentClaim, SplicedClaim, APLiftClaim], Field(discriminator="kind")]


# --------------------------------------------------------------------------- compare


class CompareSpec(SpecModel):
    """Match features of the SAEs of two models over the same images."""

    a: str
    """First model key."""
    b: str
    """Second model key."""
    min_score: float = Field(default=0.5, ge=-1, le=1)
    """A feature whose best match correlates below this has no counterpart."""


class StabilitySpec(SpecModel):
    """Match a model's SAE to the same SAE trained with another seed."""

    model: str
    """Model key; the SAE sweep must list at least two seeds."""
    min_score: float = Field(default=0.5, ge=-1, le=1)
    """A feature whose best match in the other seed's SAE correlates below this has no counterpart."""


# --------------------------------------------------------------------------- slurm


class SlurmSpec(SpecModel):
    """Cluster resources for `saev-report build --executor slurm` (flags override them).
    Every stage is one job; record, train, analyse, compare and stability jobs get `gpus` GPUs, one rank on each."""

    partition: str | None = None
    """Slurm partition; default: the cluster's default."""
    account: str | None = None
    """Slurm account to charge; default: yours."""
    gpus: int = Field(default=1, ge=1)
    """GPUs (and torch.distributed ranks) of each record, train, analyse, compare and stability job; other stages use one."""
    cpus_per_gpu: int = Field(default=8, ge=1)
    """CPU cores per rank (image decoding, the shuffled reader)."""
    mem_gb_per_gpu: int = Field(default=64, ge=1)
    """Host memory per rank in GB."""
    time_min: int = Field(default=720, ge=1)
    """Wall-clock limit of each stage's job in minutes; a stage killed at the limit resumes when resubmitted."""


# --------------------------------------------------------------------------- report


class ReportSpec(SpecModel):
    """The static site."""

    title: str = "saev-report"
    """Site title."""
    exemplars_shown: int = Field(default=12, gt=0)
    """Exemplars on each feature page."""
    feature_pages: int | None = Field(default=None, gt=0)
    """Render pages for at most this many features per SAE (by max activation); default all alive."""
    thumbnail_px: int = Field(default=160, ge=32)
    """Thumbnail side in pixels."""


# --------------------------------------------------------------------------- top level


class Spec(SpecModel):
    """A saev-report build."""

    run: RunSpec
    """Run settings."""
    datasets: dict[Name, DatasetSpec] = Field(min_length=1)
    """Image sets by key."""
    models: dict[Name, ModelSpec] = Field(min_length=1)
    """Vision transformers by key."""
    record: RecordSpec
    """Activation recording."""
    sae: SAESpec = SAESpec()
    """SAE sweep."""
    analysis: AnalysisSpec = AnalysisSpec()
    """Feature statistics and exemplars."""
    heads: dict[Name, HeadSpec] = Field(default_factory=dict)
    """Task heads by key."""
    edits: list[EditSpec] = Field(default_factory=list)
    """Interventions."""
    experiments: list[ExperimentSpec] = Field(default_factory=list)
    """Concept-suppression experiments with dose-response and controls."""
    compare: list[CompareSpec] = Field(default_factory=list)
    """Cross-model comparisons."""
    stability: list[StabilitySpec] = Field(default_factory=list)
    """Seed-stability comparisons."""
    report: ReportSpec = ReportSpec()
    """Site options."""
    slurm: SlurmSpec = SlurmSpec()
    """Resources when the stages run as Slurm jobs (`--executor slurm`)."""
    stats: StatsSpec = StatsSpec()
    """Intervals, tests and their correction."""
    claims: list[ClaimSpec] = Field(default_factory=list)
    """Declared hypotheses, each checked to a verdict: holds, fails or inconclusive."""

    @property
    def run_dir(self) -> Path:
        return self.run.out_dir / self.run.name

    def recorded_models(self) -> list[str]:
        return list(self.record.models or self.models)

    def sweep_for(self, model_key: str) -> SAESpec:
        """The `sae` section with the model's own overrides (`models.<key>.sae`) applied."""
        override = self.models[model_key].sae
        if override is None:
            return self.sae
        return self.sae.model_copy(update=override.model_dump(exclude_none=True))


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class SpecIssue:
    """One located problem in a spec file."""

    file: str
    line: int
    column: int
    field: str
    message: str
    flag: str | None = None
    """The `--set` argument the offending value came from (`sae.n_patches=-1`); it replaces the
    file location, which holds a value the flag overrode."""

    def __str__(self) -> str:
        where = f"--set {self.flag}" if self.flag else f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(Exception):
    """A spec that cannot be used; carries every located issue."""

    def __init__(self, issues: list[SpecIssue]):
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


# --------------------------------------------------------------------------- loading


def _locate(root: yaml.Node | None, loc: tuple[Any, ...]) -> tuple[int, int]:
    """1-based line/column of the YAML node at pydantic location `loc`.

    A field's own line is its key. A missing field points at its parent's key,
    and discriminator tags that are not in the YAML are skipped.
    """
    if root is None:
        return 1, 1
    node: yaml.Node = root
    anchor: yaml.Node = root  # the key (or item) naming `node`
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, yaml.MappingNode):
            entry = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if entry is None:
                if last:
                    node = anchor
                continue
            anchor, node = entry[0], (entry[0] if last else entry[1])
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            anchor = node = node.value[part]
    return node.start_mark.line + 1, node.start_mark.column + 1


def _field_path(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop pydantic's union-tag elements (e.g. `demo` in datasets.x.demo.size)."""
    path: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            path.append(part)
        elif isinstance(node, dict) and node.get("kind") == part:
            continue
        else:
            path.append(part)
            node = None
    return tuple(path)


def _issue(file: str, root: yaml.Node | None, loc: tuple[Any, ...], message: str,
           applied: Sequence[tuple[tuple[Any, ...], Override]] = ()) -> SpecIssue:
    line, column = _locate(root, loc)
    override = flag_for(loc, applied)
    return SpecIssue(file, line, column, ".".join(str(p) for p in loc), message, override.flag if override else None)


def parse_spec_text(text: str, file: str = "<spec>", check_paths: bool = True, overrides: Sequence[str] = ()) -> Spec:
    """Parse and validate spec YAML, with `--set path=value` overrides applied first (see
    `overrides.py`); raise SpecError with issues located in the file or at the flag."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SpecError([SpecIssue(file, line, column, "", f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecIssue(file, 1, 1, "", f"invalid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise SpecError([SpecIssue(file, 1, 1, "", "a spec is a YAML mapping with `run`, `datasets`, `models`, `record`, ...")])
    try:
        applied = apply_overrides(data, [parse_override(flag) for flag in overrides])
    except OverrideError as exc:
        raise SpecError([SpecIssue(file, 0, 0, "", exc.message, exc.flag)]) from None
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        issues = []
        for error in exc.errors():
            loc = _field_path(tuple(error["loc"]), data)
            if error["type"] == "union_tag_invalid":
                loc = (*loc, "kind")
            issues.append(_issue(file, root, loc, error["msg"], applied))
        raise SpecError(issues) from None
    issues = [_issue(file, root, loc, message, applied) for loc, message in cross_check(spec, check_paths)]
    if issues:
        raise SpecError(issues)
    return spec


def load_spec(path: str | os.PathLike[str], check_paths: bool = True, overrides: Sequence[str] = ()) -> Spec:
    """Load a spec file, with `--set path=value` overrides. Relative dataset/model paths resolve
    against the current directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([SpecIssue(str(path), 1, 1, "", f"cannot read spec: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise SpecError([SpecIssue(str(path), 1, 1, "", "spec is not UTF-8 text")]) from None
    return parse_spec_text(text, file=str(path), check_paths=check_paths, overrides=overrides)


def cross_check(spec: Spec, check_paths: bool = True) -> list[tuple[tuple[Any, ...], str]]:
    """References between sections, layer ranges and (optionally) paths on disk."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    models, datasets = set(spec.models), set(spec.datasets)

    def need(kind: str, names: set[str], value: str | None, loc: tuple[Any, ...]) -> None:
        if value is not None and value not in names:
            known = ", ".join(sorted(names)) or "none"
            problems.append((loc, f"{kind} {value!r} is not declared (declared: {known})"))

    for key, model in spec.models.items():
        depth = model_depth(model)
        for i, layer in enumerate(model.layers):
            if depth is not None and layer > depth:
                problems.append((("models", key, "layers", i), f"layer {layer} is out of range: {model.source or key} has {depth} blocks"))
    need("dataset", datasets, spec.record.dataset, ("record", "dataset"))
    for i, name in enumerate(spec.record.models or []):
        need("model", models, name, ("record", "models", i))
    for key, head in spec.heads.items():
        need("model", models, head.model, ("heads", key, "model"))
        need("dataset", datasets, head.train, ("heads", key, "train"))
        need("dataset", datasets, head.val, ("heads", key, "val"))
        for field_name in ("train", "val"):
            ds_key = getattr(head, field_name)
            ds = spec.datasets.get(ds_key) if ds_key else None
            if ds is not None and head.task == "segmentation" and ds.kind not in ("demo", "seg_folder", "ade20k"):
                problems.append((("heads", key, field_name), f"segmentation needs masks; dataset {ds_key!r} ({ds.kind}) has none"))
    recorded = set(spec.recorded_models())
    for i, edit in enumerate(spec.edits):
        need("model", models, edit.model, ("edits", i, "model"))
        need("head", set(spec.heads), edit.head, ("edits", i, "head"))
        need("dataset", datasets, edit.dataset, ("edits", i, "dataset"))
        if edit.model in models and edit.model not in recorded:
            problems.append((("edits", i, "model"), f"model {edit.model!r} is not recorded, so it has no SAE"))
        head = spec.heads.get(edit.head)
        if head is not None and head.model != edit.model:
            problems.append((("edits", i, "head"), f"head {edit.head!r} reads model {head.model!r}, not {edit.model!r}"))
        model = spec.models.get(edit.model)
        if model is not None and edit.layer is not None and edit.layer not in model.layers:
            problems.append((("edits", i, "layer"), f"layer {edit.layer} is not recorded for {edit.model!r} (layers {model.layers})"))
        n_saes = len(sae_sweep(spec.sweep_for(edit.model))) if edit.model in models else 0
        if edit.model in models and edit.sae >= n_saes:
            problems.append((("edits", i, "sae"), f"the sweep has {n_saes} SAE(s); index {edit.sae} is out of range"))
    for i, exp in enumerate(spec.experiments):
        problems += _check_experiment(spec, i, exp, models, datasets, recorded)
    for i, cmp in enumerate(spec.compare):
        need("model", recorded, cmp.a, ("compare", i, "a"))
        need("model", recorded, cmp.b, ("compare", i, "b"))
        if cmp.a == cmp.b:
            problems.append((("compare", i, "b"), "compare needs two different models (use `stability` for seeds)"))
    for i, stab in enumerate(spec.stability):
        need("model", recorded, stab.model, ("stability", i, "model"))
        if stab.model in models and len(spec.sweep_for(stab.model).seeds) < 2:
            problems.append((("stability", i, "model"), "stability needs the model's sweep (`sae.seeds`, or its own `sae.seeds`) to list at least two seeds"))
    problems += _check_claims(spec, models, recorded)
    if check_paths:
        for key, ds in spec.datasets.items():
            for field_name in ("root", "images", "masks"):
                value = getattr(ds, field_name, None)
                if value is not None and not Path(value).exists():
                    problems.append((("datasets", key, field_name), f"path {str(value)!r} does not exist"))
        for key, model in spec.models.items():
            if model.source and _looks_local(model.source) and not Path(model.source).exists():
                problems.append((("models", key, "source"), f"local model path {model.source!r} does not exist"))
    return problems


def _check_experiment(spec: Spec, i: int, exp: ExperimentSpec, models: set[str], datasets: set[str], recorded: set[str]) -> list[tuple[tuple[Any, ...], str]]:
    """An experiment's references: its model is recorded, its head reads it, its SAEs and layer exist,
    and `where: concept` has masks to find the concept's patches in."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    loc = ("experiments", i)
    if exp.model not in models:
        problems.append(((*loc, "model"), f"model {exp.model!r} is not declared (declared: {', '.join(sorted(models))})"))
    elif exp.model not in recorded:
        problems.append(((*loc, "model"), f"model {exp.model!r} is not recorded, so it has no SAE"))
    head = spec.heads.get(exp.head)
    if head is None:
        problems.append(((*loc, "head"), f"head {exp.head!r} is not declared (declared: {', '.join(sorted(spec.heads)) or 'none'})"))
    elif head.model != exp.model:
        problems.append(((*loc, "head"), f"head {exp.head!r} reads model {head.model!r}, not {exp.model!r}"))
    if exp.dataset is not None and exp.dataset not in datasets:
        problems.append(((*loc, "dataset"), f"dataset {exp.dataset!r} is not declared (declared: {', '.join(sorted(datasets))})"))
    model = spec.models.get(exp.model)
    if model is not None and exp.layer is not None and exp.layer not in model.layers:
        problems.append(((*loc, "layer"), f"layer {exp.layer} is not recorded for {exp.model!r} (layers {model.layers})"))
    n_saes = len(sae_sweep(spec.sweep_for(exp.model))) if exp.model in models else 0
    for j, index in enumerate(exp.saes if exp.model in models else []):
        if not 0 <= index < n_saes:
            problems.append(((*loc, "saes", j), f"the sweep has {n_saes} SAE(s); index {index} is out of range"))
    ds_key = exp.dataset or (head.val or head.train if head is not None else None)
    ds = spec.datasets.get(ds_key) if ds_key else None
    has_masks = ds is not None and ds.kind in ("demo", "seg_folder", "ade20k")
    if ds is not None and not has_masks and (head is not None and head.task == "segmentation" or "concept" in exp.where):
        problems.append(((*loc, "where" if "concept" in exp.where else "head"), f"dataset {ds_key!r} ({ds.kind}) has no masks to find the concept's patches in"))
    return problems


def _check_claims(spec: Spec, models: set[str], recorded: set[str]) -> list[tuple[tuple[Any, ...], str]]:
    """Claims name declared experiments, models and SAEs; replication counts fit; names are unique."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    experiments = {e.name: e for e in spec.experiments}
    seen: set[str] = set()
    for i, claim in enumerate(spec.claims):
        loc = ("claims", i)
        if claim.name in seen:
            problems.append(((*loc, "name"), f"claim {claim.name!r} is declared twice"))
        seen.add(claim.name)
        if claim.min_replicates is not None and claim.min_replicates > len(claim.saes):
            problems.append(((*loc, "min_replicates"), f"{claim.min_replicates} replicates asked of {len(claim.saes)} SAE(s)"))
        if isinstance(claim, ExperimentClaim):
            exp = experiments.get(claim.experiment)
            if exp is None:
                problems.append(((*loc, "experiment"), f"experiment {claim.experiment!r} is not declared (declared: {', '.join(sorted(experiments)) or 'none'})"))
                continue
            for j, index in enumerate(claim.saes):
                if index not in exp.saes:
                    problems.append(((*loc, "saes", j), f"experiment {exp.name!r} runs SAEs {exp.saes}, not {index}"))
            if claim.setting is not None:
                s = claim.setting
                for field_name, value, declared in (("m", s.m, exp.m), ("factor", s.factor, exp.factors), ("where", s.where, exp.where)):
                    if value not in declared:
                        problems.append(((*loc, "setting", field_name), f"experiment {exp.name!r} does not run {field_name} {value} (it runs {declared})"))
            for j, control in enumerate(claim.beats):
                if control not in exp.controls:
                    problems.append(((*loc, "beats", j), f"experiment {exp.name!r} has no {control!r} control (controls: {exp.controls})"))
            for j, cond in enumerate(claim.conditions):
                if (cond.arm == "random" or cond.times is not None) and "random" not in exp.controls:
                    problems.append(((*loc, "conditions", j), f"experiment {exp.name!r} has no random control"))
            head = spec.heads.get(exp.head)
            metrics = SEGMENTATION_METRICS if head is not None and head.task == "segmentation" else CLASSIFICATION_METRICS
            for j, cond in enumerate(claim.conditions):
                if head is not None and cond.metric not in metrics:
                    problems.append(((*loc, "conditions", j, "metric"), f"a {head.task} experiment reports {', '.join(metrics)}, not {cond.metric}"))
            n_tested = len(claim.concepts) if claim.concepts else len(exp.concepts) if exp.concepts else None
            if claim.min_concepts is not None and n_tested is not None and claim.min_concepts > n_tested:
                problems.append(((*loc, "min_concepts"), f"{claim.min_concepts} concepts asked of the {n_tested} tested"))
            continue
        for field_name in ("model", "control_model"):
            key = getattr(claim, field_name, None)
            if key is not None and key not in recorded:
                problems.append(((*loc, field_name), f"model {key!r} is not a recorded model (recorded: {', '.join(sorted(recorded))})"))
        if claim.model in recorded:
            n_saes = len(sae_sweep(spec.sweep_for(claim.model)))
            for j, index in enumerate(claim.saes):
                if not 0 <= index < n_saes:
                    problems.append(((*loc, "saes", j), f"the sweep has {n_saes} SAE(s); index {index} is out of range"))
        if isinstance(claim, SplicedClaim) and claim.model in models:
            if not any(h.model == claim.model and h.task == claim.task for h in spec.heads.values()):
                problems.append(((*loc, "task"), f"model {claim.model!r} has no {claim.task} head to splice"))
    return problems


SEGMENTATION_METRICS = ("removed_frac", "other_changed_frac")
CLASSIFICATION_METRICS = ("p_delta", "other_p_delta", "flip_frac")


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~"))


# --------------------------------------------------------------------------- derived


@dataclass(frozen=True)
class SAEConfig:
    """One SAE of the sweep, resolved."""

    index: int
    kind: str
    expansion: int
    l1_coeff: float
    k: int
    seed: int

    @property
    def tag(self) -> str:
        sparsity = f"l1_{self.l1_coeff:g}" if self.kind == "relu" else f"k{self.k}"
        return f"{self.kind}-x{self.expansion}-{sparsity}-s{self.seed}"


def sae_id(model_key: str, layer: int, config: SAEConfig) -> str:
    """Stable SAE id used in every table: `<model>/L<layer>/<tag>`."""
    return f"{model_key}/L{layer}/{config.tag}"


def sae_sweep(sae: SAESpec) -> list[SAEConfig]:
    """Expand the sweep lists in a fixed order (kind, expansion, sparsity, seed)."""
    configs = []
    for kind in sae.kinds:
        sparsities: list[tuple[float, int]] = [(l1, 0) for l1 in sae.l1_coeff] if kind == "relu" else [(0.0, k) for k in sae.k]
        for expansion in sae.expansion:
            for l1, k in sparsities:
                for seed in sae.seeds:
                    configs.append(SAEConfig(len(configs), kind, expansion, l1, k, seed))
    return configs


def content_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (pydantic models are dumped in JSON mode)."""

    def plain(part: Any) -> Any:
        if isinstance(part, BaseModel):
            return part.model_dump(mode="json")
        if isinstance(part, Path):
            return str(part)
        return part

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def json_schema() -> dict[str, Any]:
    """JSON schema of the spec, for editors (yaml-language-server)."""
    return Spec.model_json_schema()
