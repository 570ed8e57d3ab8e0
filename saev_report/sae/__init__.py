"""Sparse autoencoders: one module per kind, a registry, and the module and sparse path they share.

    base.py        SparseAutoencoder: weights, normalisation, decode, the training forward
    sparse.py      active (patch, feature) pairs; encoder and decoder differentiated at them only
    kind.py        SAEKind: what a kind declares (params, encode, pairs, loss, hooks)
    registry.py    KINDS: every kind by name
    relu.py topk.py batchtopk.py jumprelu.py matryoshka.py    the kinds; auxk.py: AuxK for the TopK family
    checkpoint.py  our checkpoints and the paper's reference code's
"""

from saev_report.sae.base import THRESHOLD_EMA_BETA, SparseAutoencoder
from saev_report.sae.batchtopk import batch_topk_pairs
from saev_report.sae.checkpoint import (
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    REFERENCE_NAMES,
    WEIGHT_FILE,
    checkpoint_params,
    load_reference_checkpoint,
    load_sae,
    read_sae_config,
    save_sae,
)
from saev_report.sae.kind import LossContext, SAEKind, SubModel, TrainForward
from saev_report.sae.registry import KINDS, kind_named
from saev_report.sae.sparse import ActivePairs, stable_argsort
from saev_report.sae.topk import topk_pairs

__all__ = [
    "ActivePairs", "CHECKPOINT_FORMAT", "CONFIG_FILE", "KINDS", "LossContext", "REFERENCE_NAMES", "SAEKind", "SparseAutoencoder",
    "SubModel", "THRESHOLD_EMA_BETA", "TrainForward", "WEIGHT_FILE", "batch_topk_pairs", "checkpoint_params", "kind_named",
    "load_reference_checkpoint", "load_sae", "read_sae_config", "save_sae", "stable_argsort", "topk_pairs",
]
