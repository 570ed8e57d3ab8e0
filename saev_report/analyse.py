"""Observe: SAE metrics, per-feature statistics and top-k exemplar images, in one pass.

`analyse_sae` reads every patch once, a batch of whole images at a time. Per
batch it encodes the patches, decodes them for the metrics, and updates:

- float64 reconstruction sums: Σ‖x−x̂‖², active features, and the per-dim mean
  and centred M2 of x merged batch by batch (Chan et al.), so the centred
  Σ‖x−x̄‖² of the FVU stays exact even when the mean dwarfs the spread (the
  float32 E[x²]−E[x]² shortcut cancels to noise there);
- per-feature counters over the firing entries only (f > 0, found with one
  `nonzero` over f): firings, activation sum, max, and a log10 histogram on a
  fixed fine grid (`FINE_PER_DECADE` bins per decade over `LOG10_RANGE`);
- the top-k images per feature, ranked by the image's max patch activation, so
  an image appears at most once per feature. Value and stream position share
  one int64 key per slot, which makes the merge a single `torch.topk` over
  [F, k + images] with deterministic ties (equal activations: the image read
  first wins), and the patch maps of images entering the top-k are copied out
  of the batch then.

Memory is bounded whatever the number of patches: one batch, O(F·fine bins)
counters, and the maps of the current winners, F·k·patches float32 (100 MB at
6144 × 16 × 256, 400 MB at 24576 × 16 × 256). Keeping the maps beats a second
pass that re-encodes the winners: with few images (the demo) nearly every
image wins some slot, so that pass is a second full encode, and with many
(ImageNet) it re-reads a store of hundreds of GB that the scan just streamed.

Histogram edges: the fine grid (1/8 decade from 1e-8 to 1e6; values outside
land in the end bins) is fixed before the pass; afterwards one set of
`histogram_bins` edges per SAE is chosen spanning every firing activation of
every feature, each coarse bin a whole number of fine bins. Counts are exact,
edges are shared by all features of an SAE (comparable, summable in SQL), and
no second look at the data is needed.

Exemplar labels: `top_label` is the most common label among a feature's
exemplar images (ties: the label of the better-ranked exemplar),
`label_purity` its share and `label_entropy` the entropy in bits of their
label distribution; exemplar images without a label are left out of all three.

Across ranks (torchrun): each rank scans a contiguous range of whole batches and
`ScanResult.merge_ranks` folds every accumulator into one pass's state: counts and
histograms add exactly, float64 sums add up to summation order, maxima max, and
the top-k images and quantile samples re-rank over keys carrying the global stream
position. Rank 0 builds the tables.

SAE activations must be non-negative (ReLU, TopK and BatchTopK SAEs are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import pyarrow as pa
import torch

from saev_report import distributed, progress, tables
from saev_report.concepts import BestConcepts, ConceptLabels, ConceptStats, best_concepts
from saev_report.spec import AnalysisSpec

Batch = tuple[torch.Tensor, np.ndarray]
"""(acts_bpd: raw float32 activations [images, patches, d], image_idx_b: dataset image index of each)."""

LOG10_RANGE = (-8.0, 6.0)
FINE_PER_DECADE = 8
N_FINE_BINS = int((LOG10_RANGE[1] - LOG10_RANGE[0]) * FINE_PER_DECADE)

_POS_BITS = 32
_POS_MASK = (1 << _POS_BITS) - 1


class SAELike(Protocol):
    n_features: int
    d_model: int

    def normalize(self, x_nd: torch.Tensor) -> torch.Tensor: ...
    def encode_normalized(self, xn_nd: torch.Tensor) -> torch.Tensor: ...
    def decode_normalized(self, f_nf: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AnalysisResult:
    metrics: dict[str, float | int]
    """The metric columns of the `saes` table: n_patches_eval, mse, l0, fvu, n_dead, n_dense."""
    features: pa.Table
    """The `features` table (one row per feature)."""
    exemplars: pa.Table
    """The `exemplars` table (≤ top_k rows per feature, only images where it fires)."""
    quantile_exemplars: pa.Table
    """The `quantile_exemplars` table (a uniform sample of firing images, in quantile bands)."""
    class_split: pa.Table
    """The `class_split` table (empty without labels)."""
    similar_features: pa.Table
    """The `similar_features` table (empty when the SAE exposes no decoder)."""
    concepts: pa.Table | None = None
    """The `concepts` table (None when the analysis had no concept labels)."""
    concept_nulls: pa.Table | None = None
    """The `concept_nulls` table (None when the analysis had no concept labels)."""


# --------------------------------------------------------------------------- accumulators


def _float64_device(device: torch.device) -> torch.device:
    """MPS has no float64: keep the (small) float64 accumulators on the CPU there."""
    return torch.device("cpu") if device.type == "mps" else device


class ReconstructionStats:
    """float64 sums for MSE, L0 and the centred FVU over every patch seen."""

    def __init__(self, d_model: int, device: torch.device):
        self.device = _float64_device(device)
        self.n_patches = 0
        self.n_active = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=self.device)
        self.mean_d = torch.zeros(d_model, dtype=torch.float64, device=self.device)
        self.m2_d = torch.zeros(d_model, dtype=torch.float64, device=self.device)

    def update(self, xn_nd: torch.Tensor, xhat_nd: torch.Tensor, n_active: int) -> None:
        x_nd = xn_nd.to(self.device, torch.float64)
        # Subtracting in float64 keeps float32 rounding out of the residual.
        self.sq_err += (x_nd - xhat_nd.to(self.device, torch.float64)).square_().sum()
        # Chan et al.: merge this batch's mean and centred M2 into the running ones.
        mean_b = x_nd.mean(0)
        self._merge(x_nd.shape[0], mean_b, (x_nd - mean_b).square_().sum(0))
        self.n_active += n_active

    def merge_ranks(self) -> None:
        """Fold every rank's sums into this one (all ranks end equal): counts and Σ‖x−x̂‖² add,
        the per-rank means and M2 combine by Chan et al. in rank order."""
        counts = distributed.gather((self.n_patches, self.n_active))
        means, m2s = distributed.gather_tensor(self.mean_d), distributed.gather_tensor(self.m2_d)
        distributed.sum_(self.sq_err)
        self.n_patches, self.n_active = 0, 0
        self.mean_d.zero_()
        self.m2_d.zero_()
        for (n_b, n_active), mean_b, m2_b in zip(counts, means, m2s):
            if n_b:
                self._merge(n_b, mean_b, m2_b)
            self.n_active += n_active

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n = self.n_patches + n_b
        delta = mean_b - self.mean_d
        self.mean_d += delta * (n_b / n)
        self.m2_d += m2_b + delta.square() * (self.n_patches * n_b / n)
        self.n_patches = n

    def metrics(self, d_model: int) -> dict[str, float]:
        n = max(self.n_patches, 1)
        sq_err = float(self.sq_err)
        total_var = float(self.m2_d.sum())
        return {
            "mse": sq_err / (n * d_model),
            "l0": self.n_active / n,
            "fvu": sq_err / total_var if total_var > 0 else math.nan,
        }


def fine_thresholds() -> np.ndarray:
    """Lower edge of fine bins 1.. as the smallest float32 ≥ 10^edge, so that bucketizing float32
    activations against them is exactly `floor((log10(v) − lo) · FINE_PER_DECADE)`, with no log."""
    edges = 10.0 ** (LOG10_RANGE[0] + np.arange(1, N_FINE_BINS) / FINE_PER_DECADE)
    thresholds = edges.astype(np.float32)
    below = thresholds.astype(np.float64) < edges
    thresholds[below] = np.nextafter(thresholds[below], np.float32(np.inf))
    return thresholds


def fine_bins(vals: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """Fine-grid bin of each positive float32 activation (outside the grid: the end bins).
    `thresholds` are `fine_thresholds()` on `vals`' device, when the caller keeps them."""
    if thresholds is None:
        thresholds = torch.from_numpy(fine_thresholds()).to(vals.device)
    return torch.bucketize(vals, thresholds, right=True)


