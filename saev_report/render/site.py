"""The static feature atlas: published tables (through DuckDB) + images → a folder of HTML.

`build_site` reads only `<run>/tables/` and the image files the `images` table
points to, so templates can be re-rendered without running the pipeline. It
writes into `.<out>.partial/` next to `out_dir` and swaps it in at the end;
thumbnails the previous site already has (same content address) are
hard-linked instead of re-drawn, and the feature pages' contexts (the range
queries, the packed patch maps, the panels) are kept per chunk in the run's
`cache/render/<key>/`, keyed by the published tables' files, the report options
and the render code (`page_cache_key`), so a template-only rebuild costs little
more than the HTML itself.

Every picture is stored once: one thumbnail per distinct image, drawn by a
process pool. Heat-maps are data, not images: each feature page carries its
exemplars' patch maps (one byte per patch, one zlib stream per page, see
`heatmaps`) and `assets/atlas.js` paints them on canvases over the shared
thumbnails; without scripts the plain thumbnails show.

Page weight: a feature page exists 24K times per SAE at the paper's width, so
it holds only what must show without scripts, and what every page of an SAE
would repeat (image labels and their counts, band names, concepts' chance and
support, the other SAEs and comparisons) is written once, to the SAE's data
file; pages name those things by position (see `SaeInfo.label_pos`).

Scale: per SAE, the small per-feature columns are read once (a few MB at 24K
features); feature pages are built `CHUNK_FEATURES` at a time from range
queries on the exemplar, sample, class-split and similarity tables, so memory
does not grow with the dictionary, and each chunk's exemplar rows are handled
as columns (`ExemplarColumns`: one numpy pass quantises all their maps). Feature pages carry an inline SVG
histogram, never a plotly chart; only the index, the per-SAE lists and the
comparison pages load plotly.js.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import pickle
import sys
from bisect import bisect_left
import os
import shutil
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape
from rich.markup import escape as rich_escape

from saev_report import __version__, fsutil, tables
from saev_report.sae.registry import KINDS as SAE_KINDS
from saev_report.progress import bar, log
from saev_report.render import addresses as addr
from saev_report.render import charts, heatmaps, overlays, queries
from saev_report.render.queries import fetch_rows, fetch_table, stream_batches
from saev_report.render.concepts import build_concept_pages
from saev_report.spec import ReportSpec, content_hash



def _bundled(name: str) -> Path:
    """Top-level `templates/` or `site/`: copied into the package by a wheel build (setup.py),
    read from the checkout's top level otherwise (editable install, source tree)."""
    packaged = Path(__file__).resolve().parents[1] / "_assets" / name
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / name


TEMPLATES_DIR = _bundled("templates")
ASSETS_DIR = _bundled("site")
CONCEPTS_SHOWN = 3
"""Best concepts listed per level on a feature page."""
CONCEPT_FIGURES = ("concept_ap", "concept_lift")  # drawn in the index's concept section, not among the sparsity charts
POOL_MIN_JOBS = 96  # below this, a pool's start-up costs more than it saves
PAGE_POOL_MIN_PAGES = 4096  # smaller sites render their pages in process: worker start-up would dominate
PAGES_PER_TASK = 128  # feature pages per pool task: pickling a page's context costs far less than rendering it
MAX_CURVE_POINTS = 2000
MAX_COMPARE_CARDS = 60
CHUNK_FEATURES = 2048  # feature pages per round of range queries: bounds memory at any dictionary width
PAGE_CACHE = "render"  # under the run's cache/: feature-page contexts per chunk, for template-only rebuilds
BAND_NAMES = ["lowest quarter", "second quarter", "third quarter", "top quarter"]  # quantile bands, 0 = lowest

T = TypeVar("T")


@dataclass
class SiteStats:
    """What a build produced."""

    out_dir: Path
    n_saes: int = 0
    n_feature_pages: int = 0
    n_edit_pages: int = 0
    n_compare_pages: int = 0
    n_thumbnails: int = 0  # distinct images shown: each stored once
    n_heatmaps: int = 0  # exemplar heat-maps the browser draws (from patch maps, not image files)
    n_images_rendered: int = 0  # image files drawn by this build (the rest were reused)
    n_missing_images: int = 0  # images that could not be read (shown as a placeholder)
    n_bytes: int = 0
    seconds: float = 0.0


@dataclass
class SaeInfo:
    """One SAE as the site shows it."""

    sae_id: str
    model: str
    model_label: str
    n_features: int
    slug: str
    metrics: dict[str, Any]
    # Filled while its pages are built; read by edit/compare pages.
    pages: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # features with a page, sorted
    capped: bool = False  # report.feature_pages left out some live features
    thumbs: dict[int, str] = field(default_factory=dict)  # feature → thumbnail file of its top exemplar
    thumb_list: list[str] = field(default_factory=list)  # every thumbnail its pages show; pages name them by position
    thumb_pos: dict[str, int] = field(default_factory=dict)
    top_maps: dict[int, tuple[str, np.ndarray]] = field(default_factory=dict)  # feature → (grid, quantised map of that exemplar)
    top_labels: dict[int, str] = field(default_factory=dict)
    # Shared by every page of the SAE, so kept once in its data file: image labels (bands, class split) by position,
    # each label's number of analysed images, and each concept's chance (base rate) and support.
    label_pos: dict[str | None, int] = field(default_factory=dict)
    label_images: dict[str, int] = field(default_factory=dict)
    concept_base: list[list[Any]] = field(default_factory=list)
    _params: Any = field(default=None, repr=False)  # the kind's Params, parsed once from `metrics["params"]`

    def title(self, feature: int) -> str:
        return addr.feature_title(self.model_label, self.n_features, feature)

    def feature_group(self, feature: int) -> str | None:
        """What the SAE's kind says about where the feature sits (a Matryoshka prefix), from the `saes` row."""
        kind = SAE_KINDS.get(self.metrics.get("kind") or "")
        if kind is None or not self.metrics.get("params"):
            return None
        if self._params is None:
            self._params = kind.Params.model_validate_json(self.metrics["params"])
        return kind.feature_group(self._params, self.n_features, feature)

    @property
    def short(self) -> str:
        return f"{self.model_label}-{addr.width_label(self.n_features)}"

    @property
    def list_page(self) -> str:
        return addr.sae_page(self.model, self.slug)

    @property
    def data_file(self) -> str:
        return addr.sae_data(self.model, self.slug)

    def page(self, feature: int | None) -> str | None:
        if feature is None:  # a dead feature has no best match
            return None
        i = np.searchsorted(self.pages, feature)
        return addr.feature_page(self.model, self.slug, feature) if i < len(self.pages) and self.pages[i] == feature else None


