"""Error-preserving SAE feature edits (paper §3.3, six steps).

1. x = the image's tokens at layer L; f = enc(x_patches); x̂ = dec(f); err = x − x̂.
2. f' = f with chosen features suppressed / set / scaled / clamped / shifted at chosen patches.
3. x' = dec(f') + err, computed as x + (dec(f') − dec(f)) on the changed patches only, so an
   edit that changes nothing reproduces x bit for bit.
4. The patch tokens at layer L are replaced (CLS and registers untouched) and the forward
   pass resumes from L to the final norm.
5–6. The frozen head runs on the original and the edited final tokens; both are recorded.

Step 1 reads the image's recorded layer-L tokens (`captured_from_acts`; from pixels:
`capture_image`); any number of edits of it resume as one batch (`apply_edits`, the
one path both `edit_image` and `run_edits` take). `run_edits` turns an `EditSpec`
(explicit or generated edits, each with a frequency-matched random-feature control)
into rows of the `edits` table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from saev_report.backbones import Backbone
from saev_report.datasets import BadImage, ImageDataset
from saev_report.heads import LinearHead, class_map, pixel_classes
from saev_report.progress import log, track
from saev_report.spec import EDIT_ACTIONS, EditSpec, ExplicitEdit

TOP_K = 5
"""Classes kept in the classification before/after columns."""
CONTROL_SAMPLE = 256
"""Random alive features among which the control nearest in log-frequency is chosen."""
MAX_CANDIDATES = 64
"""Images of a label scored (by the feature's activation) when choosing images for generated edits."""

PatchChoice = Sequence[int] | Literal["all", "active"]


class SAELike(Protocol):
    def encode(self, x_nd: Tensor) -> Tensor: ...
    def decode(self, f_nf: Tensor) -> Tensor: ...


# --------------------------------------------------------------------------- steps 1–4


@dataclass(frozen=True)
class FeatureEdit:
    """Step 2's recipe: which features, how, and where."""

    features: tuple[int, ...]
    action: str = "suppress"
    value: float = 0.0
    patches: PatchChoice = "all"


@dataclass
class CapturedImage:
    """One image's unedited state: tokens at layer L, final tokens and SAE codes of the patches."""

    layer: int
    acts_td: Tensor
    final_td: Tensor
    f_pf: Tensor


class LayerTokens(Protocol):
    """Recorded layer-L tokens (every kind), found by image file path (`record.RecordedTokens`)."""

    def get(self, path: str) -> Tensor | None:
        """[tokens, d], or None for an image the recording skipped."""


@torch.no_grad()
def captured_from_acts(backbone: Backbone, sae: SAELike, acts_td: Tensor, layer: int) -> CapturedImage:
    """Step 1 from an image's layer-L tokens: the unedited forward resumed from L, and f = enc(x_patches)."""
    acts_td = acts_td.to(backbone.device, torch.float32)
    final_td = backbone.resume(acts_td[None], layer)[0]
    return CapturedImage(layer, acts_td, final_td, sae.encode(acts_td[backbone.layer_layout(layer).patch_slice]))


@torch.no_grad()
def capture_image(backbone: Backbone, sae: SAELike, pixels_3hw: Tensor, layer: int) -> CapturedImage:
    """Step 1 from pixels: the forward pass up to layer L, then as `captured_from_acts`."""
    acts_td = backbone.capture(pixels_3hw[None].to(backbone.device), [layer])[layer][0]
    return captured_from_acts(backbone, sae, acts_td, layer)


def resolve_patches(f_pf: Tensor, features: Sequence[int], patches: PatchChoice) -> list[int]:
    """Row-major patch indices: a list as given (sorted, unique), `all`, or `active` (any feature > 0)."""
    n_patches = f_pf.shape[0]
    if patches == "all":
        return list(range(n_patches))
    if patches == "active":
        return torch.nonzero((f_pf[:, list(features)] > 0).any(dim=1)).flatten().tolist()
    chosen = sorted({int(p) for p in patches})
    if chosen and not (0 <= chosen[0] and chosen[-1] < n_patches):
        raise ValueError(f"patch indices must lie in 0..{n_patches - 1}, got {chosen[0]}..{chosen[-1]}")
    return chosen


EDIT_FUNCTIONS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "suppress": lambda f, value: torch.zeros_like(f),
    "set": lambda f, value: torch.full_like(f, value),
    "scale": lambda f, value: f * value,
    "clamp": lambda f, value: f.clamp(max=value),
    "add": lambda f, value: f + value,
}
"""Step 2 of each edit action in `spec.EDIT_ACTIONS`: the new values of the chosen codes."""
assert set(EDIT_FUNCTIONS) == set(EDIT_ACTIONS), "every spec edit action needs a function here"


