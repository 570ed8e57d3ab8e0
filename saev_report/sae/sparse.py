"""The sparse path every kind shares: active (patch, feature) pairs, and the encoder and decoder
evaluated and differentiated at those pairs only.

A training step (see `base.SparseAutoencoder.training_forward`) is written once for both paths
through a *coder*:

    pairs = kind.select_pairs(sae, pre_nf)          # which (patch, feature) pairs the rule keeps
    pre_a = coder.encode(pairs)                     # their pre-activations, differentiable
    f_a   = kind.pair_activation(sae, pre_a, pairs) # ReLU, JumpReLU, … on a vector of length nnz
    x̂     = coder.decode(f_a, pairs) + b_dec

`SparseCoder` computes the pre-activations once without autograd (the dense n × F matmul) and
back-propagates through the pairs alone (`_EncodePairs`, `_DecodePairs`: about 8·nnz·d flop
instead of 4·n·F·d); `DenseCoder` is plain autograd on n × F tensors, the reference the tests
and `bench/train.py` hold the sparse path to. Backward of the two functions, with g = ∂L/∂x̂,
xc = x − b_dec and active pairs (i, j):

    ∂L/∂f_ij        = g_i · W_dec[j]                        sampled matmul (feature-major CSR)
    ∂L/∂W_dec[j]    = Σ_i f_ij g_i                          embedding_bag
    ∂L/∂W_enc[:, j] = Σ_i ∂L/∂pre_ij xc_i                   embedding_bag
    ∂L/∂b_enc[j]    = Σ_i ∂L/∂pre_ij ;  ∂L/∂b_dec (encoder side) = −W_enc ∂L/∂b_enc
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from saev_report.sae.base import SparseAutoencoder


@dataclass
class ActivePairs:
    """The (patch, feature) pairs a batch keeps, in patch-major order (rows ascending).

    Feature-major order (features ascending, patches ascending within each) is built on
    demand for the backward pass, once per set of pairs: weight gradients gather per feature.
    """

    rows_a: Tensor  # [nnz] patch index
    cols_a: Tensor  # [nnz] feature index
    n_rows: int
    n_features: int
    min_kept: float | None = None  # BatchTopK: smallest positive kept pre-activation
    pre_a: Tensor | None = field(default=None, repr=False)  # the pairs' pre-activations, when the selection had them
    _feature_major: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def nnz(self) -> int:
        return self.rows_a.numel()

    def row_offsets(self) -> Tensor:
        """Start of each patch's pairs (for embedding_bag)."""
        counts_n = torch.bincount(self.rows_a, minlength=self.n_rows)
        return torch.cumsum(counts_n, 0) - counts_n

    def feature_major(self) -> tuple[Tensor, Tensor, Tensor]:
        """(perm_a, rows in feature-major order, feature offsets [F + 1]), computed once."""
        if self._feature_major is None:
            perm_a = stable_argsort(self.cols_a, self.n_features)
            counts_f = torch.bincount(self.cols_a, minlength=self.n_features)
            offsets_f1 = torch.zeros(self.n_features + 1, dtype=torch.long, device=self.cols_a.device)
            torch.cumsum(counts_f, 0, out=offsets_f1[1:])
            self._feature_major = (perm_a, self.rows_a[perm_a], offsets_f1)
        return self._feature_major

    @staticmethod
    def from_mask(mask_nf: Tensor) -> "ActivePairs":
        rows_a, cols_a = mask_nf.nonzero(as_tuple=True)
        return ActivePairs(rows_a, cols_a, mask_nf.shape[0], mask_nf.shape[1])


def stable_argsort(keys_a: Tensor, n_keys: int) -> Tensor:
    """Stable argsort of small non-negative integers (radix sort through numpy on CPU)."""
    if keys_a.device.type == "cpu" and n_keys <= np.iinfo(np.uint16).max + 1:
        order = np.argsort(keys_a.numpy().astype(np.uint16), kind="stable")  # numpy radix-sorts 16-bit keys
        return torch.from_numpy(order.astype(np.int64))
    return torch.sort(keys_a, stable=True).indices


