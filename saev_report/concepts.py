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

The pass keeps no patches. Activations are binned by their float32 bits (the
exponent and the top `MANTISSA_BITS` of the mantissa: 16 bins per octave, each
≤ 6.25 % wide, plus bin 0 for "does not fire"), and the counters are

- the histogram of every feature over all samples (dense, [F, bins]);
- the histogram of every feature over the positives of each concept: a dense
  int32 vector while (label sets × F × C × bins) fits in `DENSE_COUNTERS`,
  else sorted sparse keys, one per occupied (label set, feature, concept, bin),
  so memory follows what fires, never F × C × bins (at F = 24,576 and the 150
  ADE20K classes that product is 1.7 G counters).

Negatives are totals − positives. From the two histograms AP and IoU come
exactly as if every activation were replaced by its bin (sklearn's AP with
ties grouped: `average_precision_score` on the binned scores). The AP of the
unbinned activations lies in [`ap_low`, `ap_high`]: within a bin the order of
positives and negatives is unknown, and the bounds take the worst and the
best. Not firing is an exact tie, so bin 0 adds no uncertainty.

The null: the same statistics with the labels permuted across images (a seeded
permutation: image i is scored against the labels of image π(i)), kept as a
second label set in the same counters. A feature that "detects" a concept only
as well as under permuted labels detects nothing.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from saev_report import distributed

MANTISSA_BITS = 4
"""Bins per octave = 2**MANTISSA_BITS: a bin is a float32 exponent and its top mantissa bits (≤ 6.25 % wide)."""
OCTAVES = (-16, 12)
"""Activations binned over [2**-16, 2**12); smaller positives share bin 1, larger ones the last bin."""
_SHIFT = 23 - MANTISSA_BITS
_FIRST_KEY = (127 + OCTAVES[0]) << MANTISSA_BITS  # exponent-and-mantissa key of 2**-16
N_BINS = 1 + ((OCTAVES[1] - OCTAVES[0]) << MANTISSA_BITS)
"""Bin 0: activation 0 (does not fire); bins 1..: positive activations."""
DENSE_COUNTERS = 1 << 26
"""Up to this many (set, feature, concept, bin) counters are kept dense (int32, 256 MB); beyond, sparse."""

NO_CONCEPT = -1
REAL, NULL = 0, 1
"""Label sets: the real labels and the permuted-label null."""

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
    more_null_i: np.ndarray | None = None
    """[permutations − 1, images] further permutations of the null (`analysis.null_permutations`)."""

    @property
    def null_sets(self) -> np.ndarray:
        """[permutations, images]: every null permutation, the first one first."""
        extra = self.more_null_i if self.more_null_i is not None else np.zeros((0, len(self.null_i)), dtype=np.int64)
        return np.concatenate([self.null_i[None], extra])

    @property
    def has_patch(self) -> bool:
        return self.patch_ip is not None and len(self.patch_names) > 0

    @property
    def has_image(self) -> bool:
        return self.image_i is not None and len(self.image_names) > 0


def null_permutation(labelled_i: np.ndarray, seed: int | Sequence[int]) -> np.ndarray:
    """A seeded permutation of the images where `labelled_i` is true (the others map to themselves)."""
    perm = np.arange(len(labelled_i), dtype=np.int64)
    which = np.flatnonzero(labelled_i)
    perm[which] = which[np.random.default_rng(seed).permutation(len(which))]
    return perm


def make_labels(patch_names: Sequence[str], patch_ip: np.ndarray | None, image_names: Sequence[str],
                image_i: np.ndarray | None, seed: int, n_null: int = 1) -> ConceptLabels:
    """ConceptLabels with `n_null` null permutations drawn over the images that carry any label
    (the first from `seed` alone, as a single-permutation build drew it; the k-th from [seed, k])."""
    n = len(patch_ip) if patch_ip is not None else len(image_i) if image_i is not None else 0
    labelled = np.zeros(n, dtype=bool)
    if patch_ip is not None:
        labelled |= np.asarray((patch_ip != NO_CONCEPT).any(1))
    if image_i is not None:
        labelled |= np.asarray(image_i) != NO_CONCEPT
    more = np.stack([null_permutation(labelled, [seed, k]) for k in range(1, n_null)]) if n_null > 1 else None
    return ConceptLabels(list(patch_names), patch_ip, list(image_names), image_i, null_permutation(labelled, seed), more)


def dataset_labels(dataset, grid: tuple[int, int], seed: int, patch_path: Path | None = None, n_null: int = 1) -> ConceptLabels | None:
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
    return make_labels(seg, patch_ip, list(dataset.classes), image_i, seed, n_null)