def modify_features(f_pf: Tensor, features: Sequence[int], action: str, value: float, patches: Sequence[int]) -> Tensor:
    """Step 2: f' = f with `action` applied to `features` at `patches` (a copy)."""
    if action not in EDIT_FUNCTIONS:
        raise ValueError(f"unknown edit action {action!r}; use one of {EDIT_ACTIONS}")
    edited_pf = f_pf.clone()
    if not patches or not features:
        return edited_pf
    rows, cols = torch.tensor(list(patches))[:, None], torch.tensor(list(features))[None, :]
    edited_pf[rows, cols] = EDIT_FUNCTIONS[action](edited_pf[rows, cols], value)
    return edited_pf


@torch.no_grad()
def edited_acts(backbone: Backbone, sae: SAELike, captured: CapturedImage, edit: FeatureEdit) -> tuple[Tensor, list[int]]:
    """Steps 2–3: layer-L tokens with x' = x + dec(f') − dec(f) at the changed patches.

    Only the edited features' columns are modified and compared (m of F), so an edit costs
    O(patches × m) before the decode, whatever the dictionary width.
    """
    patches = resolve_patches(captured.f_pf, edit.features, edit.patches)
    features = list(dict.fromkeys(edit.features))
    f_pm = captured.f_pf[:, features]
    edited_pm = modify_features(f_pm, list(range(len(features))), edit.action, edit.value, patches)
    changed = torch.nonzero((edited_pm != f_pm).any(dim=1)).flatten()
    acts_td = captured.acts_td.clone()
    if changed.numel():
        rows = changed + backbone.layer_layout(captured.layer).patch_slice.start
        delta_nd = decoded_change(sae, captured.f_pf[changed], edited_pm[changed], features)  # = dec(f') + err − x
        acts_td[rows] = acts_td[rows] + delta_nd.to(acts_td.dtype)
    return acts_td, patches


def decoded_change(sae: SAELike, f_pf: Tensor, edited_pm: Tensor, features: Sequence[int]) -> Tensor:
    """dec(f') − dec(f) for patches whose `features` columns of f (`f_pf`) are replaced by `edited_pm`.

    A `SparseAutoencoder` decodes affinely (x̂ = f·W_dec / scale + constant), so the change goes
    through those columns alone: m × d work per patch instead of two F × d decodes, which dominated
    a resumed edit. Any other SAE is decoded twice.
    """
    cols = torch.tensor(list(features), dtype=torch.long, device=f_pf.device)
    W_dec_fd, scale = getattr(sae, "W_dec_fd", None), getattr(sae, "act_scale", None)
    if isinstance(W_dec_fd, Tensor) and isinstance(scale, Tensor):
        return (edited_pm - f_pf[:, cols]) @ W_dec_fd[cols] / scale
    edited_pf = f_pf.clone()
    edited_pf[:, cols] = edited_pm
    return sae.decode(edited_pf) - sae.decode(f_pf)


@torch.no_grad()
def resume_edits(backbone: Backbone, sae: SAELike, captured: CapturedImage, edits: Sequence[FeatureEdit]) -> tuple[Tensor, list[list[int]]]:
    """Step 4 for several edits of one image at once: final tokens [n_edits, tokens, d] and patches used."""
    edited = [edited_acts(backbone, sae, captured, edit) for edit in edits]
    acts_btd = torch.stack([acts for acts, _ in edited])
    return backbone.resume(acts_btd, captured.layer), [patches for _, patches in edited]


