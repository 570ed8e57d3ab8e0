"""Sparse autoencoders (ReLU + L1, TopK, BatchTopK) and their checkpoints.

The paper's recipe (public reference code, saev 0.1.0):

    f(x) = ReLU(W_enc (x − b_dec) + b_enc),    x̂ = W_dec f(x) + b_dec

on activations that were centred and scaled first. The scale makes the mean
L2 norm √d (so every coordinate has RMS ≈ 1): that is what the reference code
does (`scalar = mean‖x − μ‖ / √d`, after Templeton et al. 2024), what its
λ = 4e-4 is tuned for, and why the paper's MSE (mean over coordinates) is of
the same size as the fraction of variance unexplained. The paper's text calls
this "unit norm"; a plain unit norm would shrink the MSE by d and λ's effect
with it. Mean and scale are buffers saved with the checkpoint.

Training touches only the active features: `training_forward(..., sparse=True)`
runs the dense encoder matmul, selects the active (patch, feature) pairs and
hands them to `_SparseDecode`, whose backward computes every gradient from the
active pairs alone (about 8·L0·d flop per patch instead of 8·d·F). The dense
path (`sparse=False`, used while a fresh ReLU SAE still fires a large fraction
of its features) is `_DenseReluDecode` for ReLU, which holds two n × F tensors
at its peak where autograd holds six, and plain autograd for TopK/BatchTopK.
The tests check both against plain autograd.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from saev_report.fsutil import atomic_write_bytes, atomic_write_text

Kind = Literal["relu", "topk", "batchtopk"]
KINDS: tuple[str, ...] = ("relu", "topk", "batchtopk")
CHECKPOINT_FORMAT = 1

# BatchTopK's inference threshold: running mean of each batch's smallest kept activation,
# turning into an exponential moving average (Bussmann et al.'s β = 0.999) once it has
# seen 1 / (1 − β) batches, so it tracks the end of training rather than its start.
THRESHOLD_EMA_BETA = 0.999


class SparseAutoencoder(nn.Module):
    """An SAE over `d_model`-wide activations with `n_features` dictionary atoms.

    Shapes carry their names: `W_enc_df` is d × F (stored as `W_enc_fd`), `W_dec_fd` is
    F × d (rows are the unit-norm dictionary atoms). `*_normalized` methods work in the
    normalised space the SAE trains in; `encode` / `decode` / `forward` take and give raw
    activations.
    """

    def __init__(self, d_model: int, n_features: int, kind: Kind = "relu", k: int = 0, seed: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown SAE kind {kind!r}; expected one of {', '.join(KINDS)}")
        if kind != "relu" and not 0 < k <= n_features:
            raise ValueError(f"{kind} needs 0 < k <= n_features, got k={k}, n_features={n_features}")
        self.d_model, self.n_features, self.kind, self.k = int(d_model), int(n_features), kind, int(k)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # The encoder is stored feature-major (W_enc_fd, F × d; `W_enc_df` is its d × F view): the
        # sparse backward produces its gradient one feature row at a time, fused Adam wants
        # contiguous weights, and matmuls read either layout at the same speed. Kaiming-uniform
        # on the d × F view, as the reference (fan-in F).
        W_enc_fd = torch.empty(n_features, d_model)
        nn.init.kaiming_uniform_(W_enc_fd.t(), generator=generator)
        self.W_enc_fd = nn.Parameter(W_enc_fd)
        self.b_enc_f = nn.Parameter(torch.zeros(n_features))
        self.W_dec_fd = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(n_features, d_model), generator=generator))
        self.b_dec_d = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("act_mean_d", torch.zeros(d_model))
        self.register_buffer("act_scale", torch.ones(()))
        self.register_buffer("threshold", torch.zeros(()))  # BatchTopK inference threshold
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self._workspace: Tensor | None = None  # training pre-activations, reused across steps
        self.normalize_decoder_()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_workspace"] = None  # scratch memory: not worth copying or pickling
        return state

    def release_workspace(self) -> None:
        self._workspace = None

    @property
    def W_enc_df(self) -> Tensor:
        """Encoder weights, d × F (a view of `W_enc_fd`)."""
        return self.W_enc_fd.t()

    # ------------------------------------------------------------------ normalisation

    def normalize(self, x_nd: Tensor) -> Tensor:
        """Raw activations → the centred, scaled space the SAE works in."""
        return (x_nd.to(self.act_mean_d.dtype) - self.act_mean_d) * self.act_scale

    def denormalize(self, xn_nd: Tensor) -> Tensor:
        return xn_nd / self.act_scale + self.act_mean_d

    @torch.no_grad()
    def fit_normalization(self, sample_nd: Tensor, normalize: bool = True) -> None:
        """Mean and scale from a sample: mean ‖x − μ‖ becomes √d (identity if `normalize` is off)."""
        if not normalize:
            self.act_mean_d.zero_()
            self.act_scale.fill_(1.0)
            return
        sample_nd = sample_nd.to(self.act_mean_d.device, torch.float64)
        mean_d = sample_nd.mean(0)
        mean_norm = (sample_nd - mean_d).norm(dim=1).mean()
        if not torch.isfinite(mean_norm) or mean_norm <= 0:
            raise ValueError(f"cannot normalise activations: mean norm after centring is {mean_norm.item()}")
        self.act_mean_d.copy_(mean_d)
        self.act_scale.fill_(math.sqrt(self.d_model) / mean_norm.item())

    @torch.no_grad()
    def init_b_dec(self, sample_nd: Tensor) -> None:
        """b_dec = mean of the normalised sample (the reference code's choice)."""
        self.b_dec_d.copy_(self.normalize(sample_nd.to(self.act_mean_d.device)).mean(0))

    # ------------------------------------------------------------------ inference

    def pre_activations_normalized(self, xn_nd: Tensor) -> Tensor:
        return torch.addmm(self.b_enc_f, xn_nd - self.b_dec_d, self.W_enc_df)

    def activate(self, pre_nf: Tensor) -> Tensor:
        """Inference activation: independent of the other rows of the batch."""
        if self.kind == "relu":
            return F.relu(pre_nf)
        if self.kind == "topk":
            values_nk, idx_nk = pre_nf.topk(self.k, dim=1, sorted=False)
            return torch.zeros_like(pre_nf).scatter_(1, idx_nk, F.relu(values_nk))
        # batchtopk: a fixed threshold learnt in training replaces the batch's top k·n
        return torch.where(pre_nf > self.threshold.clamp(min=0), pre_nf, 0.0)

    def encode_normalized(self, xn_nd: Tensor) -> Tensor:
        return self.activate(self.pre_activations_normalized(xn_nd))

    def decode_normalized(self, f_nf: Tensor) -> Tensor:
        return torch.addmm(self.b_dec_d, f_nf, self.W_dec_fd)

    def encode(self, x_nd: Tensor) -> Tensor:
        """Raw activations in, features out."""
        return self.encode_normalized(self.normalize(x_nd))

    def decode(self, f_nf: Tensor) -> Tensor:
        """Features in, raw activations out."""
        return self.denormalize(self.decode_normalized(f_nf))

    def forward(self, x_nd: Tensor) -> tuple[Tensor, Tensor]:
        f_nf = self.encode(x_nd)
        return self.decode(f_nf), f_nf

    # ------------------------------------------------------------------ training helpers

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Dictionary atoms (rows of W_dec) back to unit length."""
        self.W_dec_fd.div_(torch.linalg.vector_norm(self.W_dec_fd, dim=1, keepdim=True).clamp(min=1e-12))

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the part of each atom's gradient along the atom: renormalisation would undo it."""
        grad_fd = self.W_dec_fd.grad
        if grad_fd is None:
            return
        parallel_f1 = torch.einsum("fd,fd->f", grad_fd, self.W_dec_fd).unsqueeze(1)  # one fused pass
        grad_fd.addcmul_(parallel_f1, self.W_dec_fd, value=-1.0)

    @torch.no_grad()
    def update_threshold(self, min_kept: float) -> None:
        """Fold a batch's smallest kept activation into the BatchTopK inference threshold."""
        self.threshold_updates += 1
        weight = max(1.0 / self.threshold_updates.item(), 1.0 - THRESHOLD_EMA_BETA)
        self.threshold.mul_(1.0 - weight).add_(weight * min_kept)

    def training_forward(self, xn_nd: Tensor, sparse: bool = True) -> "TrainForward":
        """Reconstruction of a normalised batch with training-time sparsity (BatchTopK uses the batch).

        Both paths compute the same function; `sparse` decodes and back-propagates through
        the active (patch, feature) pairs only.
        """
        if sparse:
            with torch.no_grad():
                pre_nf = self._pre_activations_into_workspace(xn_nd)
                active = select_active(pre_nf, self.kind, self.k)
                pre_a = pre_nf[active.rows_a, active.cols_a]
            xhat_nd, f_a = _SparseDecode.apply(xn_nd, self.W_enc_fd, self.b_enc_f, self.W_dec_fd, self.b_dec_d, pre_a, active)
            mse = (xhat_nd - xn_nd).pow(2).mean()
            with torch.no_grad():
                fired_a = f_a > 0
                fired_f = torch.zeros(self.n_features, dtype=torch.bool, device=f_a.device)
                fired_f[active.cols_a[fired_a]] = True
                stats = (active.nnz, int(fired_a.sum()), fired_f, active.min_kept)
            return TrainForward(xhat_nd, mse, f_a.sum() / xn_nd.shape[0], *stats)
        if self.kind == "relu":  # every positive pre-activation is kept: no pairs to find
            xhat_nd, l1, n_fired, fired_f = _DenseReluDecode.apply(xn_nd, self.W_enc_fd, self.b_enc_f, self.W_dec_fd, self.b_dec_d)
            mse = (xhat_nd - xn_nd).pow(2).mean()
            return TrainForward(xhat_nd, mse, l1, int(n_fired), int(n_fired), fired_f)
        pre_nf = self.pre_activations_normalized(xn_nd)
        active = select_active(pre_nf.detach(), self.kind, self.k)
        mask_nf = torch.zeros_like(pre_nf, dtype=torch.bool)
        mask_nf[active.rows_a, active.cols_a] = True
        f_nf = F.relu(pre_nf) * mask_nf
        xhat_nd = self.decode_normalized(f_nf)
        mse = (xhat_nd - xn_nd).pow(2).mean()
        with torch.no_grad():
            n_fired = int(torch.count_nonzero(f_nf))
            fired_f = f_nf.amax(dim=0) > 0
        return TrainForward(xhat_nd, mse, f_nf.sum() / xn_nd.shape[0], active.nnz, n_fired, fired_f, active.min_kept)

    def _pre_activations_into_workspace(self, xn_nd: Tensor) -> Tensor:
        """Pre-activations written into a buffer kept between steps: on CPU a fresh n × F
        tensor every step costs page faults worth a tenth of the matmul."""
        shape = (xn_nd.shape[0], self.n_features)
        ws = self._workspace
        if ws is None or ws.shape != shape or ws.dtype != xn_nd.dtype or ws.device != xn_nd.device:
            ws = self._workspace = torch.empty(shape, dtype=xn_nd.dtype, device=xn_nd.device)
        return torch.addmm(self.b_enc_f, xn_nd - self.b_dec_d, self.W_enc_df, out=ws)

    def config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "n_features": self.n_features, "kind": self.kind, "k": self.k}


