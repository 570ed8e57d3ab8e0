"""Building the demo set (stamps and backgrounds loaded, 600 composites written as PNG), on the
default threads against one thread, in one run; the bytes of both builds must be equal.

    python bench/demo_images.py            # the demo's 600 images at 256 px
    python bench/demo_images.py --quick    # 120 images

Needs the demo's sources (`make install`). Ratios by wall time: the point of the threads is that
PIL and zlib work outside the GIL, so process-CPU time stays about the same.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Timer  # noqa: E402

from saev_report.datasets import demo  # noqa: E402


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def timed_build(sources: demo.DemoSources, n_images: int, workers: int | None) -> tuple[Timer, dict[str, str]]:
    out = Path(tempfile.mkdtemp(prefix="demo-bench-")) / "set"
    try:
        with Timer() as t:
            demo.build_demo(out, sources, n_images, 256, 0, workers=workers)
        return t, file_hashes(out)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120 images instead of 600")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each is kept")
    args = parser.parse_args()
    n_images = 120 if args.quick else 600
    sources = demo.demo_sources(None)
    best: dict[str, Timer] = {}
    hashes: dict[str, dict[str, str]] = {}
    for _ in range(args.rounds):
        for label, workers in (("1 thread", 1), ("default threads", None)):
            t, hashes[label] = timed_build(sources, n_images, workers)
            if label not in best or t.wall < best[label].wall:
                best[label] = t
    assert hashes["1 thread"] == hashes["default threads"], "threaded build wrote other bytes"
    one, many = best["1 thread"], best["default threads"]
    print(f"demo set, {n_images} images: 1 thread {one.wall:.1f} s wall ({one.cpu:.1f} CPU-s), "
          f"default threads {many.wall:.1f} s wall ({many.cpu:.1f} CPU-s)")
    print(f"ratio (1 thread / threads, wall): {one.wall / many.wall:.2f}x; bytes identical")


if __name__ == "__main__":
    main()