# --------------------------------------------------------------------------- formatting


def fmt_num(value: Any, digits: int = 4) -> str:
    """Readable number: integers with separators, floats to `digits` significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    value = float(value)
    if not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}" if abs(value) < 1e9 else f"{value:.{digits}g}"


def fmt_pct(value: Any, digits: int = 3) -> str:
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{100 * float(value):.{digits}g}%"


def make_env(templates_dir: Path = TEMPLATES_DIR) -> Environment:
    """Jinja environment; autoescape is on for every template (labels come from datasets)."""
    if not (templates_dir / "base.html").is_file() or not (ASSETS_DIR / "atlas.js").is_file():
        raise FileNotFoundError(f"site templates/assets not found at {templates_dir} and {ASSETS_DIR}: reinstall saev-report")
    # auto_reload off: templates do not change during a build, and checking them costs a stat per page.
    env = Environment(loader=FileSystemLoader(str(templates_dir)), autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, auto_reload=False)
    env.filters["num"] = fmt_num
    env.filters["pct"] = fmt_pct
    env.filters["script_json"] = charts.script_json
    return env


# --------------------------------------------------------------------------- DuckDB helpers


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- the builder


class SiteBuilder:
    """One build: holds the connection, the staging folder, the pool and the image names."""

    def __init__(self, con: duckdb.DuckDBPyConnection, staging: Path, previous: Path | None, report: ReportSpec, model_labels: dict[str, str], workers: int | None):
        self.con, self.staging, self.previous, self.report = con, staging, previous, report
        self.model_labels = model_labels
        self.workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
        self._pool: Executor | None = None
        self._queue: list[tuple[str, str, dict[str, Any]]] = []  # feature pages waiting for the pool
        self._pending: list[Any] = []  # futures of page batches
        self.n_pages_total = 0
        self._labels_html: dict[str | None, Markup] = {}
        self._base_contexts: dict[str, dict[str, Any]] = {}  # by root; the SAE list and menus are fixed before pages render
        self.env = make_env()
        self.stats = SiteStats(out_dir=staging)
        self.thumb_names: dict[tuple[str, int], str | None] = {}  # (image path, px) → thumbnail name
        self.saes: list[SaeInfo] = []
        self._by_id: dict[str, SaeInfo] = {}
        self.comparisons: list[dict[str, str]] = []
        self.has_edits = self.has_compare = self.has_experiments = False
        # Tables from before concept detection have no best_concept column (and no concepts rows).
        self.has_concepts = "best_concept" in {r[0] for r in con.sql("DESCRIBE features").fetchall()}
        self.concepts: list[dict[str, Any]] = []
        self.page_cache: Path | None = None  # this build's folder of chunk contexts (`page_cache_key`), if any
        self._recorded: list[tuple[str, dict[str, Any]]] | None = None  # feature pages of the chunk being built

    # ---- infrastructure

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def _map(self, fn: Callable[[Any], T], jobs: Sequence[Any], chunksize: int = 1, n_items: int | None = None) -> list[T]:
        """Run jobs in the pool when there are enough items (`n_items`, default one per job) to pay for it."""
        if self.workers <= 1 or (n_items if n_items is not None else len(jobs)) < POOL_MIN_JOBS:
            return list(map(fn, jobs))
        if self._pool is None:
            # spawn, not fork: the pipeline process may hold torch/OpenMP threads that fork would copy.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            return list(self._pool.map(fn, jobs, chunksize=chunksize))
        except BrokenProcessPool:
            # Typically a script calling build_site without `if __name__ == "__main__":`, which spawn needs.
            log("[yellow]site: the process pool failed to start; drawing images in this process[/]")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool, self.workers = None, 1
            return list(map(fn, jobs))

    def write(self, rel: str, text: str) -> None:
        path = self.staging / rel
        overlays.ensure_dir(path.parent)
        path.write_text(text, encoding="utf-8")

    def base_context(self, page: str) -> dict[str, Any]:
        """What every template sees (plain data only: feature pages travel to pool workers); built once per folder depth."""
        root = addr.root_of(page)
        if root not in self._base_contexts:
            self._base_contexts[root] = self._base_context(root)
        return self._base_contexts[root]

    def _base_context(self, root: str) -> dict[str, Any]:
        return {
            "root": root,
            "site_title": self.report.title,
            "report_px": self.report.thumbnail_px,
            "version": __version__,
            "has_edits": self.has_edits,
            "has_concepts": self.has_concepts,
            "has_experiments": self.has_experiments,
            "has_compare": self.has_compare,
            "comparisons": self.comparisons,
            "saes_nav": [{"list_page": s.list_page, "short": s.short, "sae_id": s.sae_id} for s in self.saes],
        }

    def render(self, template: str, page: str, **context: Any) -> None:
        self.write(page, self.env.get_template(template).render(**self.base_context(page), **context))

    def render_later(self, template: str, page: str, **context: Any) -> None:
        """Queue a page for the pool (feature pages: the bulk of a build); rendered now without a pool."""
        self._queue.append((template, page, {**self.base_context(page), **context}))  # context wins over the base
        if len(self._queue) >= PAGES_PER_TASK:
            self.flush_pages()

    def flush_pages(self, wait: bool = False) -> None:
        """Hand the queued pages to the pool (the build goes on querying meanwhile); `wait` for all of them."""
        if self._queue:
            batch, self._queue = PageBatch(str(self.staging), self._queue), []
            future = None
            if self.workers > 1 and self.n_pages_total >= PAGE_POOL_MIN_PAGES:
                try:
                    future = self._pool_for_pages().submit(render_page_batch, batch)
                except BrokenProcessPool:
                    self.workers = 1
            if future is None:
                render_page_batch(batch, self.env)
            else:
                self._pending.append((future, batch))
                # Back-pressure: queued contexts are memory; let the workers catch up before querying on.
                while len(self._pending) > 2 * self.workers:
                    self._settle(*self._pending.pop(0))
        if wait:
            for future, batch in self._pending:
                self._settle(future, batch)
            self._pending = []

    def _settle(self, future: Any, batch: PageBatch) -> None:
        try:
            future.result()  # re-raises a worker's error
        except BrokenProcessPool:  # see _map: render here instead
            render_page_batch(batch, self.env)

    def _pool_for_pages(self) -> Executor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def img(self, kind: str, name: str | None) -> str:
        return addr.image_file(kind, name) if name else "assets/missing.svg"

    def previous_file(self, rel: str) -> Path | None:
        return self.previous / rel if self.previous else None

    def copy_assets(self) -> None:
        assets = self.staging / "assets"
        shutil.copytree(ASSETS_DIR, assets, dirs_exist_ok=True)
        (assets / "colormap.js").write_text(heatmaps.colormap_script(), encoding="utf-8")
        plotly_js = assets / "plotly.min.js"
        bundled = _bundled_plotly_js()
        if bundled is not None:
            shutil.copyfile(bundled, plotly_js)
        else:
            from plotly.offline import get_plotlyjs

            plotly_js.write_text(get_plotlyjs(), encoding="utf-8")

    # ---- thumbnails

    def ensure_thumbnails(self, paths: Iterable[str | None], px: int) -> None:
        todo = sorted({p for p in paths if p and (p, px) not in self.thumb_names})
        if not todo:
            return
        jobs = [overlays.ThumbJob(p, px, str(self.staging), str(self.previous) if self.previous else None) for p in todo]
        with bar(f"thumbnails ({px}px)", total=len(jobs), unit="img") as b:
            for chunk in _chunks(jobs, 256):
                for source, name, rendered in self._map(overlays.make_thumbnail, chunk, chunksize=8, n_items=len(jobs)):
                    self.thumb_names[(source, px)] = name
                    self.stats.n_images_rendered += int(rendered)
                    self.stats.n_missing_images += int(name is None)
                b.advance(len(chunk))

    def thumb(self, path: str | None, px: int) -> str | None:
        return self.thumb_names.get((path, px)) if path else None

    # ---- SAEs

    def load_saes(self) -> None:
        rows = fetch_rows(self.con, "SELECT * FROM saes ORDER BY model, layer, sae_id")
        known = {r["sae_id"] for r in rows}
        for extra in fetch_rows(self.con, "SELECT sae_id, max(feature) + 1 AS n_features FROM features GROUP BY sae_id ORDER BY sae_id"):
            if extra["sae_id"] not in known:  # features without an saes row: still browsable
                blank = {c.name: None for c in tables.TABLES["saes"].columns}
                rows.append({**blank, "sae_id": extra["sae_id"], "model": extra["sae_id"].split("/")[0], "n_features": extra["n_features"]})
        slugs = addr.unique_slugs([(r["model"], r["sae_id"]) for r in rows])
        for r in rows:
            model = r["model"]
            self.saes.append(
                SaeInfo(
                    sae_id=r["sae_id"],
                    model=model,
                    model_label=self.model_labels.get(model, model),
                    n_features=int(r.get("n_features") or 0),
                    slug=slugs[(model, r["sae_id"])],
                    metrics=r,
                )
            )

    def sae_label(self, sae_id: str) -> str:
        """The SAE's name in legends and panel titles: its short name, plus its tag where that repeats."""
        return legend_names(self.saes).get(sae_id, sae_id)

    def sae_by_id(self, sae_id: str) -> SaeInfo | None:
        if len(self._by_id) != len(self.saes):
            self._by_id = {s.sae_id: s for s in self.saes}
        return self._by_id.get(sae_id)

    def feature_index(self, sae: SaeInfo) -> pa.Table:
        concept = ", best_concept, best_concept_ap" if self.has_concepts else ""
        return fetch_table(
            self.con,
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
        sae.capped = self.report.feature_pages is not None and len(chosen) > self.report.feature_pages
        if sae.capped:
            order = np.argsort(-max_act[chosen], kind="stable")[: self.report.feature_pages]
            chosen = chosen[order]
        edited = [int(r["f"]) for r in fetch_rows(self.con, "SELECT DISTINCT unnest(features) AS f FROM edits WHERE sae_id = ?", [sae.sae_id])]
        sae.pages = np.union1d(feature[chosen], np.intersect1d(feature, np.asarray(edited, dtype=np.int64)))
        labels = index.column("top_label").to_pylist()
        sae.top_labels = {int(f): l for f, l in zip(feature, labels) if l is not None}

    def build_sae(self, sae: SaeInfo, index: pa.Table) -> None:
        """Thumbnails, the SAE's data file, its feature pages (in chunks of features) and its list page."""
        self.con.register("_pages", pa.table({"feature": pa.array(sae.pages, type=pa.int32())}))
        self.ensure_sae_thumbnails(sae)
        self.load_shared(sae)
        self.write(sae.data_file, charts.data_script(sae.data_file, self.sae_columns(sae, index)))
        edits, matches = self.edits_by_feature(sae), self.matches_by_feature(sae)
        pages = sae.pages.tolist()
        with bar(f"pages {sae.sae_id}", total=len(pages), unit="page") as b:
            for start in range(0, len(pages), CHUNK_FEATURES):
                chunk = pages[start : start + CHUNK_FEATURES]
                self.feature_chunk(sae, chunk, pages, start, edits, matches)
                b.advance(len(chunk))
        self.con.unregister("_pages")
        self.render("sae.html", sae.list_page, sae=sae, n_pages=len(pages), n_features=index.num_rows)

    def ensure_sae_thumbnails(self, sae: SaeInfo) -> None:
        """One thumbnail per distinct image any page of this SAE shows; `sae.thumbs` = each feature's top image."""
        k = self.report.exemplars_shown
        px = self.report.thumbnail_px
        shown = fetch_rows(
            self.con,
            "SELECT DISTINCT i.path FROM ("
            " SELECT e.dataset, e.image_idx FROM exemplars e JOIN _pages USING (feature) WHERE e.sae_id = ? AND e.rank < ?"
            " UNION SELECT q.dataset, q.image_idx FROM quantile_exemplars q JOIN _pages USING (feature) WHERE q.sae_id = ?"
            " UNION SELECT dataset, image_idx FROM exemplars WHERE sae_id = ? AND rank = 0"
            ") x JOIN images i ON i.dataset = x.dataset AND i.image_idx = x.image_idx ORDER BY i.path",
            [sae.sae_id, k, sae.sae_id, sae.sae_id],
        )
        self.ensure_thumbnails((r["path"] for r in shown), px)
        sae.thumb_list = sorted({addr.image_file("t", n) for n in (self.thumb(r["path"], px) for r in shown) if n})
        sae.thumb_pos = {t: i for i, t in enumerate(sae.thumb_list)}
        top = fetch_rows(
            self.con,
            "SELECT e.feature, i.path FROM exemplars e LEFT JOIN images i ON i.dataset = e.dataset AND i.image_idx = e.image_idx "
            "WHERE e.sae_id = ? AND e.rank = 0",
            [sae.sae_id],
        )
        for r in top:
            name = self.thumb(r["path"], px)
            if name:
                sae.thumbs[int(r["feature"])] = addr.image_file("t", name)

    def load_shared(self, sae: SaeInfo) -> None:
        """What every page of the SAE would repeat (see `SaeInfo.label_pos`): read once, written to its data file."""
        labels = [r["label"] for r in fetch_rows(
            self.con, "SELECT label FROM images WHERE label IS NOT NULL UNION SELECT label FROM class_split WHERE sae_id = ? AND label IS NOT NULL "
            "ORDER BY label", [sae.sae_id])]
        sae.label_pos = {label: i for i, label in enumerate(labels)}
        # The most common count per label: a feature that saw another count carries its own (see render_feature_chunk).
        sae.label_images = {r["label"]: int(r["n"]) for r in fetch_rows(
            self.con, "SELECT label, mode(n_images) AS n FROM class_split WHERE sae_id = ? AND label IS NOT NULL GROUP BY label", [sae.sae_id])}
        if self.has_concepts:
            sae.concept_base = [[r["concept"], r["level"], charts.sig(r["base_rate"], 3), r["support"]] for r in fetch_rows(
                self.con, "SELECT concept, level, any_value(base_rate) AS base_rate, any_value(support) AS support FROM concepts "
                "WHERE sae_id = ? GROUP BY concept, level ORDER BY level DESC, concept", [sae.sae_id])]

    def exemplar_columns(self, table: pa.Table, lo: int) -> ExemplarColumns:
        """A chunk's exemplar rows (sorted by feature) as columns: one numpy pass per chunk, not one per row."""
        px = self.report.thumbnail_px
        feature_r = table.column("feature").to_numpy(zero_copy_only=False).astype(np.int64)
        thumbs = [self.thumb(path, px) for path in table.column("path").to_pylist()]
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
            srcs=[self.img("t", t) for t in thumbs], labels=table.column("label").to_pylist(),
            bands=table.column("band").to_pylist() if "band" in table.column_names else None,
        )

    def escaped_label(self, label: str | None) -> Markup:
        if label not in self._labels_html:
            self._labels_html[label] = escape(label) if label is not None else Markup("unlabelled")
        return self._labels_html[label]

    def chunk_table(self, sql: str, sae: SaeInfo, lo: int, hi: int, *params: Any) -> pa.Table:
        return fetch_table(self.con, sql, [sae.sae_id, lo, hi, *params])

    def feature_chunk(self, sae: SaeInfo, chunk: list[int], pages: list[int], offset: int,
                      edits: dict[int, list[dict[str, Any]]], matches: dict[int, list[dict[str, Any]]]) -> None:
        """Feature pages of `chunk`: from the page cache when it holds them, else built (and cached)."""
        path = self.page_cache / f"{sae.slug.replace('/', '_')}-{sae.model}-{offset}.pkl" if self.page_cache else None
        saved = _read_chunk(path, chunk) if path is not None else None
        if saved is not None:
            for page, context in saved["pages"]:
                self.render_later("feature.html", page, **context)
            self.stats.n_feature_pages += len(saved["pages"])
            self.stats.n_heatmaps += saved["n_heatmaps"]
            sae.top_maps.update(saved["top_maps"])
            return
        heatmaps_before, self._recorded = self.stats.n_heatmaps, []
        try:
            self.render_feature_chunk(sae, chunk, pages, offset, edits, matches)
            recorded = self._recorded
        finally:
            self._recorded = None
        if path is not None:
            record = {"features": chunk, "pages": recorded, "n_heatmaps": self.stats.n_heatmaps - heatmaps_before,
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
            f"SELECT {columns} {joined.format(t='exemplars')} AND e.rank < ? ORDER BY e.feature, e.rank", sae, lo, hi, self.report.exemplars_shown), lo)
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
        split = _group(fetch_rows(self.con, "SELECT feature, label, mean_act, n_fire_images, n_images FROM class_split "
                                  "WHERE sae_id = ? AND feature BETWEEN ? AND ? ORDER BY feature, rank", [sae.sae_id, lo, hi]), lambda r: int(r["feature"]))
        similar = _group(fetch_rows(self.con, "SELECT feature, similar_feature, cosine FROM similar_features "
                                    "WHERE sae_id = ? AND feature BETWEEN ? AND ? ORDER BY feature, rank", [sae.sae_id, lo, hi]), lambda r: int(r["feature"]))
        concepts = self.concepts_by_feature(sae, lo, hi)
        rows = fetch_rows(self.con, "SELECT * FROM features WHERE sae_id = ? AND feature BETWEEN ? AND ? ORDER BY feature", [sae.sae_id, lo, hi])
        for row in rows:
            f = int(row["feature"])
            if f not in wanted:
                continue
            i = bisect_left(pages, f)
            vmax = float(vmax_f[f - lo])
            tiles = [top.tiles[r] for r in top.rows_of(f)]
            bands: dict[int, list[list[Any]]] = {}
            for r in samples.rows_of(f):
                bands.setdefault(int(samples.bands[r]), []).append(
                    [sae.thumb_pos.get(samples.srcs[r], -1), samples.act_text[r], sae.label_pos.get(samples.labels[r], -1), int(samples.heat_r[r])])
            first = top.rows_of(f).start if tiles else samples.rows_of(f).start
            grid = (top if tiles else samples).grids[first] if len(top.rows_of(f)) + len(samples.rows_of(f)) else ""
            if tiles and tiles[0][0]:
                sae.top_maps[f] = (grid, top.map_of(first))
            self.stats.n_heatmaps += int(top.heat_r[top.rows_of(f)].sum() + samples.heat_r[samples.rows_of(f)].sum())
            self.render_feature_page(
                sae, row, tiles, vmax, heatmaps.pack([top.maps_of(f), samples.maps_of(f)]), grid,
                panels={
                    "hist": _hist_json(row.get("hist_counts"), row.get("hist_edges")),
                    # [band, [[thumbnail, activation, label, has a heat-map], ...]] top band first; band, thumbnail and
                    # label are positions in the SAE's data file (`bands`, `thumbs`, `image_labels`; -1: none)
                    "bands": [[b, bands[b]] for b in sorted(bands, reverse=True)],
                    # [comparison, SAE, its feature (None: dead), correlation, matched, mutual, has a page]; comparison and SAE
                    # are positions in the data file's `comparisons` and `saes` (SAE -1: not on this site, then its title)
                    "matches": [[m["comparison_pos"], m["sae_pos"], m["feature_b"] if m["sae_pos"] >= 0 else m["title"],
                                 charts.sig(m["score"], 3), int(bool(m["matched"])), int(bool(m["mutual"])), int(m["href"] is not None)]
                                for m in matches.get(f, [])],
                    # [label, firing images, mean activation]: the rate is firing / the label's images (`label_images` in
                    # the data file), which a 4th element overrides where this feature saw another count
                    "split": [[sae.label_pos.get(r["label"], -1), r["n_fire_images"], charts.sig(r["mean_act"], 3),
                               *([r["n_images"]] if r["n_images"] != sae.label_images.get(r["label"]) else [])]
                              for r in split.get(f, [])],
                    "similar": [[int(r["similar_feature"]), charts.sig(r["cosine"], 3)] for r in similar.get(f, [])],
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
            title=sae.title(f), group=sae.feature_group(f), exemplars=tiles, vmax=vmax,
            heat={"g": grid, "z": maps} if maps else None, panels=panels,
            concept=row.get("best_concept"), concepts=concepts, edits=edits, prev=prev, next=next,
        )
        if self._recorded is not None:
            self._recorded.append((page, context))
        self.render_later("feature.html", page, **context)
        self.stats.n_feature_pages += 1

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
            "saes": [[s.short, addr.sae_dir(s.model, s.slug) + "/"] for s in self.saes],  # counterparts' titles and folders
            "comparisons": [[c["name"], c["href"]] for c in self.comparisons],
        }

    def concepts_by_feature(self, sae: SaeInfo, lo: int, hi: int, per_level: int = CONCEPTS_SHOWN) -> dict[int, list[dict[str, Any]]]:
        """The best concepts of features `lo`..`hi`: `per_level` per level, by AP above chance."""
        if not self.has_concepts:
            return {}
        rows = fetch_rows(
            self.con,
            "SELECT feature, concept, level, ap, null_ap, base_rate, iou, threshold, support, fire_rate FROM ("
            "  SELECT *, row_number() OVER (PARTITION BY feature, level ORDER BY ap_lift DESC NULLS LAST, concept) AS r"
            "  FROM concepts WHERE sae_id = ? AND feature BETWEEN ? AND ?) "
            "WHERE r <= ? ORDER BY feature, level DESC, r",
            [sae.sae_id, lo, hi, per_level],
        )
        return _group(rows, lambda r: int(r["feature"]))

    def edits_by_feature(self, sae: SaeInfo) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        rows = fetch_rows(
            self.con,
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
        for r in fetch_rows(self.con, "SELECT * FROM matches WHERE sae_a = ? ORDER BY comparison, score DESC", [sae.sae_id]):
            other = self.sae_by_id(r["sae_b"])
            if r["feature_b"] is None:
                r["title"] = "— (dead feature: no match)"
            else:
                r["title"] = other.title(r["feature_b"]) if other else f"{r['sae_b']}/{r['feature_b']}"
            r["href"] = other.page(r["feature_b"]) if other else None
            r["sae_pos"] = next(i for i, s in enumerate(self.saes) if s is other) if other else -1
            r["comparison_pos"] = next(i for i, c in enumerate(self.comparisons) if c["name"] == r["comparison"])
            out.setdefault(int(r["feature_a"]), []).append(r)
        return out

    # ---- edits

    def edit_grid(self, sae_id: str, row: dict[str, Any]) -> tuple[int, int] | None:
        """Patch grid of an edit: from the SAE's exemplars, else a square map."""
        rows = fetch_rows(self.con, "SELECT grid_h, grid_w FROM exemplars WHERE sae_id = ? AND grid_h > 0 LIMIT 1", [sae_id])
        if rows:
            return int(rows[0]["grid_h"]), int(rows[0]["grid_w"])
        for key in ("before_map", "after_map"):
            n = len(row.get(key) or [])
            if n and math.isqrt(n) ** 2 == n:
                return math.isqrt(n), math.isqrt(n)
        return None

    def build_edits(self) -> None:
        rows = fetch_rows(
            self.con,
            "SELECT e.*, i.path, i.label AS image_label FROM edits e "
            "LEFT JOIN images i ON i.dataset = e.dataset AND i.image_idx = e.image_idx ORDER BY e.edit, e.edit_id",
        )
        if not rows:
            return
        classes = {r["head"]: r["classes"] or [] for r in fetch_rows(self.con, "SELECT head, classes FROM heads")}
        px = max(2 * self.report.thumbnail_px, 256)
        self.ensure_thumbnails((r["path"] for r in rows), px)
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
        for r in real:
            self.render("edit.html", r["href"], e=r, c=r["control"])
            self.stats.n_edit_pages += 1
        self.render("edits.html", "edits/index.html", groups=groups, summary=summary)

    def decorate_edit(self, r: dict[str, Any], grid: tuple[int, int] | None, px: int, classes: list[str]) -> None:
        """Add page address, titles, links and images (marks, class maps) to an edit row."""
        sae = self.sae_by_id(r["sae_id"])
        r["href"] = addr.edit_page(r["edit_id"].removesuffix("/control"))
        r["feature_links"] = [
            {"title": sae.title(f) if sae else f"{r['sae_id']}/{f}", "href": sae.page(f) if sae else None, "label": sae.top_labels.get(int(f)) if sae else None}
            for f in (r["features"] or [])
        ]
        thumb = self.thumb(r["path"], px)
        r["image"] = self.img("t", thumb)
        r["marks"] = r["image"]
        patches = list(r["patches"] or [])
        if thumb and grid:
            name = overlays.marks_name(thumb, grid, patches)
            rel = addr.image_file("m", name)
            if not overlays.place(self.staging / rel, self.previous_file(rel)):
                overlays.render_marks(str(self.staging / addr.image_file("t", thumb)), str(self.staging / rel), grid, patches)
                self.stats.n_images_rendered += 1
            r["marks"] = rel
        r["all_patches"] = grid is not None and len(set(patches)) >= grid[0] * grid[1]
        r["maps"] = {}
        for key in ("before_map", "after_map"):
            classes_p = list(r.get(key) or [])
            if thumb and grid and len(classes_p) == grid[0] * grid[1]:
                name = overlays.classmap_name(thumb, grid, classes_p)
                rel = addr.image_file("s", name)
                if not overlays.place(self.staging / rel, self.previous_file(rel)):
                    overlays.render_class_map(str(self.staging / addr.image_file("t", thumb)), str(self.staging / rel), grid, classes_p)
                    self.stats.n_images_rendered += 1
                r["maps"][key] = rel
        r["bars"] = classification_bars(r)
        r["legend"] = segmentation_legend(r, classes)

    # ---- comparisons

    def build_compare(self) -> None:
        for comparison in [r["comparison"] for r in fetch_rows(self.con, "SELECT DISTINCT comparison FROM matches ORDER BY comparison")]:
            rows = fetch_rows(self.con, "SELECT * FROM matches WHERE comparison = ? ORDER BY sae_a, sae_b, score DESC", [comparison])
            directions = []
            maps: list[np.ndarray] = []  # heat-maps in the order the template shows the cards
            for (sae_a, sae_b), group in _group(rows, lambda r: (r["sae_a"], r["sae_b"])).items():
                directions.append(self.compare_direction(sae_a, sae_b, group, maps))
            heat = {"z": heatmaps.pack(maps)} if maps else None
            self.render("compare.html", addr.compare_page(comparison), comparison=comparison, directions=directions, heat=heat)
            self.stats.n_compare_pages += 1

    def feature_card(self, sae_id: str, feature: int, score: float | None = None, maps: list[np.ndarray] | None = None) -> dict[str, Any]:
        """A linked thumbnail of a feature's top exemplar; its heat-map (if known) is appended to `maps` in page order."""
        sae = self.sae_by_id(sae_id)
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
        a, b = self.sae_by_id(sae_a), self.sae_by_id(sae_b)

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

    # ---- index

    def build_index(self) -> None:
        saes = []
        for s in self.saes:
            blank = {c.name: None for c in tables.TABLES["saes"].columns}  # older runs lack the splice columns
            saes.append({**blank, **s.metrics, "sae_id": s.sae_id, "model_label": s.model_label, "short": s.short, "list_page": s.list_page, "data_file": s.data_file, "n_pages": len(s.pages)})
        logs: dict[str, dict[str, list[float]]] = {}
        for s in self.saes:
            rows = fetch_rows(self.con, "SELECT step, loss, mse, l0 FROM train_log WHERE sae_id = ? ORDER BY step", [s.sae_id])
            if len(rows) > MAX_CURVE_POINTS:  # keep the curve's shape, not every logged step
                rows = [rows[i] for i in np.linspace(0, len(rows) - 1, MAX_CURVE_POINTS).round().astype(int)]
            if rows:
                logs[s.sae_id] = {key: [r[key] for r in rows] for key in ("step", "loss", "mse", "l0")}
        names = legend_names(self.saes)
        by_id = {s["sae_id"]: s for s in saes}
        sub_models = [{**r, "model_label": by_id[r["sae_id"]]["model_label"], "kind": by_id[r["sae_id"]].get("kind"),
                       "list_page": by_id[r["sae_id"]]["list_page"]}
                      for r in fetch_rows(self.con, "SELECT * FROM sub_models ORDER BY sae_id, n_features") if r["sae_id"] in by_id]
        figures = {
            "l0_mse": charts.metric_scatter(saes, "mse", "MSE", sub_models),
            "l0_fvu": charts.metric_scatter(saes, "fvu", "FVU", sub_models),
            "loss": charts.training_curves(logs, "loss", "training loss", names),
            "mse": charts.training_curves(logs, "mse", "training MSE", names),
            "l0": charts.training_curves(logs, "l0", "training L0", names),
        }
        if self.has_concepts:
            figures["concept_ap"], figures["concept_lift"] = self.concept_figures()
        figures = {k: v for k, v in figures.items() if v["data"]}
        scatter_saes = [{"sae_id": s["sae_id"], "short": s["short"], "data": s["data_file"]} for s in saes]
        self.write("data/index.js", charts.data_script("index", {"figures": figures, "saes": scatter_saes}))
        datasets = fetch_rows(
            self.con,
            "SELECT dataset, count(*) AS n, count(*) FILTER (WHERE status = 'ok' OR status IS NULL) AS n_ok, count(DISTINCT label) AS n_labels "
            "FROM images GROUP BY dataset ORDER BY dataset",
        )
        heads = fetch_rows(self.con, "SELECT head, model, task, val_accuracy, val_miou, n_train, n_val, len(classes) AS n_classes FROM heads ORDER BY head")
        self.render("index.html", "index.html", saes=saes, figures=[f for f in figures if f not in CONCEPT_FIGURES], datasets=datasets,
                    heads=heads, stats=self.stats, concept_figures=[f for f in CONCEPT_FIGURES if f in figures])

    def concept_figures(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each SAE's best concept per live feature, next to the same under permuted labels (the null's
        best concept chosen the same way, by AP above chance): the AP box plots and the AP-lift tails."""
        rows = fetch_rows(
            self.con,
            "WITH lvl AS (SELECT sae_id, CASE WHEN bool_or(level = 'patch') THEN 'patch' ELSE 'image' END AS level FROM concepts GROUP BY 1), "
            "c AS (SELECT *, (null_ap - base_rate) / (1 - base_rate) AS null_lift FROM concepts) "
            "SELECT c.sae_id, any_value(lvl.level) AS level, arg_max(c.ap, c.ap_lift) AS ap, max(c.ap_lift) AS lift, "
            "arg_max(c.null_ap, c.null_lift) AS null_ap, max(c.null_lift) AS null_lift "
            "FROM c JOIN lvl USING (sae_id, level) JOIN features f USING (sae_id, feature) "
            "WHERE NOT f.dead GROUP BY c.sae_id, c.feature",
        )
        by_sae = _group(rows, lambda r: r["sae_id"])
        present = [s for s in self.saes if s.sae_id in by_sae]
        level = "/".join(sorted({r["level"] for r in rows})) or "patch"

        def series(*columns: str) -> list[dict[str, Any]]:
            return [{"name": self.sae_label(s.sae_id), **{c: [r[c] for r in by_sae[s.sae_id]] for c in columns}} for s in present]

        boxes = [{**b, "name": b["name"].replace(" ", "\n", 1)} for b in series("ap", "null_ap")]  # model above tag on the axis
        return charts.ap_distributions(boxes, level), charts.lift_tails(series("lift", "null_lift"), level)

    # ---- everything

    def build(self) -> SiteStats:
        self.copy_assets()
        self.load_saes()
        self.has_edits = _count(self.con, "edits") > 0
        self.has_experiments = _count(self.con, "experiments") > 0
        self.comparisons = [
            {"name": r["comparison"], "href": addr.compare_page(r["comparison"])} for r in fetch_rows(self.con, "SELECT DISTINCT comparison FROM matches ORDER BY comparison")
        ]
        self.has_compare = bool(self.comparisons)
        indexes = {}
        for sae in self.saes:  # every page set first, so cross-links between SAEs know which pages exist
            indexes[sae.sae_id] = self.feature_index(sae)
            self.choose_pages(sae, indexes[sae.sae_id])
        self.n_pages_total = sum(len(s.pages) for s in self.saes)
        for sae in self.saes:
            self.build_sae(sae, indexes.pop(sae.sae_id))
        self.flush_pages(wait=True)
        self.stats.n_saes = len(self.saes)
        self.build_edits()
        self.concepts = build_concept_pages(self)
        self.build_compare()
        self.build_index()
        self.stats.n_thumbnails = len({name for name in self.thumb_names.values() if name})
        return self.stats


def _hist_json(counts: Sequence[int] | None, edges: Sequence[float] | None) -> list[Any] | None:
    """[counts, first edge, last edge] (log10 activation) for the page's histogram; None without one."""
    counts = list(counts or [])
    edges = list(edges or [])
    if not counts or len(edges) != len(counts) + 1 or max(counts) <= 0:
        return None
    return [[int(c) for c in counts], charts.sig(edges[0], 3), charts.sig(edges[-1], 3)]


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


@dataclass(frozen=True)
class PageBatch:
    staging: str  # site root being built
    pages: list[tuple[str, str, dict[str, Any]]]  # (template, page path, full context)


_worker_env: Environment | None = None


def render_page_batch(batch: PageBatch, env: Environment | None = None) -> int:
    """Render and write a batch of pages (in a pool worker, with its own cached jinja environment)."""
    global _worker_env
    if env is None:
        _worker_env = _worker_env or make_env()
        env = _worker_env
    root = Path(batch.staging)
    for template, page, context in batch.pages:
        path = root / page
        overlays.ensure_dir(path.parent)
        path.write_text(env.get_template(template).render(**context), encoding="utf-8")
    return len(batch.pages)


def page_cache_key(run_dir: Path, report: ReportSpec, model_labels: dict[str, str]) -> str:
    """What a feature page's context depends on, apart from the templates: the published tables (their
    files' paths, sizes and modification times), the report options but the title (it only reaches
    the pages through the base context, added at render time), the model labels and the code that
    builds the contexts. Any change gives a new key, so a stale context is never reused."""
    stamps = []
    for path in sorted((Path(run_dir) / "tables").rglob("*.parquet")):
        stat = path.stat()
        stamps.append((str(path.relative_to(run_dir)), stat.st_size, stat.st_mtime_ns))
    code = [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()
            for m in (sys.modules[__name__], heatmaps, charts, queries, addr, overlays)]
    return content_hash(__version__, stamps, report.model_dump(mode="json", exclude={"title"}), model_labels, code)


def prepare_page_cache(run_dir: Path, key: str) -> Path | None:
    """The cache folder of `key` under the run's `cache/render/`, other keys' folders removed (one site's
    worth of contexts is kept); None where it cannot be made (the site then builds without it)."""
    root = Path(run_dir) / "cache" / PAGE_CACHE
    try:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.iterdir():
            if old.name != key:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        (root / key).mkdir(exist_ok=True)
    except OSError:
        return None
    return root / key


def _read_chunk(path: Path, features: list[int]) -> dict[str, Any] | None:
    """A cached chunk of feature-page contexts, if it is there, readable and for exactly these features."""
    try:
        saved = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError):
        return None
    return saved if isinstance(saved, dict) and saved.get("features") == features else None


