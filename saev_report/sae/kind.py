"""What every SAE kind declares: its parameters, encode, training pairs, loss and hooks.

A kind is one module under `saev_report/sae/` holding a subclass of `SAEKind` and its
`Params` model, registered in `registry.KINDS`. Everything kind-specific lives there:

- `Params` (a `SpecModel`: its field docstrings become the spec reference). The fields named in
  `swept` are lists in the spec's `sae.<kind>` section and the sweep takes their product;
- `activate` (inference, row by row), `select_pairs` (the training sparsity rule), and
  `pair_activation` (the nonlinearity on the kept pairs, differentiable);
- `reconstruct` (default: one decode; Matryoshka decodes its prefixes) and `loss`, the one
  signature the training loop calls: `loss(sae, out, coder, ctx) -> {term: tensor}`, summed;
- hooks with do-nothing defaults: `init_module` (extra parameters or buffers), `init_from_sample`,
  `after_step` (state folded after the optimiser step), `feature_groups` (named feature ranges the
  site shows), `sub_models` (nested reconstructions the analysis also scores).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, create_model, model_validator
from torch import Tensor

from saev_report.sae.sparse import ActivePairs, Coder
from saev_report.specmodel import SpecModel

if TYPE_CHECKING:
    from saev_report.distributed import Shard
    from saev_report.sae.base import SparseAutoencoder


@dataclass
class LossContext:
    """What the loss of a step may depend on besides the batch (training-loop state)."""

    sparsity_scale: float = 1.0  # warm-up factor of the sparsity coefficient (λ), 0 → 1
    n_seen: int = 0  # patches seen before this batch
    last_fired_f: Tensor | None = None  # [F] long: `n_seen` when each feature last fired (AuxK's dead latents)


@dataclass
class TrainForward:
    """One training forward pass: reconstruction, loss and the active pairs' statistics."""

    xhat_nd: Tensor  # normalised space
    mse: Tensor  # mean over patches and coordinates of (x̂ − x)²
    l1: Tensor  # mean over patches of ‖f‖₁
    n_active: int  # (patch, feature) pairs kept by the sparsity rule (TopK keeps some zeros)
    n_fired: int  # kept pairs with f > 0
    fired_f: Tensor  # [F] bool: the feature fired on some patch of the batch
    min_kept: float | None = None  # BatchTopK: smallest kept pre-activation
    loss: Tensor | None = None  # the kind's total loss (sum of `terms`)
    terms: dict[str, Tensor] = field(default_factory=dict)  # the loss's named terms
    pairs: ActivePairs | None = field(default=None, repr=False)
    pre_a: Tensor | None = field(default=None, repr=False)  # pre-activations at the pairs
    f_a: Tensor | None = field(default=None, repr=False)  # codes at the pairs
    extras: dict[str, Any] = field(default_factory=dict, repr=False)  # kind-specific (Matryoshka's prefix x̂)

    @property
    def l0(self) -> float:
        return self.n_fired / self.xhat_nd.shape[0]


@dataclass(frozen=True)
class SubModel:
    """A nested reconstruction scored beside the whole SAE (a Matryoshka prefix)."""

    name: str  # e.g. `prefix-1`
    n_features: int  # features 0 … n_features − 1 decode it


