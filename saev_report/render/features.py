"""Feature pages and each SAE's feature list: the bulk of a site (24K pages per SAE at the paper's width).

Page weight: a feature page holds only what must show without scripts; what every page of an SAE
would repeat (image labels and their counts, band names, concepts' chance and support, the other
SAEs and comparisons) is written once, to the SAE's data file, and pages name those things by
position (see `SaeInfo.label_pos`). The positional lists' fields are declared in `contract`.

Scale: per SAE, the small per-feature columns are read once (a few MB at 24K features); pages are
built `CHUNK_FEATURES` at a time from range queries on the exemplar, sample, class-split and
similarity tables, so memory does not grow with the dictionary, and each chunk's exemplar rows are
handled as columns (`ExemplarColumns`: one numpy pass quantises all their maps). A chunk's page
contexts are kept in the page cache (`site.page_cache_key`) for template-only rebuilds.
"""

from __future__ import annotations

import pickle
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from markupsafe import Markup, escape

from saev_report import fsutil
from saev_report.progress import bar, log
from saev_report.render import addresses as addr
from saev_report.render import charts, heatmaps
from saev_report.render import contract
from saev_report.render.builder import SaeInfo, SiteBuilder, fmt_num, group_rows
from saev_report.render.queries import fetch_rows, fetch_table

CONCEPTS_SHOWN = 3
CHUNK_FEATURES = 2048  # feature pages per round of range queries: bounds memory at any dictionary width
BAND_NAMES = ["lowest quarter", "second quarter", "third quarter", "top quarter"]  # quantile bands, 0 = lowest