@dataclass
class TrainForward:
    """One training forward pass: reconstruction, loss terms and the active pairs."""

    xhat_nd: Tensor  # normalised space
    mse: Tensor  # mean over patches and coordinates of (x̂ − x)²
    l1: Tensor  # mean over patches of ‖f‖₁
    n_active: int  # (patch, feature) pairs kept by the sparsity rule (TopK keeps some zeros)
    n_fired: int  # kept pairs with f > 0
    fired_f: Tensor  # [F] bool: the feature fired on some patch of the batch
    min_kept: float | None = None  # BatchTopK: smallest kept pre-activation

    @property
    def l0(self) -> float:
        return self.n_fired / self.xhat_nd.shape[0]


# --------------------------------------------------------------------------- active pairs


@dataclass
class ActivePairs:
    """The (patch, feature) pairs a batch keeps, in patch-major order (rows ascending).

    Feature-major order (features ascending, patches ascending within each) is built on
    demand for the backward pass: weight gradients gather per feature.
    """

    rows_a: Tensor  # [nnz] patch index
    cols_a: Tensor  # [nnz] feature index
    n_rows: int
    n_features: int
    min_kept: float | None = None  # BatchTopK: smallest positive kept pre-activation

    @property
    def nnz(self) -> int:
        return self.rows_a.numel()

    def row_offsets(self) -> Tensor:
        """Start of each patch's pairs (for embedding_bag)."""
        counts_n = torch.bincount(self.rows_a, minlength=self.n_rows)
        return torch.cumsum(counts_n, 0) - counts_n

    def feature_major(self) -> tuple[Tensor, Tensor, Tensor]:
        """(perm_a, rows in feature-major order, feature offsets [F + 1])."""
        perm_a = stable_argsort(self.cols_a, self.n_features)
        counts_f = torch.bincount(self.cols_a, minlength=self.n_features)
        offsets_f1 = torch.zeros(self.n_features + 1, dtype=torch.long, device=self.cols_a.device)
        torch.cumsum(counts_f, 0, out=offsets_f1[1:])
        return perm_a, self.rows_a[perm_a], offsets_f1


