"""The index page: the SAEs' metrics, training curves, the L0–MSE/FVU frontiers, the concept
figures, datasets and heads, and the index data file the scatter plots read."""

from __future__ import annotations

from typing import Any

import numpy as np

from saev_report import tables
from saev_report.render import charts
from saev_report.render.builder import SiteBuilder, group_rows, legend_names
from saev_report.render.queries import fetch_rows

CONCEPT_FIGURES = ("concept_ap", "concept_lift")  # drawn in the index's concept section, not among the sparsity charts
MAX_CURVE_POINTS = 2000


class IndexPage:
    def __init__(self, site: SiteBuilder):
        self.site = site

    def build(self) -> None:
        saes = []
        for s in self.site.saes:
            blank = {c.name: None for c in tables.TABLES["saes"].columns}  # older runs lack the splice columns
            saes.append({**blank, **s.metrics, "sae_id": s.sae_id, "model_label": s.model_label, "short": s.short, "list_page": s.list_page, "data_file": s.data_file, "n_pages": len(s.pages)})
        # Intervals over the validation images (the claims stage's `splice_summary`): per (SAE, head), and per head its clean score.
        splice_ci = {(r["sae_id"], r["head"]): r for r in fetch_rows(self.site.con, "SELECT * FROM splice_summary")}
        for row in saes:
            row["ci"] = {prefix: splice_ci.get((row["sae_id"], row[f"{prefix}_head"])) for prefix in ("cls", "seg")}
        head_ci = {head: r for (_, head), r in sorted(splice_ci.items())}
        logs: dict[str, dict[str, list[float]]] = {}
        for s in self.site.saes:
            rows = fetch_rows(self.site.con, "SELECT step, loss, mse, l0 FROM train_log WHERE sae_id = ? ORDER BY step", [s.sae_id])
            if len(rows) > MAX_CURVE_POINTS:  # keep the curve's shape, not every logged step
                rows = [rows[i] for i in np.linspace(0, len(rows) - 1, MAX_CURVE_POINTS).round().astype(int)]
            if rows:
                logs[s.sae_id] = {key: [r[key] for r in rows] for key in ("step", "loss", "mse", "l0")}
        names = legend_names(self.site.saes)
        figures = {
            "l0_mse": charts.metric_scatter(saes, "mse", "MSE"),
            "l0_fvu": charts.metric_scatter(saes, "fvu", "FVU"),
            "loss": charts.training_curves(logs, "loss", "training loss", names),
            "mse": charts.training_curves(logs, "mse", "training MSE", names),
            "l0": charts.training_curves(logs, "l0", "training L0", names),
        }
        if self.site.has_concepts:
            figures["concept_ap"], figures["concept_lift"] = self.concept_figures()
        figures = {k: v for k, v in figures.items() if v["data"]}
        scatter_saes = [{"sae_id": s["sae_id"], "short": s["short"], "data": s["data_file"]} for s in saes]
        self.site.write("data/index.js", charts.data_script("index", {"figures": figures, "saes": scatter_saes}))
        datasets = fetch_rows(
            self.site.con,
            "SELECT dataset, count(*) AS n, count(*) FILTER (WHERE status = 'ok' OR status IS NULL) AS n_ok, count(DISTINCT label) AS n_labels "
            "FROM images GROUP BY dataset ORDER BY dataset",
        )
        heads = fetch_rows(self.site.con, "SELECT head, model, task, val_accuracy, val_miou, n_train, n_val, len(classes) AS n_classes FROM heads ORDER BY head")
        for h in heads:
            h["ci"] = head_ci.get(h["head"])
        self.site.render("index.html", "index.html", saes=saes, figures=[f for f in figures if f not in CONCEPT_FIGURES], datasets=datasets,
                    heads=heads, stats=self.site.stats, concept_figures=[f for f in CONCEPT_FIGURES if f in figures])

    def concept_figures(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each SAE's best concept per live feature, next to the same under permuted labels (the null's
        best concept chosen the same way, by AP above chance): the AP box plots and the AP-lift tails."""
        rows = fetch_rows(
            self.site.con,
            "WITH lvl AS (SELECT sae_id, CASE WHEN bool_or(level = 'patch') THEN 'patch' ELSE 'image' END AS level FROM concepts GROUP BY 1), "
            "c AS (SELECT *, (null_ap - base_rate) / (1 - base_rate) AS null_lift FROM concepts) "
            "SELECT c.sae_id, any_value(lvl.level) AS level, arg_max(c.ap, c.ap_lift) AS ap, max(c.ap_lift) AS lift, "
            "arg_max(c.null_ap, c.null_lift) AS null_ap, max(c.null_lift) AS null_lift "
            "FROM c JOIN lvl USING (sae_id, level) JOIN features f USING (sae_id, feature) "
            "WHERE NOT f.dead GROUP BY c.sae_id, c.feature",
        )
        by_sae = group_rows(rows, lambda r: r["sae_id"])
        present = [s for s in self.site.saes if s.sae_id in by_sae]
        level = "/".join(sorted({r["level"] for r in rows})) or "patch"

        def series(*columns: str) -> list[dict[str, Any]]:
            return [{"name": self.site.sae_label(s.sae_id), **{c: [r[c] for r in by_sae[s.sae_id]] for c in columns}} for s in present]

        boxes = [{**b, "name": b["name"].replace(" ", "\n", 1)} for b in series("ap", "null_ap")]  # model above tag on the axis
        return charts.ap_distributions(boxes, level), charts.lift_tails(series("lift", "null_lift"), level)
