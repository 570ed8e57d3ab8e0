"""The SAE module every kind shares: weights, normalisation, decode, and the training forward.

The paper's recipe (public reference code, saev 0.1.0):

    f(x) = act(W_enc (x − b_dec) + b_enc),    x̂ = W_dec f(x) + b_dec

on activations that were centred and scaled first. The scale makes the mean L2 norm √d (so
every coordinate has RMS ≈ 1): that is what the reference code does (`scalar = mean‖x − μ‖ /
√d`, after Templeton et al. 2024), what its λ = 4e-4 is tuned for, and why the paper's MSE
(mean over coordinates) is of the same size as the fraction of variance unexplained. Mean and
scale are buffers saved with the checkpoint.

`act` and the training-time sparsity rule belong to the kind (`saev_report/sae/<kind>.py`,
looked up in `registry.KINDS`); this module never branches on the kind's name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from saev_report.sae.kind import LossContext, SAEKind, TrainForward
from saev_report.sae.sparse import DenseCoder, SparseCoder

# BatchTopK's inference threshold: running mean of each batch's smallest kept activation,
# turning into an exponential moving average (Bussmann et al.'s β = 0.999) once it has
# seen 1 / (1 − β) batches, so it tracks the end of training rather than its start.
THRESHOLD_EMA_BETA = 0.999


class SparseAutoencoder(nn.Module):
    """An SAE over `d_model`-wide activations with `n_features` dictionary atoms.

    `kind` names a registered kind; `params` is that kind's `Params` (default: its defaults,
    with `k` if given). Shapes carry their names: `W_enc_df` is d × F (stored as `W_enc_fd`),
    `W_dec_fd` is F × d (rows are the unit-norm dictionary atoms). `*_normalized` methods work
    in the normalised space the SAE trains in; `encode` / `decode` / `forward` take and give
    raw activations.
    """

    def __init__(self, d_model: int, n_features: int, kind: str = "relu", k: int | None = None, seed: int | None = None,
                 params: Any = None):
        super().__init__()
        from saev_report.sae.registry import kind_named

        self.kind_impl: SAEKind = kind_named(kind)
        if params is None:
            given = {"k": int(k)} if k is not None and "k" in self.kind_impl.Params.model_fields else {}
            params = self.kind_impl.Params(**given)
        elif not isinstance(params, self.kind_impl.Params):
            params = self.kind_impl.Params.model_validate(params)
        self.kind_impl.check(params, int(n_features))
        self.d_model, self.n_features, self.kind, self.params = int(d_model), int(n_features), kind, params
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
        # The batch-threshold kinds' inference threshold; every SAE carries it (0, unused, for the
        # others) so checkpoints of every kind share their core tensors.
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self.kind_impl.init_module(self)
        self._workspace: Tensor | None = None  # training pre-activations, reused across steps
        self.normalize_decoder_()

    @property
    def k(self) -> int:
        """The kind's `k` (0 for kinds without one)."""
        return int(getattr(self.params, "k", 0) or 0)

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

    @torch.no_grad()
    def init_from_sample(self, sample_nd: Tensor) -> None:
        """The kind's data-dependent initialisation (after `fit_normalization` and `init_b_dec`)."""
        self.kind_impl.init_from_sample(self, self.normalize(sample_nd.to(self.act_mean_d.device)))

    # ------------------------------------------------------------------ inference

    def pre_activations_normalized(self, xn_nd: Tensor) -> Tensor:
        return torch.addmm(self.b_enc_f, xn_nd - self.b_dec_d, self.W_enc_df)

    def activate(self, pre_nf: Tensor) -> Tensor:
        """Inference activation: independent of the other rows of the batch."""
        return self.kind_impl.activate(self, pre_nf)

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
        """Fold a batch's smallest kept activation into the batch-threshold kinds' inference threshold."""
        self.threshold_updates += 1
        weight = max(1.0 / self.threshold_updates.item(), 1.0 - THRESHOLD_EMA_BETA)
        self.threshold.mul_(1.0 - weight).add_(weight * min_kept)

    def training_forward(self, xn_nd: Tensor, sparse: bool = True, ctx: LossContext | None = None) -> TrainForward:
        """Reconstruction of a normalised batch with training-time sparsity, and the kind's loss.

        Both paths compute the same function; `sparse` decodes and back-propagates through
        the kept (patch, feature) pairs only (see `sparse.py`).
        """
        ctx = ctx if ctx is not None else LossContext()
        kind = self.kind_impl
        if not sparse:
            own = kind.dense_forward(self, xn_nd, ctx)
            if own is not None:
                return own
            coder: SparseCoder | DenseCoder = DenseCoder(self, xn_nd)
        else:
            with torch.no_grad():
                coder = SparseCoder(self, xn_nd, self._pre_activations_into_workspace(xn_nd))
        with torch.no_grad():
            pairs = kind.select_pairs(self, coder.pre_nf)
        pre_a = coder.encode(pairs)
        f_a = kind.pair_activation(self, pre_a, pairs)
        xhat_nd, extras = kind.reconstruct(self, coder, f_a, pairs)
        mse = (xhat_nd - xn_nd).pow(2).mean()
        with torch.no_grad():
            fired_a = f_a > 0
            fired_f = torch.zeros(self.n_features, dtype=torch.bool, device=f_a.device)
            fired_f[pairs.cols_a[fired_a]] = True
            n_fired = int(fired_a.sum())
        out = TrainForward(xhat_nd, mse, f_a.sum() / xn_nd.shape[0], pairs.nnz, n_fired, fired_f, pairs.min_kept,
                           pairs=pairs, pre_a=pre_a, f_a=f_a, extras=extras)
        out.terms = kind.loss(self, out, coder, ctx)
        out.loss = sum(out.terms.values())
        return out

    def _pre_activations_into_workspace(self, xn_nd: Tensor) -> Tensor:
        """Pre-activations written into a buffer kept between steps: on CPU a fresh n × F
        tensor every step costs page faults worth a tenth of the matmul."""
        shape = (xn_nd.shape[0], self.n_features)
        ws = self._workspace
        if ws is None or ws.shape != shape or ws.dtype != xn_nd.dtype or ws.device != xn_nd.device:
            ws = self._workspace = torch.empty(shape, dtype=xn_nd.dtype, device=xn_nd.device)
        return torch.addmm(self.b_enc_f, xn_nd - self.b_dec_d, self.W_enc_df, out=ws)

    def config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "n_features": self.n_features, "kind": self.kind, "k": self.k,
                "params": self.params.model_dump(mode="json")}