def stable_argsort(keys_a: Tensor, n_keys: int) -> Tensor:
    """Stable argsort of small non-negative integers (radix sort through numpy on CPU)."""
    if keys_a.device.type == "cpu" and n_keys <= np.iinfo(np.uint16).max + 1:
        order = np.argsort(keys_a.numpy().astype(np.uint16), kind="stable")  # numpy radix-sorts 16-bit keys
        return torch.from_numpy(order.astype(np.int64))
    return torch.sort(keys_a, stable=True).indices


@torch.no_grad()
def select_active(pre_nf: Tensor, kind: str, k: int) -> ActivePairs:
    """Training-time sparsity pattern: ReLU's positives, TopK's k per row, BatchTopK's k·n per batch."""
    n_rows, n_features = pre_nf.shape
    if kind == "relu":
        rows_a, cols_a = (pre_nf > 0).nonzero(as_tuple=True)
        return ActivePairs(rows_a, cols_a, n_rows, n_features)
    if kind == "topk":
        idx_nk = pre_nf.topk(k, dim=1, sorted=False).indices
        rows_a = torch.arange(n_rows, device=pre_nf.device).repeat_interleave(k)
        return ActivePairs(rows_a, idx_nk.reshape(-1), n_rows, n_features)
    if kind == "batchtopk":
        rows_a, cols_a = _batch_topk_pairs(pre_nf, k * n_rows)
        kept_a = pre_nf[rows_a, cols_a]
        min_kept = float(kept_a.min()) if kept_a.numel() else None
        return ActivePairs(rows_a, cols_a, n_rows, n_features, min_kept=min_kept)
    raise ValueError(f"unknown SAE kind {kind!r}")


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


