"""BatchTopK (Bussmann et al. 2024): a batch of n patches keeps its k·n largest pre-activations
(so k per patch on average), L = MSE(x, x̂) (+ AuxK). Inference cannot see a batch: a fixed
threshold, the running average of each training batch's smallest kept activation (an EMA with
β = 0.999 once warm, `base.THRESHOLD_EMA_BETA`), replaces the batch's top k·n."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from saev_report import distributed
from saev_report.sae.kind import TrainForward
from saev_report.sae.sparse import ActivePairs
from saev_report.sae.topk import TopK, TopKParams

if TYPE_CHECKING:
    from saev_report.distributed import Shard
    from saev_report.sae.base import SparseAutoencoder


class BatchTopKParams(TopKParams):
    """BatchTopK: k features per patch on average over the batch; a fixed threshold at inference."""


def batch_topk_pairs(pre_nf: Tensor, k: int) -> ActivePairs:
    """The batch's k·n largest positive pre-activations, patch-major, with the smallest kept."""
    n_rows, n_features = pre_nf.shape
    rows_a, cols_a = _batch_topk_pairs(pre_nf, k * n_rows)
    kept_a = pre_nf[rows_a, cols_a]
    min_kept = float(kept_a.min()) if kept_a.numel() else None
    return ActivePairs(rows_a, cols_a, n_rows, n_features, min_kept=min_kept, pre_a=kept_a)


def _batch_topk_pairs(pre_nf: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
    """The batch's `n_keep` largest positive pre-activations, patch-major.

    A full top-k over n·F values is slow on CPU; instead a threshold estimated from a
    sample keeps a superset, and an exact top-k runs over that superset. The result is
    the same set (up to ties) as `relu(pre).flatten().topk(n_keep)` restricted to > 0.
    """
    flat = pre_nf.reshape(-1)
    n_total = flat.numel()
    if n_keep >= n_total:
        return (pre_nf > 0).nonzero(as_tuple=True)
    generator = torch.Generator(device=pre_nf.device).manual_seed(n_total)  # deterministic sample
    n_sample = min(n_total, 1 << 16)
    sample = flat[torch.randint(n_total, (n_sample,), device=pre_nf.device, generator=generator)]
    # Aim at 1.25× n_keep candidates, less four standard errors of the sampled quantile:
    # too few candidates (then an exact cut is computed) becomes very unlikely.
    p_keep = n_keep / n_total
    q = max(0.0, 1.0 - 1.25 * p_keep - 4.0 * math.sqrt(p_keep * (1 - p_keep) / n_sample))
    cut = max(float(torch.quantile(sample, q)), 0.0) if q > 0 else 0.0
    mask_nf = pre_nf > cut
    n_candidates = int(mask_nf.sum())
    if n_candidates < n_keep and cut > 0:  # estimate too high: fall back to the exact cut
        cut = max(float(F.relu(flat).topk(n_keep, sorted=False).values.min()), 0.0)
        mask_nf = pre_nf >= cut if cut > 0 else pre_nf > 0
    rows_c, cols_c = mask_nf.nonzero(as_tuple=True)
    if rows_c.numel() <= n_keep:
        return rows_c, cols_c
    values_c = pre_nf[rows_c, cols_c]
    keep_c = torch.zeros_like(values_c, dtype=torch.bool)
    keep_c[values_c.topk(n_keep, sorted=False).indices] = True  # a mask keeps patch-major order
    return rows_c[keep_c], cols_c[keep_c]


class BatchTopK(TopK):
    name = "batchtopk"
    Params = BatchTopKParams
    summary = "k·n largest pre-activations per batch; a learnt fixed threshold at inference; optional AuxK."
    reference = "Bussmann et al. 2024"
    uses_batch_threshold = True

    def activate(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> Tensor:
        return torch.where(pre_nf > sae.threshold.clamp(min=0), pre_nf, 0.0)

    def select_pairs(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> ActivePairs:
        return batch_topk_pairs(pre_nf, sae.params.k)

    def after_step(self, sae: "SparseAutoencoder", out: TrainForward, data_parallel: "Shard", share: float) -> None:
        """Fold the batch's smallest kept activation (of any rank: replicas stay equal) into the threshold."""
        min_kept = out.min_kept
        if data_parallel.world > 1:
            kept = distributed.min_(torch.tensor(math.inf if min_kept is None else min_kept, dtype=torch.float64,
                                                 device=out.xhat_nd.device))
            min_kept = None if math.isinf(float(kept)) else float(kept)
        if min_kept is not None:
            sae.update_threshold(min_kept)


KIND = BatchTopK()
