"""The Python↔JS data contract (render/contract.py), from both sides: every positional row a built
site carries has its declared shape, every field atlas.js reads is declared (and every declared field
is read), and in the browser an undeclared name throws instead of reading `undefined`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from saev_report.render import addresses as addr
from saev_report.render import contract
from saev_report.render.builder import ASSETS_DIR
from saev_report.render.site import build_site
from saev_report.render.synthetic import SyntheticRun, SyntheticSAE, write_synthetic_run
from saev_report.spec import ReportSpec

ATLAS_JS = (ASSETS_DIR / "atlas.js").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    write_synthetic_run(run_dir, SyntheticRun(saes=[SyntheticSAE("dino", 30), SyntheticSAE("clip", 30, seed=1)], n_images=8,
                                              image_px=48, grid=(4, 4), top_k=4, labels=["bird", "boat", "cat", "dog", "fish", "tree"]))
    out = run_dir / "site"
    build_site(run_dir, out, ReportSpec(title="contract", exemplars_shown=4, thumbnail_px=48), workers=1)
    return out


def _data_file(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return json.loads(re.search(r"SAEV\.data\[[^\]]*\]=(.*);\s*$", text, re.S).group(1))


def test_pack_puts_fields_in_order_and_refuses_unknown_or_missing_ones():
    assert contract.SIMILAR.pack(cosine=0.5, feature=3) == [3, 0.5]
    assert contract.SPLIT.pack(label=1, n_fire=2, mean_act=0.3) == [1, 2, 0.3]  # the optional count left off
    assert contract.SPLIT.pack(label=1, n_fire=2, mean_act=0.3, n_images=9) == [1, 2, 0.3, 9]
    with pytest.raises(KeyError, match="no field cosin"):
        contract.SIMILAR.pack(feature=3, cosin=0.5)
    with pytest.raises(KeyError, match="missing cosine"):
        contract.SIMILAR.pack(feature=3)


def test_every_row_a_built_site_carries_has_its_declared_shape(site):
    seen: set[str] = set()

    def check(kind: contract.Row, rows: list) -> None:
        for row in rows:
            kind.check(row)
        seen.add(kind.name) if rows else None

    data_files = sorted((site / "data").rglob("*.js"))
    for path in data_files:
        d = _data_file(path)
        if "feature" not in d:  # the index's and concept pages' data files hold no rows
            continue
        check(contract.SAE_REF, d["saes"])
        check(contract.COMPARISON_REF, d["comparisons"])
        check(contract.CONCEPT_BASE, d["concept_base"])
    pages = [p for p in (site / "features").rglob("*.html") if p.stem.isdigit()]
    assert pages
    for page in pages:
        panels = json.loads(re.search(r'id="panels">(.*?)</script>', page.read_text(encoding="utf-8"), re.S).group(1))
        if panels["hist"] is not None:
            check(contract.HIST, [panels["hist"]])
        check(contract.BAND, panels["bands"])
        for band in panels["bands"]:
            check(contract.BAND_SAMPLE, band[contract.BAND.index()["samples"]])
        check(contract.MATCH, panels["matches"])
        check(contract.SPLIT, panels["split"])
        check(contract.SIMILAR, panels["similar"])
    assert seen >= {"sae_ref", "comparison_ref", "hist", "band", "band_sample", "match", "split", "similar"}, seen


def _js_field_reads() -> dict[str, set[str]]:
    """Row kind → the fields atlas.js reads: `F.row.field`, and `X.field` where `X = F.row`."""
    reads: dict[str, set[str]] = {}
    for row, fld in re.findall(r"\bF\.(\w+)\.(\w+)", ATLAS_JS):
        reads.setdefault(row, set()).add(fld)
    for alias, row in re.findall(r"\b([A-Z])\s*=\s*F\.(\w+)\b(?!\.)", ATLAS_JS):
        reads.setdefault(row, set())
        for fld in re.findall(rf"(?<![\w.]){alias}\.(\w+)", ATLAS_JS):
            reads[row].add(fld)
    return reads


def test_atlas_js_reads_only_declared_fields_and_every_declared_field():
    reads = _js_field_reads()
    assert set(reads) == set(contract.ROWS), "atlas.js and contract.ROWS name different row kinds"
    for name, row in contract.ROWS.items():
        assert reads[name] == set(row.fields), (name, reads[name] ^ set(row.fields))


def test_the_site_ships_the_contract_ahead_of_atlas_js(site):
    shipped = (site / "assets" / "atlas.js").read_text(encoding="utf-8")
    assert shipped.startswith(contract.fields_script())
    assert shipped.endswith(ATLAS_JS)


def test_in_the_browser_a_feature_page_reads_rows_by_name_and_unknown_names_throw(site, browser):
    from headless import open_page, severe

    page = sorted((site / addr.sae_dir("dino", addr.sae_slug("dino/L10/relu-x1-l1_0.0004-s0", "dino"))).glob("[0-9]*.html"))[0]
    logs = open_page(browser, page)
    assert not severe(logs), logs
    assert browser.execute_script("return SAEV.F.match.score") == contract.MATCH.index()["score"]
    error = browser.execute_script("try { SAEV.F.match.scor; return null } catch (e) { return String(e) }")
    assert error and "no field of match: scor" in error
    error = browser.execute_script("try { SAEV.F.matches; return null } catch (e) { return String(e) }")
    assert error and "no row kind matches" in error