# --------------------------------------------------------------------------- bins


def bin_lower_edges() -> np.ndarray:
    """Smallest activation of every bin [N_BINS], exact float32 values (0 for bins 0 and 1: "fires at all")."""
    keys = (_FIRST_KEY + np.arange(1, N_BINS - 1, dtype=np.int64)) << _SHIFT
    return np.concatenate([[0.0, 0.0], keys.astype(np.int32).view(np.float32).astype(np.float64)])


def activation_bins(vals: torch.Tensor) -> torch.Tensor:
    """Bin of each float32 activation: 0 for ≤ 0, else 1 + its place on the grid.

    For non-negative floats the bit pattern orders like the value, so the bin
    is one shift of the bits: no logarithm, no search, and exact edges.
    """
    vals = vals.float().contiguous()
    key = (vals.view(torch.int32) >> _SHIFT).long()
    bins = (key - _FIRST_KEY).clamp_(0, N_BINS - 2) + 1
    return torch.where(vals > 0, bins, torch.zeros_like(bins))


# --------------------------------------------------------------------------- scores


@dataclass
class Scores:
    """Detection scores of (feature, concept) pairs, each [F, C] float64.

    `ap` is exact for the binned activations; the unbinned AP lies in
    [`ap_low`, `ap_high`]; `iou` is the best over thresholds "activation ≥
    `threshold`" (NaN threshold where the feature never fires on the concept);
    `fire_rate` the share of the concept's samples on which the feature fires.
    """

    ap: np.ndarray
    ap_low: np.ndarray
    ap_high: np.ndarray
    iou: np.ndarray
    threshold: np.ndarray
    fire_rate: np.ndarray


# --------------------------------------------------------------------------- counters