class _EncodePairs(torch.autograd.Function):
    """pre_a = (x − b_dec) · W_enc[:, j] + b_enc[j] at the pairs; the values come precomputed."""

    @staticmethod
    def forward(ctx, xn_nd, W_enc_fd, b_enc_f, b_dec_d, pre_a, pairs: ActivePairs):  # type: ignore[override]
        ctx.save_for_backward(xn_nd, W_enc_fd, b_dec_d)
        ctx.pairs = pairs
        return pre_a.clone()

    @staticmethod
    def backward(ctx, g_pre_a):  # type: ignore[override]
        xn_nd, W_enc_fd, b_dec_d = ctx.saved_tensors
        pairs: ActivePairs = ctx.pairs
        perm_a, rows_fm, offsets_f1 = pairs.feature_major()
        g_pre_fm = g_pre_a[perm_a]
        xc_nd = xn_nd - b_dec_d
        g_W_enc_fd = F.embedding_bag(rows_fm, xc_nd, offsets_f1[:-1], mode="sum", per_sample_weights=g_pre_fm)
        g_b_enc_f = torch.zeros(pairs.n_features, dtype=g_pre_fm.dtype, device=g_pre_fm.device)
        g_b_enc_f.index_add_(0, pairs.cols_a[perm_a], g_pre_fm)
        g_b_dec_d = -(g_b_enc_f @ W_enc_fd)
        return None, g_W_enc_fd, g_b_enc_f, g_b_dec_d, None, None


class _DecodePairs(torch.autograd.Function):
    """x̂ (without b_dec) = Σ_pairs f_ij · W_dec[j], row by row."""

    @staticmethod
    def forward(ctx, f_a, W_dec_fd, pairs: ActivePairs):  # type: ignore[override]
        ctx.save_for_backward(f_a, W_dec_fd)
        ctx.pairs = pairs
        return F.embedding_bag(pairs.cols_a, W_dec_fd, pairs.row_offsets(), mode="sum", per_sample_weights=f_a)

    @staticmethod
    def backward(ctx, g_xhat_nd):  # type: ignore[override]
        f_a, W_dec_fd = ctx.saved_tensors
        pairs: ActivePairs = ctx.pairs
        g_xhat_nd = g_xhat_nd.contiguous()
        perm_a, rows_fm, offsets_f1 = pairs.feature_major()
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(offsets_f1, rows_fm, torch.zeros(pairs.nnz, dtype=f_a.dtype, device=f_a.device),
                                              size=(pairs.n_features, pairs.n_rows), check_invariants=False)
        g_f_fm = torch.sparse.sampled_addmm(pattern, W_dec_fd, g_xhat_nd.t(), beta=0.0).values()
        g_f_a = torch.empty_like(g_f_fm)
        g_f_a[perm_a] = g_f_fm
        g_W_dec_fd = F.embedding_bag(rows_fm, g_xhat_nd, offsets_f1[:-1], mode="sum", per_sample_weights=f_a[perm_a])
        return g_f_a, g_W_dec_fd, None


