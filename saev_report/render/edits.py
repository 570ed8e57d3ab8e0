"""Edit pages: each edit's before/after (marked patches, class maps or top-5 bars) next to its
control, and the edits index with each group's summary."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from saev_report.render import addresses as addr
from saev_report.render import overlays
from saev_report.render.builder import SiteBuilder
from saev_report.render.queries import fetch_rows


class EditPages:
    def __init__(self, site: SiteBuilder):
        self.site = site

    def edit_grid(self, sae_id: str, row: dict[str, Any]) -> tuple[int, int] | None:
        """Patch grid of an edit: from the SAE's exemplars, else a square map."""
        rows = fetch_rows(self.site.con, "SELECT grid_h, grid_w FROM exemplars WHERE sae_id = ? AND grid_h > 0 LIMIT 1", [sae_id])
        if rows:
            return int(rows[0]["grid_h"]), int(rows[0]["grid_w"])
        for key in ("before_map", "after_map"):
            n = len(row.get(key) or [])
            if n and math.isqrt(n) ** 2 == n:
                return math.isqrt(n), math.isqrt(n)
        return None

    def build(self) -> None:
        rows = fetch_rows(
            self.site.con,
            "SELECT e.*, i.path, i.label AS image_label FROM edits e "
            "LEFT JOIN images i ON i.dataset = e.dataset AND i.image_idx = e.image_idx ORDER BY e.edit, e.edit_id",
        )
        if not rows:
            return
        classes = {r["head"]: r["classes"] or [] for r in fetch_rows(self.site.con, "SELECT head, classes FROM heads")}
        px = max(2 * self.site.report.thumbnail_px, 256)
        self.site.ensure_thumbnails((r["path"] for r in rows), px)
        controls = {r["edit_id"]: r for r in rows if r["is_control"]}
        real = [r for r in rows if not r["is_control"]]
        grids: dict[str, tuple[int, int] | None] = {}
        for r in rows:
            if r["sae_id"] not in grids:
                grids[r["sae_id"]] = self.edit_grid(r["sae_id"], r)
            self.decorate_edit(r, grids[r["sae_id"]], px, classes.get(r["head"], []))
        for r in real:
            r["control"] = controls.get(f"{r['edit_id']}/control")
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in real:
            groups.setdefault(r["edit"], []).append(r)
        summary = [edit_summary(name, group, [g["control"] for g in group if g["control"]]) for name, group in groups.items()]
        # The claims stage's `edit_summary` (means over images, with intervals) replaces the per-edit means where it exists.
        pooled = {(r["edit"], bool(r["is_control"])): r for r in fetch_rows(self.site.con, "SELECT * FROM edit_summary")}
        for s in summary:
            for side, is_control in (("real", False), ("control", True)):
                row = pooled.get((s["edit"], is_control))
                if row is not None:
                    s[side].update({"target_delta": row["target_delta"], "target_delta_lo": row["target_delta_lo"], "target_delta_hi": row["target_delta_hi"],
                                    "flip_rate": row["flip_frac"], "flip_rate_lo": row["flip_frac_lo"], "flip_rate_hi": row["flip_frac_hi"],
                                    "n_images": row["n_images"]})
        for r in real:
            self.site.render("edit.html", r["href"], e=r, c=r["control"])
            self.site.stats.n_edit_pages += 1
        self.site.render("edits.html", "edits/index.html", groups=groups, summary=summary)

    def decorate_edit(self, r: dict[str, Any], grid: tuple[int, int] | None, px: int, classes: list[str]) -> None:
        """Add page address, titles, links and images (marks, class maps) to an edit row."""
        sae = self.site.sae_by_id(r["sae_id"])
        r["href"] = addr.edit_page(r["edit_id"].removesuffix("/control"))
        r["feature_links"] = [
            {"title": sae.title(f) if sae else f"{r['sae_id']}/{f}", "href": sae.page(f) if sae else None, "label": sae.top_labels.get(int(f)) if sae else None}
            for f in (r["features"] or [])
        ]
        thumb = self.site.thumb(r["path"], px)
        r["image"] = self.site.img("t", thumb)
        r["marks"] = r["image"]
        patches = list(r["patches"] or [])
        if thumb and grid:
            name = overlays.marks_name(thumb, grid, patches)
            rel = addr.image_file("m", name)
            if not overlays.place(self.site.staging / rel, self.site.previous_file(rel)):
                overlays.render_marks(str(self.site.staging / addr.image_file("t", thumb)), str(self.site.staging / rel), grid, patches)
                self.site.stats.n_images_rendered += 1
            r["marks"] = rel
        r["all_patches"] = grid is not None and len(set(patches)) >= grid[0] * grid[1]
        r["maps"] = {}
        for key in ("before_map", "after_map"):
            classes_p = list(r.get(key) or [])
            if thumb and grid and len(classes_p) == grid[0] * grid[1]:
                name = overlays.classmap_name(thumb, grid, classes_p)
                rel = addr.image_file("s", name)
                if not overlays.place(self.site.staging / rel, self.site.previous_file(rel)):
                    overlays.render_class_map(str(self.site.staging / addr.image_file("t", thumb)), str(self.site.staging / rel), grid, classes_p)
                    self.site.stats.n_images_rendered += 1
                r["maps"][key] = rel
        r["bars"] = classification_bars(r)
        r["legend"] = segmentation_legend(r, classes)