@dataclass
class EditOutcome:
    """Head outputs before and after one edit (logits [C] or [C, grid_h, grid_w])."""

    before: Tensor
    after: Tensor
    patches_used: list[int]
    final_before: Tensor
    final_after: Tensor


@torch.no_grad()
def apply_edits(backbone: Backbone, sae: SAELike, head: LinearHead, captured: CapturedImage, edits: Sequence[FeatureEdit]) -> list[EditOutcome]:
    """Steps 2–6 for several edits of one captured image, resumed as one batch."""
    final_btd, patches_used = resume_edits(backbone, sae, captured, edits)
    before = head(captured.final_td[None], backbone.layout)[0]
    after_b = head(final_btd, backbone.layout)
    return [EditOutcome(before, after_b[i], patches_used[i], captured.final_td, final_btd[i]) for i in range(len(edits))]


@torch.no_grad()
def edit_image(
    backbone: Backbone,
    sae: SAELike,
    head: LinearHead,
    pixels_3hw: Tensor,
    layer: int,
    features: Sequence[int],
    action: str = "suppress",
    value: float = 0.0,
    patches: PatchChoice = "all",
) -> EditOutcome:
    """The six steps for one image and one edit."""
    captured = capture_image(backbone, sae, pixels_3hw, layer)
    [outcome] = apply_edits(backbone, sae, head, captured, [FeatureEdit(tuple(features), action, value, patches)])
    return outcome


# --------------------------------------------------------------------------- steps 5–6: summaries


def class_index(classes: Sequence[str], label: str | None) -> int | None:
    """Head class of a label: an exact name, else a unique match on the last path part (`animals/birds` ~ `birds`)."""
    if label is None:
        return None
    if label in classes:
        return list(classes).index(label)
    tail = label.rsplit("/", 1)[-1]
    hits = [i for i, name in enumerate(classes) if name.rsplit("/", 1)[-1] == tail]
    return hits[0] if len(hits) == 1 else None


def _deltas(before_c: np.ndarray, after_c: np.ndarray, target: int | None) -> dict[str, Any]:
    """target_delta, other_delta (mean |Δ| over the other classes) and specificity."""
    change = after_c - before_c
    others = np.ones(len(change), dtype=bool)
    if target is not None:
        others[target] = False
    other_delta = float(np.abs(change[others]).mean()) if others.any() else 0.0
    if target is None:
        return {"target_delta": None, "other_delta": other_delta, "specificity": None}
    target_delta = float(change[target])
    return {"target_delta": target_delta, "other_delta": other_delta, "specificity": abs(target_delta) / (other_delta + 1e-9)}


def classification_summary(before_c: Tensor, after_c: Tensor, classes: Sequence[str], target: int | None) -> dict[str, Any]:
    """Top-5 classes and probabilities before/after, probability deltas, flip of the top class."""
    p_before = torch.softmax(before_c.double(), dim=0)
    p_after = torch.softmax(after_c.double(), dim=0)
    k = min(TOP_K, len(classes))
    top_before, top_after = p_before.topk(k), p_after.topk(k)
    flipped = int(p_before.argmax()) != int(p_after.argmax())
    return {
        "before_top": [classes[i] for i in top_before.indices.tolist()], "before_probs": top_before.values.tolist(),
        "after_top": [classes[i] for i in top_after.indices.tolist()], "after_probs": top_after.values.tolist(),
        **_deltas(p_before.numpy(), p_after.numpy(), target),
        "flipped": flipped, "flip_frac": float(flipped),
    }