# --------------------------------------------------------------------------- sparse autograd


class _DenseReluDecode(torch.autograd.Function):
    """x̂ = relu(W_enc (x − b_dec) + b_enc) · W_dec + b_dec and the L1 term, with a hand-written
    backward that reuses its n × F buffers (autograd keeps pre-activations, features, their
    gradient, the L1 gradient and the ReLU mask alive at once: about 6.5 n × F floats).

    Outputs x̂, mean ‖f‖₁, the number of positive features and which features fired (the last
    two without gradient). Backward, with g = ∂L/∂x̂, xc = x − b_dec and f > 0 the ReLU mask:

        ∂L/∂pre = (g · W_decᵀ + ∂L/∂l1 / n) ⊙ [f > 0]      one n × F buffer, masked in place
        ∂L/∂W_dec = fᵀ g ;  ∂L/∂W_enc = ∂L/∂preᵀ xc ;  ∂L/∂b_enc = Σ_i ∂L/∂pre_i
        ∂L/∂b_dec = Σ_i g_i − ∂L/∂b_enc · W_enc
    """

    @staticmethod
    def forward(ctx, xn_nd, W_enc_fd, b_enc_f, W_dec_fd, b_dec_d):  # type: ignore[override]
        xc_nd = xn_nd - b_dec_d
        f_nf = torch.addmm(b_enc_f, xc_nd, W_enc_fd.t()).relu_()
        xhat_nd = torch.addmm(b_dec_d, f_nf, W_dec_fd)
        l1 = f_nf.sum() / xn_nd.shape[0]
        n_fired = torch.count_nonzero(f_nf)
        fired_f = f_nf.amax(dim=0) > 0
        ctx.save_for_backward(xc_nd, W_enc_fd, W_dec_fd, f_nf)
        ctx.mark_non_differentiable(n_fired, fired_f)
        return xhat_nd, l1, n_fired, fired_f

    @staticmethod
    def backward(ctx, g_xhat_nd, g_l1, _g_n_fired, _g_fired_f):  # type: ignore[override]
        xc_nd, W_enc_fd, W_dec_fd, f_nf = ctx.saved_tensors
        # The L1 term's gradient is the same for every entry: it rides in the matmul's bias.
        g_l1_f = (g_l1 / xc_nd.shape[0]).expand(f_nf.shape[1]) if g_l1 is not None else W_dec_fd.new_zeros(()).expand(f_nf.shape[1])
        g_pre_nf = torch.addmm(g_l1_f, g_xhat_nd, W_dec_fd.t())
        torch.ops.aten.threshold_backward.grad_input(g_pre_nf, f_nf, 0.0, grad_input=g_pre_nf)  # ReLU, in place
        g_W_dec_fd = f_nf.t() @ g_xhat_nd
        g_W_enc_fd = g_pre_nf.t() @ xc_nd
        g_b_enc_f = g_pre_nf.sum(0)
        g_b_dec_d = g_xhat_nd.sum(0) - g_b_enc_f @ W_enc_fd
        return None, g_W_enc_fd, g_b_enc_f, g_W_dec_fd, g_b_dec_d


