"""Concept detection: how well each SAE feature detects each labelled concept, in one streaming pass.

Two levels, each scored by average precision (AP) and the best-threshold IoU
of network dissection (Bau et al. 2017):

- **patch**: a feature's activation at a patch as a detector of the patch's
  concept, read from the segmentation mask. The mask goes through the model's
  own geometry (shorter side resized, centre crop) and a patch belongs to
  concept c when c covers at least half of its pixels (unlabelled pixels count
  in the denominator; at an exact 50/50 split the lower class id wins). A patch
  no concept covers by half is a negative for every concept. Background is a
  concept like any other (the dataset's `seg_classes` name them).
- **image**: the image's maximum activation over its patches as a detector of
  the image's class label.

The pass keeps no patches. Activations are binned on a fixed fine log10 grid
(`BINS_PER_DECADE` per decade over `LOG10_RANGE`, plus bin 0 for "does not
fire"), and the counters are

- the histogram of every feature over all samples (dense, [F, bins]);
- the histogram of every feature over the positives of each concept, stored
  sparsely: one int64 key per occupied (label set, feature, concept, bin) with
  its count, so memory follows what fires, never F × C × bins (at F = 24,576
  and the 150 ADE20K classes that product is 1.2 G counters).

Negatives are totals − positives. From the two histograms AP and IoU come
exactly as if every activation were replaced by its bin (sklearn's AP with
ties grouped, `average_precision_score` on the binned scores). The true AP of
the unbinned activations lies in [`ap_low`, `ap_high`] (`ap_bounds`): within a
bin the order of positives and negatives is unknown, and the bounds take the
worst and the best. Not firing is an exact tie, so bin 0 is exact.

The null: the same statistics with the labels permuted across images (a seeded
permutation: image i is scored against the labels of image π(i)), kept as a
second label set in the same counters. A feature that "detects" a concept only
as well as under permuted labels detects nothing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

LOG10_RANGE = (-6.0, 4.0)
BINS_PER_DECADE = 32
N_BINS = 1 + int((LOG10_RANGE[1] - LOG10_RANGE[0]) * BINS_PER_DECADE)
"""Bin 0: activation 0 (does not fire); bins 1..: positive activations on the log10 grid (outside it: the end bins)."""

NO_CONCEPT = -1
LEVELS = ("patch", "image")
REAL, NULL = 0, 1
"""Label sets: the real labels and the permuted-label null."""

_BLOCK_COUNTERS = 1 << 24
"""Dense counters per summary block (features × concepts × bins): bounds summary memory."""


# --------------------------------------------------------------------------- labels


def patch_concepts(mask_hw: np.ndarray, grid: tuple[int, int], ignore_index: int, n_concepts: int,
                   image_wh: tuple[int, int] | None = None) -> np.ndarray:
    """Concept of every patch [grid_h·grid_w] int16 (row-major), NO_CONCEPT where none covers half the pixels.

    The mask follows the image through the model's preprocessing (resize the
    shorter side, centre crop to a square); `image_wh` is the image's size
    when the mask was saved at another one.
    """
    from saev_report.heads import IGNORE, mask_like_image  # the heads' own geometry, so masks align the same way

    grid_h, grid_w = grid
    if grid_w != grid_h:
        raise ValueError(f"patch grid {grid_h}×{grid_w}: the models' centre crop is square")
    px = 16  # pixels per patch side of the aligned mask: the geometry is the same at any resolution
    height, width = mask_hw.shape
    aligned_hw = mask_like_image(mask_hw, image_wh or (width, height), grid_h * px, ignore_index, n_concepts)
    blocks_pq = aligned_hw.long().reshape(grid_h, px, grid_w, px).permute(0, 2, 1, 3).reshape(grid_h * grid_w, px * px)
    valid = blocks_pq != IGNORE
    counts_pc = torch.zeros(blocks_pq.shape[0], n_concepts, dtype=torch.int64)
    counts_pc.scatter_add_(1, blocks_pq.clamp_min(0), valid.long())
    top_count_p, top_p = counts_pc.max(1)  # ties: the lower id
    return torch.where(2 * top_count_p >= px * px, top_p, torch.full_like(top_p, NO_CONCEPT)).numpy().astype(np.int16)


@dataclass(frozen=True)
class ConceptLabels:
    """The labels an analysis scores features against, indexed by dataset image index.

    `patch_ip` may be a memory-mapped array: it is read a batch at a time.
    `null_i[i]` is the image whose labels stand in for image i's in the
    permuted-label null.
    """

    patch_names: list[str]
    """Patch-level concept names by id (the dataset's `seg_classes`); empty without masks."""
    patch_ip: np.ndarray | None
    """[images, patches] int16 concept of every patch, NO_CONCEPT where none (or the image has no mask)."""
    image_names: list[str]
    """Image-level concept names by id (the dataset's classes); empty without labels."""
    image_i: np.ndarray | None
    """[images] int16 class id of every image, NO_CONCEPT without a label."""
    null_i: np.ndarray
    """[images] int64 permutation of the labelled images (identity elsewhere)."""

    @property
    def has_patch(self) -> bool:
        return self.patch_ip is not None and len(self.patch_names) > 0

    @property
    def has_image(self) -> bool:
        return self.image_i is not None and len(self.image_names) > 0


def null_permutation(labelled_i: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation of the images where `labelled_i` is true (the others map to themselves)."""
    perm = np.arange(len(labelled_i), dtype=np.int64)
    which = np.flatnonzero(labelled_i)
    perm[which] = which[np.random.default_rng(seed).permutation(len(which))]
    return perm


def make_labels(patch_names: Sequence[str], patch_ip: np.ndarray | None, image_names: Sequence[str],
                image_i: np.ndarray | None, seed: int) -> ConceptLabels:
    """ConceptLabels with the null permutation drawn over the images that carry any label."""
    n = len(patch_ip) if patch_ip is not None else len(image_i) if image_i is not None else 0
    labelled = np.zeros(n, dtype=bool)
    if patch_ip is not None:
        labelled |= np.asarray((patch_ip != NO_CONCEPT).any(1))
    if image_i is not None:
        labelled |= np.asarray(image_i) != NO_CONCEPT
    return ConceptLabels(list(patch_names), patch_ip, list(image_names), image_i, null_permutation(labelled, seed))


def dataset_labels(dataset, grid: tuple[int, int], seed: int, patch_path: Path | None = None) -> ConceptLabels | None:
    """Concept labels of every image of an `ImageDataset`: mask classes per patch (when it has masks) and
    class labels per image (when it has labels); None with neither. With `patch_path` the patch labels are
    written there (atomically, `.npy`) and memory-mapped, so they never need to fit in memory."""
    from PIL import Image

    from saev_report.datasets import BadImage
    from saev_report.progress import bar

    n = len(dataset.records)
    image_i = dataset.label_ids().astype(np.int16) if dataset.classes else None
    patch_ip = None
    seg = list(dataset.seg_classes or [])
    if seg and any(r.mask_path for r in dataset.records):
        shape = (n, grid[0] * grid[1])
        tmp = None if patch_path is None else patch_path.with_name(f".{patch_path.name}.tmp")
        if tmp is not None:
            tmp.parent.mkdir(parents=True, exist_ok=True)
        patch_ip = np.full(shape, NO_CONCEPT, dtype=np.int16) if tmp is None else \
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=shape)
        patch_ip[:] = NO_CONCEPT
        with bar(f"concept masks {dataset.key}", total=n, unit="img") as b:
            for pos, record in enumerate(dataset.records):
                if record.mask_path is not None:
                    try:
                        with Image.open(record.path) as image:
                            image_wh = image.size
                        patch_ip[record.index] = patch_concepts(dataset.mask(pos), grid, dataset.ignore_index, len(seg), image_wh)
                    except (BadImage, OSError):
                        pass  # the image was skipped by the recording too, or has no usable mask: no concept
                b.advance(1)
        if tmp is not None:
            patch_ip.flush()
            del patch_ip
            os.replace(tmp, patch_path)
            patch_ip = np.load(patch_path, mmap_mode="r")
    if patch_ip is None and image_i is None:
        return None
    return make_labels(seg, patch_ip, list(dataset.classes), image_i, seed)


# --------------------------------------------------------------------------- bins


def bin_thresholds() -> np.ndarray:
    """Lower edges of bins 2.. as the smallest float32 ≥ 10^edge, so bucketizing float32 is exact."""
    edges = 10.0 ** (LOG10_RANGE[0] + np.arange(1, N_BINS - 1) / BINS_PER_DECADE)
    thresholds = edges.astype(np.float32)
    below = thresholds.astype(np.float64) < edges
    thresholds[below] = np.nextafter(thresholds[below], np.float32(np.inf))
    return thresholds


def bin_lower_edges() -> np.ndarray:
    """Smallest activation of every bin [N_BINS] (0 for bins 0 and 1: "fires at all")."""
    return np.concatenate([[0.0, 0.0], bin_thresholds().astype(np.float64)])


def activation_bins(vals: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Bin of each activation: 0 for ≤ 0, else 1 + its place on the log10 grid."""
    bins = torch.bucketize(vals, thresholds, right=True) + 1
    return torch.where(vals > 0, bins, torch.zeros_like(bins))


# --------------------------------------------------------------------------- counters


class SparseCounts:
    """Counts of int64 keys, kept as sorted unique keys + counts; new keys merge in amortised batches."""

    def __init__(self, device: torch.device):
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.counts = torch.zeros(0, dtype=torch.int64, device=device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._n_pending = 0

    def add(self, keys_n: torch.Tensor) -> None:
        if keys_n.numel() == 0:
            return
        uniq, counts = torch.unique(keys_n, return_counts=True)
        self._pending.append((uniq, counts))
        self._n_pending += len(uniq)
        if self._n_pending > max(len(self.keys), 1 << 20):  # merge cost stays linear overall
            self.compact()

    def compact(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.keys, *(k for k, _ in self._pending)])
        counts = torch.cat([self.counts, *(c for _, c in self._pending)])
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.counts = torch.zeros(len(self.keys), dtype=torch.int64, device=keys.device).index_add_(0, inverse, counts)
        self._pending, self._n_pending = [], 0

    def dense(self, lo: int, hi: int) -> torch.Tensor:
        """Counts of keys lo..hi-1 as a dense vector."""
        self.compact()
        a, b = (int(torch.searchsorted(self.keys, torch.tensor(v, device=self.keys.device))) for v in (lo, hi))
        out = torch.zeros(hi - lo, dtype=torch.int64, device=self.keys.device)
        out[self.keys[a:b] - lo] = self.counts[a:b]
        return out


class DetectionHistograms:
    """Per-(label set, feature, concept) activation histograms over the positives, and per-feature totals.

    A sample is a patch (patch level) or an image (image level); each has at
    most one concept per label set.
    """

    def __init__(self, n_features: int, n_concepts: int, n_sets: int, device: torch.device):
        self.n_features, self.n_concepts, self.n_sets = n_features, n_concepts, n_sets
        self.n_samples = 0
        self.totals_fb = torch.zeros(n_features, N_BINS, dtype=torch.int64, device=device)
        self.support_sc = torch.zeros(n_sets, n_concepts, dtype=torch.int64, device=device)
        self.positives = SparseCounts(device)

    def update(self, feature_e: torch.Tensor, bin_e: torch.Tensor, sample_e: torch.Tensor, concept_sn: torch.Tensor) -> None:
        """Add a batch: the firing entries (feature, bin ≥ 1, sample) and each sample's concept per label set [sets, n]."""
        n_bins, n_concepts, n_features = N_BINS, self.n_concepts, self.n_features
        self.n_samples += concept_sn.shape[1]
        self.totals_fb.view(-1).index_add_(0, feature_e * n_bins + bin_e, torch.ones_like(feature_e))
        for s in range(self.n_sets):
            concept_n = concept_sn[s]
            has = concept_n >= 0
            self.support_sc[s] += torch.bincount(concept_n[has], minlength=n_concepts)[:n_concepts]
            concept_e = concept_n[sample_e]
            keep = concept_e >= 0
            self.positives.add(((s * n_features + feature_e[keep]) * n_concepts + concept_e[keep]) * n_bins + bin_e[keep])

    def block(self, s: int, f0: int, f1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positives, negatives) of features f0..f1-1 in label set s, [f, C, N_BINS] int64, bin 0 included."""
        width = self.n_concepts * N_BINS
        lo = (s * self.n_features + f0) * width
        pos_fcb = self.positives.dense(lo, lo + (f1 - f0) * width).view(f1 - f0, self.n_concepts, N_BINS)
        total_fb = self.totals_fb[f0:f1].clone()
        total_fb[:, 0] = self.n_samples - total_fb[:, 1:].sum(1)
        pos_fcb[:, :, 0] = self.support_sc[s][None, :] - pos_fcb[:, :, 1:].sum(2)
        return pos_fcb, total_fb[:, None, :] - pos_fcb


# --------------------------------------------------------------------------- scores


@dataclass
class Scores:
    """Detection scores of a block of (feature, concept) pairs, each [f, C] float64."""

    ap: torch.Tensor
    ap_low: torch.Tensor
    ap_high: torch.Tensor
    iou: torch.Tensor
    threshold: torch.Tensor


def _harmonic_diff(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """H(a + p) − H(a) = Σ_{k=1..p} 1/(a + k), through the digamma function (float64)."""
    return torch.special.digamma(a + p + 1) - torch.special.digamma(a + 1)


def detection_scores(pos_fcb: torch.Tensor, neg_fcb: torch.Tensor, lower_edges_b: torch.Tensor) -> Scores:
    """AP (binned, ties grouped), its bounds for the unbinned scores, and the best-threshold IoU.

    Bins are ordered by activation; the detector "fires" at bin b when the
    activation is in bin b or above. NaN where a concept has no positives.
    """
    pos = pos_fcb.double().flip(-1)  # highest bin first
    neg = neg_fcb.double().flip(-1)
    tp = pos.cumsum(-1)
    seen = tp + neg.cumsum(-1)  # samples at or above each bin
    tp_above, seen_above = tp - pos, seen - pos - neg
    n_pos = tp[..., -1:]
    prec = torch.where(seen > 0, tp / seen.clamp_min(1), torch.zeros_like(tp))
    exact = pos * prec
    ap = exact.sum(-1) / n_pos[..., 0]
    # Worst order inside a bin: its negatives first, then its positives one by one.
    worst = pos - (seen_above + neg - tp_above) * _harmonic_diff(seen_above + neg, pos)
    # Best: every positive at the precision of all the bin's positives ranked first (also covers ties).
    best = pos * (tp_above + pos) / (seen_above + pos).clamp_min(1)
    worst[..., -1], best[..., -1] = exact[..., -1], exact[..., -1]  # bin 0 (last after the flip) is an exact tie
    ap_low = worst.sum(-1) / n_pos[..., 0]
    ap_high = best.sum(-1) / n_pos[..., 0]
    # IoU when firing at bin b or above, b ≥ 1 (network dissection thresholds the activation).
    iou = tp[..., :-1] / (n_pos + seen[..., :-1] - tp[..., :-1])
    best_iou, best_at = iou.nan_to_num(-1.0).max(-1)
    threshold = lower_edges_b.flip(0)[best_at]
    none = n_pos[..., 0] == 0
    nan = torch.full_like(ap, math.nan)
    return Scores(torch.where(none, nan, ap), torch.where(none, nan, ap_low.clamp(0, 1)),
                  torch.where(none, nan, ap_high.clamp(0, 1)), torch.where(none, nan, best_iou.clamp_min(0)),
                  torch.where(none, nan, threshold))


# --------------------------------------------------------------------------- the streaming hook


class ConceptStats:
    """Streaming concept statistics of one SAE: `update` once per batch of whole images, then `table`."""

    def __init__(self, labels: ConceptLabels, n_features: int, device: torch.device):
        self.labels = labels
        self.n_features = n_features
        self.device = device
        self.thresholds = torch.from_numpy(bin_thresholds()).to(device)
        self.patch = DetectionHistograms(n_features, len(labels.patch_names), 2, device) if labels.has_patch else None
        self.image = DetectionHistograms(n_features, len(labels.image_names), 2, device) if labels.has_image else None

    def update(self, f_bpf: torch.Tensor, img_max_bf: torch.Tensor, image_idx_b: np.ndarray) -> None:
        """Add a batch: features [images, patches, F], their per-image max [images, F], dataset indices [images]."""
        image_idx_b = np.asarray(image_idx_b, dtype=np.int64)
        both_b = np.stack([image_idx_b, self.labels.null_i[image_idx_b]])  # [sets, images]
        if self.patch is not None:
            assert self.labels.patch_ip is not None
            concept_sn = torch.from_numpy(np.asarray(self.labels.patch_ip[both_b.reshape(-1)], dtype=np.int64))
            self._add(self.patch, f_bpf.reshape(-1, f_bpf.shape[-1]), concept_sn.view(2, -1).to(self.device))
        if self.image is not None:
            assert self.labels.image_i is not None
            concept_sn = torch.from_numpy(np.asarray(self.labels.image_i[both_b], dtype=np.int64))
            self._add(self.image, img_max_bf, concept_sn.to(self.device))

    def _add(self, hist: DetectionHistograms, f_nf: torch.Tensor, concept_sn: torch.Tensor) -> None:
        flat = f_nf.reshape(-1)
        idx = torch.nonzero(flat > 0).squeeze(1)
        vals = flat.index_select(0, idx).float()
        hist.update(idx % self.n_features, activation_bins(vals, self.thresholds), idx // self.n_features, concept_sn)

    def table(self, sae_id: str) -> pa.Table:
        """The `concepts` rows: every (feature, concept) with support, at each level."""
        parts = []
        for level, hist, names in (("patch", self.patch, self.labels.patch_names), ("image", self.image, self.labels.image_names)):
            if hist is not None:
                parts.append(_level_table(sae_id, level, hist, names))
        if not parts:
            from saev_report import tables

            return tables.to_arrow("concepts", [])
        return pa.concat_tables(parts)


def _level_table(sae_id: str, level: str, hist: DetectionHistograms, names: Sequence[str]) -> pa.Table:
    from saev_report import tables

    n_concepts = hist.n_concepts
    lower_edges_b = torch.from_numpy(bin_lower_edges()).to(hist.totals_fb.device)
    block = max(1, _BLOCK_COUNTERS // (n_concepts * N_BINS))
    support_c = hist.support_sc[REAL].cpu().numpy()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("feature", "concept", "ap", "ap_low", "ap_high", "iou", "threshold", "null_ap", "null_iou")}
    for f0 in range(0, hist.n_features, block):
        f1 = min(f0 + block, hist.n_features)
        real = detection_scores(*hist.block(REAL, f0, f1), lower_edges_b)
        null = detection_scores(*hist.block(NULL, f0, f1), lower_edges_b)
        feature_fc, concept_fc = np.meshgrid(np.arange(f0, f1), np.arange(n_concepts), indexing="ij")
        keep = np.broadcast_to(support_c > 0, feature_fc.shape)
        cols["feature"].append(feature_fc[keep])
        cols["concept"].append(concept_fc[keep])
        for key, value in (("ap", real.ap), ("ap_low", real.ap_low), ("ap_high", real.ap_high), ("iou", real.iou),
                           ("threshold", real.threshold), ("null_ap", null.ap), ("null_iou", null.iou)):
            cols[key].append(value.cpu().numpy()[keep])
    flat = {k: np.concatenate(v) for k, v in cols.items()}
    n = len(flat["feature"])
    name_arr = np.asarray(list(names), dtype=object)
    return tables.to_arrow("concepts", {
        "sae_id": [sae_id] * n,
        "feature": flat["feature"].astype(np.int32),
        "concept": name_arr[flat["concept"]].tolist() if n else [],
        "level": [level] * n,
        "ap": flat["ap"], "iou": flat["iou"], "threshold": flat["threshold"],
        "support": support_c[flat["concept"]].astype(np.int64),
        "null_ap": flat["null_ap"],
        "ap_low": flat["ap_low"], "ap_high": flat["ap_high"],
        "base_rate": support_c[flat["concept"]] / max(hist.n_samples, 1),
        "null_iou": flat["null_iou"],
    })


# --------------------------------------------------------------------------- per-feature summary


@dataclass
class BestConcepts:
    concept: list[str | None]
    ap: np.ndarray
    margin: np.ndarray
    level: str | None

    @classmethod
    def none(cls, n_features: int) -> "BestConcepts":
        """No concept labels: every column null."""
        return cls([None] * n_features, np.full(n_features, np.nan), np.full(n_features, np.nan), None)


def best_concepts(concepts: pa.Table, n_features: int) -> BestConcepts:
    """Each feature's best concept by AP at the patch level (the image level without masks), and its margin
    over the second best (NaN with a single concept)."""
    levels = set(concepts.column("level").to_pylist()) if concepts.num_rows else set()
    level = "patch" if "patch" in levels else "image" if "image" in levels else None
    if level is None:
        return BestConcepts.none(n_features)
    nan = np.full(n_features, np.nan)
    rows = concepts.filter(pc.equal(concepts.column("level"), level))
    feature = rows.column("feature").to_numpy()
    ap = np.nan_to_num(rows.column("ap").to_numpy(zero_copy_only=False), nan=-1.0)
    names = rows.column("concept").to_numpy(zero_copy_only=False)
    order = np.lexsort((-ap, feature))  # by feature, then AP descending
    feature, ap, names = feature[order], ap[order], names[order]
    starts = np.flatnonzero(np.r_[True, feature[1:] != feature[:-1]])
    best_ap, second = nan.copy(), nan.copy()
    best_name: list[str | None] = [None] * n_features
    f = feature[starts]
    best_ap[f] = ap[starts]
    has_second = np.r_[starts[1:], len(feature)] - starts > 1
    second[f[has_second]] = ap[starts[has_second] + 1]
    for i, s in zip(f, starts):
        best_name[int(i)] = str(names[s])
    best_ap[best_ap < 0] = np.nan
    return BestConcepts(best_name, best_ap, best_ap - second, level)
