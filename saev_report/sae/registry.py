"""Every SAE kind, by name: the spec, the training loop, the tags, the tables and the site
learn the kinds from here. Adding a kind: its module beside this one, one line below, its test
(docs/ARCHITECTURE.md, "Adding an SAE kind")."""

from __future__ import annotations

from saev_report.sae import batchtopk, jumprelu, matryoshka, relu, topk
from saev_report.sae.kind import SAEKind

KINDS: dict[str, SAEKind] = {module.KIND.name: module.KIND for module in (relu, topk, batchtopk, jumprelu, matryoshka)}
"""Registered kinds, in the order the docs list them."""


def kind_named(name: str) -> SAEKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown SAE kind {name!r}; expected one of {', '.join(KINDS)}") from None
