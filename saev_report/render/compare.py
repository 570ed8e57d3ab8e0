"""Comparison pages: for each pair of SAEs, the best-match histogram and the matched and unmatched
features as cards with their top exemplar's heat-map."""

from __future__ import annotations

from typing import Any

import numpy as np

from saev_report.render import addresses as addr
from saev_report.render import charts, heatmaps
from saev_report.render.builder import SaeInfo, SiteBuilder, group_rows
from saev_report.render.queries import fetch_rows

MAX_COMPARE_CARDS = 60


class ComparePages:
    def __init__(self, site: SiteBuilder):
        self.site = site

    def build(self) -> None:
        for comparison in [r["comparison"] for r in fetch_rows(self.site.con, "SELECT DISTINCT comparison FROM matches ORDER BY comparison")]:
            rows = fetch_rows(self.site.con, "SELECT * FROM matches WHERE comparison = ? ORDER BY sae_a, sae_b, score DESC", [comparison])
            directions = []
            maps: list[np.ndarray] = []  # heat-maps in the order the template shows the cards
            for (sae_a, sae_b), group in group_rows(rows, lambda r: (r["sae_a"], r["sae_b"])).items():
                directions.append(self.compare_direction(sae_a, sae_b, group, maps))
            heat = {"z": heatmaps.pack(maps)} if maps else None
            self.site.render("compare.html", addr.compare_page(comparison), comparison=comparison, directions=directions, heat=heat)
            self.site.stats.n_compare_pages += 1

    def feature_card(self, sae_id: str, feature: int, score: float | None = None, maps: list[np.ndarray] | None = None) -> dict[str, Any]:
        """A linked thumbnail of a feature's top exemplar; its heat-map (if known) is appended to `maps` in page order."""
        sae = self.site.sae_by_id(sae_id)
        top_map = sae.top_maps.get(int(feature)) if sae else None
        if top_map is not None and maps is not None:
            maps.append(top_map[1])
        return {
            "title": sae.title(feature) if sae else f"{sae_id}/{feature}",
            "href": sae.page(feature) if sae else None,
            "thumb": sae.thumbs.get(int(feature)) if sae else None,
            "grid": top_map[0] if top_map is not None and maps is not None else None,
            "label": sae.top_labels.get(int(feature)) if sae else None,
            "score": score,
        }

    def compare_direction(self, sae_a: str, sae_b: str, rows: list[dict[str, Any]], maps: list[np.ndarray]) -> dict[str, Any]:
        counts, edges = charts.score_histogram([r["score"] for r in rows])
        matched = [r for r in rows if r["matched"]]
        unmatched = [r for r in rows if not r["matched"]]
        a, b = self.site.sae_by_id(sae_a), self.site.sae_by_id(sae_b)

        def has_page(sae: SaeInfo | None, feature: int) -> bool:
            return sae is not None and sae.page(feature) is not None

        # Cards with pictures first: a pair whose features both have pages, then by score.
        matched.sort(key=lambda r: (-(has_page(a, r["feature_a"]) + has_page(b, r["feature_b"])), -(r["score"] or 0.0)))
        unmatched.sort(key=lambda r: (not has_page(a, r["feature_a"]), r["score"] if r["score"] is not None else -2))
        n_matched = len(matched)
        matched, unmatched = matched[:MAX_COMPARE_CARDS], unmatched[:MAX_COMPARE_CARDS]
        # Cards in template order (pairs a, b; then unmatched), so their heat-maps line up with `maps`.
        pairs = [
            {"a": self.feature_card(sae_a, r["feature_a"], maps=maps), "b": self.feature_card(sae_b, r["feature_b"], maps=maps), "score": r["score"], "mutual": r["mutual"]}
            for r in matched
        ]
        lonely = [self.feature_card(sae_a, r["feature_a"], r["score"], maps=maps) for r in unmatched]
        return {
            "sae_a": sae_a,
            "sae_b": sae_b,
            "label_a": a.short if a else sae_a,
            "label_b": b.short if b else sae_b,
            "n": len(rows),
            "n_matched": n_matched,
            "n_mutual": sum(1 for r in rows if r["mutual"]),
            "hist": charts.svg_histogram(counts, edges, width=420, height=110, x_label="best-match correlation", unit="features"),
            "pairs": pairs,
            "unmatched": lonely,
        }
