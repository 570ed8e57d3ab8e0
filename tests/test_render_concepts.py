"""Concept pages: dose-response figures with the controls on the same axes, the strongest-setting
summary, escaping of concept names, and links that resolve; from synthetic tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from saev_report.render import concepts as rc
from saev_report.render.site import build_site
from saev_report.render.synthetic import SyntheticRun, SyntheticSAE, write_summary, write_synthetic_run
from saev_report.spec import ReportSpec
from saev_report.tables import read_table, write_table

EVIL = "<script>alert(1)</script>"
REPORT = ReportSpec(title="concepts test", thumbnail_px=64)


def summary_row(arm: str, m: int, factor: float, effect: float, task: str = "segmentation") -> dict:
    key = "removed_frac" if task == "segmentation" else "p_delta"
    return {"task": task, "arm": arm, "m": m, "factor": factor, "where": "all", key: effect,
            "other_changed_frac": 0.01, "other_p_delta": 0.01, "flip_frac": 0.5}


def test_dose_response_has_one_line_per_arm_and_m_on_shared_axes():
    rows = [summary_row(arm, m, f, 0.1 * m * (1 - f)) for arm in ("concept", "random", "other") for m in (1, 4) for f in (1.0, 0.0, -1.0)]
    fig = rc.dose_response(rows, "t")
    assert len(fig["data"]) == 6
    dashes = {t["line"]["dash"] for t in fig["data"]}
    assert dashes == {"solid", "dot", "dash"}
    for trace in fig["data"]:
        assert trace["x"] == [1.0, 0.0, -1.0]  # from no edit towards the strongest
    assert fig["layout"]["xaxis"]["autorange"] == "reversed"


def test_strongest_setting_takes_largest_m_and_lowest_factor_with_its_controls():
    rows = [summary_row(arm, m, f, {"concept": 0.8, "random": 0.02, "other": 0.1}[arm] * m / 4 * (1 - f) / 3)
            for arm in ("concept", "random", "other") for m in (1, 4) for f in (1.0, 0.0, -2.0)]
    best = rc.strongest(rows)
    assert (best["m"], best["factor"]) == (4, -2.0)
    assert best["concept_effect"] == pytest.approx(0.8) and best["random_effect"] == pytest.approx(0.02)
    assert best["other_side"] == 0.01
    assert rc.strongest([summary_row("random", 1, 0.0, 0.1)]) is None


def _experiment_rows(concept: str, sae_id: str, n_images: int, grid: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for arm in ("concept", "random", "other"):
        for m in (1, 4):
            for factor in (1.0, 0.0, -2.0):
                for image in range(n_images):
                    before = 20 * int(rng.integers(3, 10))
                    removed = 0 if factor == 1.0 else round(before * (0.9 if arm == "concept" else 0.05))
                    rows.append({
                        "experiment": "e", "sae_id": sae_id, "head": "seg", "task": "segmentation", "level": "patch", "concept": concept,
                        "arm": arm, "m": m, "factor": factor, "where": "all", "features": [1, 2][:m], "dataset": "photos", "image_idx": image,
                        "concept_px_before": before, "concept_px_removed": removed, "removed_frac": removed / before,
                        "other_changed_frac": 0.0, "before_map": rng.integers(0, 3, grid * grid).tolist(),
                        "after_map": rng.integers(0, 3, grid * grid).tolist(),
                    })
    return rows


def _write_claims(run_dir: Path, rows: list[dict], sae_id: str, twin_id: str) -> None:
    """A claim on both seeds, evaluated as the claims stage does, its name hostile to HTML."""
    import duckdb

    from saev_report import claims as cl
    from saev_report.spec import ExperimentClaim, StatsSpec
    from saev_report.stages.claims import ResolvedClaim
    from saev_report.tables import to_arrow

    claim = ExperimentClaim.model_validate({
        "name": "removes", "kind": "experiment", "experiment": "e", "saes": [0, 1], "statement": f"removes {EVIL}",
        "setting": {"m": 4, "factor": -2.0}, "conditions": [{"metric": "removed_frac", "min": 0.5}], "beats": ["random"]})
    con = duckdb.connect()
    con.register("experiments", to_arrow("experiments", rows))
    claims, evidence = cl.evaluate([ResolvedClaim(claim=claim, sae_ids=[sae_id, twin_id], seeds=[0, 1])], cl.per_image(con), [], {},
                                   StatsSpec(correction="bh"), 0)
    write_table(run_dir / "tables" / "claims" / "part-0.parquet", "claims", claims, "synthetic")
    write_table(run_dir / "tables" / "claim_evidence" / "part-0.parquet", "claim_evidence", evidence, "synthetic")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run = SyntheticRun(saes=[SyntheticSAE("dino", 20), SyntheticSAE("dino", 20, seed=1)], n_images=6, image_px=64, grid=(6, 6), top_k=4, labels=["cat", "bird", "boat", "dog", "fish", "cow"], edits=False, matches=False,
                       features_per_part=20)
    write_synthetic_run(run_dir, run)
    sae_id, twin_id = sorted(read_table(run_dir, "saes").column("sae_id").to_pylist())
    dataset = read_table(run_dir, "images").column("dataset")[0].as_py()
    # the second seed (same model and width) is tested on "cat" too: its panel must be told apart
    rows = _experiment_rows("cat", sae_id, 3, 6) + _experiment_rows("cat", twin_id, 3, 6) + _experiment_rows(EVIL, sae_id, 2, 6)
    # an image-level (classification) experiment: no class maps, probabilities instead
    rows += [{**r, "experiment": "c", "head": "cls", "task": "classification", "level": "image", "concept": "dog",
              "before_map": None, "after_map": None, "p_before": 0.6, "p_after": 0.6 if r["factor"] == 1.0 else 0.1}
             for r in _experiment_rows("dog", sae_id, 2, 6)]
    for r in rows:
        r["dataset"] = dataset
    write_table(run_dir / "tables" / "experiments" / "part-0.parquet", "experiments", rows, "synthetic")
    write_summary(run_dir / "tables", rows)
    _write_claims(run_dir, rows, sae_id, twin_id)
    out = run_dir / "site"
    build_site(run_dir, out, REPORT, {"dino": "DINOv2"}, workers=1)
    return out


def test_a_page_per_concept_with_figures_and_examples(built):
    index = (built / "concepts" / "index.html").read_text(encoding="utf-8")
    pages = sorted((built / "concepts").glob("patch-*.html"))
    assert len(pages) == 2
    assert (built / rc.concept_page("image", "dog")).is_file()  # a concept page without class maps renders too
    cat = (built / rc.concept_page("patch", "cat")).read_text(encoding="utf-8")
    assert 'data-concept-figure="dose-1"' in cat and cat.count("predicted classes after") == 6  # 3 examples per SAE
    titles = re.findall(r"<h2[^>]*>(.*?)</h2>", cat, re.S)
    seeds = [t for t in titles if "-s0" in t or "-s1" in t]
    assert len(seeds) == 2 and len(set(seeds)) == 2, titles  # the two seeds' panels are named apart
    assert "90%" in index and "5%" in index  # the strongest setting's effect and the random control's, pooled over images
    data = (built / "data" / "concepts" / "patch-cat.js").read_text(encoding="utf-8")
    figures = json.loads(re.search(r"=(\{.*\});", data).group(1))
    lines = [t for t in figures["dose-0"]["data"] if t["mode"] == "lines+markers"]
    bands = [t for t in figures["dose-0"]["data"] if t.get("fill") == "toself"]
    assert len(lines) == 6 and len(bands) == 4  # 3 arms × 2 m; intervals as bands on the concept and random arms
    assert all(len(b["x"]) == 2 * len(lines[0]["x"]) for b in bands)
    assert "[" in index and "]" in index  # the overview's effects carry their intervals
    for img in re.findall(r'src="([^"]+\.jpg)"', cat):
        assert (built / "concepts" / img).resolve().is_file(), img
    assert 'href="concepts/index.html"' in (built / "index.html").read_text(encoding="utf-8")


def test_the_claims_page_states_the_verdict_per_seed_and_links_the_concept_pages(built):
    page = (built / "claims.html").read_text(encoding="utf-8")
    assert 'href="claims.html"' in (built / "index.html").read_text(encoding="utf-8")
    assert "removes" in page and "verdict-" in page and "seed 0" in page and "seed 1" in page
    assert 'href="concepts/patch-cat.html"' in page
    assert "sign-flip" in page and "BH" in page


def test_concept_names_are_escaped(built):
    html = "\n".join(p.read_text(encoding="utf-8") for p in built.rglob("*.html"))
    assert EVIL not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for js in (built / "data" / "concepts").glob("*.js"):
        assert "<" not in js.read_text(encoding="utf-8")


def test_concept_pages_draw_their_figures_in_a_browser(built, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    from headless import no_xss, open_page, severe

    for page in (rc.concept_page("patch", "cat"), rc.concept_page("patch", EVIL), rc.concept_page("image", "dog"), "concepts/index.html"):
        logs = open_page(browser, built / page)
        n_figures = browser.execute_script("return document.querySelectorAll('[data-concept-figure]').length")
        WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.querySelectorAll('.js-plotly-plot').length") == n_figures)
        assert not severe(logs + browser.get_log("browser")), (page, logs)
        no_xss(browser)
        if page != "concepts/index.html":
            assert n_figures >= 1
            browser.execute_script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")  # lazy below the fold
            WebDriverWait(browser, 20).until(lambda d: d.execute_script("return [...document.images].every(i => i.complete)"))
            images = browser.execute_script("return [...document.images].map(i => [i.src, i.naturalWidth > 0])")
            assert images and all(ok for _, ok in images), [src for src, ok in images if not ok]
