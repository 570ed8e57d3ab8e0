"""ReLU + L1, the paper's SAE (Bricken et al. 2023; saev 0.1.0):

    f = ReLU(W_enc (x − b_dec) + b_enc),    L = MSE(x, x̂) + λ · ‖f‖₁

λ warms up linearly over `sae.l1_warmup_steps`. Training keeps every positive pre-activation;
its dense path is `_DenseReluDecode`, which holds two n × F tensors at its peak where
autograd holds six (a fresh ReLU SAE fires about half its features, so early steps run dense).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from saev_report.sae.kind import LossContext, SAEKind, TrainForward
from saev_report.sae.sparse import ActivePairs, Coder
from saev_report.specmodel import SpecModel

if TYPE_CHECKING:
    from saev_report.sae.base import SparseAutoencoder


class ReluParams(SpecModel):
    """ReLU + L1 (the paper's SAE)."""

    l1_coeff: float = Field(default=4e-4, ge=0, allow_inf_nan=False)
    """Sparsity coefficient λ on ‖f‖₁ (paper 4e-4); warms up over `sae.l1_warmup_steps`."""


class Relu(SAEKind):
    name = "relu"
    Params = ReluParams
    swept = ("l1_coeff",)
    summary = "ReLU + λ‖f‖₁, the paper's recipe (λ warmed up)."
    reference = "Bricken et al. 2023; the paper's saev 0.1.0"

    def tag_part(self, params: ReluParams) -> str:
        return f"l1_{params.l1_coeff:g}"

    def activate(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> Tensor:
        return F.relu(pre_nf)

    def select_pairs(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> ActivePairs:
        return ActivePairs.from_mask(pre_nf > 0)

    def loss(self, sae: "SparseAutoencoder", out: TrainForward, coder: Coder, ctx: LossContext) -> dict[str, Tensor]:
        terms = {"mse": out.mse}
        coeff = sae.params.l1_coeff * ctx.sparsity_scale
        if coeff:
            terms["l1"] = coeff * out.l1
        return terms

    def dense_forward(self, sae: "SparseAutoencoder", xn_nd: Tensor, ctx: LossContext) -> TrainForward:
        xhat_nd, l1, n_fired, fired_f = _DenseReluDecode.apply(xn_nd, sae.W_enc_fd, sae.b_enc_f, sae.W_dec_fd, sae.b_dec_d)
        mse = (xhat_nd - xn_nd).pow(2).mean()
        out = TrainForward(xhat_nd, mse, l1, int(n_fired), int(n_fired), fired_f)
        out.terms = self.loss(sae, out, None, ctx)  # type: ignore[arg-type]  (ReLU's loss reads no coder)
        out.loss = sum(out.terms.values())
        return out


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


KIND = Relu()
