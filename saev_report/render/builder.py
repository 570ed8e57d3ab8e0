"""The site builder's core, shared by every page kind: the DuckDB connection, the staging folder,
the jinja environment, the page and thumbnail pools, and the SAEs the site shows.

Page kinds live in their own modules (`features`, `edits`, `compare`, `index_page`, `concepts`,
...); each takes a `SiteBuilder` and renders its pages through `render` / `render_later` /
`write`. `site.build_site` runs them in order. This module imports none of them.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import duckdb
import numpy as np
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from saev_report import __version__, tables
from saev_report.progress import bar, log
from saev_report.render import addresses as addr
from saev_report.render import charts, contract, heatmaps, overlays
from saev_report.render.queries import fetch_rows
from saev_report.spec import ReportSpec

def _bundled(name: str) -> Path:
    """Top-level `templates/` or `site/`: copied into the package by a wheel build (setup.py),
    read from the checkout's top level otherwise (editable install, source tree)."""
    packaged = Path(__file__).resolve().parents[1] / "_assets" / name
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / name


TEMPLATES_DIR = _bundled("templates")
ASSETS_DIR = _bundled("site")
POOL_MIN_JOBS = 96  # below this, a pool's start-up costs more than it saves
PAGE_POOL_MIN_PAGES = 4096  # smaller sites render their pages in process: worker start-up would dominate
PAGES_PER_TASK = 128  # feature pages per pool task: pickling a page's context costs far less than rendering it

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

    def title(self, feature: int) -> str:
        return addr.feature_title(self.model_label, self.n_features, feature)

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


def fmt_interval(lo: Any, hi: Any, as_pct: bool = False, digits: int = 3) -> str:
    """"[lo, hi]" of a bootstrap interval, or "" when there is none (older runs, single images)."""
    if lo is None or hi is None:
        return ""
    fmt = fmt_pct if as_pct else fmt_num
    return f"[{fmt(lo, digits)}, {fmt(hi, digits)}]"


def make_env(templates_dir: Path = TEMPLATES_DIR) -> Environment:
    """Jinja environment; autoescape is on for every template (labels come from datasets)."""
    if not (templates_dir / "base.html").is_file() or not (ASSETS_DIR / "atlas.js").is_file():
        raise FileNotFoundError(f"site templates/assets not found at {templates_dir} and {ASSETS_DIR}: reinstall saev-report")
    # auto_reload off: templates do not change during a build, and checking them costs a stat per page.
    env = Environment(loader=FileSystemLoader(str(templates_dir)), autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, auto_reload=False)
    env.filters["num"] = fmt_num
    env.filters["pct"] = fmt_pct
    env.globals["interval"] = fmt_interval
    env.filters["script_json"] = charts.script_json
    return env


# --------------------------------------------------------------------------- DuckDB helpers


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]



# --------------------------------------------------------------------------- the builder


class SiteBuilder:
    """One build: holds the connection, the staging folder, the pool and the image names."""

    def __init__(self, con: duckdb.DuckDBPyConnection, staging: Path, previous: Path | None, report: ReportSpec, model_labels: dict[str, str], workers: int | None,
                 manifest: dict[str, Any] | None = None, resolved_spec: str | None = None, cache_dir: str | None = None):
        self.con, self.staging, self.previous, self.report = con, staging, previous, report
        self.manifest, self.resolved_spec = manifest, resolved_spec  # the run's manifest.json: the "How this was built" page
        self.cache_dir = cache_dir  # where the `images` table's relative paths (the demo set, in the shared cache) are
        self.model_labels = model_labels
        self.workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
        self._pool: Executor | None = None
        self._queue: list[tuple[str, str, dict[str, Any]]] = []  # feature pages waiting for the pool
        self._pending: list[Any] = []  # futures of page batches
        self.n_pages_total = 0
        self._base_contexts: dict[str, dict[str, Any]] = {}  # by root; the SAE list and menus are fixed before pages render
        self.env = make_env()
        self.stats = SiteStats(out_dir=staging)
        self.thumb_names: dict[tuple[str, int], str | None] = {}  # (image path, px) → thumbnail name
        self.saes: list[SaeInfo] = []
        self._by_id: dict[str, SaeInfo] = {}
        self.comparisons: list[dict[str, str]] = []
        self.has_edits = self.has_compare = self.has_experiments = self.has_claims = False
        # `tables.connect` declares every column, so the question is whether any concept was scored.
        self.has_concepts = count_rows(con, "concepts") > 0
        self.concepts: list[dict[str, Any]] = []
        self.page_cache: Path | None = None  # this build's folder of chunk contexts (`page_cache_key`), if any

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
            "has_claims": self.has_claims,
            "has_compare": self.has_compare,
            "has_build_page": self.manifest is not None,
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
        # The positional lists' field names (`contract`) come first, so atlas.js reads rows by name.
        (assets / "atlas.js").write_text(contract.fields_script() + (ASSETS_DIR / "atlas.js").read_text(encoding="utf-8"), encoding="utf-8")
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
        jobs = [overlays.ThumbJob(p, px, str(self.staging), str(self.previous) if self.previous else None, self.cache_dir) for p in todo]
        with bar(f"thumbnails ({px}px)", total=len(jobs), unit="img") as b:
            for chunk in chunks(jobs, 256):
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
















    # ---- edits




    # ---- comparisons




    # ---- index



    # ---- everything

    def prepare(self) -> None:
        """Assets, the SAEs, and what every page's menu shows (edits, experiments, comparisons): known before any page renders."""
        self.copy_assets()
        self.load_saes()
        self.has_edits = count_rows(self.con, "edits") > 0
        self.has_experiments = count_rows(self.con, "experiments") > 0
        self.has_claims = count_rows(self.con, "claims") > 0  # the nav links the page from every page; it is rendered later
        self.comparisons = [
            {"name": r["comparison"], "href": addr.compare_page(r["comparison"])} for r in fetch_rows(self.con, "SELECT DISTINCT comparison FROM matches ORDER BY comparison")
        ]
        self.has_compare = bool(self.comparisons)


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



def legend_names(saes: list[SaeInfo]) -> dict[str, str]:
    """Short legend name per SAE: `DINOv2-6K`, plus the layer/tag part of the id where that repeats."""
    counts: dict[str, int] = {}
    for s in saes:
        counts[s.short] = counts.get(s.short, 0) + 1
    return {s.sae_id: s.short if counts[s.short] == 1 else f"{s.short} {s.sae_id.removeprefix(s.model + '/')}" for s in saes}


def count_rows(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(con.sql(f'SELECT count(*) FROM "{table}"').fetchall()[0][0])


def group_rows(rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def _bundled_plotly_js() -> Path | None:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