FiringEntries = tuple[torch.Tensor, torch.Tensor]
"""(flat indices into f_nf of its non-zero entries, their values as float32)."""


def firing_entries(f_nf: torch.Tensor) -> FiringEntries:
    """Only firing entries cost anything beyond one pass over f: found once per batch, shared by the counters."""
    flat = f_nf.reshape(-1)
    idx = torch.nonzero(flat).squeeze(1)
    return idx, flat.index_select(0, idx).float()


class FeatureStats:
    """Per-feature firing counts, activation sums, maxima and fine log10 histograms."""

    def __init__(self, n_features: int, device: torch.device):
        acc = _float64_device(device)
        self.n_features = n_features
        self.n_fire_f = torch.zeros(n_features, dtype=torch.int64, device=acc)
        self.act_sum_f = torch.zeros(n_features, dtype=torch.float64, device=acc)
        self.max_act_f = torch.zeros(n_features, dtype=torch.float32, device=acc)
        self.fine_hist_fh = torch.zeros(n_features, N_FINE_BINS, dtype=torch.int64, device=acc)
        self.thresholds = torch.from_numpy(fine_thresholds()).to(acc)

    def update(self, f_nf: torch.Tensor, img_max_bf: torch.Tensor, entries: "FiringEntries | None" = None) -> int:
        """Add a batch (with its `firing_entries`, when the caller already has them); returns its number
        of firing (patch, feature) entries."""
        acc = self.n_fire_f.device
        idx, vals = entries or firing_entries(f_nf)
        if vals.numel() and bool(vals.min() < 0):
            raise ValueError("SAE activations must be non-negative")
        feat = (idx % self.n_features).to(acc)
        vals = vals.to(acc)
        ones = torch.ones_like(feat)
        self.n_fire_f.index_add_(0, feat, ones)
        self.act_sum_f.index_add_(0, feat, vals.double())
        bins = fine_bins(vals, self.thresholds)
        self.fine_hist_fh.view(-1).index_add_(0, feat * N_FINE_BINS + bins, ones)
        if img_max_bf.shape[0]:
            self.max_act_f = torch.maximum(self.max_act_f, img_max_bf.amax(0).to(acc))
        return int(idx.numel())

    def merge_ranks(self) -> None:
        """Sum the counts, sums and histograms of every rank, take the maxima (exact)."""
        for total in (self.n_fire_f, self.act_sum_f, self.fine_hist_fh):
            distributed.sum_(total)
        distributed.max_(self.max_act_f)


