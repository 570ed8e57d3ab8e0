"""Concept-suppression experiments and spliced task metrics: does editing a concept's features do
what the concept reading predicts, and how much of the head's skill survives the SAE?

**Experiments** (issue #11, "automatic hypotheses and their tests"). For every concept the `concepts`
table reads (a mask class at patch level, an image label at image level), take its top-m features by
AP and scale them by each factor (1 → 0 → −1 → −2: the paper pushes features below zero) with the
error-preserving edit of `edits.py` (x' = x + dec(f') − dec(f)), everywhere or only on the concept's
ground-truth patches. Two controls go through the same edit on the same images:

- `random`: for each top feature, a random alive feature of nearly the same firing frequency;
- `other`: the top-m features of another concept (the next one in name order).

Segmentation heads are scored on the pixels of the bilinearly upsampled prediction: the concept's
predicted pixels removed, and the pixels of every other class that changed (a fraction of the
image). Classification heads: the concept's probability, the mean |Δp| of the other classes, top-1
flips. One row per (image, arm, m, factor) goes to the `experiments` table.

**Spliced metrics** (the "CE loss recovered" of SAELens / ViT-Prisma): the head's score with the
patch tokens at layer L replaced by x̂ (no error term), next to the clean score and the score with
them replaced by the mean activation; recovered = (spliced − ablated) / (clean − ablated).

**Where the ranking comes from.** The `concepts` rows of the analysis score features on the record
dataset. When that dataset does not hold the head's concepts (the paper spec records ImageNet but
tests CUB and ADE20K heads), `head_data_concepts` computes the same statistics on the head's
training data: the images it then edits are the head's validation data, so they never rank the
features they test.

Everything here is a function of tensors, heads, SAEs, datasets and table rows: no spec inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from saev_report.backbones import Backbone
from saev_report.concepts import ConceptLabels, ConceptStats, dataset_labels, make_labels
from saev_report.datasets import BadImage, ImageDataset
from saev_report.edits import CapturedImage, FeatureEdit, LayerTokens, SAELike, class_index, matched_control, resume_edits
from saev_report.heads import IGNORE, LinearHead, confusion_matrix, mask_like_image, patch_targets, pixel_classes, class_map, scores_from_confusion
from saev_report.progress import log, track
from saev_report.tables import to_arrow

Arm = Literal["concept", "random", "other"]
Where = Literal["all", "concept"]
EDITS_PER_PASS = 32
"""Edited copies of one image resumed together (bounds memory at large m × factors × arms)."""


# --------------------------------------------------------------------------- choosing features


def ranked_features(concept_rows: Iterable[Mapping[str, Any]] | pa.Table, sae_id: str, level: str) -> dict[str, list[int]]:
    """Features of each concept of one SAE and level, best AP first (ties: lower feature id).

    `concept_rows` are `concepts` rows, or a table of them: millions of rows at 24,576 features ×
    150 ADE20K classes, sorted in numpy rather than as Python dicts.
    """
    if isinstance(concept_rows, pa.Table):
        return _ranked_from_table(concept_rows, sae_id, level)
    by_concept: dict[str, list[tuple[float, int]]] = {}
    for row in concept_rows:
        if row["sae_id"] != sae_id or row["level"] != level or row["ap"] is None or math.isnan(row["ap"]):
            continue
        by_concept.setdefault(row["concept"], []).append((-float(row["ap"]), int(row["feature"])))
    return {concept: [f for _, f in sorted(pairs)] for concept, pairs in sorted(by_concept.items())}


def _ranked_from_table(table: pa.Table, sae_id: str, level: str) -> dict[str, list[int]]:
    import pyarrow.compute as pc

    keep = pc.and_(pc.equal(table.column("sae_id"), sae_id), pc.equal(table.column("level"), level))
    rows = table.filter(pc.and_(keep, pc.invert(pc.is_nan(pc.fill_null(table.column("ap"), float("nan"))))))
    concept = rows.column("concept").to_numpy(zero_copy_only=False).astype(str)
    ap = rows.column("ap").to_numpy(zero_copy_only=False).astype(np.float64)
    feature = rows.column("feature").to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((feature, -ap, concept))  # by concept, then AP descending, then feature
    concept, feature = concept[order], feature[order]
    starts = np.flatnonzero(np.r_[True, concept[1:] != concept[:-1]]) if len(concept) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(concept)]
    return {str(concept[a]): feature[a:b].tolist() for a, b in zip(starts, ends)}


def tested_concepts(ranked: Mapping[str, Sequence[int]], head_classes: Sequence[str], concepts: Sequence[str] | None) -> list[str]:
    """The ranked concepts an experiment tests: those the head predicts (and in `concepts`, if given)."""
    return [c for c in ranked if class_index(head_classes, c) is not None and (concepts is None or c in concepts)]


def other_concept(concept: str, concepts: Sequence[str]) -> str | None:
    """The control concept of `concept`: the next one in name order (wrapping), None if it is alone."""
    names = sorted(set(concepts))
    if len(names) < 2 or concept not in names:
        return None
    return names[(names.index(concept) + 1) % len(names)]


@dataclass(frozen=True)
class ArmFeatures:
    """The features one arm edits for one concept at one m."""

    concept: str
    arm: Arm
    m: int
    features: tuple[int, ...]
    source: str | None
    """Whose features they are: the concept itself, the other concept, or None (random)."""
    draw: int = 0
    """Which random draw (0 to random_draws − 1); 0 for the other arms."""


def plan_arms(
    ranked: Mapping[str, Sequence[int]],
    concept: str,
    ms: Sequence[int],
    controls: Sequence[str],
    feature_rows: Mapping[int, Mapping[str, Any]],
    seed: int,
    random_draws: int = 1,
) -> list[ArmFeatures]:
    """The concept's top-m features for every m, and each control arm of the same size.

    Random controls are drawn once per draw for the largest m and truncated, so the m = 4 control
    is the first 4 of the m = 16 one, like the concept's own features. Each of the `random_draws`
    draws is independent (its own generator; draw 0 is the one a single-draw build made), and
    never picks the concept's own top features. An arm that cannot be filled (too few features,
    no frequency data) is left out rather than run smaller.
    """
    own = list(ranked.get(concept, []))
    arms: list[ArmFeatures] = []
    biggest = min(max(ms), len(own)) if own and ms else 0
    draws: list[list[int]] = []
    if "random" in controls and biggest:
        for draw in range(random_draws):
            rng = np.random.default_rng([seed, *concept.encode()] if draw == 0 else [seed, draw, *concept.encode()])
            exclude, random_features = set(own[:biggest]), []
            for feature in own[:biggest]:
                match = matched_control(feature_rows, feature, exclude | set(random_features), rng)
                if match is None:
                    break
                random_features.append(match)
            draws.append(random_features)
    other = other_concept(concept, list(ranked)) if "other" in controls else None
    for m in sorted(set(ms)):
        if m > len(own):
            continue
        arms.append(ArmFeatures(concept, "concept", m, tuple(own[:m]), concept))
        for draw, random_features in enumerate(draws):
            if len(random_features) >= m:
                arms.append(ArmFeatures(concept, "random", m, tuple(random_features[:m]), None, draw))
        if other is not None and len(ranked[other]) >= m:
            arms.append(ArmFeatures(concept, "other", m, tuple(ranked[other][:m]), other))
    return arms


# --------------------------------------------------------------------------- ranking on the head's training data

RANK_BATCH_ELEMENTS = 1 << 26
"""Codes held at once while ranking: images × patches × features of one batch (256 MB of float32)."""
RANK_MAX_BATCH = 32
"""Images per forward pass while ranking, at most."""


def rank_batch_size(n_patches: int, n_features: int) -> int:
    """Images per ranking batch: as many as fit in RANK_BATCH_ELEMENTS codes, 1 to RANK_MAX_BATCH."""
    return max(1, min(RANK_MAX_BATCH, RANK_BATCH_ELEMENTS // max(n_patches * n_features, 1)))


def level_labels(dataset: ImageDataset, level: str, grid: tuple[int, int], seed: int,
                 patch_path: Path | None = None) -> ConceptLabels | None:
    """The dataset's concept labels at one level only (`patch`: mask classes, `image`: class labels);
    None when it has none at that level. The other level is left out so that it costs nothing."""
    if level == "image":
        if not dataset.classes:
            return None
        return make_labels([], None, list(dataset.classes), dataset.label_ids().astype(np.int16), seed)
    labels = dataset_labels(dataset, grid, seed, patch_path)
    if labels is None or not labels.has_patch:
        return None
    return replace(labels, image_names=[], image_i=None)


@torch.no_grad()
def head_data_concepts(
    backbone: Backbone,
    saes: Mapping[str, SAELike],
    sae_ids: Mapping[str, str],
    dataset: ImageDataset,
    layer: int,
    level: str,
    seed: int,
    batch_size: int,
    patch_path: Path | None = None,
) -> dict[str, pa.Table]:
    """`concepts` rows (by SAE key) of every SAE of one layer, scored on `dataset` at one level.

    One streaming pass: each batch of images goes through the backbone up to `layer` once, every
    SAE encodes its patch tokens, and `concepts.ConceptStats` adds them to its histograms; nothing
    per patch is kept, so memory is the histograms plus one batch of codes. Unreadable images are
    skipped. Empty tables when the dataset has no labels at `level`.
    """
    labels = level_labels(dataset, level, backbone.layer_layout(layer).grid, seed, patch_path)
    if labels is None:
        log(f"  [yellow]ranking[/]: {dataset.key} has no {level}-level concept labels")
        return {key: to_arrow("concepts", []) for key in saes}
    backbone.eval()
    patches = backbone.layer_layout(layer).patch_slice
    stats: dict[str, ConceptStats] = {}
    n = len(dataset.records)
    for start in track(range(0, n, batch_size), f"ranking on {dataset.key}", unit="batch"):
        pixels, image_idx = [], []
        for position in range(start, min(start + batch_size, n)):
            try:
                pixels.append(backbone.preprocess(dataset.image(position)))
            except BadImage:
                continue
            image_idx.append(dataset.records[position].index)
        if not pixels:
            continue
        acts_bpd = backbone.capture(torch.stack(pixels).to(backbone.device), [layer])[layer][:, patches]
        b, p, d = acts_bpd.shape
        for key, sae in saes.items():
            f_bpf = sae.encode(acts_bpd.reshape(b * p, d)).reshape(b, p, -1)
            if key not in stats:
                stats[key] = ConceptStats(labels, f_bpf.shape[-1], f_bpf.device)
            stats[key].update(f_bpf, f_bpf.amax(1), np.asarray(image_idx))
    return {key: stats[key].table(sae_ids[key]) if key in stats else to_arrow("concepts", []) for key in saes}


# --------------------------------------------------------------------------- ground truth


def patch_classes(dataset: ImageDataset, position: int, image_size: int, grid: tuple[int, int], n_classes: int) -> tuple[Tensor, Tensor] | None:
    """(mask [H, W], majority class per patch [P]) at the model input's geometry, IGNORE unlabelled; None without a mask."""
    if dataset.records[position].mask_path is None:
        return None
    image = dataset.image(position)
    mask_hw = mask_like_image(dataset.mask(position), image.size, image_size, dataset.ignore_index, n_classes)
    return mask_hw, patch_targets(mask_hw[None], grid, n_classes).flatten()


