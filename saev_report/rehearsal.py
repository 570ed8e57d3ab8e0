"""`build --rehearse`: any spec, the paper's included, run end to end on CPU at miniature scale.

The spec file itself is loaded and validated as it stands; `rehearsal_spec` then swaps, section
by section, what a CPU cannot hold for something it can:

- every dataset for a generated miniature tree **in its kind's real on-disk layout** (an
  ImageNet-style class-folder train set, `CUB_200_2011` with its five metadata files,
  `ADEChallengeData2016` with `objectInfo150.csv`), read by the real dataset readers;
- every model for a **tiny random-weight twin of the same family and class** (open_clip's
  `VisionTransformer` from the spec's own architecture config, HF `Dinov2Model`, ...) with the
  spec's patch size, image size, token kinds and depth (so the layer it names exists and is
  still "second to last"), saved as a local checkpoint and loaded through the ordinary adapter;
- the budgets (`sae.n_patches`, `expansion`, head epochs, edit and experiment image counts) capped
  by `RehearsalScale`.

Everything else — the graph, the sweeps' lengths, `rank_on`, `where`, `m`, the factors, the
comparisons, the report — is the spec's own, so a rehearsal runs every stage the real build runs.
The run is named `<name>-rehearsal` and its trees and checkpoints are shared-cache entries
(`$SAEV_REPORT_CACHE/rehearsal-*`), built once, atomically, under their lock.

What it proves and what it does not: docs/guides/rehearsal.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from saev_report.locks import cache_entry_lock
from saev_report.spec import (
    Ade20kDataset,
    Cub200Dataset,
    DatasetSpec,
    DemoDataset,
    ImageFolderDataset,
    ModelSpec,
    SegFolderDataset,
    ExperimentSpec,
    HeadSpec,
    Spec,
    content_hash,
    cross_check,
    known_arch,
    model_depth,
)

FORMAT_VERSION = 1
"""Bumped when a generator's output changes, so old cache entries are not reused."""

RUN_SUFFIX = "-rehearsal"


