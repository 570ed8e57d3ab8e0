"""Benchmark: building the static atlas of one synthetic 24K-feature SAE.

    python bench/site.py            # 24,576 features, 16 exemplars each over 10,000 distinct images
    python bench/site.py --quick    # 2,048 features over 1,000 images

A fresh build (one thumbnail per distinct image, a page per feature with its
packed patch maps, indexes) and a template-only rebuild (every thumbnail
reused from the previous site) are each timed against a baseline measured in
the same run: writing files of the same sizes and layout as the built site
with no work behind them (the I/O floor of any site that size). Also peak RSS
(main process and pool workers), the site's size, bytes per feature page and
per distinct image, and the projection to the paper's case: 24,576 features
over ImageNet-1K.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")

from saev_report.render.site import build_site  # noqa: E402
from saev_report.render.synthetic import SyntheticRun, SyntheticSAE, write_synthetic_run  # noqa: E402
from saev_report.spec import ReportSpec  # noqa: E402


def write_same_files(site: Path, folder: Path) -> tuple[float, int]:
    """The I/O floor: seconds to write files of the same sizes and folder layout as the built site."""
    sizes = [(p.relative_to(site), p.stat().st_size) for p in site.rglob("*") if p.is_file()]
    start = time.perf_counter()
    made: set[Path] = set()
    for rel, size in sizes:
        path = folder / rel
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(b"x" * size)
    return time.perf_counter() - start, len(sizes)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def peak_rss_mb() -> tuple[float, float]:
    kb_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kb_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kb_self / 1024, kb_children / 1024


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (pool workers): robust to a busy machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_twice(run_dir: Path, site: Path, report: ReportSpec, workers: int | None, results) -> None:
    """In a child process: a fresh build, its peak RSS (own and pool workers'), then a template-only rebuild."""
    cpu0 = cpu_seconds()
    stats = build_site(run_dir, site, report, {"dino": "DINOv2"}, workers=workers)
    cpu1 = cpu_seconds()
    rss = peak_rss_mb()
    rebuild = build_site(run_dir, site, report.model_copy(update={"title": "bench (rebuilt)"}), {"dino": "DINOv2"}, workers=workers)
    cpu2 = cpu_seconds()
    results.put((stats, rss, rebuild, (cpu1 - cpu0, cpu2 - cpu1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,048 features over 1,000 images instead of 24,576 over 10,000")
    parser.add_argument("--features", type=int, help="override the number of features")
    parser.add_argument("--images", type=int, help="override the number of distinct images")
    parser.add_argument("--workers", type=int, default=None, help="thumbnail processes (default: CPU count, at most 8)")
    parser.add_argument("--exemplars", type=int, default=16, help="exemplars shown per feature page")
    parser.add_argument("--keep", type=Path, help="build here and keep the site (default: a temporary folder)")
    args = parser.parse_args()
    n_features = args.features or (2048 if args.quick else 24576)

    root = args.keep or Path(tempfile.mkdtemp(prefix="saev-bench-site-"))
    run_dir = root / "run"
    synthetic = SyntheticRun(
        saes=[SyntheticSAE("dino", n_features, d_model=768)],
        n_images=args.images or (1000 if args.quick else 10_000),
        image_px=224,
        image_format="jpg",
        grid=(16, 16),
        top_k=16,
        edits=False,
        matches=False,
        features_per_part=2048,
    )
    print(f"writing synthetic tables: {n_features:,} features, {synthetic.n_images:,} images, 16 exemplars + 12 quantile samples "
          "of 16×16 patches each ...", flush=True)
    started = time.perf_counter()
    # A child process, so the generator's memory does not count in the build's peak RSS.
    child = multiprocessing.get_context("spawn").Process(target=write_synthetic_run, args=(run_dir, synthetic))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit("writing the synthetic tables failed")
    print(f"  {time.perf_counter() - started:.1f} s, tables {tree_bytes(run_dir / 'tables') / 2**20:.0f} MB", flush=True)

    report = ReportSpec(title="bench", exemplars_shown=args.exemplars, thumbnail_px=160)
    site = root / "site"
    # The build runs in its own process so that its peak RSS is its own, not the generator's.
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    builder = spawn.Process(target=build_twice, args=(run_dir, site, report, args.workers, results))
    builder.start()
    stats, (rss_main, rss_children), rebuild, (cpu_fresh, cpu_rebuild) = results.get()
    builder.join()

    pages = stats.n_feature_pages
    baseline_dir = root / "baseline"
    cpu0 = cpu_seconds()
    baseline, n_files = write_same_files(site, baseline_dir)
    cpu_baseline = cpu_seconds() - cpu0
    shutil.rmtree(baseline_dir)
    per_k = 1000 / max(pages, 1)
    site_bytes = tree_bytes(site)
    thumb_bytes = tree_bytes(site / "img" / "t")
    page_bytes = tree_bytes(site / "features")
    fixed_bytes = site_bytes - thumb_bytes - page_bytes  # assets (plotly.js), data files, index
    per_page, per_image = page_bytes / max(pages, 1), thumb_bytes / max(stats.n_thumbnails, 1)
    print()
    print(f"features {n_features:,}; feature pages {pages:,}; heat-maps {stats.n_heatmaps:,} (drawn in the browser); "
          f"thumbnails {stats.n_thumbnails:,}; workers {args.workers or min(os.cpu_count() or 1, 8)}")
    print(f"{'':46s} {'wall s':>8s} {'CPU s':>8s} {'wall ×baseline':>15s}")
    rows = [
        (f"baseline: write the site's {n_files:,} files as bytes", baseline, cpu_baseline),
        ("fresh build", stats.seconds, cpu_fresh),
        ("template-only rebuild (thumbnails reused)", rebuild.seconds, cpu_rebuild),
    ]
    for name, wall, cpu in rows:
        print(f"{name:46s} {wall:8.1f} {cpu:8.1f} {wall / baseline:14.1f}×")
    print(f"per 1,000 pages: fresh {stats.seconds * per_k:.2f} s, rebuild {rebuild.seconds * per_k:.2f} s")
    print(f"images drawn: fresh {stats.n_images_rendered:,}, rebuild {rebuild.n_images_rendered:,}")
    print(f"peak RSS: build process {rss_main:,.0f} MB, largest pool worker {rss_children:,.0f} MB")
    print(f"site size {site_bytes / 2**20:,.1f} MB: feature pages {page_bytes / 2**20:,.1f} MB ({per_page / 1024:.1f} KB each), "
          f"thumbnails {thumb_bytes / 2**20:,.1f} MB ({per_image / 1024:.1f} KB each), the rest {fixed_bytes / 2**20:.1f} MB "
          f"(plotly.js {(site / 'assets' / 'plotly.min.js').stat().st_size / 2**20:.1f} MB)")
    # The paper: 24,576 features; its exemplars (16 top + 12 samples) can show at most that many distinct
    # ImageNet-1K train images, and at most the 1,281,167 there are.
    paper_images = min(1_281_167, 24_576 * 28)
    paper = 24_576 * per_page + paper_images * per_image + fixed_bytes
    print(f"projection, paper (24,576 features over ImageNet-1K, ≤ {paper_images:,} distinct exemplar images): "
          f"{paper / 2**30:.2f} GB per SAE ({24_576 * per_page / 2**30:.2f} GB pages + {paper_images * per_image / 2**30:.2f} GB thumbnails)")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