def concept_images(
    dataset: ImageDataset,
    concept: str,
    level: str,
    n_images: int,
    seg_classes: Sequence[str] | None,
    patch_class_of: Mapping[int, Tensor],
) -> list[int]:
    """Up to n_images dataset positions showing the concept, in dataset order.

    Image level: images labelled with the concept. Patch level: images where at least one patch's
    majority class is the concept (`patch_class_of[position]`, from `patch_classes`).
    """
    if level == "image":
        return [i for i, r in enumerate(dataset.records) if r.label == concept][:n_images]
    target = class_index(seg_classes or [], concept)
    if target is None:
        return []
    return [p for p, classes in sorted(patch_class_of.items()) if bool((classes == target).any())][:n_images]


# --------------------------------------------------------------------------- measuring


def segmentation_measure(before_chw: Tensor, after_chw: Tensor, size: tuple[int, int], concept: int,
                         pred_before: Tensor | None = None) -> dict[str, Any]:
    """Pixel-level effect of one edit on the concept's predicted pixels and on everything else.

    `pred_before` is `pixel_classes(before)` flattened, when the caller measures many edits of one image.
    """
    pred_b = pixel_classes(before_chw[None], size)[0].flatten().cpu() if pred_before is None else pred_before
    pred_a = pixel_classes(after_chw[None], size)[0].flatten().cpu()
    n_classes = before_chw.shape[0]
    was_concept = pred_b == concept
    changed = pred_a != pred_b
    before_px = torch.bincount(pred_b, minlength=n_classes)
    after_px = torch.bincount(pred_a, minlength=n_classes)
    n_before = int(was_concept.sum())
    n_removed = int((was_concept & changed).sum())
    n_other_changed = int((~was_concept & changed).sum())
    return {
        "concept_px_before": n_before, "concept_px_after": int(after_px[concept]), "concept_px_removed": n_removed,
        "removed_frac": n_removed / n_before if n_before else None,
        "other_px_changed": n_other_changed, "image_px": int(pred_b.numel()),
        "other_changed_frac": n_other_changed / pred_b.numel(),
        "class_px_delta": (after_px - before_px).tolist(),
        "before_map": class_map(before_chw[None])[0].flatten().cpu().tolist(),
        "after_map": class_map(after_chw[None])[0].flatten().cpu().tolist(),
    }