class TopImages:
    """Running top-k images per feature by max patch activation, with their patch maps.

    Each slot is one int64 key: the float32 bits of the (non-negative)
    activation in the high 32 bits — for non-negative floats the bit pattern
    orders like the value — and `_POS_MASK − stream position` in the low 32,
    so among equal activations the earlier image ranks first. Empty slots are -1.
    Keys stay sorted (rank order); the maps live in per-feature cells that do
    not move: `cell_fk` says which cell holds the map of each slot, and an
    image entering the top-k takes over a cell freed by an image leaving it.
    """

    def __init__(self, n_features: int, k: int, n_patches: int, device: torch.device, map_dtype: torch.dtype = torch.float32):
        self.k = k
        self.keys_fk = torch.full((n_features, k), -1, dtype=torch.int64, device=device)
        self.cell_fk = torch.arange(k, device=device).repeat(n_features, 1)
        self.maps_fkp = torch.zeros(n_features, k, n_patches, device=device, dtype=map_dtype)

    def update(self, img_max_bf: torch.Tensor, f_bpf: torch.Tensor, first_pos: int) -> None:
        n_images = img_max_bf.shape[0]
        if first_pos + n_images > _POS_MASK:
            raise ValueError("more than 2**32 images in one analysis")
        # Negative values (and -0.0) have negative int32 bits: clamp them to +0.0.
        bits_bf = img_max_bf.float().contiguous().view(torch.int32).clamp_min(0).long()
        pos_b = torch.arange(first_pos, first_pos + n_images, device=bits_bf.device)
        keys_bf = (bits_bf << _POS_BITS) | (_POS_MASK - pos_b)[:, None]
        self.merge(keys_bf, f_bpf)

    def merge(self, keys_bf: torch.Tensor, f_bpf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep the k largest keys per feature among the slots and this batch's images (key -1: never).

        Returns (changed features, their pick of [old slots | batch images]) for subclasses that
        keep more per slot, or None when nothing changed."""
        n_images, k = keys_bf.shape[0], self.k
        # Only features where some image beats the current k-th slot change; once the
        # slots fill up that is a shrinking minority.
        changed_c = torch.nonzero(keys_bf.amax(0) > self.keys_fk[:, -1]).squeeze(1)
        if changed_c.numel() == 0:
            return None
        keys_ck, pick_ck = torch.cat([self.keys_fk[changed_c], keys_bf[:, changed_c].T], dim=1).topk(k, dim=1)

        # Cells: survivors keep theirs, entrants take the freed ones. Each row frees as many
        # cells as it gains entrants, so the row-major lists of both pair up row by row.
        cell_ck = self.cell_fk[changed_c]
        new_cell_ck = cell_ck.gather(1, pick_ck.clamp_max(k - 1))
        kept_cm = torch.zeros(len(changed_c), k + n_images, dtype=torch.bool, device=pick_ck.device)
        kept_cm.scatter_(1, pick_ck, True)
        freed_row, freed_slot = torch.nonzero(~kept_cm[:, :k], as_tuple=True)
        entrant_row, entrant_slot = torch.nonzero(pick_ck >= k, as_tuple=True)
        new_cell_ck[entrant_row, entrant_slot] = cell_ck[freed_row, freed_slot]
        self.keys_fk[changed_c] = keys_ck
        self.cell_fk[changed_c] = new_cell_ck

        feature_e = changed_c[entrant_row]
        image_e = pick_ck[entrant_row, entrant_slot] - k
        if 3 * len(feature_e) > n_images * f_bpf.shape[2]:
            # Many entrants (the first batches): one transposing copy beats strided gathers.
            maps_ep = f_bpf.transpose(1, 2).contiguous()[image_e, feature_e]
        else:
            maps_ep = f_bpf[image_e, :, feature_e]
        finite = torch.finfo(self.maps_fkp.dtype).max  # float16 maps saturate rather than overflow to inf
        self.maps_fkp[feature_e, new_cell_ck[entrant_row, entrant_slot]] = maps_ep.clamp_max(finite).to(self.maps_fkp.dtype)
        return changed_c, pick_ck

    def merge_ranks(self, first_pos: int) -> torch.Tensor:
        """Merge every rank's top-k into the global one; this rank's stream starts at global
        position `first_pos`. Keys are re-based to global positions, so the merged keys, ties
        included, are those of one pass over all ranks' images in rank order.

        Returns, per merged slot, its index into the concatenation of all ranks' slots (for
        subclasses that keep more per slot)."""
        self.keys_fk, source_fk = distributed.topk_keys(self._global_keys(first_pos))
        n_features, k = self.keys_fk.shape
        # Only the winners' maps travel: each rank sends those of its slots that won, in
        # row-major order of the merged slots, which every rank can recompute from source_fk.
        filled_fk = self.keys_fk >= 0
        from_fk = torch.where(filled_fk, source_fk // k, -1)
        mine_fk = from_fk == distributed.current().rank
        feature_w, slot_w = torch.nonzero(mine_fk, as_tuple=True)
        maps_wp = self.maps_fkp[feature_w, self.cell_fk[feature_w, source_fk[feature_w, slot_w] % k]]
        maps_fkp = torch.zeros_like(self.maps_fkp)
        for rank, part_wp in enumerate(distributed.gather_varying(maps_wp)):
            maps_fkp[from_fk == rank] = part_wp
        self.maps_fkp = maps_fkp
        self.cell_fk = torch.arange(k, device=self.keys_fk.device).repeat(n_features, 1)
        return source_fk

    def _global_keys(self, first_pos: int) -> torch.Tensor:
        """The keys with stream positions counted from the first image of all ranks (the low bits hold
        `_POS_MASK − position`)."""
        return torch.where(self.keys_fk >= 0, self.keys_fk - first_pos, self.keys_fk)

    def values_fk(self) -> torch.Tensor:
        """Activations (float32); empty slots are -inf."""
        vals = (self.keys_fk >> _POS_BITS).to(torch.int32).view(torch.float32)
        return torch.where(self.keys_fk >= 0, vals, torch.full_like(vals, -math.inf))

    def positions_fk(self) -> torch.Tensor:
        """Stream positions of the images in the slots; -1 for empty slots."""
        pos = _POS_MASK - (self.keys_fk & _POS_MASK)
        return torch.where(self.keys_fk >= 0, pos, torch.full_like(pos, -1))

    def maps(self, feature_n: torch.Tensor, rank_n: torch.Tensor) -> torch.Tensor:
        """[n, patches] activation maps of the given (feature, rank) slots."""
        return self.maps_fkp[feature_n, self.cell_fk[feature_n, rank_n]]


# --------------------------------------------------------------------------- panels
#
# What a feature page shows beyond the top images, each with memory bounded by F
# (never by the number of images): a uniform sample of the images a feature fires
# on, split into quantile bands; its firing rate per image label; its nearest
# neighbours by decoder direction. The first two ride along the streaming pass as
# `ScanHook`s; the third needs only the decoder.

QUANTILE_BANDS = 4
"""Bands of each feature's image-activation distribution shown on its page (quarters)."""
SAMPLES_PER_BAND = 3
"""Images per band; the reservoir holds QUANTILE_BANDS × SAMPLES_PER_BAND."""
CLASS_SPLIT_LABELS = 10
"""Labels kept per feature in `class_split` (highest activation rate first)."""
SIMILAR_FEATURES = 8
"""Nearest features by decoder cosine kept per feature."""
SIMILAR_BLOCK_ROWS = 1024
"""Rows of the cosine matrix computed at once: SIMILAR_BLOCK_ROWS × F floats, never F²."""

_M31 = (1 << 31) - 1


class ScanHook(Protocol):
    def update(self, f_bpf: torch.Tensor, img_max_bf: torch.Tensor, image_idx_b: np.ndarray, first_pos: int) -> None: ...

    def merge_ranks(self, first_pos: int) -> None:
        """Fold every rank's state into this one, exactly (this rank's stream starts at global position `first_pos`)."""
        ...