class FeaturePages:
    """Every SAE's data file, feature pages and list page."""

    def __init__(self, site: SiteBuilder):
        self.site = site
        self._labels_html: dict[str | None, Markup] = {}
        self._recorded: list[tuple[str, dict[str, Any]]] | None = None  # feature pages of the chunk being built

    def build(self) -> None:
        indexes = {}
        for sae in self.site.saes:  # every page set first, so cross-links between SAEs know which pages exist
            indexes[sae.sae_id] = self.feature_index(sae)
            self.choose_pages(sae, indexes[sae.sae_id])
        self.site.n_pages_total = sum(len(s.pages) for s in self.site.saes)
        for sae in self.site.saes:
            self.build_sae(sae, indexes.pop(sae.sae_id))
        self.site.flush_pages(wait=True)

    def feature_index(self, sae: SaeInfo) -> pa.Table:
        concept = ", best_concept, best_concept_ap" if self.site.has_concepts else ""
        return fetch_table(
            self.site.con,
            "SELECT feature, n_fire, freq, log10_freq, mean_act, log10_mean_act, max_act, dead, dense, top_label, label_purity"
            f"{concept} FROM features WHERE sae_id = ? ORDER BY feature",
            [sae.sae_id],
        )

    def choose_pages(self, sae: SaeInfo, index: pa.Table) -> None:
        """Alive features get pages; with `feature_pages`, only the strongest (by max activation), plus every
        feature an edit names, so that edit pages always link to a page."""
        feature = index.column("feature").to_numpy().astype(np.int64)
        max_act = np.nan_to_num(index.column("max_act").to_numpy(zero_copy_only=False).astype(np.float64), nan=0.0)
        dead = index.column("dead").to_numpy(zero_copy_only=False)
        alive = ~np.array([bool(d) for d in dead], dtype=bool) & (max_act > 0)
        chosen = np.flatnonzero(alive)
        sae.capped = self.site.report.feature_pages is not None and len(chosen) > self.site.report.feature_pages
        if sae.capped:
            order = np.argsort(-max_act[chosen], kind="stable")[: self.site.report.feature_pages]
            chosen = chosen[order]
        edited = [int(r["f"]) for r in fetch_rows(self.site.con, "SELECT DISTINCT unnest(features) AS f FROM edits WHERE sae_id = ?", [sae.sae_id])]
        sae.pages = np.union1d(feature[chosen], np.intersect1d(feature, np.asarray(edited, dtype=np.int64)))
        labels = index.column("top_label").to_pylist()
        sae.top_labels = {int(f): l for f, l in zip(feature, labels) if l is not None}

    def build_sae(self, sae: SaeInfo, index: pa.Table) -> None:
        """Thumbnails, the SAE's data file, its feature pages (in chunks of features) and its list page."""
        self.site.con.register("_pages", pa.table({"feature": pa.array(sae.pages, type=pa.int32())}))
        self.ensure_sae_thumbnails(sae)
        self.load_shared(sae)
        self.site.write(sae.data_file, charts.data_script(sae.data_file, self.sae_columns(sae, index)))
        edits, matches = self.edits_by_feature(sae), self.matches_by_feature(sae)
        pages = sae.pages.tolist()
        with bar(f"pages {sae.sae_id}", total=len(pages), unit="page") as b:
            for start in range(0, len(pages), CHUNK_FEATURES):
                chunk = pages[start : start + CHUNK_FEATURES]
                self.feature_chunk(sae, chunk, pages, start, edits, matches)
                b.advance(len(chunk))
        self.site.con.unregister("_pages")
        self.site.render("sae.html", sae.list_page, sae=sae, n_pages=len(pages), n_features=index.num_rows)

    def ensure_sae_thumbnails(self, sae: SaeInfo) -> None:
        """One thumbnail per distinct image any page of this SAE shows; `sae.thumbs` = each feature's top image."""
        k = self.site.report.exemplars_shown
        px = self.site.report.thumbnail_px
        shown = fetch_rows(
            self.site.con,
            "SELECT DISTINCT i.path FROM ("
            " SELECT e.dataset, e.image_idx FROM exemplars e JOIN _pages USING (feature) WHERE e.sae_id = ? AND e.rank < ?"
            " UNION SELECT q.dataset, q.image_idx FROM quantile_exemplars q JOIN _pages USING (feature) WHERE q.sae_id = ?"
            " UNION SELECT dataset, image_idx FROM exemplars WHERE sae_id = ? AND rank = 0"
            ") x JOIN images i ON i.dataset = x.dataset AND i.image_idx = x.image_idx ORDER BY i.path",
            [sae.sae_id, k, sae.sae_id, sae.sae_id],
        )
        self.site.ensure_thumbnails((r["path"] for r in shown), px)
        sae.thumb_list = sorted({addr.image_file("t", n) for n in (self.site.thumb(r["path"], px) for r in shown) if n})
        sae.thumb_pos = {t: i for i, t in enumerate(sae.thumb_list)}
        top = fetch_rows(
            self.site.con,
            "SELECT e.feature, i.path FROM exemplars e LEFT JOIN images i ON i.dataset = e.dataset AND i.image_idx = e.image_idx "
            "WHERE e.sae_id = ? AND e.rank = 0",
            [sae.sae_id],
        )
        for r in top:
            name = self.site.thumb(r["path"], px)
            if name:
                sae.thumbs[int(r["feature"])] = addr.image_file("t", name)

    def load_shared(self, sae: SaeInfo) -> None:
        """What every page of the SAE would repeat (see `SaeInfo.label_pos`): read once, written to its data file."""
        labels = [r["label"] for r in fetch_rows(
            self.site.con, "SELECT label FROM images WHERE label IS NOT NULL UNION SELECT label FROM class_split WHERE sae_id = ? AND label IS NOT NULL "
            "ORDER BY label", [sae.sae_id])]
        sae.label_pos = {label: i for i, label in enumerate(labels)}
        # The most common count per label: a feature that saw another count carries its own (see render_feature_chunk).
        sae.label_images = {r["label"]: int(r["n"]) for r in fetch_rows(
            self.site.con, "SELECT label, mode(n_images) AS n FROM class_split WHERE sae_id = ? AND label IS NOT NULL GROUP BY label", [sae.sae_id])}
        if self.site.has_concepts:
            sae.concept_base = [contract.CONCEPT_BASE.pack(concept=r["concept"], level=r["level"], chance=charts.sig(r["base_rate"], 3), support=r["support"]) for r in fetch_rows(
                self.site.con, "SELECT concept, level, any_value(base_rate) AS base_rate, any_value(support) AS support FROM concepts "
                "WHERE sae_id = ? GROUP BY concept, level ORDER BY level DESC, concept", [sae.sae_id])]

    def exemplar_columns(self, table: pa.Table, lo: int) -> ExemplarColumns:
        """A chunk's exemplar rows (sorted by feature) as columns: one numpy pass per chunk, not one per row."""
        px = self.site.report.thumbnail_px
        feature_r = table.column("feature").to_numpy(zero_copy_only=False).astype(np.int64)
        thumbs = [self.site.thumb(path, px) for path in table.column("path").to_pylist()]
        acts = table.column("patch_acts").combine_chunks()
        lengths_r = pc.fill_null(pc.list_value_length(acts), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        grid_h = pc.fill_null(table.column("grid_h"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        grid_w = pc.fill_null(table.column("grid_w"), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        # No heat-map over a missing picture (the placeholder shows alone), nor from a malformed map.
        has_map_r = (acts.is_valid().to_numpy(zero_copy_only=False) & (grid_h > 0) & (grid_h * grid_w == lengths_r)
                     & np.array([t is not None for t in thumbs], dtype=bool))
        return ExemplarColumns(
            lo=lo, feature_r=feature_r, lengths_r=lengths_r, has_map_r=has_map_r,
            act_r=table.column("act").to_numpy(zero_copy_only=False).astype(np.float64),
            acts_v=pc.list_flatten(acts).to_numpy(zero_copy_only=False).astype(np.float64),
            grids=[f"{h}x{w}" for h, w in zip(grid_h.tolist(), grid_w.tolist())],
            srcs=[self.site.img("t", t) for t in thumbs], labels=table.column("label").to_pylist(),
            bands=table.column("band").to_pylist() if "band" in table.column_names else None,
        )

    def escaped_label(self, label: str | None) -> Markup:
        if label not in self._labels_html:
            self._labels_html[label] = escape(label) if label is not None else Markup("unlabelled")
        return self._labels_html[label]

    def chunk_table(self, sql: str, sae: SaeInfo, lo: int, hi: int, *params: Any) -> pa.Table:
        return fetch_table(self.site.con, sql, [sae.sae_id, lo, hi, *params])

    def feature_chunk(self, sae: SaeInfo, chunk: list[int], pages: list[int], offset: int,
                      edits: dict[int, list[dict[str, Any]]], matches: dict[int, list[dict[str, Any]]]) -> None:
        """Feature pages of `chunk`: from the page cache when it holds them, else built (and cached)."""
        path = self.site.page_cache / f"{sae.slug.replace('/', '_')}-{sae.model}-{offset}.pkl" if self.site.page_cache else None
        saved = _read_chunk(path, chunk) if path is not None else None
        if saved is not None:
            for page, context in saved["pages"]:
                self.site.render_later("feature.html", page, **context)
            self.site.stats.n_feature_pages += len(saved["pages"])
            self.site.stats.n_heatmaps += saved["n_heatmaps"]
            sae.top_maps.update(saved["top_maps"])
            return
        heatmaps_before, self._recorded = self.site.stats.n_heatmaps, []
        try:
            self.render_feature_chunk(sae, chunk, pages, offset, edits, matches)
            recorded = self._recorded
        finally:
            self._recorded = None
        if path is not None:
            record = {"features": chunk, "pages": recorded, "n_heatmaps": self.site.stats.n_heatmaps - heatmaps_before,
                      "top_maps": {f: sae.top_maps[f] for f in chunk if f in sae.top_maps}}
            try:
                fsutil.atomic_write_bytes(path, pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError as exc:  # a cache, not an output: a full disk must not fail the site
                log(f"  [yellow]page cache not written[/] ({exc}); the next render rebuilds these pages")

    def render_feature_chunk(self, sae: SaeInfo, chunk: list[int], pages: list[int], offset: int,
                             edits: dict[int, list[dict[str, Any]]], matches: dict[int, list[dict[str, Any]]]) -> None:
        """Feature pages of `chunk` (sorted ids): a few range queries, then one template render per page."""
        lo, hi = chunk[0], chunk[-1]
        wanted = set(chunk)
        joined = "FROM {t} e LEFT JOIN images i ON i.dataset = e.dataset AND i.image_idx = e.image_idx WHERE e.sae_id = ? AND e.feature BETWEEN ? AND ?"
        columns = "e.feature, e.rank, e.dataset, e.image_idx, e.act, e.grid_h, e.grid_w, e.patch_acts, i.path, i.label"
        top = self.exemplar_columns(self.chunk_table(
            f"SELECT {columns} {joined.format(t='exemplars')} AND e.rank < ? ORDER BY e.feature, e.rank", sae, lo, hi, self.site.report.exemplars_shown), lo)
        samples = self.exemplar_columns(self.chunk_table(
            f"SELECT {columns}, e.band {joined.format(t='quantile_exemplars')} ORDER BY e.feature, e.band DESC, e.rank", sae, lo, hi), lo)
        # One colour scale per feature: its strongest shown exemplar (top images and band samples alike).
        vmax_f = np.zeros(hi - lo + 1)
        for ex in (top, samples):
            np.maximum.at(vmax_f, ex.feature_r - lo, np.nan_to_num(ex.act_r, nan=0.0))
        top.quantize(vmax_f)
        samples.quantize(vmax_f)
        # (has a heat-map, thumbnail, caption) per top image, escaped once here: millions of tiles at 24K features
        srcs: dict[str, Markup] = {}
        top.tiles = [(heat, srcs.setdefault(src, Markup(src)), Markup(f"{fmt_num(act, 3)} {self.escaped_label(label)}"))  # Markup() of escaped text
                     for heat, src, act, label in zip(top.heat_r.tolist(), top.srcs, top.act_r.tolist(), top.labels)]
        split = group_rows(fetch_rows(self.site.con, "SELECT feature, label, mean_act, n_fire_images, n_images FROM class_split "
                                  "WHERE sae_id = ? AND feature BETWEEN ? AND ? ORDER BY feature, rank", [sae.sae_id, lo, hi]), lambda r: int(r["feature"]))
        similar = group_rows(fetch_rows(self.site.con, "SELECT feature, similar_feature, cosine FROM similar_features "
                                    "WHERE sae_id = ? AND feature BETWEEN ? AND ? ORDER BY feature, rank", [sae.sae_id, lo, hi]), lambda r: int(r["feature"]))
        concepts = self.concepts_by_feature(sae, lo, hi)
        rows = fetch_rows(self.site.con, "SELECT * FROM features WHERE sae_id = ? AND feature BETWEEN ? AND ? ORDER BY feature", [sae.sae_id, lo, hi])
        for row in rows:
            f = int(row["feature"])
            if f not in wanted:
                continue
            i = bisect_left(pages, f)
            vmax = float(vmax_f[f - lo])
            tiles = [top.tiles[r] for r in top.rows_of(f)]
            bands: dict[int, list[list[Any]]] = {}
            for r in samples.rows_of(f):
                bands.setdefault(int(samples.bands[r]), []).append(contract.BAND_SAMPLE.pack(
                    thumb=sae.thumb_pos.get(samples.srcs[r], -1), act=samples.act_text[r],
                    label=sae.label_pos.get(samples.labels[r], -1), heat=int(samples.heat_r[r])))
            first = top.rows_of(f).start if tiles else samples.rows_of(f).start
            grid = (top if tiles else samples).grids[first] if len(top.rows_of(f)) + len(samples.rows_of(f)) else ""
            if tiles and tiles[0][0]:
                sae.top_maps[f] = (grid, top.map_of(first))
            self.site.stats.n_heatmaps += int(top.heat_r[top.rows_of(f)].sum() + samples.heat_r[samples.rows_of(f)].sum())
            self.render_feature_page(
                sae, row, tiles, vmax, heatmaps.pack([top.maps_of(f), samples.maps_of(f)]), grid,
                panels={  # positional rows: their fields are declared in `contract` (atlas.js reads them by name)
                    "hist": _hist_json(row.get("hist_counts"), row.get("hist_edges")),
                    "bands": [contract.BAND.pack(band=b, samples=bands[b]) for b in sorted(bands, reverse=True)],  # top band first
                    "matches": [contract.MATCH.pack(
                        comparison=m["comparison_pos"], sae=m["sae_pos"], feature=m["feature_b"] if m["sae_pos"] >= 0 else m["title"],
                        score=charts.sig(m["score"], 3), matched=int(bool(m["matched"])), mutual=int(bool(m["mutual"])),
                        has_page=int(m["href"] is not None)) for m in matches.get(f, [])],
                    # the rate is firing / the label's images (`label_images` in the data file), unless n_images says otherwise
                    "split": [contract.SPLIT.pack(label=sae.label_pos.get(r["label"], -1), n_fire=r["n_fire_images"], mean_act=charts.sig(r["mean_act"], 3),
                                              **({"n_images": r["n_images"]} if r["n_images"] != sae.label_images.get(r["label"]) else {}))
                              for r in split.get(f, [])],
                    "similar": [contract.SIMILAR.pack(feature=int(r["similar_feature"]), cosine=charts.sig(r["cosine"], 3)) for r in similar.get(f, [])],
                },
                edits=edits.get(f, []), concepts=concepts.get(f, []),
                prev=pages[i - 1] if i > 0 else None, next=pages[i + 1] if i + 1 < len(pages) else None,
            )

    def render_feature_page(self, sae: SaeInfo, row: dict[str, Any], tiles: list[tuple[bool, Markup, Markup]], vmax: float, maps: str, grid: str,
                            panels: dict[str, Any], edits: list[dict[str, Any]], concepts: list[dict[str, Any]],
                            prev: int | None, next: int | None) -> None:
        """One feature page: statistics and top images in the HTML, the rest as data atlas.js draws (see feature.html)."""
        f = int(row["feature"])
        page = addr.feature_page(sae.model, sae.slug, f)
        context = dict(
            sae={"short": sae.short, "sae_id": sae.sae_id, "data_file": sae.data_file}, f=row,
            saes_nav=[], comparisons=[],  # the crumbs lead to the lists: menus on every feature page are bytes × 24K
            title=sae.title(f), exemplars=tiles, vmax=vmax,
            heat={"g": grid, "z": maps} if maps else None, panels=panels,
            concept=row.get("best_concept"), concepts=concepts, edits=edits, prev=prev, next=next,
        )
        if self._recorded is not None:
            self._recorded.append((page, context))
        self.site.render_later("feature.html", page, **context)
        self.site.stats.n_feature_pages += 1

    def sae_columns(self, sae: SaeInfo, index: pa.Table) -> dict[str, Any]:
        """The compact columnar index the feature list and scatter read (one JS file per SAE)."""
        feature = index.column("feature").to_numpy().astype(np.int64)
        labels = index.column("top_label").to_pylist()
        vocabulary = sorted({l for l in labels if l is not None})
        label_pos = {l: i for i, l in enumerate(vocabulary)}
        has_page = np.isin(feature, sae.pages)
        thumbs, thumb_pos = sae.thumb_list, sae.thumb_pos
        def col(name: str, digits: int = 4) -> list[float | None]:
            return charts.round_sig(index.column(name).to_numpy(zero_copy_only=False).astype(np.float64), digits)

        concept_names = index.column("best_concept").to_pylist() if "best_concept" in index.column_names else [None] * len(feature)
        concepts = sorted({c for c in concept_names if c is not None})
        concept_pos = {c: i for i, c in enumerate(concepts)}

        return {
            "sae_id": sae.sae_id,
            "short": sae.short,
            "page_dir": addr.sae_dir(sae.model, sae.slug) + "/",
            "feature": feature.tolist(),
            "freq": col("freq"),
            "log10_freq": col("log10_freq"),
            "mean_act": col("mean_act"),
            "log10_mean_act": col("log10_mean_act"),
            "max_act": col("max_act"),
            "purity": col("label_purity", 3),
            "concepts": concepts,
            "concept": [concept_pos[c] if c is not None else -1 for c in concept_names],
            "concept_ap": col("best_concept_ap", 3) if concepts else [None] * len(feature),
            "labels": vocabulary,
            "label": [label_pos[l] if l is not None else -1 for l in labels],
            "dead": [int(bool(d)) for d in index.column("dead").to_pylist()],
            "dense": [int(bool(d)) for d in index.column("dense").to_pylist()],
            "page": has_page.astype(int).tolist(),
            # Each distinct thumbnail once, then an index per feature (-1: none): 2–6 bytes per feature, not 40.
            "thumbs": thumbs,
            "thumb": [thumb_pos.get(sae.thumbs.get(int(f), ""), -1) for f in feature],
            # Read by feature pages (see `load_shared`).
            "bands": BAND_NAMES,
            "image_labels": list(sae.label_pos),
            "label_images": [sae.label_images.get(l) for l in sae.label_pos],
            "concept_base": sae.concept_base,  # [concept, level, chance, support]
            "saes": [contract.SAE_REF.pack(short=s.short, dir=addr.sae_dir(s.model, s.slug) + "/") for s in self.site.saes],  # counterparts
            "comparisons": [contract.COMPARISON_REF.pack(name=c["name"], href=c["href"]) for c in self.site.comparisons],
        }

    def concepts_by_feature(self, sae: SaeInfo, lo: int, hi: int, per_level: int = CONCEPTS_SHOWN) -> dict[int, list[dict[str, Any]]]:
        """The best concepts of features `lo`..`hi`: `per_level` per level, by AP above chance."""
        if not self.site.has_concepts:
            return {}
        rows = fetch_rows(
            self.site.con,
            "SELECT feature, concept, level, ap, null_ap, base_rate, iou, threshold, support, fire_rate FROM ("
            "  SELECT *, row_number() OVER (PARTITION BY feature, level ORDER BY ap_lift DESC NULLS LAST, concept) AS r"
            "  FROM concepts WHERE sae_id = ? AND feature BETWEEN ? AND ?) "
            "WHERE r <= ? ORDER BY feature, level DESC, r",
            [sae.sae_id, lo, hi, per_level],
        )
        return group_rows(rows, lambda r: int(r["feature"]))

    def edits_by_feature(self, sae: SaeInfo) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        rows = fetch_rows(
            self.site.con,
            "SELECT edit_id, edit, task, features, action, value, target_class, target_delta, specificity, flipped "
            "FROM edits WHERE sae_id = ? AND NOT coalesce(is_control, false) ORDER BY edit_id",
            [sae.sae_id],
        )
        for r in rows:
            r["href"] = addr.edit_page(r["edit_id"])
            for f in set(r["features"] or []):
                out.setdefault(int(f), []).append(r)
        return out

    def matches_by_feature(self, sae: SaeInfo) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for r in fetch_rows(self.site.con, "SELECT * FROM matches WHERE sae_a = ? ORDER BY comparison, score DESC", [sae.sae_id]):
            other = self.site.sae_by_id(r["sae_b"])
            if r["feature_b"] is None:
                r["title"] = "— (dead feature: no match)"
            else:
                r["title"] = other.title(r["feature_b"]) if other else f"{r['sae_b']}/{r['feature_b']}"
            r["href"] = other.page(r["feature_b"]) if other else None
            r["sae_pos"] = next(i for i, s in enumerate(self.site.saes) if s is other) if other else -1
            r["comparison_pos"] = next(i for i, c in enumerate(self.site.comparisons) if c["name"] == r["comparison"])
            out.setdefault(int(r["feature_a"]), []).append(r)
        return out


def _hist_json(counts: Sequence[int] | None, edges: Sequence[float] | None) -> list[Any] | None:
    """[counts, first edge, last edge] (log10 activation) for the page's histogram; None without one."""
    counts = list(counts or [])
    edges = list(edges or [])
    if not counts or len(edges) != len(counts) + 1 or max(counts) <= 0:
        return None
    return contract.HIST.pack(counts=[int(c) for c in counts], lo=charts.sig(edges[0], 3), hi=charts.sig(edges[-1], 3))

@dataclass
class ExemplarColumns:
    """One chunk of exemplar rows (sorted by feature; `_r`: per row, `_v`: per patch value of all rows' maps)."""

    lo: int  # first feature of the chunk
    feature_r: np.ndarray
    act_r: np.ndarray
    lengths_r: np.ndarray  # patches in each row's map (0: none)
    has_map_r: np.ndarray  # the map is well formed and over a real thumbnail
    acts_v: np.ndarray
    grids: list[str]  # "HxW"
    srcs: list[str]  # thumbnail file (or the placeholder)
    labels: list[str | None]
    bands: list[int] | None  # quantile band of each row (sample tables only)
    heat_r: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # drawn as a heat-map (set by `quantize`)
    act_text: list[float | None] = field(default_factory=list)  # activation to 3 significant digits
    tiles: list[tuple[bool, Markup, Markup]] = field(default_factory=list)  # set for the top images (render_feature_chunk)
    _q_v: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))  # quantised maps of the `heat_r` rows only
    _q_start_r: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # row r's map: _q_v[start[r]:start[r+1]]
    _start_f: list[int] = field(default_factory=list)  # feature lo + j's rows: start[j]:start[j+1]

    def quantize(self, vmax_f: np.ndarray) -> None:
        """Each row's map on its feature's scale (`vmax_f[feature - lo]`), in one pass over the chunk."""
        vmax_r = vmax_f[self.feature_r - self.lo]
        self.heat_r = self.has_map_r & (vmax_r > 0)
        kept_v = np.repeat(self.heat_r, self.lengths_r)
        self._q_v = heatmaps.quantize(self.acts_v[kept_v], np.repeat(vmax_r, self.lengths_r)[kept_v])
        self._q_start_r = np.concatenate([[0], np.cumsum(self.lengths_r * self.heat_r)])
        self.act_text = charts.round_sig(self.act_r, 3)
        self._start_f = np.searchsorted(self.feature_r, np.arange(self.lo, self.lo + len(vmax_f) + 1)).tolist()

    def rows_of(self, feature: int) -> range:
        j = feature - self.lo
        return range(self._start_f[j], self._start_f[j + 1])

    def maps_of(self, feature: int) -> np.ndarray:
        """The feature's maps (rows with a heat-map only), concatenated in row order."""
        rows = self.rows_of(feature)
        return self._q_v[self._q_start_r[rows.start] : self._q_start_r[rows.stop]]

    def map_of(self, row: int) -> np.ndarray:
        return self._q_v[self._q_start_r[row] : self._q_start_r[row + 1]]


def _read_chunk(path: Path, features: list[int]) -> dict[str, Any] | None:
    """A cached chunk of feature-page contexts, if it is there, readable and for exactly these features."""
    try:
        saved = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError):
        return None
    return saved if isinstance(saved, dict) and saved.get("features") == features else None