def classification_measure(before_c: Tensor, after_c: Tensor, concept: int) -> dict[str, Any]:
    """Effect of one edit on the concept's probability, the other classes' and the top-1 class."""
    p_b = torch.softmax(before_c.double(), 0).cpu()
    p_a = torch.softmax(after_c.double(), 0).cpu()
    others = torch.ones_like(p_b, dtype=torch.bool)
    others[concept] = False
    top_b, top_a = int(p_b.argmax()), int(p_a.argmax())
    return {
        "p_before": float(p_b[concept]), "p_after": float(p_a[concept]), "p_delta": float(p_a[concept] - p_b[concept]),
        "other_p_delta": float((p_a - p_b)[others].abs().mean()) if others.any() else 0.0,
        "top1_before": top_b, "top1_after": top_a, "flipped": top_b != top_a,
    }


@dataclass(frozen=True)
class Trial:
    """One edit of one image: which arm, at which m and factor, on which patches."""

    arms: ArmFeatures
    factor: float
    where: Where


def trial_edit(trial: Trial, concept_patches: Sequence[int] | None) -> FeatureEdit:
    """The `edits.FeatureEdit` of a trial: scale the arm's features by the factor where asked."""
    patches: Sequence[int] | str = "all" if trial.where == "all" else tuple(concept_patches or ())
    return FeatureEdit(trial.arms.features, "scale", float(trial.factor), patches)