class _SparseDecode(torch.autograd.Function):
    """x̂ = Σ_active relu(pre) · W_dec[feature] + b_dec, with gradients from the active pairs only.

    Inputs: the normalised batch, the four parameters, the pre-activations of the active
    pairs (computed without autograd) and the pairs. Outputs x̂ and the active values f_a
    (whose sum is the L1 term). Backward, with g = ∂L/∂x̂ and xc = x − b_dec:

        ∂L/∂f_a      = g[row] · W_dec[feature] (+ ∂L/∂f_a from the L1 term)   sampled matmul
        ∂L/∂pre_a    = ∂L/∂f_a where f_a > 0                                  (ReLU)
        ∂L/∂W_dec[j] = Σ_{active (i, j)} f_ij g_i                             embedding_bag
        ∂L/∂W_enc[:, j] = Σ_{active (i, j)} ∂L/∂pre_ij xc_i                   embedding_bag
        ∂L/∂b_enc[j] = Σ_i ∂L/∂pre_ij ;  ∂L/∂b_dec = Σ_i g_i − W_enc ∂L/∂b_enc
    """

    @staticmethod
    def forward(ctx, xn_nd, W_enc_fd, b_enc_f, W_dec_fd, b_dec_d, pre_a, active: ActivePairs):  # type: ignore[override]
        f_a = F.relu(pre_a)
        offsets_n = active.row_offsets()
        xhat_nd = F.embedding_bag(active.cols_a, W_dec_fd, offsets_n, mode="sum", per_sample_weights=f_a)
        xhat_nd.add_(b_dec_d)
        ctx.save_for_backward(xn_nd, W_enc_fd, W_dec_fd, b_dec_d, f_a)
        ctx.active = active
        return xhat_nd, f_a

    @staticmethod
    def backward(ctx, g_xhat_nd, g_f_a):  # type: ignore[override]
        xn_nd, W_enc_fd, W_dec_fd, b_dec_d, f_a = ctx.saved_tensors
        active: ActivePairs = ctx.active
        n_features = active.n_features
        g_xhat_nd = g_xhat_nd.contiguous()
        perm_a, rows_fm, offsets_f1 = active.feature_major()
        f_fm = f_a[perm_a]
        # ∂L/∂f at the active pairs: g_xhat @ W_decᵀ sampled at the pattern (feature-major CSR [F, n])
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                offsets_f1, rows_fm, torch.zeros_like(f_fm), size=(n_features, active.n_rows), check_invariants=False
            )
        g_f_fm = torch.sparse.sampled_addmm(pattern, W_dec_fd, g_xhat_nd.t(), beta=0.0).values()
        if g_f_a is not None:
            g_f_fm = g_f_fm + g_f_a[perm_a]
        g_pre_fm = g_f_fm * (f_fm > 0)
        offsets_f = offsets_f1[:-1]
        g_W_dec_fd = F.embedding_bag(rows_fm, g_xhat_nd, offsets_f, mode="sum", per_sample_weights=f_fm)
        xc_nd = xn_nd - b_dec_d
        g_W_enc_fd = F.embedding_bag(rows_fm, xc_nd, offsets_f, mode="sum", per_sample_weights=g_pre_fm)
        g_b_enc_f = torch.zeros(n_features, dtype=g_pre_fm.dtype, device=g_pre_fm.device)
        g_b_enc_f.index_add_(0, active.cols_a[perm_a], g_pre_fm)
        g_b_dec_d = g_xhat_nd.sum(0) - g_b_enc_f @ W_enc_fd
        return None, g_W_enc_fd, g_b_enc_f, g_W_dec_fd, g_b_dec_d, None, None


