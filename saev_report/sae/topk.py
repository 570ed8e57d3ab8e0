"""TopK (Makhzani & Frey 2013; Gao et al. 2024): each patch keeps its k largest pre-activations
(then ReLU), L = MSE(x, x̂), plus AuxK's term when `aux_k` > 0 (`auxk.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from saev_report.sae.auxk import AuxKParams, aux_loss, aux_tag
from saev_report.sae.kind import LossContext, SAEKind, TrainForward, positive_count
from saev_report.sae.sparse import ActivePairs, Coder

if TYPE_CHECKING:
    from saev_report.sae.base import SparseAutoencoder


class TopKParams(AuxKParams):
    """TopK: exactly k features per patch (fewer if some of the k are ≤ 0)."""

    k: int = Field(default=64, gt=0)
    """Active features per patch."""


def topk_pairs(pre_nf: Tensor, k: int) -> ActivePairs:
    """Each row's k largest pre-activations, patch-major."""
    n_rows, n_features = pre_nf.shape
    values_nk, idx_nk = pre_nf.topk(k, dim=1, sorted=False)
    rows_a = torch.arange(n_rows, device=pre_nf.device).repeat_interleave(k)
    return ActivePairs(rows_a, idx_nk.reshape(-1), n_rows, n_features, pre_a=values_nk.reshape(-1))


class TopK(SAEKind):
    name = "topk"
    Params = TopKParams
    swept = ("k",)
    summary = "k largest pre-activations per patch; optional AuxK."
    reference = "Gao et al. 2024"

    def tag_part(self, params: TopKParams) -> str:
        return f"k{params.k}{aux_tag(params)}"

    def check(self, params: TopKParams, n_features: int) -> None:
        positive_count("k", params.k, n_features)
        if params.aux_k > n_features:
            raise ValueError(f"needs aux_k <= n_features, got aux_k={params.aux_k}, n_features={n_features}")

    def reads_dead_latents(self, params: TopKParams) -> bool:
        return params.aux_k > 0

    def activate(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> Tensor:
        values_nk, idx_nk = pre_nf.topk(sae.params.k, dim=1, sorted=False)
        return torch.zeros_like(pre_nf).scatter_(1, idx_nk, F.relu(values_nk))

    def select_pairs(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> ActivePairs:
        return topk_pairs(pre_nf, sae.params.k)

    def loss(self, sae: "SparseAutoencoder", out: TrainForward, coder: Coder, ctx: LossContext) -> dict[str, Tensor]:
        return {"mse": out.mse, **aux_loss(sae, sae.params, out, coder, ctx)}


KIND = TopK()
