"""The Claims page: each declared claim in words with its verdict, the replicates (seeds) side by
side, and per concept the evidence it rests on — intervals against thresholds, corrected p-values
against the controls — linked to the concept pages.

It reads the `claims` and `claim_evidence` tables, the ones `saev-report check` prints."""

from __future__ import annotations

from typing import Any, Protocol

import duckdb

from saev_report.render.concepts import concept_page
from saev_report.render.queries import fetch_rows


class ClaimsSite(Protocol):
    """What the Claims page needs of the site being built (`site.SiteBuilder` is one)."""

    con: duckdb.DuckDBPyConnection

    def render(self, template: str, page: str, **context: Any) -> None: ...
    def sae_label(self, sae_id: str) -> str: ...


PAGE = "claims.html"


def claim_views(con: duckdb.DuckDBPyConnection, has_concept_pages: bool) -> list[dict[str, Any]]:
    """One view per claim: its row, and its evidence grouped by replicate, then by concept."""
    claims = fetch_rows(con, "SELECT * FROM claims ORDER BY claim")
    evidence = fetch_rows(con, 'SELECT * FROM claim_evidence ORDER BY claim, sae_id, concept NULLS FIRST, "check" DESC, label')
    views = []
    for claim in claims:
        rows = [e for e in evidence if e["claim"] == claim["claim"]]
        replicates = []
        for sae_id, verdict in zip(claim["replicates"] or [], claim["replicate_verdicts"] or []):
            mine = [e for e in rows if e["sae_id"] == sae_id]
            concepts: dict[str | None, list[dict[str, Any]]] = {}
            for e in mine:
                concepts.setdefault(e["concept"], []).append(e)
            setting = next(({"m": e["m"], "factor": e["factor"], "where": e["where"], "images": e["images"]} for e in mine if e["m"] is not None), None)
            replicates.append({
                "sae_id": sae_id, "verdict": verdict, "seed": mine[0]["seed"] if mine else None, "setting": setting,
                "concepts": [{"concept": c, "verdict": items[0]["concept_verdict"], "checks": items,
                              "href": concept_page(items[0]["level"], c) if c is not None and items[0]["level"] and has_concept_pages else None}
                             for c, items in concepts.items()],
            })
        views.append({**claim, "replicate_views": replicates})
    return views


def build_claims_page(builder: ClaimsSite, has_concept_pages: bool) -> bool:
    """Render `claims.html` when the run has claims; returns whether it did."""
    views = claim_views(builder.con, has_concept_pages)
    if not views:
        return False
    labels = {s: builder.sae_label(s) for v in views for s in v["replicates"] or []}
    builder.render("claims.html", PAGE, claims=views, labels=labels)
    return True