class SparseCounts:
    """Counts of int64 keys as sorted unique keys + counts (numpy: its integer sort is ~10× torch's on CPU);
    each batch is reduced on arrival and merged in amortised rounds."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_pending = 0

    def add(self, keys_n: torch.Tensor) -> None:
        if len(keys_n) == 0:
            return
        uniq, counts = np.unique(keys_n.cpu().numpy(), return_counts=True)
        self._pending.append((uniq, counts))
        self._n_pending += len(uniq)
        if self._n_pending > max(len(self.keys), 1 << 22):  # merge cost stays linear overall
            self.compact()

    def compact(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.keys, *(k for k, _ in self._pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self._pending)])
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        self.keys, self.counts = keys[starts], np.add.reduceat(counts, starts) if len(keys) else counts
        self._pending, self._n_pending = [], 0

    def merge_ranks(self) -> None:
        """Every rank's counts added into this one (all ranks end equal)."""
        self.compact()
        keys = distributed.gather_varying(torch.from_numpy(self.keys))
        counts = distributed.gather_varying(torch.from_numpy(self.counts))
        self.keys, self.counts = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self._pending = [(k.numpy(), c.numpy()) for k, c in zip(keys, counts) if len(k)]
        self._n_pending = sum(len(k) for k, _ in self._pending)
        self.compact()

    def range(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, counts) of the keys in lo..hi-1, sorted."""
        self.compact()
        a, b = np.searchsorted(self.keys, [lo, hi])
        return self.keys[a:b], self.counts[a:b]


class DenseCounts:
    """The same interface as SparseCounts over a small key space: one dense int32 vector (a counter is
    bounded by the samples seen; `add` refuses to let that pass 2**31)."""

    def __init__(self, n_keys: int, device: torch.device):
        self.counts_k = torch.zeros(n_keys, dtype=torch.int32, device=device)
        self.n_added = 0

    def add(self, keys_n: torch.Tensor) -> None:
        self.n_added += len(keys_n)
        if self.n_added >= 2**31:
            raise OverflowError("more than 2**31 positives: raise DENSE_COUNTERS's int32 to int64")
        self.counts_k.index_add_(0, keys_n, torch.ones(len(keys_n), dtype=torch.int32, device=keys_n.device))

    def merge_ranks(self) -> None:
        """Every rank's counts added into this one (all ranks end equal)."""
        self.n_added = sum(distributed.gather(self.n_added))
        if self.n_added >= 2**31:
            raise OverflowError("more than 2**31 positives: raise DENSE_COUNTERS's int32 to int64")
        distributed.sum_(self.counts_k)

    def range(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        counts = self.counts_k[lo:hi].cpu().numpy()
        keys = np.flatnonzero(counts)
        return keys + lo, counts[keys].astype(np.int64)


class DetectionHistograms:
    """Per-(label set, feature, concept) activation histograms over the positives, and per-feature totals.

    A sample is a patch (patch level) or an image (image level); each has at
    most one concept per label set. Keys are ((set·F + feature)·C + concept)·N_BINS + bin.
    """

    def __init__(self, n_features: int, n_concepts: int, n_sets: int, device: torch.device):
        self.n_features, self.n_concepts, self.n_sets = n_features, n_concepts, n_sets
        self.n_samples = 0
        self.totals_fb = torch.zeros(n_features, N_BINS, dtype=torch.int64, device=device)
        self.support_sc = torch.zeros(n_sets, n_concepts, dtype=torch.int64, device=device)
        n_keys = n_sets * n_features * n_concepts * N_BINS
        self.positives = DenseCounts(n_keys, device) if n_keys <= DENSE_COUNTERS else SparseCounts()

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
            keys = ((s * n_features + feature_e[keep]) * n_concepts + concept_e[keep]) * n_bins + bin_e[keep]
            self.positives.add(keys)

    def merge_ranks(self) -> None:
        """Every rank's histograms added into this one (all ranks end equal): integer counts, so the
        merged counters, and the scores made from them, are exactly those of one pass."""
        self.n_samples = sum(distributed.gather(self.n_samples))
        distributed.sum_(self.totals_fb)
        distributed.sum_(self.support_sc)
        self.positives.merge_ranks()

    def scores(self, s: int, bounds: bool = True) -> Scores:
        """Detection scores of every (feature, concept) in label set s, [F, C] (NaN where a concept has no
        samples; `ap_low`/`ap_high` NaN unless `bounds`).

        Only occupied cells are visited: AP sums over the bins holding positives,
        and the best IoU is reached at the bottom of such a bin (between two, the
        cut only adds negatives), so the cost follows the counts, not F × C × bins.
        """
        n_features, n_concepts, n_bins = self.n_features, self.n_concepts, N_BINS
        n_pairs, width = n_features * n_concepts, n_features * n_concepts * N_BINS
        keys, counts = self.positives.range(s * width, (s + 1) * width)
        keys = keys - s * width
        bin_e, pair_e = keys % n_bins, keys // n_bins  # pair = feature·C + concept; cells sorted by pair, then bin
        fb_e = (pair_e // n_concepts) * n_bins + bin_e
        p = counts.astype(np.float64)

        totals_fb = self.totals_fb.cpu().numpy().astype(np.float64)
        totals_fb[:, 0] = self.n_samples - totals_fb[:, 1:].sum(1)
        at_or_above_fb = np.cumsum(totals_fb[:, ::-1], axis=1)[:, ::-1]  # samples in bin b or above
        seen = at_or_above_fb.reshape(-1)[fb_e]
        in_bin = totals_fb.reshape(-1)[fb_e]
        fired_pair = np.bincount(pair_e, weights=p, minlength=n_pairs)  # positives where the feature fires
        # Positives in higher bins of the same pair: the pair's total minus the running sum up to this cell.
        starts = np.flatnonzero(np.r_[True, pair_e[1:] != pair_e[:-1]]) if len(p) else np.zeros(0, dtype=np.int64)
        lengths = np.diff(np.r_[starts, len(p)])
        running = np.cumsum(p)
        tp = fired_pair[pair_e] - running + np.repeat(running[starts] - p[starts], lengths) + p
        support_pair = np.tile(self.support_sc[s].cpu().numpy().astype(np.float64), n_features)
        iou = tp / (support_pair[pair_e] + seen - tp)

        # Bin 0 (does not fire) is one exact tie at the bottom: all samples seen, all positives found.
        bin0 = (support_pair - fired_pair) * support_pair / max(self.n_samples, 1)
        none = support_pair == 0

        def ap_from(cells: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                ap = (np.bincount(pair_e, weights=cells, minlength=n_pairs) + bin0) / support_pair
            return np.where(none, math.nan, np.clip(ap, 0, 1)).reshape(n_features, n_concepts)

        ap = ap_from(p * tp / seen)
        ap_low = ap_high = np.full((n_features, n_concepts), math.nan)
        if bounds:
            tp_above, below_first = tp - p, seen - p  # the bin's positives come after `below_first` samples at worst
            # Worst order inside a bin: its negatives first, then its positives one by one:
            # Σ_k (tp_above + k) / (below_first + k) = p − (below_first − tp_above)·(H(seen) − H(below_first)).
            harmonic = (torch.from_numpy(seen + 1).digamma() - torch.from_numpy(below_first + 1).digamma()).numpy()
            ap_low = ap_from(p - (below_first - tp_above) * harmonic)
            # Best: every positive at the precision of all the bin's positives ranked first (covers ties too).
            ap_high = ap_from(p * tp / (seen - in_bin + p))
        best_iou = np.zeros(n_pairs)
        threshold = np.full(n_pairs, math.nan)
        if len(p):
            pairs = pair_e[starts]
            best_iou[pairs] = np.maximum.reduceat(iou, starts)
            # the highest bin reaching the best IoU (cells ascend by bin within a pair)
            hit = np.where(iou == np.repeat(best_iou[pairs], lengths), np.arange(len(p)), -1)
            threshold[pairs] = bin_lower_edges()[bin_e[np.maximum.reduceat(hit, starts)]]
        threshold[best_iou == 0] = math.nan  # never fires on the concept: no threshold helps
        best_iou[none] = math.nan
        threshold[none] = math.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            fire_rate = np.where(none, math.nan, fired_pair / support_pair)
        return Scores(ap, ap_low, ap_high, best_iou.reshape(n_features, n_concepts), threshold.reshape(n_features, n_concepts),
                      fire_rate.reshape(n_features, n_concepts))


# --------------------------------------------------------------------------- the streaming hook


class ConceptStats:
    """Streaming concept statistics of one SAE: `update` once per batch of whole images, then `table`."""

    def __init__(self, labels: ConceptLabels, n_features: int, device: torch.device):
        self.labels = labels
        self.n_features = n_features
        self.device = device
        n_sets = 1 + len(labels.null_sets)  # the real labels, then every null permutation
        self.patch = DetectionHistograms(n_features, len(labels.patch_names), n_sets, device) if labels.has_patch else None
        self.image = DetectionHistograms(n_features, len(labels.image_names), n_sets, device) if labels.has_image else None

    def update(self, f_bpf: torch.Tensor, img_max_bf: torch.Tensor, image_idx_b: np.ndarray,
               entries: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add a batch: features [images, patches, F], their per-image max [images, F], dataset indices
        [images], and optionally the firing entries of f_bpf (flat indices, values) if the caller has them."""
        image_idx_b = np.asarray(image_idx_b, dtype=np.int64)
        both_b = np.concatenate([image_idx_b[None], self.labels.null_sets[:, image_idx_b]])  # [sets, images]
        if self.patch is not None:
            assert self.labels.patch_ip is not None
            concept_sn = torch.from_numpy(np.asarray(self.labels.patch_ip[both_b.reshape(-1)], dtype=np.int64))
            self._add(self.patch, entries or _firing(f_bpf), concept_sn.view(len(both_b), -1).to(self.device))
        if self.image is not None:
            assert self.labels.image_i is not None
            concept_sn = torch.from_numpy(np.asarray(self.labels.image_i[both_b], dtype=np.int64))
            self._add(self.image, _firing(img_max_bf), concept_sn.to(self.device))

    def _add(self, hist: DetectionHistograms, entries: tuple[torch.Tensor, torch.Tensor], concept_sn: torch.Tensor) -> None:
        idx, vals = entries
        hist.update(idx % self.n_features, activation_bins(vals), idx // self.n_features, concept_sn)

    def merge_ranks(self) -> None:
        """Fold every rank's histograms into this one, under torchrun: each rank streamed its share of
        the images against the same labels (and the same null permutation), so the counters add up to
        one pass's, exactly."""
        for hist in (self.patch, self.image):
            if hist is not None:
                hist.merge_ranks()

    def table(self, sae_id: str) -> pa.Table:
        """The `concepts` rows: every (feature, concept) with support, at each level."""
        from saev_report import tables

        parts = []
        for level, hist, names in (("patch", self.patch, self.labels.patch_names), ("image", self.image, self.labels.image_names)):
            if hist is not None:
                parts.append(_level_table(sae_id, level, hist, names))
        return pa.concat_tables(parts) if parts else tables.to_arrow("concepts", [])

    def null_table(self, sae_id: str) -> pa.Table:
        """The `concept_nulls` rows: under each null permutation, every feature's best lift over the concepts."""
        from saev_report import tables

        cols: dict[str, list] = {"sae_id": [], "level": [], "permutation": [], "feature": [], "best_lift": []}
        for level, hist in (("patch", self.patch), ("image", self.image)):
            if hist is None:
                continue
            for k in range(1, hist.n_sets):
                support_c = hist.support_sc[k].cpu().numpy()
                base_rate = support_c / max(hist.n_samples, 1)
                lift_fc = chance_corrected(hist.scores(k, bounds=False).ap, base_rate[None, :])
                lift_fc = np.where(support_c[None, :] > 0, lift_fc, np.nan)
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    best_f = np.nanmax(lift_fc, axis=1) if lift_fc.size else np.zeros(hist.n_features)
                cols["sae_id"] += [sae_id] * hist.n_features
                cols["level"] += [level] * hist.n_features
                cols["permutation"] += [k - 1] * hist.n_features
                cols["feature"] += list(range(hist.n_features))
                cols["best_lift"] += [None if not np.isfinite(v) else float(v) for v in best_f]
        return tables.to_arrow("concept_nulls", cols)


def _firing(f_nf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = f_nf.reshape(-1)
    idx = torch.nonzero(flat > 0).squeeze(1)
    return idx, flat.index_select(0, idx).float()


def _level_table(sae_id: str, level: str, hist: DetectionHistograms, names: Sequence[str]) -> pa.Table:
    from saev_report import tables

    real, null = hist.scores(REAL), hist.scores(NULL, bounds=False)
    support_c = hist.support_sc[REAL].cpu().numpy()
    feature_fc, concept_fc = np.meshgrid(np.arange(hist.n_features), np.arange(hist.n_concepts), indexing="ij")
    keep = np.broadcast_to(support_c > 0, feature_fc.shape)
    concept_n = concept_fc[keep]
    n = len(concept_n)
    base_rate = support_c[concept_n] / max(hist.n_samples, 1)
    return tables.to_arrow("concepts", {
        "sae_id": [sae_id] * n,
        "feature": feature_fc[keep].astype(np.int32),
        "concept": np.asarray(list(names), dtype=object)[concept_n].tolist() if n else [],
        "level": [level] * n,
        "ap": _nullable(real.ap[keep]), "iou": _nullable(real.iou[keep]), "threshold": _nullable(real.threshold[keep]),
        "fire_rate": _nullable(real.fire_rate[keep]),
        "support": support_c[concept_n].astype(np.int64),
        "null_ap": _nullable(null.ap[keep]),
        "ap_low": _nullable(real.ap_low[keep]), "ap_high": _nullable(real.ap_high[keep]),
        "base_rate": base_rate,
        "ap_lift": _nullable(chance_corrected(real.ap[keep], base_rate)),
        "null_iou": _nullable(null.iou[keep]),
    })


def chance_corrected(ap: np.ndarray, base_rate: np.ndarray) -> np.ndarray:
    """(AP − base rate) / (1 − base rate): 0 for a detector that knows nothing, 1 for a perfect one (NaN when
    the concept covers every sample)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(base_rate < 1, (ap - base_rate) / (1 - base_rate), np.nan)


def _nullable(values: np.ndarray) -> pa.Array:
    """NaN → null: SQL sorts NaN above every number, null it leaves out."""
    return pa.array(values, type=pa.float64(), mask=np.isnan(values))


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
    """Each feature's best concept, by AP above chance (`ap_lift`), at the patch level (the image level
    without masks): its name, its AP, and its lift's margin over the runner-up's (NaN with one concept)."""
    levels = set(concepts.column("level").to_pylist()) if concepts.num_rows else set()
    level = "patch" if "patch" in levels else "image" if "image" in levels else None
    if level is None:
        return BestConcepts.none(n_features)
    rows = concepts.filter(pc.equal(concepts.column("level"), level))
    feature = rows.column("feature").to_numpy()
    lift = np.nan_to_num(rows.column("ap_lift").to_numpy(zero_copy_only=False).astype(np.float64), nan=-np.inf)
    ap = rows.column("ap").to_numpy(zero_copy_only=False).astype(np.float64)
    names = rows.column("concept").to_numpy(zero_copy_only=False)
    order = np.lexsort((-lift, feature))  # by feature, then lift descending
    feature, lift, ap, names = feature[order], lift[order], ap[order], names[order]
    starts = np.flatnonzero(np.r_[True, feature[1:] != feature[:-1]])
    f = feature[starts]
    ranked = np.isfinite(lift[starts])
    best = BestConcepts.none(n_features)
    best.level = level
    best.ap[f[ranked]] = ap[starts[ranked]]
    for i, s in zip(f[ranked], starts[ranked]):
        best.concept[int(i)] = str(names[s])
    has_second = ranked & (np.r_[starts[1:], len(feature)] - starts > 1)
    runner_up = lift[np.minimum(starts + 1, len(lift) - 1)]
    has_second &= np.isfinite(runner_up)
    best.margin[f[has_second]] = lift[starts[has_second]] - runner_up[has_second]
    return best