@torch.no_grad()
def run_trials(backbone: Backbone, sae: SAELike, head: LinearHead, captured: CapturedImage, trials: Sequence[FeatureEdit]) -> tuple[Tensor, list[Tensor]]:
    """Head logits before, and after each edit (resumed EDITS_PER_PASS at a time).

    A factor-1 edit changes no feature, so `edits` reproduces x exactly: it is answered with the
    unedited logits instead of a forward pass.
    """
    before = head(captured.final_td[None], backbone.layout)[0]
    after: list[Tensor | None] = [before if edit.action == "scale" and edit.value == 1.0 else None for edit in trials]
    todo = [i for i, out in enumerate(after) if out is None]
    for start in range(0, len(todo), EDITS_PER_PASS):
        chunk = todo[start : start + EDITS_PER_PASS]
        final_btd, _ = resume_edits(backbone, sae, captured, [trials[i] for i in chunk])
        for i, logits in zip(chunk, head(final_btd, backbone.layout)):
            after[i] = logits
    return before, [a for a in after if a is not None]


def run_experiment(
    *,
    name: str,
    backbone: Backbone,
    sae: SAELike,
    sae_id: str,
    head: LinearHead,
    head_key: str,
    dataset: ImageDataset,
    layer: int,
    concept_rows: Iterable[Mapping[str, Any]] | pa.Table,
    feature_rows: Mapping[int, Mapping[str, Any]],
    level: str,
    ms: Sequence[int],
    factors: Sequence[float],
    wheres: Sequence[Where],
    controls: Sequence[str],
    n_images: int,
    concepts: Sequence[str] | None = None,
    seed: int = 0,
    random_draws: int = 1,
    tokens_cache: dict[int, tuple[Tensor, Tensor, tuple[int, int]]] | None = None,
    rank_dataset: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of the `experiments` table for one (SAE, head): every concept × arm × m × factor × where × image.

    `tokens_cache` (position → layer-L tokens, final tokens, image size) lets several SAEs of one
    layer share each image's forward pass, which is most of an experiment's cost.

    `concept_rows` are `concepts` table rows (sae_id, feature, concept, level, ap); `feature_rows` are
    the SAE's `features` rows by feature (freq, dead) for the frequency-matched controls. Concepts are
    those of `level` that the head predicts (and `concepts`, if given). `rank_dataset` names the
    dataset `concept_rows` were computed on, for the rows.
    """
    backbone.eval()
    head = head.to(backbone.device).eval()
    ranked = ranked_features(concept_rows, sae_id, level)
    wanted = tested_concepts(ranked, head.classes, concepts)
    if not wanted:
        log(f"  [yellow]experiment {name}[/]: no {level}-level concept of {sae_id} is a class of head {head_key} "
            f"(concepts: {', '.join(list(ranked)[:5]) or 'none'}; head classes: {', '.join(head.classes[:5])}); nothing to test")
    seg_classes = dataset.seg_classes or []
    grid, n_seg = backbone.layer_layout(layer).grid, len(seg_classes)  # the SAE's patches, where edits land
    needs_masks = level == "patch" or "concept" in wheres
    patch_class_of: dict[int, Tensor] = {}
    if needs_masks:
        for position in range(len(dataset.records)):
            try:
                found = patch_classes(dataset, position, backbone.image_size, grid, n_seg)
            except BadImage:
                continue
            if found is not None:
                patch_class_of[position] = found[1]

    jobs: dict[int, list[tuple[str, Trial]]] = {}
    for concept in wanted:
        arms = plan_arms({c: ranked[c] for c in ranked if c in wanted}, concept, ms, controls, feature_rows, seed, random_draws)
        trials = [Trial(a, float(f), w) for a in arms for f in factors for w in wheres]
        for position in concept_images(dataset, concept, level, n_images, seg_classes, patch_class_of):
            jobs.setdefault(position, []).extend((concept, t) for t in trials)

    rows: list[dict[str, Any]] = []
    for position in track(sorted(jobs), f"experiment {name}", unit="img"):
        tokens = layer_tokens(backbone, dataset, position, layer, tokens_cache)
        if tokens is None:
            continue
        acts_td, final_td, size = tokens
        captured = CapturedImage(layer, acts_td, final_td, sae.encode(acts_td[backbone.layer_layout(layer).patch_slice]))
        edits = []
        for concept, trial in jobs[position]:
            seg_id = class_index(seg_classes, concept)
            patches = None
            if trial.where == "concept" and position in patch_class_of and seg_id is not None:
                patches = torch.nonzero(patch_class_of[position] == seg_id).flatten().tolist()
            edits.append(trial_edit(trial, patches))
        before, afters = run_trials(backbone, sae, head, captured, edits)
        pred_before = pixel_classes(before[None], size)[0].flatten().cpu() if head.task == "segmentation" else None
        for (concept, trial), edit, after in zip(jobs[position], edits, afters):
            target = class_index(head.classes, concept)
            assert target is not None
            measure = (classification_measure(before, after, target) if head.task == "classification"
                       else segmentation_measure(before, after, size, target, pred_before))
            rows.append({
                "experiment": name, "sae_id": sae_id, "head": head_key, "task": head.task, "level": level,
                "concept": concept, "arm": trial.arms.arm, "arm_source": trial.arms.source, "draw": trial.arms.draw, "m": trial.arms.m,
                "factor": trial.factor, "where": trial.where, "features": list(trial.arms.features),
                "n_patches_edited": len(edit.patches) if edit.patches != "all" else backbone.layer_layout(layer).n_patches,
                "dataset": dataset.key, "image_idx": dataset.records[position].index, "rank_dataset": rank_dataset, **measure,
            })
    return rows


@torch.no_grad()
def layer_tokens(backbone: Backbone, dataset: ImageDataset, position: int, layer: int,
                 cache: dict[int, tuple[Tensor, Tensor, tuple[int, int]]] | None) -> tuple[Tensor, Tensor, tuple[int, int]] | None:
    """(tokens at layer L, final tokens, image size) of one image, from `cache` when there; None if unreadable."""
    if cache is not None and position in cache:
        return cache[position]
    try:
        pixels_3hw = backbone.preprocess(dataset.image(position))
    except BadImage:
        return None
    captured = backbone.capture(pixels_3hw[None].to(backbone.device), [layer], final=True)
    tokens = (captured[layer][0], captured["final"][0], (int(pixels_3hw.shape[-2]), int(pixels_3hw.shape[-1])))
    if cache is not None:
        cache[position] = tokens
    return tokens


# --------------------------------------------------------------------------- spliced metrics


@dataclass
class SplicedScores:
    """A head's validation score three ways; `metric` is `accuracy` (classification) or `miou`."""

    metric: str
    clean: float
    spliced: float
    ablated: float
    n_images: int
    per_image: dict[str, np.ndarray] | None = None
    """Per image, by arm (`clean`, `spliced`, `ablated`): 1/0 correct [n] (classification) or the
    image's confusion matrix flattened [n, C²] (segmentation), rows in `image_idx` order; what the
    intervals over images resample (`splice_images`)."""
    image_idx: list[int] | None = None

    @property
    def recovered(self) -> float | None:
        """(spliced − ablated) / (clean − ablated): 1 = the SAE keeps everything the head uses."""
        gap = self.clean - self.ablated
        return (self.spliced - self.ablated) / gap if abs(gap) > 1e-12 else None


@torch.no_grad()
def spliced_tokens(acts_btd: Tensor, sae: SAELike, patch_slice: slice, mean_d: Tensor) -> tuple[Tensor, Tensor]:
    """(patch tokens replaced by x̂ = dec(enc(x)) with no error term, patch tokens replaced by `mean_d`)."""
    spliced, ablated = acts_btd.clone(), acts_btd.clone()
    patches_bpd = acts_btd[:, patch_slice]
    b, p, d = patches_bpd.shape
    spliced[:, patch_slice] = sae.decode(sae.encode(patches_bpd.reshape(b * p, d))).reshape(b, p, d).to(acts_btd.dtype)
    ablated[:, patch_slice] = mean_d.to(acts_btd.dtype)
    return spliced, ablated


@torch.no_grad()
def spliced_scores(
    backbone: Backbone,
    saes: Mapping[str, SAELike],
    mean_d: Tensor,
    heads: Mapping[str, LinearHead],
    dataset: ImageDataset,
    layer: int,
    batch_size: int = 16,
    tokens: tuple[LayerTokens, LayerTokens] | None = None,
) -> dict[tuple[str, str], SplicedScores]:
    """Clean / spliced / mean-ablated scores of every head on `dataset` for every SAE of one layer,
    by (sae key, head key).

    Each image's layer-L and final tokens are read from `tokens` (the recorded layer L, the final
    norm) where both hold it; a batch's other images are captured in one pass. Every SAE's spliced
    copy resumes once from layer L, the mean-ablated copy (the same for every SAE) once per batch,
    and every head reads the same final tokens. `mean_d` is the mean patch activation at layer L
    that replaces the patches when ablating. Each head scores the images it has a target for (a
    head class label, or a mask).
    """
    backbone.eval()
    heads = {key: head.to(backbone.device).eval() for key, head in heads.items()}
    tallies = {(s, h): {arm: _Tally(head.task, len(head.classes)) for arm in ("clean", "spliced", "ablated")}
               for s in saes for h, head in heads.items()}
    n_used = dict.fromkeys(heads, 0)
    image_idx: dict[str, list[int]] = {key: [] for key in heads}
    mean_d = mean_d.to(backbone.device)
    for start in track(range(0, len(dataset.records), batch_size), f"spliced L{layer}", unit="batch"):
        sources, targets, sources_at = _splice_targets(backbone, heads, dataset, range(start, min(start + batch_size, len(dataset.records))), tokens)
        if not sources:
            continue
        acts_btd, clean_btd = _splice_inputs(backbone, sources, layer)
        ablated_btd = None
        for sae_key, sae in saes.items():
            spliced, ablated = spliced_tokens(acts_btd, sae, backbone.layer_layout(layer).patch_slice, mean_d)
            if ablated_btd is None:
                ablated_btd = backbone.resume(ablated, layer)
            finals = {"clean": clean_btd, "spliced": backbone.resume(spliced, layer), "ablated": ablated_btd}
            for head_key, head in heads.items():
                rows, batch_targets = targets[head_key]
                if not rows:
                    continue
                for arm, final_btd in finals.items():
                    tallies[(sae_key, head_key)][arm].add(head(final_btd[rows], backbone.layout), torch.stack(batch_targets))
        for head_key in heads:
            n_used[head_key] += len(targets[head_key][0])
            image_idx[head_key] += [dataset.records[start + i].index for i in _positions_of(targets[head_key][0], sources_at)]
    return {
        (s, h): SplicedScores("accuracy" if heads[h].task == "classification" else "miou",
                              t["clean"].score(), t["spliced"].score(), t["ablated"].score(), n_used[h],
                              {arm: tally.per_image() for arm, tally in t.items()}, list(image_idx[h]))
        for (s, h), t in tallies.items()
    }


def _positions_of(rows: Sequence[int], sources_at: Sequence[int]) -> list[int]:
    """Offsets in the batch's position range of the sources at `rows`."""
    return [sources_at[r] for r in rows]


# Where one image's tokens come from in a splice batch: (layer-L, final) tokens read from the
# recording, or the preprocessed pixels [3, H, W] of an image the recording lacks.
SpliceSource = tuple[Tensor, Tensor] | Tensor


def _splice_targets(backbone: Backbone, heads: Mapping[str, LinearHead], dataset: ImageDataset, positions: range,
                    tokens: tuple[LayerTokens, LayerTokens] | None) -> tuple[list[SpliceSource], dict[str, tuple[list[int], list[Tensor]]], list[int]]:
    """The readable images among `positions` as `SpliceSource`s, per head (rows among them,
    targets), and each source's offset in `positions`.

    An image both token sets hold is not decoded (the recording read it); the others are decoded
    once, here, and skipped when unreadable."""
    sources: list[SpliceSource] = []
    sources_at: list[int] = []
    targets: dict[str, tuple[list[int], list[Tensor]]] = {key: ([], []) for key in heads}
    for position in positions:
        record = dataset.records[position]
        try:
            found = None
            if any(head.task == "segmentation" for head in heads.values()):
                found = patch_classes(dataset, position, backbone.image_size, backbone.layout.grid, len(dataset.seg_classes or []))
            stored = (tokens[0].get(record.path), tokens[1].get(record.path)) if tokens is not None else (None, None)
            source = stored if stored[0] is not None and stored[1] is not None else backbone.preprocess(dataset.image(position))
        except BadImage:
            continue
        for key, head in heads.items():
            if head.task == "classification" and record.label in head.classes:
                target = torch.tensor(head.classes.index(record.label))
            elif head.task == "segmentation" and found is not None:
                target = found[0]
            else:
                continue
            targets[key][0].append(len(sources))
            targets[key][1].append(target)
        sources.append(source)
        sources_at.append(position - positions.start)
    return sources, targets, sources_at


def _splice_inputs(backbone: Backbone, sources: Sequence[SpliceSource], layer: int) -> tuple[Tensor, Tensor]:
    """(layer-L tokens [b, t, d], final tokens [b, t, d]) of a batch: the stored ones as they are, the
    others captured in one forward pass (a recording skips images that decoded but were not finite)."""
    device = backbone.device
    acts: list[Tensor | None] = [s[0] if isinstance(s, tuple) else None for s in sources]
    finals: list[Tensor | None] = [s[1] if isinstance(s, tuple) else None for s in sources]
    unstored = [i for i, s in enumerate(sources) if not isinstance(s, tuple)]
    if unstored:
        captured = backbone.capture(torch.stack([sources[i] for i in unstored]).to(device), [layer], final=True)
        for j, i in enumerate(unstored):
            acts[i], finals[i] = captured[layer][j], captured["final"][j]
    return (torch.stack([a.to(device, torch.float32) for a in acts]),
            torch.stack([f.to(device, torch.float32) for f in finals]))


def store_patch_mean(store: Any) -> Tensor:
    """Mean patch activation [d] over an `ActivationStore` (float64 sums), the mean-ablation value."""
    patches = store.meta.patch_slice
    total, count = torch.zeros(store.d_model, dtype=torch.float64), 0
    for position in range(store.n_images):
        acts_pd = store.image_acts(position)[patches].double()
        total += acts_pd.sum(0)
        count += acts_pd.shape[0]
    return (total / max(count, 1)).float()


class _Tally:
    """Running accuracy (classification) or confusion matrix → mIoU (segmentation)."""

    def __init__(self, task: str, n_classes: int):
        self.task, self.n_classes = task, n_classes
        self.correct = self.total = 0
        self.confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)

        self.images: list[np.ndarray] = []  # per image: correct (0/1), or its confusion matrix flattened

    def add(self, logits: Tensor, targets: Tensor) -> None:
        if self.task == "classification":
            hits = (class_map(logits).cpu() == targets)
            self.correct += int(hits.sum())
            self.total += len(targets)
            self.images += list(hits.numpy().astype(np.float64))
        else:
            pred = pixel_classes(logits, tuple(targets.shape[-2:])).cpu()
            for pred_hw, target_hw in zip(pred, targets.long()):
                confusion = confusion_matrix(pred_hw[None], target_hw[None], self.n_classes)
                self.confusion += confusion
                self.images.append(confusion.flatten().numpy().astype(np.float64))

    def per_image(self) -> np.ndarray:
        if self.task == "classification":
            return np.asarray(self.images, dtype=np.float64)
        return np.stack(self.images) if self.images else np.zeros((0, self.n_classes**2))

    def score(self) -> float:
        if self.task == "classification":
            return self.correct / self.total if self.total else float("nan")
        return scores_from_confusion(self.confusion)["miou"]


__all__ = [
    "ArmFeatures", "SplicedScores", "Trial", "classification_measure", "concept_images", "head_data_concepts", "level_labels",
    "other_concept", "plan_arms", "rank_batch_size", "ranked_features", "run_experiment",
    "tested_concepts", "segmentation_measure", "spliced_scores", "spliced_tokens",
    "store_patch_mean",
]
