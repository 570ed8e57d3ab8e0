"""The static feature atlas: published tables (through DuckDB) + images → a folder of HTML.

`build_site` reads only `<run>/tables/` and the image files the `images` table
points to, so templates can be re-rendered without running the pipeline. It
writes into `.<out>.partial/` next to `out_dir` and swaps it in at the end;
images the previous site already has (same content address) are hard-linked
instead of re-rendered, so a template-only rebuild costs little more than the
HTML itself.

Scale: per SAE, the small per-feature columns and the exemplar metadata are
read once (a few MB at 24K features); the large `patch_acts` lists are streamed
in record batches and turned into overlay JPEGs by a process pool; feature
pages are rendered from streamed batches. Feature pages carry an inline SVG
histogram, never a plotly chart; only the index, the per-SAE lists and the
comparison pages load plotly.js.
"""

from __future__ import annotations

import math
import multiprocessing
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
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from rich.markup import escape

from saev_report import __version__, fsutil, tables
from saev_report.progress import bar, log
from saev_report.render import addresses as addr
from saev_report.render import charts, overlays
from saev_report.render.concepts import build_concept_pages
from saev_report.spec import ReportSpec



def _bundled(name: str) -> Path:
    """Top-level `templates/` or `site/`: copied into the package by a wheel build (setup.py),
    read from the checkout's top level otherwise (editable install, source tree)."""
    packaged = Path(__file__).resolve().parents[1] / "_assets" / name
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / name


TEMPLATES_DIR = _bundled("templates")
ASSETS_DIR = _bundled("site")
BATCH_ROWS = 2048
CONCEPTS_SHOWN = 3
"""Best concepts listed per level on a feature page."""
POOL_MIN_JOBS = 96  # below this, a pool's start-up costs more than it saves
MAX_CURVE_POINTS = 2000
MAX_COMPARE_CARDS = 60

T = TypeVar("T")


@dataclass
class SiteStats:
    """What a build produced."""

    out_dir: Path
    n_saes: int = 0
    n_feature_pages: int = 0
    n_edit_pages: int = 0
    n_compare_pages: int = 0
    n_thumbnails: int = 0  # distinct images shown
    n_overlays: int = 0  # exemplar heat-maps shown
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
    thumbs: dict[int, str] = field(default_factory=dict)  # feature → file of its top exemplar overlay
    top_labels: dict[int, str] = field(default_factory=dict)

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