def sample_priority(image_idx_b: torch.Tensor, feature_f: torch.Tensor) -> torch.Tensor:
    """[B, F] pseudo-random priorities in [0, 2³¹) of (dataset image index, feature) pairs.

    A fixed integer hash (murmur3-style mixing on 31-bit words, so int64 never
    overflows) rather than a random generator: the sample depends neither on the
    batch size nor on how the images are split across ranks, and a reference can
    recompute it."""
    x = ((image_idx_b[:, None] & _M31) * 0x5BD1E995 + feature_f[None, :] * 0x1B873593) & _M31
    for shift, mult in ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, 0x3C6EF372)):
        x = ((x ^ (x >> shift)) * mult) & _M31
    return x ^ (x >> 16)


class QuantileSamples(TopImages):
    """A uniform reservoir of the images each feature fires on, with their patch maps.

    Priority sampling: every (image, feature) pair where the feature fires gets a
    hash priority of (dataset image index, feature), and the slots keep the
    largest priorities (ties: the later image), so each slot set is a uniform
    sample without replacement of the images the feature fired on. At the end the
    sample is sorted by activation and cut into QUANTILE_BANDS equal bands: band b
    holds sampled images between the b/B and (b+1)/B sample quantiles, i.e. a
    uniform sample of that band of the feature's distribution. Maps are kept in
    float16 (they end up as 8-bit heat-maps): F·slots·patches·2 bytes, 150 MB at
    24,576 × 12 × 256.

    The priority depends only on the image, never on where it sits in a rank's
    stream, so the top priorities of the union of the ranks' images are the top
    priorities among the ranks' own samples: `merge_ranks` keeps exactly the
    sample one process would.
    """

    def __init__(self, n_features: int, n_patches: int, device: torch.device,
                 bands: int = QUANTILE_BANDS, per_band: int = SAMPLES_PER_BAND):
        super().__init__(n_features, bands * per_band, n_patches, device, map_dtype=torch.float16)
        self.bands = bands
        self.act_fk = torch.zeros(n_features, bands * per_band, device=device)
        self.feature_f = torch.arange(n_features, device=device)

    def update(self, f_bpf: torch.Tensor, img_max_bf: torch.Tensor, image_idx_b: np.ndarray, first_pos: int) -> None:
        n_images = img_max_bf.shape[0]
        if first_pos + n_images > _POS_MASK:
            raise ValueError("more than 2**32 images in one analysis")
        device = img_max_bf.device
        pos_b = torch.arange(first_pos, first_pos + n_images, device=device)
        prio_bf = sample_priority(torch.as_tensor(np.asarray(image_idx_b, dtype=np.int64).reshape(n_images), device=device),
                                  self.feature_f)
        keys_bf = torch.where(img_max_bf > 0, (prio_bf << _POS_BITS) | pos_b[:, None], torch.full_like(prio_bf, -1))
        picked = self.merge(keys_bf, f_bpf)
        if picked is not None:
            changed_c, pick_ck = picked
            candidates = torch.cat([self.act_fk[changed_c], img_max_bf[:, changed_c].T.float()], dim=1)
            self.act_fk[changed_c] = candidates.gather(1, pick_ck)

    def merge_ranks(self, first_pos: int) -> torch.Tensor:
        """The sample of all ranks' images (see the class docstring), with its activations and maps."""
        source_fk = super().merge_ranks(first_pos)
        self.act_fk = torch.cat(distributed.gather_tensor(self.act_fk), dim=1).gather(1, source_fk)
        return source_fk

    def _global_keys(self, first_pos: int) -> torch.Tensor:
        return torch.where(self.keys_fk >= 0, self.keys_fk + first_pos, self.keys_fk)  # the low bits hold the position itself

    def positions_fk(self) -> torch.Tensor:
        return torch.where(self.keys_fk >= 0, self.keys_fk & _POS_MASK, torch.full_like(self.keys_fk, -1))

    def table(self, sae_id: str, dataset_key: str, image_idx: np.ndarray, grid: tuple[int, int]) -> pa.Table:
        """The `quantile_exemplars` rows: by feature, band (0 = lowest), rank within the band (0 = strongest)."""
        keys_fk = self.keys_fk.cpu().numpy()
        act_fk = np.where(keys_fk >= 0, self.act_fk.cpu().numpy(), -np.inf)
        n_f = (keys_fk >= 0).sum(1)
        order_fk = np.argsort(-act_fk, axis=1, kind="stable")  # strongest first; empty slots last
        rows_feature, rows_band, rows_rank, rows_slot = [], [], [], []
        for n in np.unique(n_f[n_f > 0]):
            features = np.flatnonzero(n_f == n)
            # Ascending sample order cut into equal bands (np.array_split sizes), then strongest first within each.
            ascending = np.arange(n)[::-1]
            for band, members in enumerate(np.array_split(ascending, self.bands)):
                for rank, j in enumerate(sorted(members)):
                    rows_feature.append(features)
                    rows_band.append(np.full(len(features), band))
                    rows_rank.append(np.full(len(features), rank))
                    rows_slot.append(order_fk[features, j])
        if rows_feature:
            feature_n, band_n, rank_n, slot_n = (np.concatenate(x) for x in (rows_feature, rows_band, rows_rank, rows_slot))
            order = np.lexsort((rank_n, band_n, feature_n))
            feature_n, band_n, rank_n, slot_n = feature_n[order], band_n[order], rank_n[order], slot_n[order]
        else:
            feature_n = band_n = rank_n = slot_n = np.zeros(0, dtype=np.int64)
        pos_n = self.positions_fk().cpu().numpy()[feature_n, slot_n]
        maps_np = self.maps(torch.as_tensor(feature_n, device=self.keys_fk.device), torch.as_tensor(slot_n, device=self.keys_fk.device)).float().cpu().numpy()
        n = len(feature_n)
        columns = {
            "sae_id": pa.array([sae_id] * n, type=pa.string()),
            "feature": pa.array(feature_n.astype(np.int32)),
            "band": pa.array(band_n.astype(np.int32)),
            "rank": pa.array(rank_n.astype(np.int32)),
            "dataset": pa.array([dataset_key] * n, type=pa.string()),
            "image_idx": pa.array(image_idx[pos_n].astype(np.int64) if n else np.zeros(0, np.int64)),
            "act": pa.array(act_fk[feature_n, slot_n].astype(np.float64)),
            "patch": pa.array(maps_np.argmax(1).astype(np.int32) if n else np.zeros(0, np.int32)),
            "grid_h": pa.array(np.full(n, grid[0], dtype=np.int32)),
            "grid_w": pa.array(np.full(n, grid[1], dtype=np.int32)),
            "patch_acts": _list_array(maps_np.reshape(n, -1).astype(np.float32), pa.float32()),
        }
        return tables.to_arrow("quantile_exemplars", pa.table(columns))