class RehearsalScale(BaseModel):
    """The miniature scale of a rehearsal: sizes of the generated data and models, and caps on the
    spec's budgets. A cap never raises a value (a spec already smaller keeps its own)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    folder_classes: int = Field(default=10, gt=0)
    """Class folders of a generated `image_folder` tree (ImageNet-style `n0…` folder names)."""
    folder_images_per_class: int = Field(default=6, gt=0)
    """Images in each class folder."""
    cub_classes: int = Field(default=200, gt=0, le=200)
    """CUB species generated (200: the real set's class count)."""
    cub_train_per_class: int = Field(default=1, gt=0)
    """Training images per species (`train_test_split.txt` 1)."""
    cub_test_per_class: int = Field(default=1, gt=0)
    """Test images per species (`train_test_split.txt` 0)."""
    ade_training: int = Field(default=24, gt=0)
    """Images of ADE20K's `training` split; their masks cover every one of the 150 classes."""
    ade_validation: int = Field(default=10, gt=0)
    """Images of ADE20K's `validation` split; with 10 or more their masks too show every class."""
    seg_images: int = Field(default=16, gt=0)
    """Images of a generated `seg_folder` tree."""
    d_model: int = Field(default=64, gt=0)
    """Width of every tiny model (the real ones: 384–1024)."""
    head_dim: int = Field(default=32, gt=0)
    """Width of each attention head of the tiny models (so `d_model / head_dim` heads)."""
    max_expansion: int = Field(default=4, gt=0)
    """Cap on `sae.expansion` (each value of the sweep, order kept)."""
    max_n_patches: int = Field(default=20_000, gt=0)
    """Cap on `sae.n_patches`, the training budget."""
    max_sae_batch: int = Field(default=512, gt=0)
    """Cap on `sae.batch_size`."""
    max_warmup_steps: int = Field(default=5, ge=0)
    """Cap on `sae.lr_warmup_steps` and `sae.l1_warmup_steps`."""
    max_record_batch: int = Field(default=32, gt=0)
    """Cap on `record.batch_size`."""
    max_shard_mb: int = Field(default=64, gt=0)
    """Cap on `record.shard_mb`."""
    max_head_epochs: int = Field(default=3, gt=0)
    """Cap on `heads.*.epochs` (the learning-rate × weight-decay grid is the spec's own)."""
    max_head_batch: int = Field(default=64, gt=0)
    """Cap on `heads.*.batch_size`."""
    max_edit_features: int = Field(default=4, gt=0)
    """Cap on `edits[].generate.top_purity`."""
    max_edit_images: int = Field(default=2, gt=0)
    """Cap on `edits[].generate.images_per_feature`."""
    max_experiment_images: int = Field(default=1, gt=0)
    """Cap on `experiments[].n_images`."""
    max_experiment_concepts: int = Field(default=4, gt=0)
    """Concepts each experiment tests: its own `concepts`, else this many of the classes its head
    predicts, spread evenly over them (ranking on the head's training data still scores every class)."""


# --------------------------------------------------------------------------- cache entries


def cached_entry(cache_dir: Path, name: str, write: Callable[[Path], None]) -> Path:
    """`<cache_dir>/<name>`, written once by `write(folder)` into a fresh folder that is then
    renamed into place, under the entry's lock (a second builder waits for the first)."""
    cache_dir = Path(cache_dir)
    final = cache_dir / name
    done = final / ".complete"
    if done.is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with cache_entry_lock(cache_dir, name):
        if done.is_file():
            return final
        for leftover in cache_dir.glob(name + ".partial-*"):  # killed builders' (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=name + ".partial-", dir=cache_dir))
        try:
            write(partial / "entry")
            (partial / "entry" / ".complete").write_text("")
            if final.exists():  # an entry without its marker: a build from before it had one
                shutil.rmtree(final)
            os.rename(partial / "entry", final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- pictures

IMAGE_SIDES = (72, 96, 120)
"""Sides the generated images are drawn from: unequal, and unequal to the models' input, so
every image goes through the real resize and crop."""


def _rng(*key: int | str) -> np.random.Generator:
    """A generator of its own for each image: order-independent and reproducible."""
    return np.random.default_rng([int(content_hash(*key), 16)])


def class_colour(class_id: int) -> np.ndarray:
    """A colour per class, spread around the hue circle (what a head can learn to tell apart)."""
    hue = (class_id * 0.61803398875) % 1.0
    rgb = np.array(Image.new("HSV", (1, 1), (int(hue * 255), 200, 220)).convert("RGB").getpixel((0, 0)), dtype=np.float32)
    return rgb


def class_picture(class_id: int, rng: np.random.Generator) -> Image.Image:
    """A photo-sized picture of class `class_id`: a noisy background and a blob of the class colour."""
    w, h = int(rng.choice(IMAGE_SIDES)), int(rng.choice(IMAGE_SIDES))
    image_hw3 = rng.normal(110, 30, size=(h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    radius = rng.uniform(0.25, 0.4) * min(h, w)
    inside_hw = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    image_hw3[inside_hw] = class_colour(class_id) + rng.normal(0, 12, size=(int(inside_hw.sum()), 3))
    return Image.fromarray(np.clip(image_hw3, 0, 255).astype(np.uint8), "RGB")


def scene_picture(class_ids: list[int], rng: np.random.Generator, grid: int = 4) -> tuple[Image.Image, np.ndarray]:
    """A scene of `grid × grid` regions, region k showing class `class_ids[k]`; and its mask, with
    class c stored as c + 1 and a 0 (unlabelled) border between regions, as ADE20K stores them."""
    w, h = 4 * int(rng.choice(IMAGE_SIDES)) // 3, int(rng.choice(IMAGE_SIDES))  # landscape, like most scenes
    image_hw3 = np.empty((h, w, 3), dtype=np.float32)
    mask_hw = np.zeros((h, w), dtype=np.uint8)
    ys, xs = np.linspace(0, h, grid + 1).astype(int), np.linspace(0, w, grid + 1).astype(int)
    for k, class_id in enumerate(class_ids[: grid * grid]):
        r, c = divmod(k, grid)
        region = (slice(ys[r], ys[r + 1]), slice(xs[c], xs[c + 1]))
        shape = (ys[r + 1] - ys[r], xs[c + 1] - xs[c], 3)
        image_hw3[region] = class_colour(class_id) + rng.normal(0, 15, size=shape)
        mask_hw[region] = class_id + 1
        mask_hw[ys[r] : ys[r] + 2, xs[c] : xs[c + 1]] = 0
        mask_hw[ys[r] : ys[r + 1], xs[c] : xs[c] + 2] = 0
    return Image.fromarray(np.clip(image_hw3, 0, 255).astype(np.uint8), "RGB"), mask_hw


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)


# --------------------------------------------------------------------------- miniature datasets


def write_image_folder(root: Path, scale: RehearsalScale) -> None:
    """ImageNet's train layout: `<wnid>/<wnid>_<n>.JPEG` in one folder per class."""
    n = scale.folder_classes
    for class_id in range(n):
        wnid = f"n{1440764 + 1000 * class_id:08d}"
        for j in range(scale.folder_images_per_class):
            _save_jpeg(class_picture(class_id, _rng("folder", class_id, j)), root / wnid / f"{wnid}_{j + 1}.JPEG")


def cub_class_name(class_id: int) -> str:
    """`classes.txt`'s form: `001.Black_footed_Albatross` (here `001.Species_001`)."""
    return f"{class_id + 1:03d}.Species_{class_id + 1:03d}"


def write_cub200(root: Path, scale: RehearsalScale) -> None:
    """`CUB_200_2011/`: `images/<class>/<name>.jpg` and images.txt, image_class_labels.txt,
    train_test_split.txt, classes.txt (1-based ids, `<id> <value>` lines), as released."""
    images, labels, split, classes = [], [], [], []
    n, per_class = scale.cub_classes, scale.cub_train_per_class + scale.cub_test_per_class
    for class_id in range(n):
        name = cub_class_name(class_id)
        classes.append(f"{class_id + 1} {name}")
        for j in range(per_class):
            ident = len(images) + 1
            rel = f"{name}/{name.split('.', 1)[1]}_{ident:04d}_{j}.jpg"
            _save_jpeg(class_picture(class_id, _rng("cub", class_id, j)), root / "images" / rel)
            images.append(f"{ident} {rel}")
            labels.append(f"{ident} {class_id + 1}")
            split.append(f"{ident} {1 if j < scale.cub_train_per_class else 0}")
    for file, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("train_test_split.txt", split), ("classes.txt", classes)):
        (root / file).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_ade20k(root: Path, scale: RehearsalScale) -> None:
    """`ADEChallengeData2016/`: images/{training,validation}/ADE_*.jpg, same-stem PNG masks under
    annotations/ (0 unlabelled, k = class k−1) and objectInfo150.csv naming the 150 classes. The
    masks of each split walk through the classes in their own order, so 10 images show all 150."""
    from saev_report.datasets.folders import ADE20K_CLASSES

    n = len(ADE20K_CLASSES)
    rows = ["Idx,Ratio,Train,Val,Name"] + [f'{i + 1},0.01,1,1,"{name}"' for i, name in enumerate(ADE20K_CLASSES)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "objectInfo150.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    for split, count, tag in (("training", scale.ade_training, "train"), ("validation", scale.ade_validation, "val")):
        cycle = np.random.default_rng(len(split)).permutation(n)  # the regions walk through every class
        for i in range(count):
            rng = _rng("ade", split, i)
            class_ids = [int(cycle[(16 * i + k) % n]) for k in range(16)]
            image, mask_hw = scene_picture(class_ids, rng)
            stem = f"ADE_{tag}_{i + 1:08d}"
            _save_jpeg(image, root / "images" / split / f"{stem}.jpg")
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask_hw, "L").save(root / "annotations" / split / f"{stem}.png")


def write_seg_folder(root: Path, scale: RehearsalScale) -> None:
    """`images/<stem>.jpg` with `masks/<stem>.png` holding class ids (8 classes, 255 between regions)."""
    for i in range(scale.seg_images):
        rng = _rng("seg", i)
        image, mask_hw = scene_picture([int(c) for c in rng.choice(8, size=4)], rng, grid=2)
        mask_hw = np.where(mask_hw == 0, 255, mask_hw - 1).astype(np.uint8)
        _save_jpeg(image, root / "images" / f"{i:05d}.jpg")
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask_hw, "L").save(root / "masks" / f"{i:05d}.png")


# The scale fields each generated tree depends on (its cache key), by generator.
TREE_SIZES: dict[Callable[[Path, RehearsalScale], None], tuple[str, ...]] = {
    write_image_folder: ("folder_classes", "folder_images_per_class"),
    write_cub200: ("cub_classes", "cub_train_per_class", "cub_test_per_class"),
    write_ade20k: ("ade_training", "ade_validation"),
    write_seg_folder: ("seg_images",),
}


def _folder_entry(cache_dir: Path, name: str, scale: RehearsalScale, write: Callable[[Path, RehearsalScale], None]) -> Path:
    sizes = {field: getattr(scale, field) for field in TREE_SIZES[write]}
    return cached_entry(cache_dir, f"rehearsal-{name}-{content_hash(name, FORMAT_VERSION, sizes)}", lambda folder: write(folder, scale))


def miniature_image_folder(spec: ImageFolderDataset, cache_dir: Path, scale: RehearsalScale) -> DatasetSpec:
    root = _folder_entry(cache_dir, "imagenet", scale, write_image_folder)
    return spec.model_copy(update={"root": root, "n_images": None})


def miniature_cub200(spec: Cub200Dataset, cache_dir: Path, scale: RehearsalScale) -> DatasetSpec:
    return spec.model_copy(update={"root": _folder_entry(cache_dir, "CUB_200_2011", scale, write_cub200)})


def miniature_ade20k(spec: Ade20kDataset, cache_dir: Path, scale: RehearsalScale) -> DatasetSpec:
    return spec.model_copy(update={"root": _folder_entry(cache_dir, "ADEChallengeData2016", scale, write_ade20k)})


def miniature_seg_folder(spec: SegFolderDataset, cache_dir: Path, scale: RehearsalScale) -> DatasetSpec:
    root = _folder_entry(cache_dir, "seg_folder", scale, write_seg_folder)
    classes = spec.classes if spec.classes and len(spec.classes) >= 8 else [f"class_{i}" for i in range(8)]
    return spec.model_copy(update={"images": root / "images", "masks": root / "masks", "classes": classes, "ignore_index": 255})


def miniature_demo(spec: DemoDataset, cache_dir: Path, scale: RehearsalScale) -> DatasetSpec:
    """The demo set is generated offline already; a rehearsal only makes it small."""
    return spec.model_copy(update={"n_images": min(spec.n_images, 120), "size": min(spec.size, 128)})


MINIATURES: dict[str, Callable[..., DatasetSpec]] = {
    "image_folder": miniature_image_folder,
    "cub200": miniature_cub200,
    "ade20k": miniature_ade20k,
    "seg_folder": miniature_seg_folder,
    "demo": miniature_demo,
}
"""Dataset kind → the miniature that stands in for it (a spec entry pointing at a generated tree)."""


# --------------------------------------------------------------------------- tiny models


class RehearsalUnsupported(ValueError):
    """A spec entry the rehearsal has no miniature for."""


def _depth(model: ModelSpec) -> int:
    """Blocks of the tiny twin: the real model's (so layer L keeps its place), else the deepest layer named."""
    return model_depth(model) or max(model.layers)


def _heads(scale: RehearsalScale) -> int:
    return max(1, scale.d_model // scale.head_dim)


# HF model types a source names, most specific first: a rehearsal must know the class offline,
# before any config is downloadable.
HF_SOURCE_TYPES: tuple[tuple[str, str], ...] = (
    ("dinov2-with-registers", "dinov2_with_registers"),
    ("dinov2", "dinov2"),
    ("siglip", "siglip_vision_model"),
    ("clip", "clip_vision_model"),
)


def hf_model_type(source: str) -> str:
    """The HF `model_type` of `source`: from its config when cached or local, else from its name."""
    from saev_report.backbones.hf import import_transformers

    transformers = import_transformers()
    try:
        return str(transformers.AutoConfig.from_pretrained(source, local_files_only=True).model_type)  # never the network
    except (OSError, ValueError):
        pass
    for fragment, model_type in HF_SOURCE_TYPES:
        if fragment in source.lower():
            return model_type
    raise RehearsalUnsupported(f"cannot tell which HF model class {source!r} is offline; name a local checkpoint folder")


def tiny_hf(model: ModelSpec, cache_dir: Path, scale: RehearsalScale) -> ModelSpec:
    """A random HF checkpoint folder of the source's own class (Dinov2Model, CLIPVisionModel, ...)."""
    from saev_report.backbones.hf import adapter_class, import_transformers

    assert model.source
    model_type = hf_model_type(model.source)
    arch = known_arch(model)
    depth = _depth(model)
    sizes = {"hidden_size": scale.d_model, "num_hidden_layers": depth, "num_attention_heads": _heads(scale),
             "intermediate_size": 4 * scale.d_model}
    if arch is not None:
        sizes |= {"patch_size": arch.patch_size, "image_size": arch.image_size}
        if arch.n_registers:
            sizes["num_register_tokens"] = arch.n_registers

    def write(folder: Path) -> None:
        import torch

        transformers = import_transformers()
        model_class = getattr(transformers, adapter_class(model_type).model_class)
        from saev_report.backbones.hf import quiet_transformers

        torch.manual_seed(0)
        with quiet_transformers():
            model_class(model_class.config_class(**sizes)).save_pretrained(folder)

    key = content_hash("hf", FORMAT_VERSION, model_type, sizes)
    folder = cached_entry(cache_dir, f"rehearsal-hf-{model_type}-{key}", write)
    return model.model_copy(update={"source": str(folder), "n_layers": depth})


def tiny_open_clip(model: ModelSpec, cache_dir: Path, scale: RehearsalScale) -> ModelSpec:
    """An open_clip `local-dir` checkpoint (`open_clip_config.json` + safetensors): the spec's own
    architecture config, its vision tower narrowed and its text tower shrunk to a stub."""
    from saev_report.backbones.open_clip_vit import _import_open_clip, parse_source

    open_clip = _import_open_clip()
    assert model.source
    arch, pretrained = parse_source(model.source)
    config = open_clip.get_model_config(arch)
    if config is None:
        raise RehearsalUnsupported(f"open_clip has no architecture {arch!r} to make a tiny twin of")
    tag = (open_clip.get_pretrained_cfg(arch, pretrained) or {}) if pretrained else {}
    vision = dict(config["vision_cfg"])
    depth = _depth(model)
    vision |= {"width": scale.d_model, "layers": depth, "head_width": scale.head_dim}
    model_cfg = {**config, "embed_dim": scale.d_model, "vision_cfg": vision,
                 "text_cfg": {**config["text_cfg"], "width": scale.head_dim, "heads": 1, "layers": 1}}
    if tag.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    preprocess = {k: list(tag[k]) for k in ("mean", "std") if k in tag}

    def write(folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=1))
        torch.manual_seed(0)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # open_clip warns that the folder has no weights yet: it is making them
        try:
            clip = open_clip.create_model(f"local-dir:{folder}", pretrained=None, load_weights=False)
        finally:
            root.setLevel(level)
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "open_clip_model.safetensors"))

    key = content_hash("open_clip", FORMAT_VERSION, model_cfg, preprocess)
    folder = cached_entry(cache_dir, f"rehearsal-open_clip-{arch}-{key}", write)
    return model.model_copy(update={"source": str(folder), "n_layers": depth})