class SAEKind:
    """Base of every kind (see the module docstring). Subclasses set the class attributes."""

    name: ClassVar[str]
    Params: ClassVar[type[SpecModel]]
    swept: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""  # one line for docs/explanation/sae-kinds.md
    reference: ClassVar[str] = ""  # the paper
    uses_batch_threshold: ClassVar[bool] = False  # inference reads `sae.threshold` (BatchTopK family)

    def __deepcopy__(self, memo: dict) -> "SAEKind":
        return self  # one instance per kind: copies of an SAE share it

    def __reduce__(self):
        from saev_report.sae.registry import kind_named

        return kind_named, (self.name,)

    # ------------------------------------------------------------------ spec

    def tag_part(self, params: Any) -> str:
        """The sparsity part of the SAE's tag (`<kind>-x<expansion>-<this>-s<seed>`)."""
        raise NotImplementedError

    def check(self, params: Any, n_features: int) -> None:
        """Raise ValueError when `params` cannot run with `n_features` features."""

    def sweep_defaults(self, given: dict[str, Any]) -> dict[str, Any]:
        """Fill a spec section before validation (a kind whose swept fields exclude each other)."""
        return given

    @cache
    def sweep_model(self) -> type[SpecModel]:
        """The spec's `sae.<kind>` section: `Params` with each swept field a list of its values."""
        fields: dict[str, Any] = {}
        for name, info in self.Params.model_fields.items():
            if name in self.swept:
                item = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
                default = info.get_default(call_default_factory=True)
                fields[name] = (list[item], Field(default_factory=lambda d=default: [d], min_length=1, description=
                                                  f"{info.description or ''} A list: the sweep trains one SAE per value."))
            else:
                fields[name] = (info.annotation, info)
        fields["seeds"] = (list[int] | None, Field(default=None, min_length=1, description=
                           "This kind's initialisation seeds (default: `sae.seeds`): e.g. one seed for a kind added only for comparison."))
        kind = self

        def _expand_check(section):  # every combination must be valid Params, reported at the section
            kind.expand(section)
            return section

        model = create_model(f"{self.Params.__name__}Sweep", __base__=SpecModel, __doc__=self.Params.__doc__,
                             __validators__={"_expand_check": model_validator(mode="after")(_expand_check)}, **fields)
        return model

    def expand(self, section: SpecModel) -> list[Any]:
        """One `Params` per combination of the section's swept lists, in field order."""
        data = section.model_dump(exclude={"seeds"})
        lists = [data[name] for name in self.swept]
        return [self.Params(**{**data, **dict(zip(self.swept, combo))}) for combo in itertools.product(*lists)]

    def table_fields(self, params: Any) -> dict[str, Any]:
        """The `saes` table's shared sparsity columns (`l1_coeff`, `k`): 0 where the kind has none."""
        return {"l1_coeff": float(getattr(params, "l1_coeff", 0.0) or 0.0), "k": int(getattr(params, "k", 0) or 0)}

    # ------------------------------------------------------------------ module

    def init_module(self, sae: "SparseAutoencoder") -> None:
        """Register the kind's own parameters or buffers on a fresh SAE."""

    @torch.no_grad()
    def init_from_sample(self, sae: "SparseAutoencoder", xn_nd: Tensor) -> None:
        """Data-dependent initialisation, after normalisation and b_dec (normalised sample)."""

    def activate(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> Tensor:
        """Inference activation: independent of the other rows of the batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training

    def select_pairs(self, sae: "SparseAutoencoder", pre_nf: Tensor) -> ActivePairs:
        """The training sparsity pattern (no autograd)."""
        raise NotImplementedError

    def pair_activation(self, sae: "SparseAutoencoder", pre_a: Tensor, pairs: ActivePairs) -> Tensor:
        """Codes at the kept pairs, differentiable in `pre_a` (and the kind's own parameters)."""
        return F.relu(pre_a)

    def reconstruct(self, sae: "SparseAutoencoder", coder: Coder, f_a: Tensor, pairs: ActivePairs) -> tuple[Tensor, dict[str, Any]]:
        """x̂ of the whole dictionary, and what `loss` needs besides (default: nothing)."""
        return coder.decode(f_a, pairs) + sae.b_dec_d, {}

    def loss(self, sae: "SparseAutoencoder", out: TrainForward, coder: Coder, ctx: LossContext) -> dict[str, Tensor]:
        """Named loss terms; the training loop back-propagates their sum."""
        return {"mse": out.mse}

    def after_step(self, sae: "SparseAutoencoder", out: TrainForward, data_parallel: "Shard", share: float) -> None:
        """State folded in after the optimiser step (BatchTopK's threshold, JumpReLU's λ)."""

    def reads_dead_latents(self, params: Any) -> bool:
        """The loss reads `LossContext.last_fired_f` (AuxK): data-parallel ranks then share it every step."""
        return False

    def dense_forward(self, sae: "SparseAutoencoder", xn_nd: Tensor, ctx: LossContext) -> TrainForward | None:
        """A kind's own dense path (ReLU's memory-lean one); None: the generic `DenseCoder`."""
        return None

    # ------------------------------------------------------------------ site and analysis

    def sub_models(self, params: Any, n_features: int) -> list[SubModel]:
        """Nested reconstructions the analysis scores as their own points (default: none)."""
        return []

    def feature_group(self, params: Any, n_features: int, feature: int) -> str | None:
        """A line a feature's page shows about where the feature sits (Matryoshka: its prefix)."""
        return None


def positive_count(name: str, value: int, n_features: int) -> None:
    if not 0 < value <= n_features:
        raise ValueError(f"needs 0 < {name} <= n_features, got {name}={value}, n_features={n_features}")


def finite(value: float) -> bool:
    return math.isfinite(value)