class ClassSplit:
    """Per (image label, feature): images, images where the feature fires, and the sum of their max activations.

    Memory is labels × F (int32 + float64): 295 MB for ImageNet-1K at 24,576 features."""

    def __init__(self, n_features: int, labels: Mapping[int, str | None], device: torch.device):
        acc = _float64_device(device)
        labelled = {int(i): v for i, v in labels.items() if v is not None}
        self.names = sorted(set(labelled.values()))
        code = {name: c for c, name in enumerate(self.names)}
        self.keys = np.array(sorted(labelled), dtype=np.int64)
        self.codes = np.array([code[labelled[i]] for i in self.keys], dtype=np.int64)
        n_labels = len(self.names)
        self.n_images_l = np.zeros(n_labels, dtype=np.int64)
        self.n_fire_lf = torch.zeros(n_labels, n_features, dtype=torch.int32, device=acc)
        self.act_sum_lf = torch.zeros(n_labels, n_features, dtype=torch.float64, device=acc)

    def label_codes(self, image_idx_b: np.ndarray) -> np.ndarray:
        """Label code of each image, -1 when unlabelled."""
        if len(self.keys) == 0:
            return np.full(len(image_idx_b), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.keys, image_idx_b), len(self.keys) - 1)
        return np.where(self.keys[at] == image_idx_b, self.codes[at], -1)

    def update(self, f_bpf: torch.Tensor, img_max_bf: torch.Tensor, image_idx_b: np.ndarray, first_pos: int) -> None:
        code_b = self.label_codes(np.asarray(image_idx_b, dtype=np.int64).reshape(-1))
        keep = np.flatnonzero(code_b >= 0)
        if len(keep) == 0:
            return
        acc = self.n_fire_lf.device
        self.n_images_l += np.bincount(code_b[keep], minlength=len(self.names))
        code_k = torch.as_tensor(code_b[keep], device=acc)
        img_max_kf = img_max_bf[torch.as_tensor(keep, device=img_max_bf.device)].to(acc)
        self.n_fire_lf.index_add_(0, code_k, (img_max_kf > 0).int())
        self.act_sum_lf.index_add_(0, code_k, img_max_kf.clamp_min(0).double())

    def merge_ranks(self, first_pos: int = 0) -> None:
        """Sum every rank's counts and activation sums (all ranks hold the same labels): the counts
        exactly, the float64 sums up to summation order."""
        self.n_images_l = np.sum(distributed.gather(self.n_images_l), axis=0)
        distributed.sum_(self.n_fire_lf)
        distributed.sum_(self.act_sum_lf)

    def table(self, sae_id: str, top: int = CLASS_SPLIT_LABELS) -> pa.Table:
        """The `class_split` rows: per feature, the `top` labels with the highest firing rate (ties: label order)."""
        n_fire_lf = self.n_fire_lf.cpu().numpy().astype(np.int64)
        act_sum_lf = self.act_sum_lf.cpu().numpy()
        n_labels, n_features = n_fire_lf.shape
        with np.errstate(invalid="ignore", divide="ignore"):
            rate_lf = n_fire_lf / np.maximum(self.n_images_l, 1)[:, None]
        order_lf = np.argsort(-rate_lf, axis=0, kind="stable")[:top]  # [top, F]: label codes by rate
        feature_tf = np.broadcast_to(np.arange(n_features), order_lf.shape)
        keep = n_fire_lf[order_lf, feature_tf] > 0
        rank_tf = np.broadcast_to(np.arange(order_lf.shape[0])[:, None], order_lf.shape)
        # Feature-major row order.
        label_n, feature_n, rank_n = (a.T[keep.T] for a in (order_lf, feature_tf, rank_tf))
        n_fire_n = n_fire_lf[label_n, feature_n]
        columns = {
            "sae_id": pa.array([sae_id] * len(label_n), type=pa.string()),
            "feature": pa.array(feature_n.astype(np.int32)),
            "rank": pa.array(rank_n.astype(np.int32)),
            "label": pa.array([self.names[c] for c in label_n], type=pa.string()),
            "n_images": pa.array(self.n_images_l[label_n].astype(np.int64)),
            "n_fire_images": pa.array(n_fire_n.astype(np.int64)),
            "rate": pa.array(rate_lf[label_n, feature_n].astype(np.float64)),
            "mean_act": pa.array(act_sum_lf[label_n, feature_n] / np.maximum(n_fire_n, 1)),
        }
        return tables.to_arrow("class_split", pa.table(columns))


