"""JumpReLU (Rajamanoharan et al. 2024): per-feature thresholds θ > 0 and an L0 penalty,

    f_j = z_j · H(z_j − θ_j),  z = W_enc (x − b_dec) + b_enc,     L = MSE(x, x̂) + λ · ‖f‖₀

H has no useful gradient, so θ learns through straight-through estimators with a kernel K of
bandwidth ε (rectangle: K(u) = 1 for |u| < ½, else 0), as in the paper's eqs. 11–12:

    ∂f_j/∂θ_j   := −(θ_j / ε) · K((z_j − θ_j) / ε)       ∂f_j/∂z_j = H(z_j − θ_j)
    ∂H_j/∂θ_j   := −(1 / ε) · K((z_j − θ_j) / ε)          (the L0 term gives z no gradient)

θ is the parameter `threshold_f`, clamped to ≥ 1e-6 after each step. (A log-parametrised θ moves
by a factor e^lr per Adam step at most: from 0.001, 5,000 steps to reach 0.1 at lr 1e-3, longer than
the demo trains.) The sparse path keeps the pairs
with z > θ − ε/2: the active ones and those just below their threshold, whose θ still gets a
gradient.

Sparsity is set by either a fixed coefficient `l0_coeff` (warmed up like ReLU's λ) or an
`l0_target`: then λ is steered after every step by a proportional-integral controller on
e = clip(log(L0 / target), ±1): log λ_I += rate · e (kept within 1e-2…1e4 × its start) and the loss
uses λ_I · exp(gain · e) (not in the paper, which sweeps λ), and θ starts at each feature's
(1 − target / F) quantile on the normalisation sample, so training starts near the target.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from saev_report import distributed
from saev_report.sae.kind import LossContext, SAEKind, TrainForward
from saev_report.sae.sparse import ActivePairs, Coder
from saev_report.specmodel import SpecModel

if TYPE_CHECKING:
    from saev_report.distributed import Shard
    from saev_report.sae.base import SparseAutoencoder

INIT_SAMPLE_ROWS = 4096
# With `l0_target`, λ stays within these multiples of `l0_coeff_init`: a long stretch under the target
# (early training) would otherwise wind λ down so far that it takes as long to come back.
CONTROLLER_RANGE = (1e-2, 1e4)
THRESHOLD_FLOOR = 1e-6  # θ is clamped here after every step  # rows of the normalisation sample the thresholds start from


class JumpReLUParams(SpecModel):
    """JumpReLU: learnt per-feature thresholds, an L0 penalty through straight-through estimators."""

    l0_target: float | None = Field(default=32.0, gt=0)
    """Target L0 (active features per patch): λ is steered towards it. Null when `l0_coeff` is given."""
    l0_coeff: float | None = Field(default=None, ge=0)
    """A fixed L0 coefficient λ instead of a target (the paper's setting; warms up over `sae.l1_warmup_steps`)."""
    bandwidth: float = Field(default=0.001, gt=0)
    """Kernel bandwidth ε of the straight-through estimators (paper 0.001, with activations scaled as here)."""
    threshold_init: float = Field(default=0.001, gt=0)
    """Initial threshold θ (paper 0.001); with `l0_target`, the floor of the data-dependent start."""
    l0_coeff_init: float = Field(default=0.1, gt=0)
    """With `l0_target`: λ at the first step."""
    controller_rate: float = Field(default=0.3, gt=0, le=1)
    """With `l0_target`: the controller's integral rate (its log λ moves by at most this per step)."""
    controller_gain: float = Field(default=10.0, ge=0)
    """With `l0_target`: the controller's proportional gain: λ used = λ_integral · (L0 / target)^gain, L0 of the last step."""

    @model_validator(mode="after")
    def _one_sparsity(self) -> "JumpReLUParams":
        if (self.l0_target is None) == (self.l0_coeff is None):
            raise ValueError("give exactly one of l0_target and l0_coeff")
        return self


class _JumpReLU(torch.autograd.Function):
    """z · H(z − θ); ∂/∂z = H(z − θ), ∂/∂θ = −(θ/ε) K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, z_a, theta_a, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(z_a, theta_a)
        ctx.bandwidth = bandwidth
        return z_a * (z_a > theta_a)

    @staticmethod
    def backward(ctx, g_a):  # type: ignore[override]
        z_a, theta_a = ctx.saved_tensors
        eps = ctx.bandwidth
        near_a = (z_a - theta_a).abs() < eps / 2
        return g_a * (z_a > theta_a), g_a * near_a * (-theta_a / eps), None


class _Step(torch.autograd.Function):
    """H(z − θ); ∂/∂z = 0, ∂/∂θ = −(1/ε) K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, z_a, theta_a, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(z_a, theta_a)
        ctx.bandwidth = bandwidth
        return (z_a > theta_a).to(z_a.dtype)

    @staticmethod
    def backward(ctx, g_a):  # type: ignore[override]
        z_a, theta_a = ctx.saved_tensors
        eps = ctx.bandwidth
        near_a = (z_a - theta_a).abs() < eps / 2
        return None, g_a * near_a * (-1.0 / eps), None


class JumpReLU(SAEKind):
    name = "jumprelu"
    Params = JumpReLUParams
    swept = ("l0_target", "l0_coeff")
    summary = "per-feature thresholds learnt by straight-through estimators; L0 penalty (fixed λ or a target L0)."
    reference = "Rajamanoharan et al. 2024"

    def tag_part(self, params: JumpReLUParams) -> str:
        return f"l0_{params.l0_target:g}" if params.l0_target is not None else f"l0c_{params.l0_coeff:g}"

    def sweep_defaults(self, given: dict[str, Any]) -> dict[str, Any]:
        if "l0_coeff" in given and "l0_target" not in given:  # a fixed λ replaces the default target
            return {**given, "l0_target": [None]}
        return given

    def init_module(self, sae: "SparseAutoencoder") -> None:
        sae.threshold_f = torch.nn.Parameter(torch.full((sae.n_features,), float(sae.params.threshold_init)))
        sae.register_buffer("l0_coeff_now", torch.tensor(float(sae.params.l0_coeff_init), dtype=torch.float64))
        sae.register_buffer("l0_error", torch.zeros((), dtype=torch.float64))  # clip(log(L0 / target), ±1) of the last step

    @torch.no_grad()
    def init_from_sample(self, sae: "SparseAutoencoder", xn_nd: Tensor) -> None:
        params: JumpReLUParams = sae.params
        if params.l0_target is None:
            return
        pre_nf = sae.pre_activations_normalized(xn_nd[:INIT_SAMPLE_ROWS].to(sae.W_enc_fd.dtype))
        q = min(1.0, max(0.0, 1.0 - params.l0_target / sae.n_features))
        theta_f = torch.quantile(pre_nf.float(), q, dim=0).clamp(min=params.threshold_init)
        sae.threshold_f.copy_(theta_f.to(sae.threshold_f.dtype))

    def threshold_f(self, sae: "SparseAutoencoder") -> Tensor:
        return sae.threshold_f

    def activate(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> Tensor:
        return torch.where(pre_nf > self.threshold_f(sae), pre_nf, 0.0)

    def select_pairs(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> ActivePairs:
        return ActivePairs.from_mask(pre_nf > self.threshold_f(sae) - sae.params.bandwidth / 2)

    def pair_activation(self, sae: "SparseAutoencoder", pre_a: Tensor, pairs: ActivePairs) -> Tensor:
        theta_a = self.threshold_f(sae)[pairs.cols_a]
        return _JumpReLU.apply(pre_a, theta_a, sae.params.bandwidth)

    def coefficient(self, sae: "SparseAutoencoder", ctx: LossContext) -> float:
        params: JumpReLUParams = sae.params
        if params.l0_coeff is not None:
            return params.l0_coeff * ctx.sparsity_scale
        return float(sae.l0_coeff_now) * math.exp(params.controller_gain * float(sae.l0_error))

    def loss(self, sae: "SparseAutoencoder", out: TrainForward, coder: Coder, ctx: LossContext) -> dict[str, Tensor]:
        pairs = out.pairs
        theta_a = self.threshold_f(sae)[pairs.cols_a]
        l0 = _Step.apply(out.pre_a.detach(), theta_a, sae.params.bandwidth).sum() / pairs.n_rows
        coeff = self.coefficient(sae, ctx)
        return {"mse": out.mse, **({"l0": coeff * l0} if coeff else {})}

    @torch.no_grad()
    def after_step(self, sae: "SparseAutoencoder", out: TrainForward, data_parallel: "Shard", share: float) -> None:
        params: JumpReLUParams = sae.params
        sae.threshold_f.clamp_(min=THRESHOLD_FLOOR)  # θ > 0: a jump at or below 0 would pass negative codes
        if params.l0_target is None:
            return
        l0 = out.l0
        if data_parallel.world > 1:  # the full batch's L0: share-weighted sum over ranks
            l0 = float(distributed.sum_(torch.tensor(l0 * share, dtype=torch.float64, device=out.xhat_nd.device)))
        error = max(-1.0, min(1.0, math.log(max(l0, 1e-3) / params.l0_target)))
        low, high = params.l0_coeff_init * CONTROLLER_RANGE[0], params.l0_coeff_init * CONTROLLER_RANGE[1]
        sae.l0_coeff_now.mul_(math.exp(params.controller_rate * error)).clamp_(low, high)
        sae.l0_error.fill_(error)


KIND = JumpReLU()