def tiny_imgfocus(model: ModelSpec, cache_dir: Path, scale: RehearsalScale) -> ModelSpec:
    """The offline DINOv2 ViT-S/14 is small enough already."""
    return model


TINY_MODELS: dict[str, Callable[[ModelSpec, Path, RehearsalScale], ModelSpec]] = {
    "hf": tiny_hf,
    "open_clip": tiny_open_clip,
    "imgfocus": tiny_imgfocus,
}
"""Model family → the tiny twin that stands in for a model of it."""


# --------------------------------------------------------------------------- the spec


def rehearsal_spec(spec: Spec, cache_dir: Path, scale: RehearsalScale = RehearsalScale()) -> Spec:
    """`spec` at miniature scale on CPU: the same graph over generated data and tiny models."""
    datasets = {}
    for key, ds in spec.datasets.items():
        if ds.kind not in MINIATURES:
            raise RehearsalUnsupported(f"datasets.{key}: no miniature for dataset kind {ds.kind!r}")
        datasets[key] = MINIATURES[ds.kind](ds, Path(cache_dir), scale)
    models = {}
    for key, model in spec.models.items():
        if model.family not in TINY_MODELS:
            raise RehearsalUnsupported(f"models.{key}: no tiny twin for model family {model.family!r}")
        # the `sae` override is excluded from dumps; model_copy keeps it
        models[key] = TINY_MODELS[model.family](model, Path(cache_dir), scale)
    sae = spec.sae
    sae = sae.model_copy(update={
        "expansion": _capped_distinct(sae.expansion, scale.max_expansion),
        "n_patches": min(sae.n_patches, scale.max_n_patches),
        "batch_size": min(sae.batch_size, scale.max_sae_batch),
        "lr_warmup_steps": min(sae.lr_warmup_steps, scale.max_warmup_steps),
        "l1_warmup_steps": min(sae.l1_warmup_steps, scale.max_warmup_steps),
    })
    heads = {key: head.model_copy(update={"epochs": min(head.epochs, scale.max_head_epochs),
                                          "batch_size": min(head.batch_size, scale.max_head_batch)})
             for key, head in spec.heads.items()}
    edits = []
    for edit in spec.edits:
        generate = edit.generate
        if generate is not None:
            generate = generate.model_copy(update={"top_purity": min(generate.top_purity, scale.max_edit_features),
                                                   "images_per_feature": min(generate.images_per_feature, scale.max_edit_images)})
        edits.append(edit.model_copy(update={"generate": generate}))
    experiments = [exp.model_copy(update={"n_images": min(exp.n_images, scale.max_experiment_images),
                                          "concepts": _sample_concepts(exp, spec.heads[exp.head], datasets, cache_dir, scale)})
                   for exp in spec.experiments]
    record = spec.record.model_copy(update={"batch_size": min(spec.record.batch_size, scale.max_record_batch),
                                            "shard_mb": min(spec.record.shard_mb, scale.max_shard_mb)})
    run = spec.run.model_copy(update={"name": spec.run.name[: 64 - len(RUN_SUFFIX)] + RUN_SUFFIX, "device": "cpu"})
    report = spec.report.model_copy(update={"title": f"{spec.report.title} (rehearsal)"})
    rehearsed = spec.model_copy(update={"run": run, "datasets": datasets, "models": models, "record": record, "sae": sae,
                                        "heads": heads, "edits": edits, "experiments": experiments, "report": report})
    problems = cross_check(rehearsed, check_paths=True)
    if problems:  # a miniature that breaks what the spec's own validation allowed: a rehearsal bug
        raise RehearsalUnsupported("; ".join(f"{'.'.join(map(str, loc))}: {message}" for loc, message in problems))
    return rehearsed


def _sample_concepts(exp: ExperimentSpec, head: HeadSpec, datasets: dict[str, DatasetSpec], cache_dir: Path,
                     scale: RehearsalScale) -> list[str]:
    """At most `max_experiment_concepts` of the experiment's concepts: the classes its head predicts
    (mask classes for segmentation, labels for classification), evenly spread, in class order."""
    from saev_report.datasets import open_dataset

    if exp.concepts is not None:
        return list(exp.concepts[: scale.max_experiment_concepts])
    train = open_dataset(head.train, datasets[head.train], Path(cache_dir))
    names = list(train.seg_classes or []) if head.task == "segmentation" else list(train.classes)
    step = max(1, len(names) // scale.max_experiment_concepts)
    return names[::step][: scale.max_experiment_concepts]


def _capped_distinct(values: list[int], cap: int) -> list[int]:
    """Scale a sweep of several widths down by one factor, so its length (which `edits[].sae` and
    `experiments[].saes` index) and its order survive: [16, 32] → [2, 4] under cap 4."""
    top = max(values)
    if top <= cap:
        return list(values)
    factor = -(-top // cap)
    scaled = [max(1, v // factor) for v in values]
    return scaled if len(set(scaled)) == len(scaled) else list(range(1, len(values) + 1))