def classification_bars(r: dict[str, Any]) -> dict[str, list[dict[str, Any]]] | None:
    """Top-5 before/after as (class, probability, is_target) rows for CSS bars."""
    if not r.get("before_top"):
        return None

    def rows(top: list[str] | None, probs: list[float] | None) -> list[dict[str, Any]]:
        return [
            {"label": c, "p": float(p or 0.0), "width": round(100 * min(max(float(p or 0.0), 0.0), 1.0), 1), "target": c == r.get("target_class")}
            for c, p in zip(top or [], probs or [])
        ]

    return {"before": rows(r["before_top"], r.get("before_probs")), "after": rows(r.get("after_top"), r.get("after_probs"))}

def segmentation_legend(r: dict[str, Any], classes: list[str]) -> list[dict[str, Any]]:
    """Classes present in either map, with their colour and patch/pixel counts before and after."""
    before_map, after_map = list(r.get("before_map") or []), list(r.get("after_map") or [])
    if not before_map and not after_map:
        return []
    before_px, after_px = list(r.get("before_pixels") or []), list(r.get("after_pixels") or [])
    present = sorted({c for c in before_map + after_map if c >= 0})
    legend = []
    for c in present:
        rgb = overlays.class_color(c)
        legend.append(
            {
                "name": classes[c] if c < len(classes) else f"class_{c}",
                "color": "#%02x%02x%02x" % rgb,
                "before": before_map.count(c),
                "after": after_map.count(c),
                "before_px": before_px[c] if c < len(before_px) else None,
                "after_px": after_px[c] if c < len(after_px) else None,
                "target": (classes[c] if c < len(classes) else None) == r.get("target_class"),
            }
        )
    return legend

def edit_summary(name: str, edits: list[dict[str, Any]], controls: list[dict[str, Any]]) -> dict[str, Any]:
    """Median specificity, mean target change and flip rate of an edit group and its controls."""

    def stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
        def values(key: str) -> list[float]:
            return [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]

        spec, delta, flips = values("specificity"), values("target_delta"), [bool(r["flipped"]) for r in rows if r.get("flipped") is not None]
        return {
            "n": len(rows),
            "specificity": float(np.median(spec)) if spec else None,
            "target_delta": float(np.mean(delta)) if delta else None,
            "flip_rate": sum(flips) / len(flips) if flips else None,
            # intervals over images, from the claims stage's `edit_summary` when the run has it
            "target_delta_lo": None, "target_delta_hi": None, "flip_rate_lo": None, "flip_rate_hi": None,
        }

    return {"edit": name, "task": edits[0]["task"] if edits else None, "real": stats(edits), "control": stats(controls)}