def pixel_counts(logits_chw: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Pixels per class [C] of the bilinearly upsampled logit map at image resolution."""
    pred_hw = pixel_classes(logits_chw[None], size)[0]
    return torch.bincount(pred_hw.flatten().cpu(), minlength=logits_chw.shape[0]).numpy()


def segmentation_summary(before_chw: Tensor, after_chw: Tensor, size: tuple[int, int], target: int | None) -> dict[str, Any]:
    """Pixel counts per class and per-patch class maps before/after, pixel-fraction deltas."""
    before_px, after_px = pixel_counts(before_chw, size), pixel_counts(after_chw, size)
    before_map = class_map(before_chw[None])[0].flatten().cpu()
    after_map = class_map(after_chw[None])[0].flatten().cpu()
    changed = before_map != after_map
    total = float(size[0] * size[1])
    return {
        "before_pixels": before_px.tolist(), "after_pixels": after_px.tolist(),
        **_deltas(before_px / total, after_px / total, target),
        "flipped": bool(changed.any()), "flip_frac": float(changed.double().mean()),
        "before_map": before_map.tolist(), "after_map": after_map.tolist(),
    }


def outcome_summary(head: LinearHead, before: Tensor, after: Tensor, size: tuple[int, int], target: int | None) -> dict[str, Any]:
    if head.task == "classification":
        return classification_summary(before, after, head.classes, target)
    return segmentation_summary(before, after, size, target)


def predicted_target(head: LinearHead, before: Tensor, patches: Sequence[int]) -> int:
    """Fallback target without a known label: the top class (classification) or the class most
    predicted over the edited patches (segmentation)."""
    if head.task == "classification":
        return int(before.argmax())
    patch_classes = class_map(before[None])[0].flatten()
    chosen = patch_classes[list(patches)] if patches else patch_classes
    return int(torch.bincount(chosen.cpu(), minlength=before.shape[0]).argmax())


# --------------------------------------------------------------------------- choosing features, images and controls


def _rows_of(features_table: Sequence[Mapping[str, Any]] | None, sae_id: str) -> dict[int, Mapping[str, Any]]:
    """Feature rows of one SAE by feature index (rows without `sae_id` are taken as this SAE's)."""
    return {int(r["feature"]): r for r in features_table or [] if r.get("sae_id", sae_id) == sae_id}


MIN_EXEMPLARS_FOR_PURITY = 8


def _alive(row: Mapping[str, Any]) -> bool:
    freq = row.get("freq")
    return not row.get("dead") and freq is not None and freq > 0


def purest_features(rows: Mapping[int, Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """The n alive, non-dense, labelled features with the highest label purity (ties: more frequent, lower id)."""
    usable = [
        r for r in rows.values()
        if _alive(r) and not r.get("dense") and r.get("top_label") is not None and r.get("label_purity") is not None
        and not math.isnan(r["label_purity"])
    ]
    # Purity over a handful of exemplars is luck: prefer features with the most exemplars.
    most = max((r.get("n_exemplars") or 0 for r in usable), default=0)
    usable = [r for r in usable if (r.get("n_exemplars") or 0) >= min(most, MIN_EXEMPLARS_FOR_PURITY)] if most else usable
    usable.sort(key=lambda r: (-r["label_purity"], -r["freq"], int(r["feature"])))
    return usable[:n]


def attributed_features(backbone: Backbone, sae: SAELike, head: LinearHead, captured: CapturedImage, target: int, n: int) -> tuple[int, ...]:
    """The n features whose activation × gradient most supports `target` (log-probability; summed
    over patches for segmentation): what the head relies on for this image, through the SAE."""
    with torch.enable_grad():
        f_pf = captured.f_pf.clone().requires_grad_(True)
        delta_pd = sae.decode(f_pf) - sae.decode(captured.f_pf)  # zero, but carries d/df
        patches = backbone.layer_layout(captured.layer).patch_slice
        acts_td = torch.cat([captured.acts_td[: patches.start], captured.acts_td[patches] + delta_pd, captured.acts_td[patches.stop:]])
        logits = head(backbone.resume(acts_td[None], captured.layer), backbone.layout)[0]
        score = logits.log_softmax(0)[target].sum()
        (grad_pf,) = torch.autograd.grad(score, f_pf)
    attribution_f = (captured.f_pf * grad_pf).sum(0)
    top = attribution_f.argsort(descending=True)[:n].tolist()
    return tuple(int(f) for f in top if attribution_f[f] > 0)


def attribution_positions(dataset: ImageDataset, labels: Sequence[str], n: int) -> list[tuple[int, str]]:
    """n (image position, label) pairs, round-robin over `labels`, in index order within each label
    (`labelled_positions`: an image of a segmentation set may come once for each class it shows)."""
    members = labelled_positions(dataset)
    queues = [[(p, label) for p in members.get(label, [])] for label in labels]
    out: list[tuple[int, str]] = []
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


def labelled_positions(dataset: ImageDataset) -> dict[str, list[int]]:
    """Label → positions of the images that show it: their class label; in a set with masks and no
    labels (ADE20K), the mask classes covering any pixel. Unreadable masks show nothing."""
    if any(r.label is not None for r in dataset.records) or not dataset.seg_classes:
        out: dict[str, list[int]] = {}
        for i, record in enumerate(dataset.records):
            if record.label is not None:
                out.setdefault(record.label, []).append(i)
        return out
    out = {}
    for i in range(len(dataset.records)):
        try:
            ids = np.unique(dataset.mask(i))
        except (BadImage, ValueError):
            continue
        for class_id in ids[(ids >= 0) & (ids < len(dataset.seg_classes))]:
            out.setdefault(dataset.seg_classes[int(class_id)], []).append(i)
    return out


def concept_group(rows: Mapping[int, Mapping[str, Any]], feature: int, max_f: Tensor, size: int) -> tuple[int, ...]:
    """`feature` plus the features of the same top label that fire most on this image (`max_f` [F])."""
    label = rows[feature].get("top_label")
    same = [f for f, r in rows.items() if f != feature and r.get("top_label") == label and _alive(r) and not r.get("dense")]
    same = [f for f in sorted(same, key=lambda f: (-float(max_f[f]), f)) if float(max_f[f]) > 0]
    return (feature, *same[: size - 1])


def matched_control(rows: Mapping[int, Mapping[str, Any]], feature: int, exclude: set[int], rng: np.random.Generator) -> int | None:
    """An alive feature (not in `exclude`) nearest in log-frequency to `feature`, among a random sample."""
    target = rows.get(feature)
    if target is None or not _alive(target):
        return None
    candidates = np.array(sorted(f for f, r in rows.items() if f not in exclude and _alive(r)), dtype=np.int64)
    if candidates.size == 0:
        return None
    sample = rng.choice(candidates, size=min(CONTROL_SAMPLE, candidates.size), replace=False)
    distance = [abs(math.log10(rows[int(f)]["freq"]) - math.log10(target["freq"])) for f in sample]
    return int(sample[int(np.argmin(distance))])


@torch.no_grad()
def max_codes(backbone: Backbone, sae: SAELike, dataset: ImageDataset, positions: Sequence[int], tokens: LayerTokens,
              layer: int) -> dict[int, Tensor]:
    """Per image: each feature's maximum over the patches at layer L [F]; unrecorded images left out."""
    out: dict[int, Tensor] = {}
    patches = backbone.layer_layout(layer).patch_slice
    for position in positions:
        acts_td = tokens.get(dataset.records[position].path)
        if acts_td is not None:
            out[position] = sae.encode(acts_td[patches].to(backbone.device, torch.float32)).amax(dim=0).cpu()
    return out


def image_position(dataset: ImageDataset, image: int | str) -> int:
    """Position of an explicit edit's image: a dataset index, or a path relative to the dataset."""
    if isinstance(image, int):
        if not 0 <= image < len(dataset.records):
            raise ValueError(f"image index {image} is out of range: dataset {dataset.key!r} has {len(dataset.records)} images")
        return image
    wanted = Path(image).as_posix().removeprefix("./")
    hits = [i for i, r in enumerate(dataset.records) if Path(r.path).as_posix() == wanted or Path(r.path).as_posix().endswith("/" + wanted)]
    if len(hits) != 1:
        raise ValueError(f"image {image!r} matches {len(hits)} images of dataset {dataset.key!r}; give its index or a longer path")
    return hits[0]


# --------------------------------------------------------------------------- run_edits


@dataclass(frozen=True)
class EditJob:
    """One planned edit of one image (and its control, if any)."""

    number: int
    position: int
    edit: FeatureEdit
    control: FeatureEdit | None
    target_label: str | None


def plan_edits(
    spec: EditSpec,
    *,
    backbone: Backbone,
    sae: SAELike,
    dataset: ImageDataset,
    layer: int,
    tokens: LayerTokens,
    rows: Mapping[int, Mapping[str, Any]],
    seed: int,
    head: LinearHead | None = None,
) -> list[EditJob]:
    """Explicit edits first, then generated ones, numbered in that order."""
    planned: list[tuple[int, FeatureEdit, str | None]] = []
    for explicit in spec.explicit:
        features = tuple(explicit.features)
        label = rows[features[0]].get("top_label") if features[0] in rows else None
        planned.append((image_position(dataset, explicit.image), FeatureEdit(features, spec.action, spec.value, _patches(explicit)), label))
    if spec.generate is not None and spec.generate.select == "attribution":
        if head is None:
            raise ValueError(f"edit {spec.name!r}: attribution needs the head")
        shown = labelled_positions(dataset)
        labels = [c for c in head.classes if shown.get(c)]
        for position, label in attribution_positions(dataset, labels, spec.generate.top_purity * spec.generate.images_per_feature):
            acts_td = tokens.get(dataset.records[position].path)
            if acts_td is None:
                continue
            captured = captured_from_acts(backbone, sae, acts_td, layer)
            group = attributed_features(backbone, sae, head, captured, head.classes.index(label), spec.generate.features_per_edit)
            if group:
                planned.append((position, FeatureEdit(group, spec.action, spec.value, spec.generate.patches), label))
    elif spec.generate is not None:
        if not rows:
            raise ValueError(f"edit {spec.name!r}: generated edits need the SAE's features table")
        chosen = purest_features(rows, spec.generate.top_purity)
        shown = labelled_positions(dataset)
        candidates = {r["top_label"]: shown.get(r["top_label"], [])[:MAX_CANDIDATES] for r in chosen}
        scores = max_codes(backbone, sae, dataset, sorted({p for ps in candidates.values() for p in ps}), tokens, layer)
        for row in chosen:
            feature = int(row["feature"])
            scored = [p for p in candidates[row["top_label"]] if p in scores]
            if not scored:
                log(f"  edit {spec.name}: no readable image labelled {row['top_label']!r} for feature {feature}")
            scored.sort(key=lambda p: (-float(scores[p][feature]), p))  # where it fires most; ties by index
            for position in scored[: spec.generate.images_per_feature]:
                group = concept_group(rows, feature, scores[position], spec.generate.features_per_edit)
                planned.append((position, FeatureEdit(group, spec.action, spec.value, spec.generate.patches), row["top_label"]))
    if spec.generate is not None and len(planned) == len(spec.explicit):
        log(f"  [yellow]edit {spec.name}: generated no edit[/] ({_why_none(spec, rows, dataset, head)})")
    # The control repeats the edit (action, value, patch choice) on a frequency-matched random
    # feature; with `active` patches that means where the control feature itself fires.
    jobs = []
    for number, (position, edit, label) in enumerate(planned):
        control = None
        if spec.random_control and rows:
            rng = np.random.default_rng([seed, number])
            picked: list[int] = []
            for feature in edit.features:
                match = matched_control(rows, feature, set(edit.features) | set(picked), rng)
                if match is not None:
                    picked.append(match)
            if len(picked) == len(edit.features):
                control = FeatureEdit(tuple(picked), edit.action, edit.value, edit.patches)
        jobs.append(EditJob(number, position, edit, control, label))
    return jobs


def _why_none(spec: EditSpec, rows: Mapping[int, Mapping[str, Any]], dataset: ImageDataset, head: LinearHead | None) -> str:
    """Why generation found nothing to edit, in words a user can act on."""
    shown = labelled_positions(dataset)
    if spec.generate is not None and spec.generate.select == "attribution":
        return f"no image of {dataset.key} shows a class of the head" if not any(shown.get(c) for c in (head.classes if head else [])) else "no feature supports any image's class"
    chosen = purest_features(rows, spec.generate.top_purity) if spec.generate is not None else []
    if not chosen:
        return "no alive, non-dense feature has a top label (see `features.dense`, `analysis.dense_threshold`)"
    return (f"the purest features' top labels ({', '.join(sorted({str(r['top_label']) for r in chosen})[:3])}, ...) label no image of "
            f"{dataset.key}: they come from the record dataset; `generate.select: attribution` picks features for the head's own classes")


def _patches(explicit: ExplicitEdit) -> PatchChoice:
    return explicit.patches if explicit.patches == "all" else tuple(explicit.patches)


@torch.no_grad()
def run_edits(
    spec: EditSpec,
    *,
    backbone: Backbone,
    sae: SAELike,
    sae_id: str,
    head: LinearHead,
    head_key: str,
    dataset: ImageDataset,
    layer: int,
    tokens: LayerTokens,
    features_table: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of the `edits` table for one `EditSpec` (controls get `is_control=True`).

    `tokens` are the recorded layer-L tokens of the dataset's images: every
    edit resumes the forward pass from them, so no image is decoded or run up
    to L again. `features_table` is the SAE's `features` rows (dicts with at
    least sae_id, feature, top_label, label_purity, freq, dead, dense):
    generated edits and controls need it. The target class is the feature's
    top label when it names a head class, else the prediction before the edit.
    """
    rows = _rows_of(features_table, sae_id)
    backbone.eval()
    head = head.to(backbone.device).eval()
    jobs = plan_edits(spec, backbone=backbone, sae=sae, dataset=dataset, layer=layer, tokens=tokens, rows=rows, seed=seed, head=head)
    if spec.random_control and not rows:
        log(f"  edit {spec.name}: no features table, so no random-feature controls")
    size = (backbone.image_size, backbone.image_size)  # the model input, where masks and maps are compared
    out: list[dict[str, Any]] = []
    for job in track(jobs, f"edit {spec.name}", unit="edit"):
        acts_td = tokens.get(dataset.records[job.position].path)
        if acts_td is None:
            log(f"  [yellow]skip[/] edit {spec.name}/{job.number}: image not recorded (unreadable or non-finite)")
            continue
        captured = captured_from_acts(backbone, sae, acts_td, layer)
        edits = [job.edit] + ([job.control] if job.control else [])
        outcomes = apply_edits(backbone, sae, head, captured, edits)
        target = class_index(head.classes, job.target_label)
        if target is None:
            target = predicted_target(head, outcomes[0].before, outcomes[0].patches_used)
        for i, (edit, outcome) in enumerate(zip(edits, outcomes)):
            is_control = i == 1
            out.append({
                "edit": spec.name,
                "edit_id": f"{spec.name}/{job.number}" + ("/control" if is_control else ""),
                "sae_id": sae_id, "head": head_key, "task": head.task, "dataset": dataset.key,
                "image_idx": dataset.records[job.position].index,
                "features": list(edit.features), "action": edit.action, "value": float(edit.value),
                "patches": outcome.patches_used, "is_control": is_control, "target_class": head.classes[target],
                **outcome_summary(head, outcome.before, outcome.after, size, target),
            })
    return out


def log_edit_summary(name: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """One log line for the edits and one for their controls: median specificity, share flipped."""
    for is_control in (False, True):
        sel = [r for r in rows if r["is_control"] == is_control]
        if sel:
            spec_med = float(np.median([r["specificity"] for r in sel]))
            flips = float(np.mean([bool(r["flipped"]) for r in sel]))
            log(f"  {name}{' controls' if is_control else ''}: {len(sel)} edit(s), median specificity {spec_med:.2f}, flipped {flips:.0%}")