@torch.inference_mode()
def similar_features(W_dec_fd: torch.Tensor, k: int = SIMILAR_FEATURES, block_rows: int = SIMILAR_BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """([F, k] nearest other features, [F, k] their cosines) by decoder direction, best first.

    The cosine matrix is made `block_rows` rows at a time, so memory is
    block_rows × F, not F². A zero decoder row has cosine 0 with everything."""
    w_fd = W_dec_fd.detach().float()
    n_features = w_fd.shape[0]
    k = min(k, n_features - 1)
    unit_fd = w_fd / w_fd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx_fk = np.zeros((n_features, max(k, 0)), dtype=np.int64)
    cos_fk = np.zeros((n_features, max(k, 0)), dtype=np.float64)
    if k <= 0:
        return idx_fk, cos_fk
    for start in range(0, n_features, block_rows):
        stop = min(start + block_rows, n_features)
        cos_bf = unit_fd[start:stop] @ unit_fd.T
        rows = torch.arange(stop - start, device=cos_bf.device)
        cos_bf[rows, rows + start] = -math.inf  # never yourself
        values_bk, index_bk = cos_bf.topk(k, dim=1)
        idx_fk[start:stop] = index_bk.cpu().numpy()
        cos_fk[start:stop] = values_bk.cpu().numpy()
    return idx_fk, cos_fk


def similar_table(sae_id: str, idx_fk: np.ndarray, cos_fk: np.ndarray) -> pa.Table:
    n_features, k = idx_fk.shape
    columns = {
        "sae_id": pa.array([sae_id] * (n_features * k), type=pa.string()),
        "feature": pa.array(np.repeat(np.arange(n_features), k).astype(np.int32)),
        "rank": pa.array(np.tile(np.arange(k), n_features).astype(np.int32)),
        "similar_feature": pa.array(idx_fk.reshape(-1).astype(np.int32)),
        "cosine": pa.array(cos_fk.reshape(-1).astype(np.float64)),
    }
    return tables.to_arrow("similar_features", pa.table(columns))


# --------------------------------------------------------------------------- the pass


@dataclass
class ScanResult:
    n_patches: int
    image_idx: np.ndarray
    """Dataset index of every image, in stream order (stream position → index)."""
    recon: ReconstructionStats | None
    stats: FeatureStats
    top: TopImages | None
    """None when no batch came."""

    @torch.inference_mode()  # the accumulators are inference tensors of `scan`
    def merge_ranks(self, n_features: int, top_k: int, n_patches: int, device: torch.device,
                    hooks: Sequence[ScanHook] = (), concepts: ConceptStats | None = None) -> "ScanResult":
        """Every rank's scan of its share of the images, merged exactly (on every rank).

        Each accumulator has a `merge_ranks` that folds in the other ranks' state: sums add,
        maxima max, top-k and samples re-rank over keys carrying the global stream position.
        The `hooks` and `concepts` that rode along the scan are merged in place.
        """
        image_idx = distributed.gather(self.image_idx)
        if sum(len(part) for part in image_idx) > _POS_MASK:
            raise ValueError("more than 2**32 images in one analysis")
        first_pos = sum(len(part) for part in image_idx[:distributed.current().rank])
        if self.recon is not None:
            self.recon.merge_ranks()
        self.stats.merge_ranks()
        top = self.top or TopImages(n_features, top_k, n_patches, device)  # a rank that got no images
        top.merge_ranks(first_pos)
        for hook in hooks:
            hook.merge_ranks(first_pos)
        if concepts is not None:
            concepts.merge_ranks()
        return ScanResult(sum(distributed.gather(self.n_patches)), np.concatenate(image_idx), self.recon, self.stats, top)


@torch.inference_mode()
def scan(batches: Iterable[Batch], sae: SAELike, top_k: int, device: torch.device, reconstruction: bool = True,
         hooks: Sequence[ScanHook] = (), concepts: ConceptStats | None = None) -> ScanResult:
    """The streaming pass: metrics (unless `reconstruction=False`), feature statistics, top-k images with maps,
    and (given `concepts`) the concept-detection histograms.

    Each of `hooks` sees every batch's features and per-image maxima (the panels ride along here)."""
    n_features, d_model = int(sae.n_features), int(sae.d_model)
    recon = ReconstructionStats(d_model, device) if reconstruction else None
    stats = FeatureStats(n_features, device)
    top: TopImages | None = None
    image_idx: list[np.ndarray] = []
    n_images_seen, n_patches = 0, 0
    for acts_bpd, image_idx_b in batches:
        n_images, patches_per_image, d = acts_bpd.shape
        if n_images == 0:
            continue
        if top is None:
            top = TopImages(n_features, top_k, patches_per_image, device)
        x_nd = acts_bpd.reshape(n_images * patches_per_image, d).to(device, torch.float32, non_blocking=True)
        xn_nd = sae.normalize(x_nd)
        f_nf = sae.encode_normalized(xn_nd)
        f_bpf = f_nf.view(n_images, patches_per_image, n_features)
        img_max_bf = f_bpf.amax(1)
        entries = firing_entries(f_nf)
        n_active = stats.update(f_nf, img_max_bf, entries)
        top.update(img_max_bf, f_bpf, n_images_seen)
        for hook in hooks:
            hook.update(f_bpf, img_max_bf, image_idx_b, n_images_seen)
        if recon is not None:
            recon.update(xn_nd, sae.decode_normalized(f_nf), n_active)
        if concepts is not None:
            concepts.update(f_bpf, img_max_bf, image_idx_b, entries)
        image_idx.append(np.asarray(image_idx_b, dtype=np.int64).reshape(n_images))
        n_images_seen += n_images
        n_patches += n_images * patches_per_image
    all_idx = np.concatenate(image_idx) if image_idx else np.zeros(0, dtype=np.int64)
    return ScanResult(n_patches, all_idx, recon, stats, top)


# --------------------------------------------------------------------------- summaries


def coarse_histograms(fine_fh: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared edges [n_bins + 1] (log10) and counts [F, n_bins] from the fine-grid counts.

    The edges span the fine bins occupied by any feature; each coarse bin
    merges a whole number of fine bins, so no count is split or estimated.
    """
    occupied = np.flatnonzero(fine_fh.sum(0))
    if len(occupied):
        lo, hi = int(occupied[0]), int(occupied[-1])
    else:  # nothing fires anywhere: a neutral range around activation 1
        lo = hi = int(-LOG10_RANGE[0] * FINE_PER_DECADE)
    width = math.ceil((hi - lo + 1) / n_bins)
    padded = np.zeros((fine_fh.shape[0], n_bins * width), dtype=np.int64)
    take = fine_fh[:, lo:lo + n_bins * width]
    padded[:, :take.shape[1]] = take
    counts_fb = padded.reshape(fine_fh.shape[0], n_bins, width).sum(2)
    edges = LOG10_RANGE[0] + (lo + width * np.arange(n_bins + 1)) / FINE_PER_DECADE
    return edges, counts_fb


@dataclass
class LabelStats:
    top_label: list[str | None]
    purity: np.ndarray
    entropy: np.ndarray


def label_stats(exemplar_image_fk: np.ndarray, labels: Mapping[int, str | None] | None) -> LabelStats:
    """Label summary of each feature's exemplars; `exemplar_image_fk` holds image indices, -1 for empty slots."""
    n_features, k = exemplar_image_fk.shape
    labelled = {int(i): v for i, v in (labels or {}).items() if v is not None}
    if not labelled:
        nan = np.full(n_features, np.nan)
        return LabelStats([None] * n_features, nan, nan.copy())
    names = sorted(set(labelled.values()))
    code = {name: c for c, name in enumerate(names)}
    # image index → label code through a sorted lookup; -1 for unlabelled images and empty slots
    keys = np.array(sorted(labelled), dtype=np.int64)
    codes = np.array([code[labelled[i]] for i in keys], dtype=np.int64)
    at = np.minimum(np.searchsorted(keys, exemplar_image_fk), len(keys) - 1)
    label_fk = np.where((exemplar_image_fk >= 0) & (keys[at] == exemplar_image_fk), codes[at], -1)
    # Compare every exemplar's label with every other's of the same feature: O(F·k²), no per-class table.
    has = label_fk >= 0
    same_fkk = (label_fk[:, :, None] == label_fk[:, None, :]) & has[:, :, None] & has[:, None, :]
    count_fk = same_fkk.sum(2)  # exemplars sharing this slot's label
    first_fk = same_fkk.argmax(2)  # best rank holding this slot's label
    is_first_fk = has & (first_fk == np.arange(k))  # one slot per distinct label
    best = np.where(has, count_fk * (k + 1) - first_fk, -1)  # most exemplars, then best-ranked
    top_slot_f = best.argmax(1)
    n_labelled_f = has.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_fk = np.where(is_first_fk, count_fk / n_labelled_f[:, None], 1.0)
        purity = np.where(n_labelled_f > 0, count_fk[np.arange(n_features), top_slot_f] / n_labelled_f, np.nan)
        # "0.0 −" rather than unary minus: a pure feature gets 0.0, not -0.0
        entropy = np.where(n_labelled_f > 0, 0.0 - (p_fk * np.log2(p_fk)).sum(1), np.nan)
    top_f = label_fk[np.arange(n_features), top_slot_f]
    top_label = [names[t] if n > 0 else None for t, n in zip(top_f, n_labelled_f)]
    return LabelStats(top_label, purity, entropy)


def _list_array(values_2d: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """[rows, width] numpy → arrow list column, without going through Python lists."""
    rows, width = values_2d.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(values_2d.reshape(-1), type=value_type))


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values, type=pa.float64(), mask=np.isnan(values))


def feature_table(sae_id: str, result: ScanResult, labels: LabelStats, spec: AnalysisSpec, n_exemplars_f: np.ndarray,
                  best: BestConcepts | None = None) -> pa.Table:
    stats = result.stats
    n_fire = stats.n_fire_f.cpu().numpy()
    n = max(result.n_patches, 1)
    freq = n_fire / n
    dead = n_fire == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_act = np.where(dead, 0.0, stats.act_sum_f.cpu().numpy() / np.maximum(n_fire, 1))
        log10_freq = np.where(dead, np.nan, np.log10(freq))
        log10_mean = np.where(dead, np.nan, np.log10(mean_act))
    edges, counts_fb = coarse_histograms(stats.fine_hist_fh.cpu().numpy(), spec.histogram_bins)
    n_features = len(n_fire)
    columns = {
        "sae_id": pa.array([sae_id] * n_features, type=pa.string()),
        "feature": pa.array(np.arange(n_features, dtype=np.int32)),
        "n_fire": pa.array(n_fire.astype(np.int64)),
        "freq": pa.array(freq, type=pa.float64()),
        "log10_freq": _nullable(log10_freq),
        "mean_act": pa.array(mean_act, type=pa.float64()),
        "log10_mean_act": _nullable(log10_mean),
        "max_act": pa.array(stats.max_act_f.cpu().numpy().astype(np.float64)),
        "dead": pa.array(dead),
        "dense": pa.array(freq > spec.dense_threshold),
        "hist_counts": _list_array(counts_fb, pa.int64()),
        "hist_edges": _list_array(np.broadcast_to(edges, (n_features, len(edges))), pa.float64()),
        "n_exemplars": pa.array(n_exemplars_f.astype(np.int32)),
        "top_label": pa.array(labels.top_label, type=pa.string()),
        "label_purity": _nullable(labels.purity),
        "label_entropy": _nullable(labels.entropy),
    }
    best = best or BestConcepts.none(n_features)
    columns |= {"best_concept": pa.array(best.concept, type=pa.string()), "best_concept_ap": _nullable(best.ap),
                "best_concept_margin": _nullable(best.margin),
                "best_concept_level": pa.array([best.level if c is not None else None for c in best.concept], type=pa.string())}
    return tables.to_arrow("features", pa.table(columns))


@dataclass
class Exemplars:
    feature_n: np.ndarray
    rank_n: np.ndarray
    image_idx_n: np.ndarray
    act_n: np.ndarray
    maps_np: np.ndarray


def exemplars(top: TopImages | None, image_idx: np.ndarray) -> Exemplars:
    """Filled slots where the feature fires (act > 0), ordered by feature then rank."""
    if top is None:
        empty = np.zeros(0, dtype=np.int64)
        return Exemplars(empty, empty, empty, np.zeros(0), np.zeros((0, 0), dtype=np.float32))
    act_fk = top.values_fk()
    feature_n, rank_n = torch.nonzero(act_fk > 0, as_tuple=True)
    pos_n = top.positions_fk()[feature_n, rank_n].cpu().numpy()
    return Exemplars(feature_n.cpu().numpy(), rank_n.cpu().numpy(), image_idx[pos_n],
                     act_fk[feature_n, rank_n].cpu().numpy(), top.maps(feature_n, rank_n).cpu().numpy())


def exemplar_table(sae_id: str, dataset_key: str, ex: Exemplars, grid: tuple[int, int]) -> pa.Table:
    n = len(ex.feature_n)
    columns = {
        "sae_id": pa.array([sae_id] * n, type=pa.string()),
        "feature": pa.array(ex.feature_n.astype(np.int32)),
        "rank": pa.array(ex.rank_n.astype(np.int32)),
        "dataset": pa.array([dataset_key] * n, type=pa.string()),
        "image_idx": pa.array(ex.image_idx_n.astype(np.int64)),
        "act": pa.array(ex.act_n.astype(np.float64)),
        "patch": pa.array(ex.maps_np.argmax(1).astype(np.int32) if n else np.zeros(0, np.int32)),
        "grid_h": pa.array(np.full(n, grid[0], dtype=np.int32)),
        "grid_w": pa.array(np.full(n, grid[1], dtype=np.int32)),
        "patch_acts": _list_array(ex.maps_np.astype(np.float32), pa.float32()),
    }
    return tables.to_arrow("exemplars", pa.table(columns))


# --------------------------------------------------------------------------- entry points


def _checked_progress(batches: Iterable[Batch], description: str, n_images: int | None, grid: tuple[int, int]) -> Iterator[Batch]:
    with progress.bar(description, total=n_images, unit="img") as b:
        for acts_bpd, image_idx_b in batches:
            if acts_bpd.ndim != 3 or acts_bpd.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"batch of shape {tuple(acts_bpd.shape)}: expected [images, {grid[0] * grid[1]} patches "
                                 f"(grid {grid[0]}×{grid[1]}), d]")
            yield acts_bpd, image_idx_b
            b.advance(acts_bpd.shape[0])


