"""Linear probes on a frozen backbone's final-layer tokens (paper §10–11).

Classification reads the CLS token after the final norm (models without CLS,
e.g. SigLIP, mean-pool their patch tokens); segmentation applies one linear
layer to every patch token, giving a low-resolution logit map that is
bilinearly upsampled to the mask's resolution for evaluation.

Features are read once from the recorded final-norm tokens (`extract_head_features`), then every
(lr, weight decay) of the sweep trains from the same seed on them and the best
on validation is kept (`train_head`). Heads are saved as safetensors + JSON
(`save_head` / `load_head`) and scored in the `heads` table (`head_row`).

Masks go through the same resize + centre crop as the image (nearest
neighbour), so "full resolution" is the model input's resolution, where mask
and image are aligned. Unlabelled mask pixels are stored as `IGNORE` (-1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from saev_report.backbones import TokenLayout, resize_size
from saev_report.datasets import BadImage, ImageDataset
from saev_report.progress import log, track
from saev_report.spec import HeadSpec

IGNORE = -1
"""Target value of unlabelled pixels / patches (the dataset's `ignore_index` is mapped to it)."""

HOLDOUT_FRACTION = 0.2
"""Share of the training images held out for model selection when the spec names no `val`."""

EVAL_CHUNK = 16
"""Images per step when upsampling segmentation logits for evaluation (bounds memory)."""

WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "head.json"


# --------------------------------------------------------------------------- reading tokens


def head_inputs(final_btd: Tensor, layout: TokenLayout, task: str) -> Tensor:
    """What a head reads from final-norm tokens: CLS (or mean patch) [b, d], or patches [b, gh, gw, d]."""
    patches_bpd = final_btd[:, layout.patch_slice]
    if task == "classification":
        return final_btd[:, layout.cls_index] if layout.n_cls else patches_bpd.mean(dim=1)
    if task == "segmentation":
        return patches_bpd.reshape(final_btd.shape[0], *layout.grid, final_btd.shape[-1])
    raise ValueError(f"unknown head task {task!r}")


def apply_linear(linear: nn.Linear, inputs: Tensor, task: str) -> Tensor:
    """Logits [b, C] (classification) or [b, C, gh, gw] (segmentation) from `head_inputs`."""
    logits = linear(inputs.to(linear.weight.dtype))
    return logits.permute(0, 3, 1, 2) if task == "segmentation" else logits


class LinearHead(nn.Module):
    """A trained probe, applied to a backbone's final-norm tokens."""

    def __init__(self, linear: nn.Linear, task: str, classes: Sequence[str], model: str = "", meta: dict[str, Any] | None = None):
        super().__init__()
        self.linear = linear
        self.task = task
        self.classes = list(classes)
        self.model = model
        self.meta = dict(meta or {})

    def forward(self, final_btd: Tensor, layout: TokenLayout) -> Tensor:
        """Logits [b, C], or [b, C, grid_h, grid_w] for segmentation."""
        return apply_linear(self.linear, head_inputs(final_btd, layout, self.task), self.task)


# --------------------------------------------------------------------------- features


@dataclass
class HeadData:
    """Frozen-backbone inputs of a head for one dataset, with their targets."""

    task: str
    inputs: Tensor
    """[n, d] (classification) or [n, grid_h, grid_w, d] (segmentation), float32."""
    labels: Tensor
    """[n] int64 image-level label: index into `classes` (classification) or into the dataset's
    `classes` (segmentation); -1 for unlabelled."""
    masks: Tensor | None
    """[n, H, W] int16 class ids at the model input's resolution, IGNORE where unlabelled (segmentation)."""
    image_idx: Tensor
    """[n] int64 dataset index of each kept image."""
    classes: list[str]
    """Head output classes: the dataset's `classes` or `seg_classes`."""
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """(image index, reason) of images left out."""

    @property
    def targets(self) -> Tensor:
        """Labels [n] (classification) or full-resolution masks [n, H, W] (segmentation)."""
        if self.task == "classification":
            return self.labels
        assert self.masks is not None
        return self.masks

    def __len__(self) -> int:
        return int(self.image_idx.numel())


def mask_like_image(mask_hw: np.ndarray, image_wh: tuple[int, int], image_size: int, ignore_index: int, n_classes: int) -> Tensor:
    """A mask through the image's geometry (resize shorter side to size·8/7, centre crop), nearest
    neighbour, as int16 with `ignore_index` and out-of-range ids mapped to IGNORE: [size, size]."""
    mask = torch.from_numpy(np.asarray(mask_hw, dtype=np.int64))
    valid = (mask >= 0) & (mask < n_classes) & (mask != ignore_index)
    mask = torch.where(valid, mask, torch.full_like(mask, IGNORE)).to(torch.int16)[None]  # [1, H, W]
    width, height = image_wh
    if mask.shape[-2:] != (height, width):  # a mask saved at another size still covers the whole image
        mask = TF.resize(mask, [height, width], interpolation=T.InterpolationMode.NEAREST_EXACT)
    mask = TF.resize(mask, resize_size(image_size), interpolation=T.InterpolationMode.NEAREST_EXACT)
    return TF.center_crop(mask, [image_size, image_size])[0]


def patch_targets(masks_nhw: Tensor, grid: tuple[int, int], n_classes: int) -> Tensor:
    """Majority class of the labelled pixels of every patch: [n, grid_h, grid_w] int64 (IGNORE if none)."""
    n, height, width = masks_nhw.shape
    gh, gw = grid
    ph, pw = height // gh, width // gw
    blocks = masks_nhw[:, : gh * ph, : gw * pw].long().reshape(n, gh, ph, gw, pw).permute(0, 1, 3, 2, 4)
    blocks = blocks.reshape(n * gh * gw, ph * pw)
    valid = blocks != IGNORE
    patch_id = torch.arange(blocks.shape[0]).unsqueeze(1).expand_as(blocks)
    counts = torch.bincount((patch_id * n_classes + blocks)[valid], minlength=blocks.shape[0] * n_classes)
    counts = counts.reshape(-1, n_classes)
    majority = counts.argmax(dim=1)  # ties: the lower class id
    majority[counts.sum(dim=1) == 0] = IGNORE
    return majority.reshape(n, gh, gw)


def head_classes(dataset: ImageDataset, task: str) -> list[str]:
    if task == "classification":
        return list(dataset.classes)
    if dataset.seg_classes:
        return list(dataset.seg_classes)
    raise ValueError(f"dataset {dataset.key!r} has no segmentation classes (seg_classes)")


class FinalTokens(Protocol):
    """Recorded final-norm tokens, found by image file path (`record.RecordedTokens`)."""

    layout: TokenLayout
    image_size: int
    """Side of the model input, where masks are compared with the predictions."""

    def get(self, path: str) -> Tensor | None:
        """[tokens, d], or None for an image the recording skipped."""


def extract_head_features(
    tokens: FinalTokens,
    dataset: ImageDataset,
    task: str,
    classes: Sequence[str] | None = None,
) -> HeadData:
    """What a head reads (CLS / mean patch, or the patch grid) of every usable image, with targets.

    The tokens come from the recording, so no backbone runs here. Images the
    recording skipped, images without a label (classification) or a mask
    (segmentation), and unreadable masks are skipped and listed in `skipped`.
    `classes` fixes the output classes (e.g. the training set's, when
    extracting validation data).
    """
    classes = list(classes) if classes is not None else head_classes(dataset, task)
    lookup = {name: i for i, name in enumerate(classes)}
    image_classes = {name: i for i, name in enumerate(dataset.classes)}
    inputs, labels, masks, kept, skipped = [], [], [], [], []
    for position, record in enumerate(track(dataset.records, f"head features {dataset.key}", unit="img")):
        if task == "classification" and record.label not in lookup:
            skipped.append((record.index, "no label" if record.label is None else f"label {record.label!r} is not a head class"))
            continue
        final_td = tokens.get(record.path)
        if final_td is None:
            skipped.append((record.index, "not recorded (unreadable or non-finite)"))
            continue
        if task == "segmentation":
            try:
                masks.append(_aligned_mask(dataset, position, tokens.image_size, len(classes)))
            except BadImage as exc:
                skipped.append((record.index, exc.reason))
                continue
        inputs.append(head_inputs(final_td[None].float(), tokens.layout, task)[0])
        kept.append(record.index)
        labels.append((lookup if task == "classification" else image_classes).get(record.label, -1))
    if skipped:
        log(f"  skipped {len(skipped)} image(s) of {dataset.key} for the {task} head (first: {skipped[0][1]})")
    if not kept:
        raise ValueError(f"dataset {dataset.key!r} has no usable images for a {task} head")
    return HeadData(
        task=task,
        inputs=torch.stack(inputs),
        labels=torch.tensor(labels, dtype=torch.int64),
        masks=torch.stack(masks) if task == "segmentation" else None,
        image_idx=torch.tensor(kept, dtype=torch.int64),
        classes=classes,
        skipped=skipped,
    )


def _aligned_mask(dataset: ImageDataset, position: int, image_size: int, n_classes: int) -> Tensor:
    """The record's mask through its image's geometry; raises BadImage."""
    if dataset.records[position].mask_path is None:
        raise BadImage("no mask")
    image_wh = dataset.image(position).size  # as loaded (EXIF-rotated), which is what was recorded
    return mask_like_image(dataset.mask(position), image_wh, image_size, dataset.ignore_index, n_classes)


# --------------------------------------------------------------------------- metrics


def confusion_matrix(pred: Tensor, target: Tensor, n_classes: int) -> Tensor:
    """[C, C] counts, rows = target, cols = prediction, IGNORE targets left out."""
    valid = target != IGNORE
    index = target[valid].long() * n_classes + pred[valid].long()
    return torch.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def scores_from_confusion(confusion: Tensor) -> dict[str, float]:
    """Pixel accuracy and mIoU (mean over classes present in the targets or the predictions)."""
    confusion = confusion.double()
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    total = confusion.sum()
    return {
        "accuracy": float(inter.sum() / total) if total > 0 else float("nan"),
        "miou": float((inter[present] / union[present]).mean()) if present.any() else float("nan"),
    }


def upsampled_logits(logits_bchw: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of patch logits to pixel resolution (align_corners=False, as mmseg)."""
    return F.interpolate(logits_bchw.float(), size=size, mode="bilinear", align_corners=False)


def class_map(logits_bc_: Tensor) -> Tensor:
    """Index of the top class along dim 1 ([b, c, ...] → [b, ...]), the first one on ties.

    `max(1).indices` rather than `argmax(1)`: on CPU, argmax over a strided class dim is about
    10× slower (6 ms for 9 classes × 224², which made it most of an experiment's time).
    """
    return logits_bc_.max(dim=1).indices


def pixel_classes(logits_bchw: Tensor, size: tuple[int, int]) -> Tensor:
    """Predicted class of every pixel [b, h, w]: argmax of the bilinearly upsampled logits."""
    return class_map(upsampled_logits(logits_bchw, size))


@torch.no_grad()
def evaluate(linear: nn.Linear, inputs: Tensor, targets: Tensor, task: str) -> dict[str, float]:
    """Classification: accuracy. Segmentation: pixel accuracy and mIoU of upsampled logits."""
    device = linear.weight.device
    if task == "classification":
        pred = class_map(apply_linear(linear, inputs.to(device), task)).cpu()
        return {"accuracy": float((pred == targets).double().mean()), "miou": float("nan")}
    n_classes = linear.out_features
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    for start in range(0, len(inputs), EVAL_CHUNK):
        logits = apply_linear(linear, inputs[start : start + EVAL_CHUNK].to(device), task)
        masks = targets[start : start + EVAL_CHUNK]
        pred = pixel_classes(logits, tuple(masks.shape[-2:])).cpu()
        confusion += confusion_matrix(pred, masks, n_classes)
    return scores_from_confusion(confusion)


# --------------------------------------------------------------------------- training


@dataclass
class TrainedHead:
    linear: nn.Linear
    task: str
    lr: float
    weight_decay: float
    metrics: dict[str, float]
    """Validation `accuracy` (pixel accuracy for segmentation) and `miou` (nan for classification)."""
    n_train: int
    n_val: int
    sweep: list[dict[str, float]]
    """Validation metrics of every (lr, weight_decay) tried."""


def holdout_split(n: int, seed: int, fraction: float = HOLDOUT_FRACTION) -> tuple[Tensor, Tensor]:
    """Seeded (train, val) index split; with fewer than 2 examples both are everything."""
    if n < 2:
        everything = torch.arange(n)
        return everything, everything
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(n * fraction)))
    return order[n_val:].sort().values, order[:n_val].sort().values


# Logits of one step of `_fit_many` stay under this many bytes: settings are fitted in groups.
FIT_LOGITS_BYTES = 1 << 29


def _fit_many(inputs: Tensor, targets: Tensor, task: str, n_classes: int, settings: Sequence[tuple[float, float]],
              epochs: int, batch_size: int, seed: int, device: torch.device) -> list[nn.Linear]:
    """One AdamW run per (lr, weight_decay) of `settings`, all in one pass over the batches.

    Every run starts from the same seeded initialisation and sees the same example order, so the
    runs only differ in their optimiser settings: their weights are stacked into one matrix and
    one matmul serves them all (the separate losses add up; no gradient crosses runs). Fitting
    the 18 default settings one by one cost 18 gathers of the batch and 18 thin matmuls, most of
    the segmentation head's time.
    """
    rows_per_step = min(batch_size, len(inputs)) * (int(math.prod(inputs.shape[1:-1])) if task == "segmentation" else 1)
    group = max(1, FIT_LOGITS_BYTES // max(1, rows_per_step * n_classes * 4 * 3))  # logits, their grad, softmax
    fitted: list[nn.Linear] = []
    for start in range(0, len(settings), group):
        fitted += _fit_group(inputs, targets, task, n_classes, settings[start : start + group], epochs, batch_size, seed, device)
    return fitted


def _fit_group(inputs: Tensor, targets: Tensor, task: str, n_classes: int, settings: Sequence[tuple[float, float]],
               epochs: int, batch_size: int, seed: int, device: torch.device) -> list[nn.Linear]:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # PyTorch's default init, drawn from our seed
        torch.manual_seed(seed)
        init = nn.Linear(inputs.shape[-1], n_classes)
    weights = [init.weight.detach().clone().to(device).requires_grad_(True) for _ in settings]  # [C, d] each
    biases = [init.bias.detach().clone().to(device).requires_grad_(True) for _ in settings]  # [C] each
    optimizer = torch.optim.AdamW([{"params": [w, b], "lr": lr, "weight_decay": wd}
                                   for (lr, wd), w, b in zip(settings, weights, biases)])
    k = len(settings)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(inputs), generator=generator).split(batch_size):
                y = targets[batch].to(device)
                if not (y != IGNORE).any():
                    continue  # every patch unlabelled: no gradient (and a nan loss)
                x_nd = inputs[batch].to(device, torch.float32).reshape(-1, inputs.shape[-1])
                logits_nkc = (x_nd @ torch.cat(weights).T + torch.cat(biases)).reshape(-1, k, n_classes)
                y_nk = y.reshape(-1, 1).expand(-1, k)
                # mean over all (row, run) pairs = mean of the runs' means, as rows and ignores are shared
                loss = F.cross_entropy(logits_nkc.reshape(-1, n_classes), y_nk.reshape(-1), ignore_index=IGNORE) * k
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    fitted = []
    for w, b in zip(weights, biases):
        linear = nn.Linear(inputs.shape[-1], n_classes).to(device)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        fitted.append(linear.eval().requires_grad_(False))
    return fitted


def train_head(
    features: Tensor,
    targets: Tensor,
    spec: HeadSpec,
    seed: int,
    n_classes: int,
    val: tuple[Tensor, Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> TrainedHead:
    """Sweep `spec.lrs × spec.weight_decays` with AdamW and keep the best on validation.

    `features`/`targets` are `HeadData.inputs`/`HeadData.targets` (labels [n], or
    full-resolution masks [n, H, W] whose per-patch majority class is the training
    target). Selection is on `val` when given, else on a seeded 20 % hold-out of
    the training images; it uses accuracy (classification) or mIoU (segmentation),
    ties going to the earlier setting. The same seed gives identical weights.
    """
    task = spec.task
    device = torch.device(device)
    if val is None:
        train_idx, val_idx = holdout_split(len(features), seed)
        val = (features[val_idx], targets[val_idx])
        features, targets = features[train_idx], targets[train_idx]
    val_features, val_targets = val
    train_targets = targets.long()
    if task == "segmentation":
        train_targets = patch_targets(targets, tuple(features.shape[1:3]), n_classes)
    key = "accuracy" if task == "classification" else "miou"

    best: TrainedHead | None = None
    sweep = []
    settings = [(lr, weight_decay) for lr in spec.lrs for weight_decay in spec.weight_decays]
    fitted = _fit_many(features, train_targets, task, n_classes, settings, spec.epochs, spec.batch_size, seed, device)
    for (lr, weight_decay), linear in zip(settings, fitted):
        metrics = evaluate(linear, val_features, val_targets, task)
        sweep.append({"lr": lr, "weight_decay": weight_decay, **metrics})
        score = -math.inf if math.isnan(metrics[key]) else metrics[key]
        best_score = -math.inf if best is None or math.isnan(best.metrics[key]) else best.metrics[key]
        if best is None or score > best_score:
            best = TrainedHead(linear.cpu(), task, lr, weight_decay, metrics, len(features), len(val_features), sweep)
    assert best is not None
    return best


# --------------------------------------------------------------------------- saving


def save_head(out_dir: Path, trained: TrainedHead, *, head_key: str, model_key: str, classes: Sequence[str]) -> Path:
    """`head.safetensors` (weight, bias) + `head.json` (task, classes, model, selection) in `out_dir`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"weight": trained.linear.weight.detach().cpu().contiguous(), "bias": trained.linear.bias.detach().cpu().contiguous()},
              str(out_dir / WEIGHTS_FILE))
    config = {
        "head": head_key, "model": model_key, "task": trained.task, "classes": list(classes),
        "lr": trained.lr, "weight_decay": trained.weight_decay, "metrics": _json_floats(trained.metrics),
        "n_train": trained.n_train, "n_val": trained.n_val, "sweep": [_json_floats(s) for s in trained.sweep],
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir


def _json_floats(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def load_head(head_dir: Path, device: torch.device | str = "cpu") -> LinearHead:
    """A head saved by `save_head`, frozen, on `device`."""
    from safetensors.torch import load_file

    head_dir = Path(head_dir)
    config = json.loads((head_dir / CONFIG_FILE).read_text())
    state = load_file(str(head_dir / WEIGHTS_FILE))
    n_classes, d_model = state["weight"].shape
    linear = nn.Linear(d_model, n_classes)
    linear.load_state_dict(state)
    head = LinearHead(linear, config["task"], config["classes"], config.get("model", ""), meta=config)
    return head.to(device).eval().requires_grad_(False)


def head_row(head_key: str, model_key: str, trained: TrainedHead, classes: Sequence[str]) -> dict[str, Any]:
    """One row of the `heads` table."""
    miou = trained.metrics.get("miou", float("nan"))
    return {
        "head": head_key, "model": model_key, "task": trained.task, "classes": list(classes),
        "lr": trained.lr, "weight_decay": trained.weight_decay,
        "val_accuracy": trained.metrics["accuracy"],
        "val_miou": None if trained.task == "classification" or math.isnan(miou) else miou,
        "n_train": trained.n_train, "n_val": trained.n_val,
    }


# --------------------------------------------------------------------------- stage


def build_head(
    head_key: str,
    spec: HeadSpec,
    tokens: FinalTokens,
    train_dataset: ImageDataset,
    val_dataset: ImageDataset | None,
    out_dir: Path,
    *,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The `heads` stage for one head: read features, sweep, save to `out_dir`; returns its table row."""
    train = extract_head_features(tokens, train_dataset, spec.task)
    val = None
    if val_dataset is not None:
        val_data = extract_head_features(tokens, val_dataset, spec.task, classes=train.classes)
        val = (val_data.inputs, val_data.targets)
    trained = train_head(train.inputs, train.targets, spec, seed, n_classes=len(train.classes), val=val, device=device)
    save_head(out_dir, trained, head_key=head_key, model_key=spec.model, classes=train.classes)
    score = f"accuracy {trained.metrics['accuracy']:.3f}" if spec.task == "classification" else (
        f"mIoU {trained.metrics['miou']:.3f}, pixel accuracy {trained.metrics['accuracy']:.3f}")
    log(f"  head {head_key}: lr {trained.lr:g}, weight decay {trained.weight_decay:g}, validation {score}")
    return head_row(head_key, spec.model, trained, train.classes)
