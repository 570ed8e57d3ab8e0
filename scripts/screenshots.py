"""Regenerate the README's screenshots from a built site with headless Chromium.

    python scripts/screenshots.py                    # from runs/demo/site (after `make demo`)
    python scripts/screenshots.py runs/other/site --out /tmp/shots

The committed pictures come from `scripts/screenshots.yaml` (the demo's photos and model, built
smaller): `saev-report build scripts/screenshots.yaml && python scripts/screenshots.py runs/shots/site`.

Writes `feature.png` (the feature page of the SAE's most label-pure feature with a full set of
exemplars; `--feature N` picks another) and `concept.png` (the concept page whose top features
remove the most of their concept; `--concept NAME` picks another) into `--out` (default
docs/screenshots). Uses Debian's chromium and chromedriver through tests/headless.py, the same
helpers as the browser tests.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from saev_report.fsutil import atomic_write_bytes  # noqa: E402
from saev_report.render import addresses as addr  # noqa: E402
from saev_report.render.concepts import concept_page  # noqa: E402
from saev_report.tables import query  # noqa: E402

WIDTH, MAX_HEIGHT = 1280, 1600


def feature_path(site: Path, feature: int | None) -> Path:
    """The page of `feature` (default: the most label-pure one with a full set of exemplars) of the first SAE."""
    run = site.parent
    rows = query(run, "SELECT sae_id, model FROM saes ORDER BY sae_id LIMIT 1").to_pylist()
    if not rows:
        raise SystemExit(f"{run}: no SAE in the tables")
    sae_id, model = rows[0]["sae_id"], rows[0]["model"]
    if feature is None:
        best = query(run, "SELECT feature FROM features WHERE sae_id = ? AND NOT dead AND n_exemplars = "
                          "(SELECT max(n_exemplars) FROM features WHERE sae_id = ?) "
                          "ORDER BY label_purity DESC NULLS LAST, max_act DESC LIMIT 1".replace("?", f"'{sae_id}'")).to_pylist()
        feature = best[0]["feature"]
    page = site / addr.feature_page(model, addr.sae_slug(sae_id, model), feature)
    if not page.exists():  # a slug made unique with a digest: find the page by its folder
        matches = sorted((site / "features" / addr.safe_name(model)).glob(f"*/{feature}.html"))
        if not matches:
            raise SystemExit(f"{site}: no page for feature {feature} of {sae_id}")
        page = matches[0]
    return page


def concept_path(site: Path, concept: str | None) -> Path:
    """The page of `concept` (default: the one whose own top features remove most of it) among the tested concepts."""
    run = site.parent
    if concept is None:
        rows = query(run, "SELECT level, concept FROM experiments WHERE arm = 'concept' GROUP BY ALL "
                          "ORDER BY coalesce(sum(concept_px_removed) / nullif(sum(concept_px_before), 0), -avg(p_delta)) DESC "
                          "LIMIT 1").to_pylist()
        if not rows:
            raise SystemExit(f"{run}: no concept experiment in the tables (the spec has no `experiments`)")
    else:
        rows = query(run, f"SELECT DISTINCT level, concept FROM experiments WHERE concept = '{concept.replace(chr(39), '')}'").to_pylist()
        if not rows:
            raise SystemExit(f"{run}: no experiment tested {concept!r}")
    return site / concept_page(rows[0]["level"], rows[0]["concept"])


def shoot(driver, page: Path, ready_js: str) -> bytes:
    from headless import open_page, severe
    from selenium.webdriver.support.ui import WebDriverWait

    driver.set_window_size(WIDTH, 1000)
    logs = open_page(driver, page)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(ready_js))
    if severe(logs + driver.get_log("browser")):
        raise SystemExit(f"{page}: the page logged errors: {severe(logs)}")
    height = min(MAX_HEIGHT, int(driver.execute_script("return document.documentElement.scrollHeight")))
    driver.set_window_size(WIDTH, height)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(ready_js))
    return driver.get_screenshot_as_png()


FEATURE_READY = "return document.body.getAttribute('data-nav') === 'ready' && [...document.images].every(i => i.complete)"
CONCEPT_READY = ("return document.querySelectorAll('.js-plotly-plot .main-svg').length > 0 "
                 "&& [...document.images].every(i => i.complete)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", type=Path, default=ROOT / "runs/demo/site", help="a built site folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/screenshots")
    parser.add_argument("--feature", type=int, default=None)
    parser.add_argument("--concept", default=None)
    args = parser.parse_args(argv)
    if not (args.site / "index.html").exists():
        raise SystemExit(f"{args.site}: not a built site (run `make demo` first)")
    from headless import start_browser

    with tempfile.TemporaryDirectory() as profile:
        driver = start_browser(Path(profile))
        try:
            shots = {"feature.png": shoot(driver, feature_path(args.site, args.feature), FEATURE_READY),
                     "concept.png": shoot(driver, concept_path(args.site, args.concept), CONCEPT_READY)}
        finally:
            driver.quit()
    for name, png in shots.items():
        atomic_write_bytes(args.out / name, png)
        print(f"wrote {args.out / name} ({len(png) / 1e3:.0f} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