class _DecodePrefixes(torch.autograd.Function):
    """x̂_p (without b_dec) = Σ_{pairs with j < m_p} f_ij · W_dec[j] for nested prefix sizes m_1 < … < m_P.

    Forward: one embedding_bag per band [m_{p−1}, m_p) (the other bands' weights zeroed), then running
    sums. Backward: band b feeds every prefix p ≥ b, so its pairs see G_b = Σ_{p ≥ b} ∂L/∂x̂_p; in
    feature-major order a band's pairs are one contiguous slice, so each band is one sampled matmul
    and one embedding_bag on its slice, with no masking or re-sorting."""

    @staticmethod
    def forward(ctx, f_a, W_dec_fd, pairs: ActivePairs, sizes: tuple[int, ...]):  # type: ignore[override]
        ends = torch.tensor(sizes, device=pairs.cols_a.device)
        band_a = torch.bucketize(pairs.cols_a, ends, right=True)
        offsets_n = pairs.row_offsets()
        outputs, total = [], None
        for band in range(len(sizes)):
            part = F.embedding_bag(pairs.cols_a, W_dec_fd, offsets_n, mode="sum", per_sample_weights=f_a * (band_a == band))
            total = part if total is None else total + part
            outputs.append(total)
        ctx.save_for_backward(f_a, W_dec_fd)
        ctx.pairs, ctx.sizes = pairs, sizes
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *g_prefix):  # type: ignore[override]
        f_a, W_dec_fd = ctx.saved_tensors
        pairs: ActivePairs = ctx.pairs
        perm_a, rows_fm, offsets_f1 = pairs.feature_major()
        f_fm = f_a[perm_a]
        g_f_fm = torch.zeros_like(f_fm)
        g_W_dec_fd = torch.zeros_like(W_dec_fd)
        G_nd = None
        starts = (0, *ctx.sizes[:-1])
        for band in reversed(range(len(ctx.sizes))):  # suffix sums: G_b = Σ_{p ≥ b} g_p
            g = g_prefix[band]
            if g is not None:
                G_nd = g.contiguous() if G_nd is None else G_nd + g
            if G_nd is None:
                continue
            first, stop = starts[band], ctx.sizes[band]
            lo, hi = int(offsets_f1[first]), int(offsets_f1[stop])
            if hi == lo:
                continue
            crow = offsets_f1[first:stop + 1] - lo
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, rows_fm[lo:hi], torch.zeros(hi - lo, dtype=f_a.dtype, device=f_a.device),
                                                  size=(stop - first, pairs.n_rows), check_invariants=False)
            g_f_fm[lo:hi] = torch.sparse.sampled_addmm(pattern, W_dec_fd[first:stop], G_nd.t(), beta=0.0).values()
            g_W_dec_fd[first:stop] = F.embedding_bag(rows_fm[lo:hi], G_nd, crow[:-1], mode="sum", per_sample_weights=f_fm[lo:hi])
        g_f_a = torch.empty_like(g_f_fm)
        g_f_a[perm_a] = g_f_fm
        return g_f_a, g_W_dec_fd, None, None


class SparseCoder:
    """Encoder and decoder at the pairs only; `pre_nf` was computed without autograd."""

    def __init__(self, sae: "SparseAutoencoder", xn_nd: Tensor, pre_nf: Tensor):
        self.sae, self.xn_nd, self.pre_nf = sae, xn_nd, pre_nf

    def encode(self, pairs: ActivePairs) -> Tensor:
        sae = self.sae
        pre_a = pairs.pre_a if pairs.pre_a is not None else self.pre_nf[pairs.rows_a, pairs.cols_a]
        return _EncodePairs.apply(self.xn_nd, sae.W_enc_fd, sae.b_enc_f, sae.b_dec_d, pre_a, pairs)

    def decode(self, f_a: Tensor, pairs: ActivePairs) -> Tensor:
        return _DecodePairs.apply(f_a, self.sae.W_dec_fd, pairs)

    def decode_prefixes(self, f_a: Tensor, pairs: ActivePairs, sizes: tuple[int, ...]) -> list[Tensor]:
        """x̂ (without b_dec) of each nested prefix of the dictionary: features 0 … m_p − 1."""
        return list(_DecodePrefixes.apply(f_a, self.sae.W_dec_fd, pairs, tuple(sizes)))


class DenseCoder:
    """The plain reference: autograd through n × F pre-activations and codes."""

    def __init__(self, sae: "SparseAutoencoder", xn_nd: Tensor):
        self.sae, self.xn_nd = sae, xn_nd
        self.pre_nf_grad = sae.pre_activations_normalized(xn_nd)
        self.pre_nf = self.pre_nf_grad.detach()

    def encode(self, pairs: ActivePairs) -> Tensor:
        return self.pre_nf_grad[pairs.rows_a, pairs.cols_a]

    def codes(self, f_a: Tensor, pairs: ActivePairs) -> Tensor:
        f_nf = torch.zeros(pairs.n_rows, pairs.n_features, dtype=f_a.dtype, device=f_a.device)
        return f_nf.index_put((pairs.rows_a, pairs.cols_a), f_a)

    def decode(self, f_a: Tensor, pairs: ActivePairs) -> Tensor:
        return self.codes(f_a, pairs) @ self.sae.W_dec_fd

    def decode_prefixes(self, f_a: Tensor, pairs: ActivePairs, sizes: tuple[int, ...]) -> list[Tensor]:
        f_nf = self.codes(f_a, pairs)
        return [f_nf[:, :m] @ self.sae.W_dec_fd[:m] for m in sizes]


Coder = SparseCoder | DenseCoder