# --------------------------------------------------------------------------- checkpoints

WEIGHT_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


def save_sae(sae: SparseAutoencoder, out_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `sae.safetensors` and `config.json` (each atomically; the config last)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    # Serialised in memory and written by Python: safetensors' own file writer hides the errno
    # of a full disk in its message (`os error 28`), Python's keeps it.
    atomic_write_bytes(out_dir / WEIGHT_FILE, save(tensors))
    config = {"format": CHECKPOINT_FORMAT, **sae.config(), **(extra or {})}
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def load_sae(sae_dir: Path, device: torch.device | str = "cpu") -> SparseAutoencoder:
    """Load a checkpoint written by `save_sae`, in eval mode."""
    sae_dir = Path(sae_dir)
    config = json.loads((sae_dir / CONFIG_FILE).read_text())
    sae = SparseAutoencoder(config["d_model"], config["n_features"], config["kind"], config["k"])
    sae.load_state_dict(load_file(str(sae_dir / WEIGHT_FILE)))
    return sae.to(device).eval()


def read_sae_config(sae_dir: Path) -> dict[str, Any]:
    return json.loads((Path(sae_dir) / CONFIG_FILE).read_text())


# saev 0.1.0 (`saev.nn.dump`) parameter names → ours. Its W_enc is [d_vit, d_sae] (our
# `W_enc_df` view) and its W_dec [d_sae, d_vit], as ours.
REFERENCE_NAMES = {"W_enc": "W_enc_df", "b_enc": "b_enc_f", "W_dec": "W_dec_fd", "b_dec": "b_dec_d"}  # W_enc_df: a view


def load_reference_checkpoint(
    path: Path, act_mean_d: Tensor | None = None, act_scale: float = 1.0, device: torch.device | str = "cpu"
) -> SparseAutoencoder:
    """Load a checkpoint of the paper's reference code (saev 0.1.0 `nn.dump`): one JSON line
    with its config, then a torch state dict (read with `weights_only=True`).

    saev normalises activations in its data loader, not in the SAE, so the checkpoint holds
    no normalisation; pass the statistics the SAE was trained with (`act_mean_d`, and
    `act_scale` = 1 / saev's `scalar`) or feed it activations normalised the same way.
    """
    with open(path, "rb") as fh:
        header = json.loads(fh.readline().decode("utf-8"))
        state = torch.load(io.BytesIO(fh.read()), weights_only=True, map_location="cpu")
    missing = [name for name in REFERENCE_NAMES if name not in state]
    if missing:
        raise ValueError(f"{path}: not a saev SparseAutoencoder checkpoint (missing {', '.join(missing)})")
    d_model, n_features = state["W_enc"].shape
    if "d_vit" in header and header["d_vit"] != d_model:
        raise ValueError(f"{path}: header d_vit={header['d_vit']} but W_enc is {tuple(state['W_enc'].shape)}")
    sae = SparseAutoencoder(d_model, n_features, "relu")
    with torch.no_grad():
        for theirs, ours in REFERENCE_NAMES.items():
            getattr(sae, ours).copy_(state[theirs].float())
        if act_mean_d is not None:
            sae.act_mean_d.copy_(act_mean_d)
        sae.act_scale.fill_(act_scale)
    return sae.to(device).eval()
