"""Concept pages: one page per tested concept with dose-response curves (plotly), the controls on
the same axes, and before/after examples; plus an overview of every concept's strongest edit.

Everything is read through DuckDB: the summaries (with bootstrap intervals over images) from
`experiment_summary`, the examples from `experiments`. Pages live under `concepts/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Protocol

import duckdb

from saev_report.render import addresses as addr
from saev_report.render import charts, overlays
from saev_report.render.queries import fetch_rows
from saev_report.spec import ReportSpec


class ConceptSite(Protocol):
    """What the concept pages need of the site being built (`site.SiteBuilder` is one); typed here
    so that this module never imports the builder that calls it."""

    con: duckdb.DuckDBPyConnection
    staging: Path
    report: ReportSpec
    stats: Any
    """Counts the build reports; this module adds to `n_images_rendered`."""

    def render(self, template: str, page: str, **context: Any) -> None: ...
    def write(self, rel: str, text: str) -> None: ...
    def img(self, kind: str, name: str | None) -> str: ...
    def thumb(self, path: str | None, px: int) -> str | None: ...
    def ensure_thumbnails(self, paths: Iterable[str | None], px: int) -> None: ...
    def previous_file(self, rel: str) -> Path | None: ...
    def sae_label(self, sae_id: str) -> str: ...

ARM_STYLE = {"concept": "solid", "random": "dot", "other": "dash"}
ARM_NAME = {"concept": "its top features", "random": "random features (frequency-matched)", "other": "another concept's top features"}
EXAMPLES = 4

SUMMARY_SQL = """
SELECT * FROM experiment_summary ORDER BY level, concept, sae_id, head, "where", arm, m, factor
"""
"""The concept pages read the `claims` stage's one aggregation of the `experiments` rows (with its
intervals), the same table `saev-report check` and the Claims page read."""


def concept_page(level: str, concept: str) -> str:
    return f"concepts/{addr.safe_name(level)}-{addr.safe_name(concept)}.html"


def effect_key(task: str) -> tuple[str, str]:
    """The summary column a dose-response curve plots for a task, and its axis title."""
    if task == "segmentation":
        return "removed_frac", "concept's predicted pixels removed"
    return "p_delta", "change of the concept's probability"


def dose_response(rows: list[dict[str, Any]], title: str) -> dict[str, Any]:
    """Plotly figure: effect against factor, one line per (arm, m); colour = m, dash = arm.

    `rows` are summary rows of one (SAE, head, concept, where). The factor axis runs from 1 (no edit)
    down to the most negative factor, the direction of the edit.
    """
    key, y_title = effect_key(rows[0]["task"]) if rows else ("removed_frac", "")
    ms = sorted({r["m"] for r in rows})
    traces = []
    for arm in ("concept", "random", "other"):
        for i, m in enumerate(ms):
            line = sorted((r for r in rows if r["arm"] == arm and r["m"] == m), key=lambda r: -r["factor"])
            if not line:
                continue
            name = f"m={m}: {ARM_NAME[arm]}"
            colour = charts.PALETTE[i % len(charts.PALETTE)]
            lo, hi = [r.get(f"{key}_lo") for r in line], [r.get(f"{key}_hi") for r in line]
            if arm != "other" and all(v is not None for v in lo + hi):
                traces.append({  # the interval over images, as a band under the line
                    "type": "scatter", "mode": "lines", "name": charts.plotly_text(f"{name}: {CONFIDENCE_NOTE}"),
                    "x": [r["factor"] for r in line] + [r["factor"] for r in reversed(line)],
                    "y": charts.round_sig(hi + lo[::-1]), "fill": "toself", "fillcolor": colour, "opacity": 0.15 if arm == "concept" else 0.08,
                    "line": {"width": 0, "color": colour}, "hoverinfo": "skip", "showlegend": False,
                })
            traces.append({
                "type": "scatter", "mode": "lines+markers", "name": charts.plotly_text(name),
                "x": [r["factor"] for r in line], "y": charts.round_sig([r[key] if r[key] is not None else float("nan") for r in line]),
                "line": {"color": charts.PALETTE[i % len(charts.PALETTE)], "dash": ARM_STYLE[arm], "width": 2 if arm == "concept" else 1.5},
                "customdata": [[_fmt(r.get(f"{key}_lo")), _fmt(r.get(f"{key}_hi"))] for r in line],
                "hovertemplate": charts.plotly_text(name) + "<br>factor %{x}<br>" + y_title + " %{y} [%{customdata[0]}, %{customdata[1]}]<extra></extra>",
            })
    layout = charts.base_layout(title, "factor the features are scaled by (1 = no edit)", y_title, height=360)
    layout["xaxis"]["autorange"] = "reversed"
    layout["legend"] = {"orientation": "v", "x": 1.02, "xanchor": "left", "y": 1, "font": {"size": 11}}
    layout["margin"]["r"] = 260
    return {"data": traces, "layout": layout}


CONFIDENCE_NOTE = "bootstrap interval over images"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def strongest(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The concept arm's strongest setting (largest m, most negative factor, `all` patches if run)
    with the controls at the same setting: the row a reader compares first."""
    own = [r for r in rows if r["arm"] == "concept"]
    if not own:
        return None
    where = "all" if any(r["where"] == "all" for r in own) else own[0]["where"]
    m = max(r["m"] for r in own if r["where"] == where)
    factor = min(r["factor"] for r in own if r["where"] == where and r["m"] == m)
    at = {r["arm"]: r for r in rows if r["where"] == where and r["m"] == m and r["factor"] == factor}
    key, _ = effect_key(own[0]["task"])
    side = "other_changed_frac" if key == "removed_frac" else "other_p_delta"
    return {"m": m, "factor": factor, "where": where, "key": key,
            **{f"{arm}_{name}{end}": (at[arm].get(col + end) if arm in at else None)
               for arm in ARM_STYLE for name, col in (("effect", key), ("side", side)) for end in ("", "_lo", "_hi")},
            "flip_frac": at["concept"].get("flip_frac") if "concept" in at else None}


