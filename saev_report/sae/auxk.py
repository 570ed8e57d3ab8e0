"""AuxK (Gao et al. 2024, §A.2), an option of the TopK-family kinds (topk, batchtopk, matryoshka).

A latent is *dead* when it has not fired in the last `dead_patches` training patches. The
`aux_k` dead latents with the largest pre-activations of each patch reconstruct the main
reconstruction's residual e = x − x̂ (no gradient through e):

    ê = W_dec z_aux,  z_aux = ReLU(TopK_aux_k over dead latents(pre)),   L = L_main + α · MSE(e, ê)

so dead latents get a gradient towards useful directions and come back. With no dead latent
(or `aux_k` = 0) the term is absent. Both MSEs are means over patches and coordinates, as the
main loss, so α keeps the paper's meaning (1/32 by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch import Tensor

from saev_report.sae.kind import LossContext, TrainForward
from saev_report.sae.sparse import ActivePairs, Coder
from saev_report.specmodel import SpecModel

if TYPE_CHECKING:
    from saev_report.sae.base import SparseAutoencoder


class AuxKParams(SpecModel):
    """AuxK's three settings, shared by the TopK-family kinds."""

    aux_k: int = Field(default=0, ge=0)
    """AuxK: dead latents per patch that reconstruct the residual (Gao et al. use 512 at d = 768·…); 0 turns AuxK off."""
    aux_coeff: float = Field(default=1 / 32, ge=0, allow_inf_nan=False)
    """AuxK: coefficient α of the auxiliary loss (Gao et al.: 1/32)."""
    dead_patches: int = Field(default=10_000_000, gt=0)
    """AuxK: a latent that has not fired in this many training patches is dead (Gao et al.: 10M tokens)."""


def aux_tag(params: AuxKParams) -> str:
    return f"-aux{params.aux_k}" if params.aux_k else ""


@torch.no_grad()
def dead_latents(params: AuxKParams, ctx: LossContext) -> Tensor | None:
    """Indices of the dead latents, or None when AuxK is off or the loop keeps no counts."""
    if not params.aux_k or ctx.last_fired_f is None:
        return None
    return ((ctx.n_seen - ctx.last_fired_f) >= params.dead_patches).nonzero().squeeze(1)


@torch.no_grad()
def aux_pairs(pre_nf: Tensor, dead_j: Tensor, aux_k: int) -> ActivePairs:
    """Each row's `aux_k` largest pre-activations among the dead latents `dead_j`."""
    n_rows, n_features = pre_nf.shape
    k = min(aux_k, dead_j.numel())
    values_nk, top_nk = pre_nf.index_select(1, dead_j).topk(k, dim=1, sorted=False)
    cols_a = dead_j[top_nk].reshape(-1)
    rows_a = torch.arange(n_rows, device=pre_nf.device).repeat_interleave(k)
    return ActivePairs(rows_a, cols_a, n_rows, n_features, pre_a=values_nk.reshape(-1))


def aux_loss(sae: "SparseAutoencoder", params: AuxKParams, out: TrainForward, coder: Coder, ctx: LossContext) -> dict[str, Tensor]:
    """`{"auxk": α · MSE(e, ê)}`, or nothing without dead latents."""
    dead_j = dead_latents(params, ctx)
    if dead_j is None or dead_j.numel() == 0 or not params.aux_coeff:
        return {}
    pairs = aux_pairs(coder.pre_nf, dead_j, params.aux_k)
    z_a = torch.relu(coder.encode(pairs))
    ehat_nd = coder.decode(z_a, pairs)
    residual_nd = (coder.xn_nd - out.xhat_nd).detach()
    return {"auxk": params.aux_coeff * (residual_nd - ehat_nd).pow(2).mean()}