def analyse_sae(batches: Iterable[Batch], sae: SAELike, grid: tuple[int, int], labels: Mapping[int, str | None] | None,
                spec: AnalysisSpec, sae_id: str, dataset_key: str, device: torch.device,
                n_images: int | None = None, concept_labels: ConceptLabels | None = None,
                shard: distributed.Shard = distributed.ONE) -> AnalysisResult | None:
    """Metrics, feature statistics, exemplars and (given `concept_labels`) concept detection of one SAE over
    every patch of `batches`.

    Each batch holds whole images with `grid[0] * grid[1]` patches each, raw
    (un-normalised) activations. `labels` maps dataset image index → label;
    `n_images` only sizes the progress bar. Under torchrun (`shard` of a world > 1) each
    rank passes its share of the images, the ranks' shares in rank order making up the
    whole stream; the scans are merged exactly and rank 0 gets the result of one pass
    over all the images, the other ranks None.
    """
    n_features = int(sae.n_features)
    samples = QuantileSamples(n_features, grid[0] * grid[1], device)
    split = ClassSplit(n_features, labels, device) if labels else None
    hooks = [samples] + ([split] if split else [])
    concepts = ConceptStats(concept_labels, n_features, device) if concept_labels is not None else None
    result = scan(_checked_progress(batches, f"analyse {sae_id}", n_images, grid), sae, spec.top_k, device, hooks=hooks,
                  concepts=concepts)
    if shard.world > 1:
        result = result.merge_ranks(n_features, spec.top_k, grid[0] * grid[1], device, hooks, concepts)
        if not shard.is_main:
            return None
    ex = exemplars(result.top, result.image_idx)
    image_fk = np.full((int(sae.n_features), spec.top_k), -1, dtype=np.int64)
    image_fk[ex.feature_n, ex.rank_n] = ex.image_idx_n
    concept_table = concepts.table(sae_id) if concepts is not None else None
    best = best_concepts(concept_table, int(sae.n_features)) if concept_table is not None else None
    features = feature_table(sae_id, result, label_stats(image_fk, labels), spec, (image_fk >= 0).sum(1), best)

    n_fire = result.stats.n_fire_f.cpu().numpy()
    assert result.recon is not None
    metrics: dict[str, float | int] = {
        "n_patches_eval": result.n_patches,
        **result.recon.metrics(int(sae.d_model)),
        "n_dead": int((n_fire == 0).sum()),
        "n_dense": int((n_fire / max(result.n_patches, 1) > spec.dense_threshold).sum()),
    }
    W_dec_fd = getattr(sae, "W_dec_fd", None)
    similar = similar_table(sae_id, *similar_features(W_dec_fd)) if isinstance(W_dec_fd, torch.Tensor) else tables.to_arrow("similar_features", {})
    return AnalysisResult(
        metrics, features, exemplar_table(sae_id, dataset_key, ex, grid),
        quantile_exemplars=samples.table(sae_id, dataset_key, result.image_idx, grid),
        class_split=split.table(sae_id) if split else tables.to_arrow("class_split", {}),
        similar_features=similar,
        concepts=concept_table,
        concept_nulls=concepts.null_table(sae_id) if concepts is not None else None,
    )