def make_env(templates_dir: Path = TEMPLATES_DIR) -> Environment:
    """Jinja environment; autoescape is on for every template (labels come from datasets)."""
    if not (templates_dir / "base.html").is_file() or not (ASSETS_DIR / "atlas.js").is_file():
        raise FileNotFoundError(f"site templates/assets not found at {templates_dir} and {ASSETS_DIR}: reinstall saev-report")
    env = Environment(loader=FileSystemLoader(str(templates_dir)), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_num
    env.filters["pct"] = fmt_pct
    env.filters["script_json"] = charts.script_json
    return env


# --------------------------------------------------------------------------- DuckDB helpers


def _rel(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> duckdb.DuckDBPyRelation:
    return con.sql(sql, params=list(params)) if params else con.sql(sql)


def fetch_rows(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    return tables.fetch_arrow(_rel(con, sql, params)).to_pylist()


def fetch_table(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> pa.Table:
    return tables.fetch_arrow(_rel(con, sql, params))


def stream_batches(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = (), rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of a query without materialising it (DuckDB keeps insertion order)."""
    rel = _rel(con, sql, params)
    reader = rel.to_arrow_reader(rows) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(rows)
    yield from reader


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

    def render(self, template: str, page: str, **context: Any) -> None:
        base = {
            "root": addr.root_of(page),
            "site_title": self.report.title,
            "report_px": self.report.thumbnail_px,
            "version": __version__,
            "has_edits": self.has_edits,
            "has_concepts": self.has_concepts,
            "has_experiments": self.has_experiments,
            "has_compare": self.has_compare,
            "comparisons": self.comparisons,
            "saes_nav": self.saes,
        }
        self.write(page, self.env.get_template(template).render(**base, **context))

    def img(self, kind: str, name: str | None) -> str:
        return addr.image_file(kind, name) if name else "assets/missing.svg"

    def previous_file(self, rel: str) -> Path | None:
        return self.previous / rel if self.previous else None

    def copy_assets(self) -> None:
        assets = self.staging / "assets"
        shutil.copytree(ASSETS_DIR, assets, dirs_exist_ok=True)
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

    def sae_by_id(self, sae_id: str) -> SaeInfo | None:
        if len(self._by_id) != len(self.saes):
            self._by_id = {s.sae_id: s for s in self.saes}
        return self._by_id.get(sae_id)

    def feature_index(self, sae: SaeInfo) -> pa.Table:
        return fetch_table(
            self.con,
            "SELECT feature, n_fire, freq, log10_freq, mean_act, log10_mean_act, max_act, dead, dense, top_label, label_purity"
            f"{', best_concept, best_concept_ap' if self.has_concepts else ''} FROM features WHERE sae_id = ? ORDER BY feature",
            [sae.sae_id],
        )

    def choose_pages(self, sae: SaeInfo, index: pa.Table) -> None:
        """Alive features get pages; with `feature_pages`, only the strongest (by max activation)."""
        feature = index.column("feature").to_numpy().astype(np.int64)
        max_act = np.nan_to_num(index.column("max_act").to_numpy(zero_copy_only=False).astype(np.float64), nan=0.0)
        dead = index.column("dead").to_numpy(zero_copy_only=False)
        alive = ~np.array([bool(d) for d in dead], dtype=bool) & (max_act > 0)
        chosen = np.flatnonzero(alive)
        if self.report.feature_pages is not None and len(chosen) > self.report.feature_pages:
            order = np.argsort(-max_act[chosen], kind="stable")[: self.report.feature_pages]
            chosen = chosen[order]
        sae.pages = np.sort(feature[chosen])
        labels = index.column("top_label").to_pylist()
        sae.top_labels = {int(f): l for f, l in zip(feature, labels) if l is not None}

    def build_sae(self, sae: SaeInfo, index: pa.Table) -> None:
        k = self.report.exemplars_shown
        px = self.report.thumbnail_px
        meta = self.exemplar_meta(sae, k)
        self.ensure_thumbnails(meta["path"], px)
        thumbs = [self.thumb(p, px) for p in meta["path"]]
        overlay_names = self.render_feature_overlays(sae, meta, thumbs, k)
        self.stats.n_overlays += sum(1 for n in overlay_names if n)

        # Exemplar images per meta row: the overlay if there is one, else the plain thumbnail.
        shown = [self.img("o", o) if o else self.img("t", t) for o, t in zip(overlay_names, thumbs)]
        starts = np.searchsorted(meta["feature"], sae.pages, "left")
        ends = np.searchsorted(meta["feature"], sae.pages, "right")
        for f, s in zip(sae.pages, starts):
            if s < len(meta["feature"]) and meta["feature"][s] == f:
                sae.thumbs[int(f)] = shown[s]
        self.write(sae.data_file, charts.data_script(sae.data_file, self.sae_columns(sae, index)))
        self.render_feature_pages(sae, meta, shown, dict(zip(sae.pages.tolist(), zip(starts.tolist(), ends.tolist()))))
        self.render("sae.html", sae.list_page, sae=sae, n_pages=len(sae.pages), n_features=index.num_rows)

    def exemplar_meta(self, sae: SaeInfo, k: int) -> dict[str, Any]:
        """Small columns of the shown exemplars of features with pages, sorted by (feature, rank)."""
        table = fetch_table(
            self.con,
            "SELECT e.feature, e.rank, e.dataset, e.image_idx, e.act, e.patch, e.grid_h, e.grid_w, i.path, i.label "
            "FROM exemplars e LEFT JOIN images i ON i.dataset = e.dataset AND i.image_idx = e.image_idx "
            "WHERE e.sae_id = ? AND e.rank >= 0 AND e.rank < ? ORDER BY e.feature, e.rank",
            [sae.sae_id, k],
        )
        feature = table.column("feature").to_numpy().astype(np.int64)
        keep = np.isin(feature, sae.pages)
        table = table.filter(pa.array(keep))
        meta: dict[str, Any] = {name: table.column(name).to_pylist() for name in ("dataset", "path", "label")}
        for name in ("feature", "rank", "image_idx", "patch", "grid_h", "grid_w"):
            meta[name] = np.nan_to_num(table.column(name).to_numpy(zero_copy_only=False).astype(np.float64), nan=-1).astype(np.int64)
        meta["act"] = table.column("act").to_numpy(zero_copy_only=False).astype(np.float64)
        return meta

    def render_feature_overlays(self, sae: SaeInfo, meta: dict[str, Any], thumbs: list[str | None], k: int) -> list[str | None]:
        """Stream `patch_acts` and draw one overlay per shown exemplar; returns names aligned with `meta`."""
        n = len(meta["feature"])
        names: list[str | None] = [None] * n
        if n == 0:
            return names
        key_sorted = meta["feature"] * k + meta["rank"]  # sorted, since meta is ordered by (feature, rank)
        # One colour scale per feature: the largest activation among its shown exemplars.
        group_start = np.flatnonzero(np.r_[True, meta["feature"][1:] != meta["feature"][:-1]])
        vmax_group = np.maximum.reduceat(np.nan_to_num(meta["act"], nan=0.0), group_start)
        vmax = np.repeat(vmax_group, np.diff(np.r_[group_start, n]))
        with bar(f"overlays {sae.sae_id}", total=n, unit="img") as b:
            for batch in stream_batches(self.con, "SELECT feature, rank, patch_acts FROM exemplars WHERE sae_id = ? AND rank >= 0 AND rank < ?", [sae.sae_id, k]):
                jobs = []
                feature = batch.column("feature").to_numpy(zero_copy_only=False).astype(np.int64)
                rank = batch.column("rank").to_numpy(zero_copy_only=False).astype(np.int64)
                pos = np.searchsorted(key_sorted, feature * k + rank).clip(0, n - 1)
                hit = key_sorted[pos] == feature * k + rank
                acts = batch.column("patch_acts")
                offsets = acts.offsets.to_numpy()
                values = acts.values.to_numpy(zero_copy_only=False)
                valid = acts.is_valid().to_numpy(zero_copy_only=False)
                for row in np.flatnonzero(hit & valid):
                    i = int(pos[row])
                    grid = (int(meta["grid_h"][i]), int(meta["grid_w"][i]))
                    acts_p = values[offsets[row] : offsets[row + 1]]
                    thumb = thumbs[i]
                    if thumb is None or grid[0] <= 0 or grid[0] * grid[1] != len(acts_p):
                        continue
                    name = overlays.overlay_name(thumb, acts_p, grid, float(vmax[i]), int(meta["patch"][i]))
                    names[i] = name
                    rel = addr.image_file("o", name)
                    if not overlays.place(self.staging / rel, self.previous_file(rel)):
                        jobs.append(overlays.OverlayJob(str(self.staging / addr.image_file("t", thumb)), str(self.staging / rel), np.array(acts_p, dtype=np.float32), grid, float(vmax[i]), int(meta["patch"][i])))
                for done in self._map(overlays.render_overlays, list(_chunks(jobs, 32)), n_items=len(jobs)):
                    self.stats.n_images_rendered += done
                b.advance(int(hit.sum()))
        return names

    def sae_columns(self, sae: SaeInfo, index: pa.Table) -> dict[str, Any]:
        """The compact columnar index the feature list and scatter read (one JS file per SAE)."""
        feature = index.column("feature").to_numpy().astype(np.int64)
        labels = index.column("top_label").to_pylist()
        vocabulary = sorted({l for l in labels if l is not None})
        label_pos = {l: i for i, l in enumerate(vocabulary)}
        has_page = np.isin(feature, sae.pages)

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
            "thumb": [sae.thumbs.get(int(f), "") if p else "" for f, p in zip(feature, has_page)],
        }

    def render_feature_pages(self, sae: SaeInfo, meta: dict[str, Any], shown: list[str], spans: dict[int, tuple[int, int]]) -> None:
        edits = self.edits_by_feature(sae)
        matches = self.matches_by_feature(sae)
        concepts = self.concepts_by_feature(sae)
        pages = sae.pages.tolist()
        position = {f: i for i, f in enumerate(pages)}
        with bar(f"pages {sae.sae_id}", total=len(pages), unit="page") as b:
            for batch in stream_batches(self.con, "SELECT * FROM features WHERE sae_id = ? ORDER BY feature", [sae.sae_id]):
                for row in batch.to_pylist():
                    f = int(row["feature"])
                    if f not in position:
                        continue
                    i = position[f]
                    start, end = spans[f]
                    exemplars = [
                        {
                            "src": shown[j],
                            "label": meta["label"][j],
                            "act": meta["act"][j],
                            "dataset": meta["dataset"][j],
                            "image_idx": int(meta["image_idx"][j]),
                            "rank": int(meta["rank"][j]),
                        }
                        for j in range(start, end)
                    ]
                    neighbours = {
                        "prev": (sae.title(pages[i - 1]), f"{pages[i - 1]}.html") if i > 0 else None,
                        "next": (sae.title(pages[i + 1]), f"{pages[i + 1]}.html") if i + 1 < len(pages) else None,
                    }
                    self.render(
                        "feature.html",
                        addr.feature_page(sae.model, sae.slug, f),
                        sae=sae,
                        f=row,
                        title=sae.title(f),
                        exemplars=exemplars,
                        hist=charts.svg_histogram(row.get("hist_counts"), row.get("hist_edges")),
                        edits=edits.get(f, []),
                        matches=matches.get(f, []),
                        concepts=concepts.get(f, []),
                        **neighbours,
                    )
                    self.stats.n_feature_pages += 1
                    b.advance()

    def concepts_by_feature(self, sae: SaeInfo, per_level: int = CONCEPTS_SHOWN) -> dict[int, list[dict[str, Any]]]:
        """The best concepts of every feature with a page: `per_level` per level, by AP above chance."""
        if not self.has_concepts:
            return {}
        rows = fetch_rows(
            self.con,
            "SELECT feature, concept, level, ap, null_ap, base_rate, iou, threshold, support FROM ("
            "  SELECT *, row_number() OVER (PARTITION BY feature, level ORDER BY ap_lift DESC NULLS LAST, concept) AS r"
            "  FROM concepts WHERE sae_id = ? AND list_contains(?, feature)) "
            "WHERE r <= ? ORDER BY feature, level DESC, r",
            [sae.sae_id, sae.pages.tolist(), per_level],
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
            r["compare_href"] = addr.compare_page(r["comparison"])
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
            for (sae_a, sae_b), group in _group(rows, lambda r: (r["sae_a"], r["sae_b"])).items():
                directions.append(self.compare_direction(sae_a, sae_b, group))
            self.render("compare.html", addr.compare_page(comparison), comparison=comparison, directions=directions)
            self.stats.n_compare_pages += 1

    def feature_card(self, sae_id: str, feature: int, score: float | None = None) -> dict[str, Any]:
        sae = self.sae_by_id(sae_id)
        return {
            "title": sae.title(feature) if sae else f"{sae_id}/{feature}",
            "href": sae.page(feature) if sae else None,
            "thumb": sae.thumbs.get(int(feature)) if sae else None,
            "label": sae.top_labels.get(int(feature)) if sae else None,
            "score": score,
        }

    def draw_top_exemplars(self, sae: SaeInfo | None, features: list[int]) -> None:
        """Overlay of the top exemplar of features that have no page (and so no picture yet)."""
        if sae is None:
            return
        wanted = sorted({int(f) for f in features} - set(sae.thumbs))
        if not wanted:
            return
        rows = fetch_rows(
            self.con,
            "SELECT e.feature, e.act, e.patch, e.grid_h, e.grid_w, e.patch_acts, i.path FROM exemplars e "
            "LEFT JOIN images i ON i.dataset = e.dataset AND i.image_idx = e.image_idx "
            "WHERE e.sae_id = ? AND e.rank = 0 AND list_contains(?, e.feature)",
            [sae.sae_id, wanted],
        )
        px = self.report.thumbnail_px
        self.ensure_thumbnails((r["path"] for r in rows), px)
        for r in rows:
            thumb = self.thumb(r["path"], px)
            grid = (r["grid_h"] or 0, r["grid_w"] or 0)
            acts_p = np.asarray(r["patch_acts"] or [], dtype=np.float32)
            if thumb is None or grid[0] * grid[1] != len(acts_p) or len(acts_p) == 0:
                sae.thumbs[int(r["feature"])] = self.img("t", thumb)
                continue
            vmax = float(r["act"] or acts_p.max())
            name = overlays.overlay_name(thumb, acts_p, grid, vmax, int(r["patch"] or 0))
            rel = addr.image_file("o", name)
            if not overlays.place(self.staging / rel, self.previous_file(rel)):
                overlays.render_overlay(overlays.OverlayJob(str(self.staging / addr.image_file("t", thumb)), str(self.staging / rel), acts_p, grid, vmax, int(r["patch"] or 0)))
                self.stats.n_images_rendered += 1
            sae.thumbs[int(r["feature"])] = rel

    def compare_direction(self, sae_a: str, sae_b: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
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
        # Features outside the page cap still get a picture: their top exemplar's overlay.
        self.draw_top_exemplars(a, [r["feature_a"] for r in matched + unmatched])
        self.draw_top_exemplars(b, [r["feature_b"] for r in matched])
        return {
            "sae_a": sae_a,
            "sae_b": sae_b,
            "label_a": a.short if a else sae_a,
            "label_b": b.short if b else sae_b,
            "n": len(rows),
            "n_matched": n_matched,
            "n_mutual": sum(1 for r in rows if r["mutual"]),
            "hist": charts.svg_histogram(counts, edges, width=420, height=110, x_label="best-match correlation", unit="features"),
            "pairs": [
                {"a": self.feature_card(sae_a, r["feature_a"]), "b": self.feature_card(sae_b, r["feature_b"]), "score": r["score"], "mutual": r["mutual"]}
                for r in matched
            ],
            "unmatched": [self.feature_card(sae_a, r["feature_a"], r["score"]) for r in unmatched],
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
        figures = {
            "l0_mse": charts.metric_scatter(saes, "mse", "MSE"),
            "l0_fvu": charts.metric_scatter(saes, "fvu", "FVU"),
            "loss": charts.training_curves(logs, "loss", "training loss", names),
            "mse": charts.training_curves(logs, "mse", "training MSE", names),
            "l0": charts.training_curves(logs, "l0", "training L0", names),
        }
        if self.has_concepts:
            figures["concept_ap"] = self.concept_ap_figure()
        figures = {k: v for k, v in figures.items() if v["data"]}
        scatter_saes = [{"sae_id": s["sae_id"], "short": s["short"], "data": s["data_file"]} for s in saes]
        self.write("data/index.js", charts.data_script("index", {"figures": figures, "saes": scatter_saes}))
        datasets = fetch_rows(
            self.con,
            "SELECT dataset, count(*) AS n, count(*) FILTER (WHERE status = 'ok' OR status IS NULL) AS n_ok, count(DISTINCT label) AS n_labels "
            "FROM images GROUP BY dataset ORDER BY dataset",
        )
        heads = fetch_rows(self.con, "SELECT head, model, task, val_accuracy, val_miou, n_train, n_val, len(classes) AS n_classes FROM heads ORDER BY head")
        self.render("index.html", "index.html", saes=saes, figures=[f for f in figures if f != "concept_ap"], datasets=datasets,
                    heads=heads, stats=self.stats, concept_figure="concept_ap" in figures)

    def concept_ap_figure(self) -> dict[str, Any]:
        """Each SAE's best-concept AP over its live features, next to the same under permuted labels
        (the null's best concept chosen the same way, by AP above chance)."""
        rows = fetch_rows(
            self.con,
            "WITH lvl AS (SELECT sae_id, CASE WHEN bool_or(level = 'patch') THEN 'patch' ELSE 'image' END AS level FROM concepts GROUP BY 1) "
            "SELECT c.sae_id, any_value(lvl.level) AS level, arg_max(c.ap, c.ap_lift) AS ap, "
            "arg_max(c.null_ap, (c.null_ap - c.base_rate) / (1 - c.base_rate)) AS null_ap "
            "FROM concepts c JOIN lvl USING (sae_id, level) JOIN features f USING (sae_id, feature) "
            "WHERE NOT f.dead GROUP BY c.sae_id, c.feature",
        )
        by_sae = _group(rows, lambda r: r["sae_id"])
        series = [{"name": s.short, "ap": [r["ap"] for r in by_sae[s.sae_id]], "null_ap": [r["null_ap"] for r in by_sae[s.sae_id]]}
                  for s in self.saes if s.sae_id in by_sae]
        levels = sorted({r["level"] for r in rows})
        return charts.ap_distributions(series, "/".join(levels) or "patch")

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
        for sae in self.saes:
            self.build_sae(sae, indexes.pop(sae.sae_id))
        self.stats.n_saes = len(self.saes)
        self.build_edits()
        self.concepts = build_concept_pages(self)
        self.build_compare()
        self.build_index()
        self.stats.n_thumbnails = len({name for name in self.thumb_names.values() if name})
        return self.stats


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


def build_site(run_dir: Path, out_dir: Path, report: ReportSpec, model_labels: dict[str, str] | None = None, workers: int | None = None) -> SiteStats:
    """Render the atlas of the run's published tables into `out_dir` (replaced atomically).

    `model_labels` maps model keys to display names (`dino` → `DINOv2`); `workers`
    sets the overlay process pool (default: CPU count, at most 8; 1 = in process).
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
        f"{stats.n_images_rendered:,} images drawn, {stats.n_bytes / 2**20:.1f} MB in {stats.seconds:.1f} s → {escape(str(out_dir))}/index.html"
    )
    return stats
