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
thumbnails; without scripts the plain thumbnails show. Feature pages carry an
inline SVG histogram, never a plotly chart; only the index, the per-SAE lists,
the concept and the comparison pages load plotly.js.

One module per page kind, each given the `builder.SiteBuilder` core: `features`
(feature pages and SAE lists), `edits`, `concepts`, `compare`, `index_page`.
`PAGE_KINDS` is their order: feature pages first, since the others link to them.
The data Python hands to atlas.js as positional lists is declared in `contract`.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from rich.markup import escape as rich_escape

from saev_report import __version__, fsutil, tables
from saev_report.progress import log
from saev_report.render import addresses as addr
from saev_report.render import builder, charts, contract, features, heatmaps, overlays, queries
from saev_report.render.builder import SiteBuilder, SiteStats, fmt_num, fmt_pct  # noqa: F401  (re-exported)
from saev_report.manifest import RESOLVED_SPEC_FILE, read_manifest
from saev_report.render.build_page import build_build_page
from saev_report.render.claims import build_claims_page
from saev_report.render.compare import ComparePages
from saev_report.render.concepts import build_concept_pages
from saev_report.render.edits import EditPages
from saev_report.render.features import FeaturePages
from saev_report.render.index_page import IndexPage
from saev_report.spec import ReportSpec, content_hash

PAGE_CACHE = "render"  # under the run's cache/: feature-page contexts per chunk, for template-only rebuilds


def _concept_pages(site: SiteBuilder) -> None:
    site.concepts = build_concept_pages(site)


def _claims_page(site: SiteBuilder) -> None:
    site.has_claims = build_claims_page(site, has_concept_pages=bool(site.concepts))


# In build order: every later kind links to feature pages, and the index lists what the others made.
PAGE_KINDS: tuple[tuple[str, Callable[[SiteBuilder], None]], ...] = (
    ("features", lambda site: FeaturePages(site).build()),
    ("edits", lambda site: EditPages(site).build()),
    ("concepts", _concept_pages),
    ("claims", _claims_page),
    ("compare", lambda site: ComparePages(site).build()),
    ("build", build_build_page),
    ("index", lambda site: IndexPage(site).build()),
)


def build_pages(site: SiteBuilder) -> SiteStats:
    """Every page kind, in `PAGE_KINDS` order, into the site's staging folder."""
    site.prepare()
    for _name, build in PAGE_KINDS:
        build(site)
    site.stats.n_saes = len(site.saes)
    site.stats.n_thumbnails = len({name for name in site.thumb_names.values() if name})
    return site.stats


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
            for m in (sys.modules[__name__], builder, features, contract, heatmaps, charts, queries, addr, overlays)]
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



# --------------------------------------------------------------------------- entry point


def _site_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def build_site(run_dir: Path, out_dir: Path, report: ReportSpec, model_labels: dict[str, str] | None = None, workers: int | None = None,
               page_cache: bool = True, cache_dir: Path | None = None) -> SiteStats:
    """Render the atlas of the run's published tables into `out_dir` (replaced atomically).

    `model_labels` maps model keys to display names (`dino` → `DINOv2`); `workers`
    sets the thumbnail process pool (default: CPU count, at most 8; 1 = in process);
    `page_cache` keeps the feature pages' contexts in `<run>/cache/render/` for the next render;
    `cache_dir` is the shared cache the `images` table's relative paths are in (default: the one the
    run's manifest names).
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
    resolved = Path(run_dir) / RESOLVED_SPEC_FILE
    manifest = read_manifest(Path(run_dir))
    cache = cache_dir if cache_dir is not None else (manifest or {}).get("cache_dir")
    site = SiteBuilder(con, staging, previous, report, model_labels or {}, workers, manifest=manifest,
                       resolved_spec=resolved.read_text(encoding="utf-8") if resolved.is_file() else None,
                       cache_dir=None if cache is None else str(cache))
    if page_cache:
        site.page_cache = prepare_page_cache(Path(run_dir), page_cache_key(Path(run_dir), report, model_labels or {}))
    try:
        stats = build_pages(site)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        site.close()
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