def store_batches(store, images_per_batch: int, images: range | None = None) -> Iterator[Batch]:
    """Whole-image batches of patch tokens from an `activations.ActivationStore` (optionally only `images`)."""
    n_patches = store.meta.n_patches
    if not n_patches:
        raise ValueError(f"{store.dir}: patches were not recorded, nothing to analyse")
    share = {} if images is None else {"images": images}
    for acts_nd, rows_n in store.iter_batches(images_per_batch * n_patches, patches_only=True, **share):
        image_pos, _ = store.row_image_token(rows_n[::n_patches])
        yield acts_nd.view(-1, n_patches, store.d_model), store.image_indices[image_pos]


def analyse_store(store, sae: SAELike, labels: Mapping[int, str | None] | None, spec: AnalysisSpec, sae_id: str,
                  dataset_key: str, device: torch.device, concept_labels: ConceptLabels | None = None,
                  shard: distributed.Shard = distributed.ONE) -> AnalysisResult | None:
    """`analyse_sae` over the patch tokens of an activation store; under torchrun (`shard`) this rank
    reads a contiguous range of whole batches (rank 0 gets the merged result, the others None)."""
    images_per_batch = max(1, spec.batch_size // store.meta.n_patches)
    # Cut at batch boundaries: every rank then runs the very batches one process would.
    mine = shard.range(store.n_images, align=images_per_batch)
    if shard.world > 1:
        progress.log(f"  {sae_id}: rank {shard.rank} of {shard.world} scans images {mine.start}–{mine.stop} of {store.n_images}")
    return analyse_sae(store_batches(store, images_per_batch, mine), sae, (store.meta.grid_h, store.meta.grid_w), labels,
                       spec, sae_id, dataset_key, device, n_images=len(mine), concept_labels=concept_labels, shard=shard)


def write_analysis(result: AnalysisResult, out_dir: Path, spec_hash: str, stem: str = "part") -> dict[str, Path]:
    """Write the `features`, `exemplars`, panel and `concepts` parts (the `saes` row also needs training info: the caller's)."""
    parts = {
        "features": result.features, "exemplars": result.exemplars, "quantile_exemplars": result.quantile_exemplars,
        "class_split": result.class_split, "similar_features": result.similar_features,
    }
    if result.concepts is not None:
        parts["concepts"] = result.concepts
    if result.concept_nulls is not None:
        parts["concept_nulls"] = result.concept_nulls
    return {name: tables.write_table(Path(out_dir) / name / f"{stem}.parquet", name, table, spec_hash) for name, table in parts.items()}