def build_concept_pages(builder: ConceptSite) -> list[dict[str, Any]]:
    """Render `concepts/index.html` and one page per concept; returns the overview rows."""

    summary = fetch_rows(builder.con, SUMMARY_SQL)
    if not summary:
        return []
    classes = {r["head"]: r["classes"] or [] for r in fetch_rows(builder.con, "SELECT head, classes FROM heads")}
    by_concept: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in summary:
        by_concept.setdefault((r["level"], r["concept"]), []).append(r)
    overview = []
    for (level, concept), rows in by_concept.items():
        page = concept_page(level, concept)
        panels = []
        for key in sorted({(r["sae_id"], r["head"], r["where"]) for r in rows}):
            sid, head, where = key
            group = [r for r in rows if (r["sae_id"], r["head"], r["where"]) == key]
            label = builder.sae_label(sid)
            figure = dose_response(group, f"{label} · head {head} · edited on {'every patch' if where == 'all' else 'the concept’s patches'}")
            best = strongest(group)
            panels.append({"sae_id": sid, "label": label, "head": head, "where": where, "task": group[0]["task"],
                           "figure_id": f"dose-{len(panels)}", "figure": figure, "best": best,
                           "examples": examples(builder, sid, head, level, concept, where, best, classes.get(head, []))})
            if best:
                overview.append({"level": level, "concept": concept, "href": page, "sae_id": sid, "label": label, "head": head,
                                 "task": group[0]["task"], "n_images": group[0]["n_images"], **best})
        builder.write(f"data/{page.removesuffix('.html')}.js",
                      charts.data_script(page, {p["figure_id"]: p["figure"] for p in panels}))
        builder.render("concept.html", page, level=level, concept=concept, panels=panels, data_key=page,
                       data_file=f"data/{page.removesuffix('.html')}.js")
    builder.render("concepts.html", "concepts/index.html", overview=overview)
    return overview


def examples(builder: ConceptSite, sae_id: str, head: str, level: str, concept: str, where: str,
             best: dict[str, Any] | None, classes: list[str]) -> list[dict[str, Any]]:
    """Up to EXAMPLES images at the strongest setting: the image, and (segmentation) the class maps
    before and after, or (classification) the probability before and after."""

    if best is None:
        return []
    rows = fetch_rows(
        builder.con,
        "SELECT x.*, i.path FROM experiments x LEFT JOIN images i ON i.dataset = x.dataset AND i.image_idx = x.image_idx "
        "WHERE x.sae_id = ? AND x.head = ? AND x.level = ? AND x.concept = ? AND x.\"where\" = ? AND x.arm = 'concept' "
        "AND x.m = ? AND x.factor = ? ORDER BY x.image_idx LIMIT ?",
        [sae_id, head, level, concept, where, best["m"], best["factor"], EXAMPLES],
    )
    px = builder.report.thumbnail_px
    builder.ensure_thumbnails((r["path"] for r in rows), px)
    out = []
    for r in rows:
        thumb = builder.thumb(r["path"], px)
        item = {"image_idx": r["image_idx"], "image": builder.img("t", thumb), "maps": {"before_map": None, "after_map": None}, "p_before": r["p_before"], "p_after": r["p_after"],
                "removed_frac": r["removed_frac"], "other_changed_frac": r["other_changed_frac"]}
        for key in ("before_map", "after_map"):
            classes_p = list(r.get(key) or [])
            side = int(round(len(classes_p) ** 0.5))
            if thumb and classes_p and side * side == len(classes_p):
                name = overlays.classmap_name(thumb, (side, side), classes_p)
                rel = addr.image_file("s", name)
                if not overlays.place(builder.staging / rel, builder.previous_file(rel)):
                    overlays.render_class_map(str(builder.staging / addr.image_file("t", thumb)), str(builder.staging / rel), (side, side), classes_p)
                    builder.stats.n_images_rendered += 1
                item["maps"][key] = rel
        out.append(item)
    return out