def legend_names(saes: list[SaeInfo]) -> dict[str, str]:
    """Short legend name per SAE: `DINOv2-6K`, plus the layer/tag part of the id where that repeats."""
    counts: dict[str, int] = {}
    for s in saes:
        counts[s.short] = counts.get(s.short, 0) + 1
    return {s.sae_id: s.short if counts[s.short] == 1 else f"{s.short} {s.sae_id.removeprefix(s.model + '/')}" for s in saes}


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(con.sql(f'SELECT count(*) FROM "{table}"').fetchall()[0][0])


def _group(rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def _bundled_plotly_js() -> Path | None:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


# --------------------------------------------------------------------------- edit helpers


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
        }

    return {"edit": name, "task": edits[0]["task"] if edits else None, "real": stats(edits), "control": stats(controls)}


# --------------------------------------------------------------------------- entry point


def _site_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def build_site(run_dir: Path, out_dir: Path, report: ReportSpec, model_labels: dict[str, str] | None = None, workers: int | None = None,
               page_cache: bool = True) -> SiteStats:
    """Render the atlas of the run's published tables into `out_dir` (replaced atomically).

    `model_labels` maps model keys to display names (`dino` → `DINOv2`); `workers`
    sets the thumbnail process pool (default: CPU count, at most 8; 1 = in process);
    `page_cache` keeps the feature pages' contexts in `<run>/cache/render/` for the next render.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A spawned pool worker is importing a script that calls build_site at top level: building here
        # would clobber the parent's staging folder. Failing makes the parent draw in-process instead.
        raise RuntimeError("build_site called while a worker process imports the main script; guard it with `if __name__ == '__main__':`")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    overlays.forget_dirs()
    previous = out_dir if (out_dir / "index.html").is_file() else None
    con = tables.connect(Path(run_dir))
    builder = SiteBuilder(con, staging, previous, report, model_labels or {}, workers)
    if page_cache:
        builder.page_cache = prepare_page_cache(Path(run_dir), page_cache_key(Path(run_dir), report, model_labels or {}))
    try:
        stats = builder.build()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        builder.close()
        con.close()
    stats.n_bytes = _site_bytes(staging)
    fsutil.swap_dir(staging, out_dir)
    stats.out_dir = out_dir
    stats.seconds = time.perf_counter() - started
    log(
        f"site: {stats.n_feature_pages:,} feature pages, {stats.n_edit_pages} edit pages, {stats.n_compare_pages} comparisons, "
        f"{stats.n_images_rendered:,} images drawn, {stats.n_bytes / 2**20:.1f} MB in {stats.seconds:.1f} s → {rich_escape(str(out_dir))}/index.html"
    )
    return stats
