"""Matryoshka BatchTopK (Bussmann et al. 2025): nested prefixes of the dictionary, each of which
reconstructs on its own. With prefix sizes m_1 < … < m_P = F and BatchTopK codes f,

    x̂_p = Σ_{j < m_p} f_j W_dec[j] + b_dec,     L = Σ_p MSE(x, x̂_p)  (+ AuxK on x − x̂_P)

so the first features learn the coarse directions and later ones refine them. The codes are
BatchTopK's (training: the batch's top k·n; inference: the learnt threshold). Sparse path: the
kept pairs fall into bands [m_{p−1}, m_p), each band is decoded once and the prefix
reconstructions are running sums (`sparse._DecodePrefixes`): P prefixes cost about P small decodes
and no extra encoder work; the dense reference decodes every prefix with its own matmul.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator
from torch import Tensor

from saev_report.sae.auxk import aux_loss
from saev_report.sae.batchtopk import BatchTopK, BatchTopKParams
from saev_report.sae.kind import LossContext, SubModel, TrainForward
from saev_report.sae.sparse import ActivePairs, Coder

if TYPE_CHECKING:
    from saev_report.sae.base import SparseAutoencoder


class MatryoshkaParams(BatchTopKParams):
    """Matryoshka BatchTopK: nested prefixes of the dictionary, each trained to reconstruct."""

    prefixes: list[float] = Field(default_factory=lambda: [0.0625, 0.25, 1.0], min_length=1)
    """Prefix sizes as fractions of the dictionary, increasing, the last 1 (the whole dictionary):
    `[0.0625, 0.25, 1.0]` trains features 0 … F/16 − 1, then 0 … F/4 − 1, then all, each to reconstruct."""

    @field_validator("prefixes")
    @classmethod
    def _nested(cls, prefixes: list[float]) -> list[float]:
        if any(not 0 < p <= 1 for p in prefixes) or any(b <= a for a, b in zip(prefixes, prefixes[1:])):
            raise ValueError(f"prefixes must increase within (0, 1], got {prefixes}")
        if prefixes[-1] != 1:
            raise ValueError(f"the last prefix must be 1 (the whole dictionary), got {prefixes[-1]}")
        return prefixes


def prefix_sizes(params: MatryoshkaParams, n_features: int) -> list[int]:
    """Number of features of each prefix."""
    return [max(1, round(p * n_features)) for p in params.prefixes]


class Matryoshka(BatchTopK):
    name = "matryoshka"
    Params = MatryoshkaParams
    summary = "BatchTopK codes; every nested prefix of the dictionary reconstructs; the loss sums them."
    reference = "Bussmann et al. 2025"

    def check(self, params: MatryoshkaParams, n_features: int) -> None:
        super().check(params, n_features)
        sizes = prefix_sizes(params, n_features)
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"prefixes {params.prefixes} of {n_features} features round to repeated sizes {sizes}")

    def reconstruct(self, sae: "SparseAutoencoder", coder: Coder, f_a: Tensor, pairs: ActivePairs) -> tuple[Tensor, dict[str, Any]]:
        prefix_xhat = [xhat_nd + sae.b_dec_d for xhat_nd in coder.decode_prefixes(f_a, pairs, tuple(prefix_sizes(sae.params, sae.n_features)))]
        return prefix_xhat[-1], {"prefix_xhat": prefix_xhat}

    def loss(self, sae: "SparseAutoencoder", out: TrainForward, coder: Coder, ctx: LossContext) -> dict[str, Tensor]:
        xn_nd = coder.xn_nd
        terms = {f"mse_prefix{p}": (xhat_nd - xn_nd).pow(2).mean() for p, xhat_nd in enumerate(out.extras["prefix_xhat"])}
        return {**terms, **aux_loss(sae, sae.params, out, coder, ctx)}

    def sub_models(self, params: MatryoshkaParams, n_features: int) -> list[SubModel]:
        return [SubModel(f"prefix {p + 1}", size) for p, size in enumerate(prefix_sizes(params, n_features))][:-1]

    def feature_group(self, params: MatryoshkaParams, n_features: int, feature: int) -> str | None:
        sizes = prefix_sizes(params, n_features)
        p = next(i for i, size in enumerate(sizes) if feature < size)
        first = sizes[p - 1] if p else 0
        return (f"Matryoshka prefix {p + 1} of {len(sizes)}: features {first}–{sizes[p] - 1} join the dictionary at this prefix, "
                f"which reconstructs with its first {sizes[p]:,} features")


KIND = Matryoshka()
