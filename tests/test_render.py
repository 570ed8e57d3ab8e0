"""The static atlas: addresses, escaping, overlays, the built folder, and the pages in a real browser.

Synthetic tables (saev_report.render.synthetic) with tiny real PNG images are
rendered once per module; browser tests drive Debian chromium headless over
file:// URLs and are skipped only where chromium/chromedriver are missing.
"""

from __future__ import annotations

import os

import json
import math
import re
import shutil
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from headless import no_xss as _no_xss
from headless import open_page as _open
from headless import severe as _severe
from saev_report.render import addresses as addr
from saev_report.render import charts, heatmaps, overlays
from saev_report.render import builder as builder_mod
from saev_report.render import features as features_mod
from saev_report.render import site as site_mod
from saev_report.render.site import build_site
from saev_report.render.synthetic import SyntheticRun, SyntheticSAE, write_synthetic_run
from saev_report.spec import ReportSpec
from saev_report.tables import read_table, write_table

EVIL_LABELS = [
    "<script>alert(1)</script>",
    '"onload=alert(1)',
    "<img src=x onerror=window.__xss=1>",
    "</script><script>window.__xss=2</script>",
    "cat & dog",
]
LABELS = {"dino": "DINOv2", "clip": '<b onmouseover="window.__xss=3">CLIP</b>'}


def small_run(**overrides) -> SyntheticRun:
    base = dict(
        saes=[SyntheticSAE("dino", 40), SyntheticSAE("clip", 40, seed=1)],
        n_images=10,
        image_px=64,
        grid=(6, 6),
        top_k=6,
        labels=EVIL_LABELS + ["bird", "boat"],
        features_per_part=25,
    )
    base.update(overrides)
    return SyntheticRun(**base)


REPORT = ReportSpec(title="Atlas <test>", exemplars_shown=5, thumbnail_px=64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    facts = write_synthetic_run(run_dir, small_run())
    out = run_dir / "site"
    stats = build_site(run_dir, out, REPORT, LABELS, workers=1)
    return run_dir, out, stats, facts


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("sae_id", "model", "slug"),
    [
        ("dino/L10/relu-x16-l1_0.0004-s0", "dino", "L10-relu-x16-l1_0.0004-s0"),
        ("clip/L11/topk-x32-k64-s1", "clip", "L11-topk-x32-k64-s1"),
    ],
)
def test_canonical_sae_slug_is_readable(sae_id, model, slug):
    assert addr.sae_slug(sae_id, model) == slug


def test_noncanonical_sae_ids_get_distinct_safe_slugs():
    ids = ["dino/a/b-c", "dino/a-b/c", "dino/x y", "dino/x_y", "dino/../etc", "other/L1/t"]
    slugs = [addr.sae_slug(i, "dino") for i in ids]
    assert len(set(slugs)) == len(ids)
    for slug in slugs:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._~-]*", slug), slug
        assert "/" not in slug and ".." not in slug.split("-")[0]


def test_unique_slugs_break_case_collisions():
    keys = [("m", "m/L1/Tag"), ("m", "m/L1/tag")]
    slugs = addr.unique_slugs(keys)
    assert len({s.lower() for s in slugs.values()}) == 2


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=40), st.text(min_size=0, max_size=40))
def test_safe_name_is_safe_and_injective(a, b):
    for text in (a, b):
        name = addr.safe_name(text)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._~-]*", name)
        assert len(name) <= 96
    if a != b:
        assert addr.safe_name(a) != addr.safe_name(b)


@pytest.mark.parametrize(
    ("label", "n", "feature", "title"),
    [("DINOv2", 6144, 1234, "DINOv2-6K/1234"), ("CLIP", 24576, 20652, "CLIP-24K/20652"), ("ViT", 768, 3, "ViT-768/3"), ("X", 16000, 1, "X-16K/1")],
)
def test_feature_title_uses_the_paper_notation(label, n, feature, title):
    assert addr.feature_title(label, n, feature) == title


def test_root_of_page():
    assert addr.root_of("index.html") == ""
    assert addr.root_of("features/dino/L1-t/3.html") == "../../../"


# --------------------------------------------------------------------------- escaping


@pytest.mark.parametrize("label", EVIL_LABELS + ["\u2028line", "a\"b'c"])
def test_script_json_cannot_close_a_script(label):
    text = charts.script_json({"labels": [label], "x": float("nan")})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"labels": [label], "x": None}


def test_plotly_text_escapes_pseudo_html():
    assert charts.plotly_text("<b>x</b> & y") == "&lt;b&gt;x&lt;/b&gt; &amp; y"


def test_svg_histogram_is_numbers_only():
    svg = str(charts.svg_histogram([1, 5, 0, 2], [0.0, 0.5, 1.0, 1.5, 2.0], height=96))
    heights = [-float(h) for h in re.findall(r"M[\d.]+ [\d.]+v(-[\d.]+)", svg)]
    assert len(heights) == 3  # one bar per non-empty bin, all in one path
    np.testing.assert_allclose(np.array(heights) / max(heights), [0.2, 1.0, 0.4], atol=0.01)
    assert "8 patches" in svg and "most in 0.5 to 1" in svg
    assert not re.search(r"[<>\"]", re.sub(r"<[^<>]*>", "", svg))  # text nodes are numbers and fixed words
    assert "No histogram" in str(charts.svg_histogram([], []))
    assert "No histogram" in str(charts.svg_histogram([1, 2], [0.0, 1.0]))  # edges must be counts + 1


def test_lift_tails_count_features_at_each_threshold():
    rng = np.random.default_rng(0)
    lift, null_lift = rng.uniform(-0.1, 0.7, 200), rng.uniform(-0.1, 0.2, 200)
    figure = charts.lift_tails([{"name": "a<b>", "lift": [*lift, None, math.nan], "null_lift": null_lift.tolist()}], "patch")
    real, null = figure["data"]
    assert real["x"] == null["x"] == charts.LIFT_THRESHOLDS.tolist() and real["x"][0] == 0.05 and real["x"][-1] == 1.0
    for trace, values in ((real, lift), (null, null_lift)):
        want = [int((values >= t).sum()) for t in charts.LIFT_THRESHOLDS]
        assert trace["y"] == [w if w else None for w in want]  # zero counts are gaps on the log axis
    assert real["y"][-1] is None and null["y"][5] is None  # nothing reaches lift 1; the null stops below 0.3
    assert real["name"] == "a&lt;b&gt;" and null["line"]["dash"] == "dot" and figure["layout"]["yaxis"]["type"] == "log"


def test_evil_labels_never_reach_html_unescaped(built):
    _, out, _, _ = built
    html = "\n".join(p.read_text(encoding="utf-8") for p in out.rglob("*.html"))
    # JSON data blocks hold labels as JSON strings ("\"onload..."): safe as long as nothing in them can end the block.
    blocks = re.findall(r'<script type="application/json" id="\w+">(.*?)</script>', html, flags=re.S)
    assert blocks and not any("<" in b or ">" in b or "&" in b for b in blocks)
    html = re.sub(r'<script type="application/json" id="\w+">.*?</script>', "", html, flags=re.S)
    for label in EVIL_LABELS + [LABELS["clip"]]:
        if "<" in label or '"' in label:
            assert label not in html, label
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown, as text
    assert "&#34;onload=alert(1)" in html
    for js in (out / "data").rglob("*.js"):
        text = js.read_text(encoding="utf-8")
        assert "</script" not in text.lower() and "<" not in text


# --------------------------------------------------------------------------- overlays


def test_crop_box_matches_backbone_preprocessing():
    # Resize the shorter side to S·8/7 and centre-crop S: the central 7/8 of the shorter side.
    assert overlays.crop_box(200, 100) == (56, 6, 144, 94)
    assert overlays.crop_box(64, 64) == (4, 4, 60, 60)


def test_quantize_keeps_firing_patches_visible_and_one_scale():
    q = heatmaps.quantize(np.array([[0.0, 1e-6, 0.5, 1.0, 2.0, -1.0, np.nan]]), vmax=1.0)[0]
    assert q.tolist() == [0, 1, 128, 255, 255, 0, 0]
    assert heatmaps.quantize(np.ones((1, 3)), vmax=0.0).tolist() == [[0, 0, 0]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=64), min_size=0, max_size=12))
def test_pack_round_trips(maps):
    arrays = [np.array(m, dtype=np.uint8) for m in maps]
    assert heatmaps.unpack(heatmaps.pack(arrays)) == b"".join(a.tobytes() for a in arrays)


def test_rgba_reference_matches_the_colormap_rule():
    px = heatmaps.rgba(np.array([0, 1, 255]))
    assert px[0, 3] == 0 and px[2, 3] == round(255 * heatmaps.MAX_ALPHA)
    assert tuple(px[2, :3]) == tuple(heatmaps.COLORMAP_256x3[255]) == (252, 255, 164)
    script = heatmaps.colormap_script()
    assert script.count(",") == 256 * 3 - 1 + 2 and "maxAlpha:0.85" in script


def test_thumbnail_names_are_content_addressed(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(a)
    shutil.copy(a, b)
    site = tmp_path / "site"
    results = [overlays.make_thumbnail(overlays.ThumbJob(str(p), 32, str(site), None)) for p in (a, b)]
    assert results[0][1] == results[1][1] and results[0][2] and not results[1][2]  # same bytes → one file
    assert Image.open(site / addr.image_file("t", results[0][1])).size == (32, 32)
    assert overlays.make_thumbnail(overlays.ThumbJob(str(tmp_path / "missing.png"), 32, str(site), None))[1] is None


def test_thumbnails_of_names_that_are_not_utf8_and_of_images_in_the_cache(tmp_path):
    from saev_report.datasets.base import display_path, relative_to_cache

    odd = os.fsencode(tmp_path) + b"/gar\xe7on-caf\xe9.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(os.fsdecode(odd))
    site = tmp_path / "site"
    shown = display_path(os.fsdecode(odd))  # what the images table holds
    assert shown.endswith("gar\\xe7on-caf\\xe9.png")
    source, name, rendered = overlays.make_thumbnail(overlays.ThumbJob(shown, 32, str(site), None))
    assert source == shown and name is not None and rendered
    cache = tmp_path / "cache"
    (cache / "demo-1").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 20, 30)).save(cache / "demo-1" / "x.png")
    stored = relative_to_cache(cache / "demo-1" / "x.png", cache)
    assert stored == "demo-1/x.png"
    assert overlays.make_thumbnail(overlays.ThumbJob(stored, 32, str(site), None, str(cache)))[1] == name  # same pixels
    assert overlays.make_thumbnail(overlays.ThumbJob(stored, 32, str(site), None))[1] is None  # no cache: placeholder


# --------------------------------------------------------------------------- the built folder


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src") and value is not None:
                self.links.append(value)


def internal_links(page: Path) -> list[str]:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.links


def test_every_internal_link_resolves_and_nothing_is_remote(built):
    _, out, _, _ = built
    pages = list(out.rglob("*.html"))
    assert len(pages) > 50
    checked = 0
    for page in pages:
        for link in internal_links(page):
            parts = urlsplit(link)
            assert parts.scheme in ("", "data"), f"{page}: remote or odd link {link}"
            if parts.scheme == "data" or not parts.path:
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            assert target.is_file(), f"{page.relative_to(out)} → {link}"
            assert out.resolve() in target.parents
            checked += 1
    assert checked > 500
    for own in (out / "assets" / "style.css", out / "assets" / "atlas.js"):  # no CDN, no fonts, no fetch()
        text = own.read_text(encoding="utf-8").replace('"http://www.w3.org/2000/svg"', "")  # a namespace name, never fetched
        assert "http" not in text and "fetch(" not in text


def test_sae_data_files_point_at_existing_pages_and_images(built):
    _, out, _, _ = built
    for js in (out / "data").rglob("*.js"):
        if js.name == "index.js":
            continue
        text = js.read_text(encoding="utf-8")
        data = json.loads(text[text.index("]=") + 2 : text.rindex(";")])
        page_dir = out / data["page_dir"]
        assert len(set(data["thumbs"])) == len(data["thumbs"])  # each thumbnail listed once
        for f, page, thumb in zip(data["feature"], data["page"], data["thumb"]):
            assert (page_dir / f"{f}.html").is_file() == bool(page)
            if thumb >= 0:
                assert (out / data["thumbs"][thumb]).is_file()
        assert sum(t >= 0 for t in data["thumb"]) >= sum(data["page"]) > 0


def test_pages_exist_for_alive_features_only(built):
    run_dir, out, stats, facts = built
    saes = read_table(run_dir, "saes").to_pylist()
    n_pages = 0
    for row in saes:
        f = facts["features"][row["sae_id"]]
        folder = out / addr.sae_dir(row["model"], addr.sae_slug(row["sae_id"], row["model"]))
        for feature, dead in enumerate(f["dead"]):
            assert (folder / f"{feature}.html").is_file() == (not dead)
        n_pages += int((~f["dead"]).sum())
    assert stats.n_feature_pages == n_pages
    assert stats.n_saes == 2 and stats.n_compare_pages == 1 and stats.n_edit_pages == 6
    assert not any(p.name.endswith(".partial") for p in out.parent.iterdir())


def test_feature_page_content(built):
    run_dir, out, _, facts = built
    sae_id = "dino/L10/relu-x1-l1_0.0004-s0"
    dead = facts["features"][sae_id]["dead"]
    feature = int(np.flatnonzero(~dead)[3])
    page = out / addr.feature_page("dino", addr.sae_slug(sae_id, "dino"), feature)
    html = page.read_text(encoding="utf-8")
    assert f"<title>DINOv2-40/{feature}</title>" in html and "Atlas &lt;test&gt;" in html
    where = f"WHERE sae_id = '{sae_id}' AND feature = {feature}"
    top = read_table(run_dir, "exemplars", where + f" AND rank < {REPORT.exemplars_shown} ORDER BY rank").to_pylist()
    samples = read_table(run_dir, "quantile_exemplars", where + " ORDER BY band DESC, rank").to_pylist()
    assert len(top) == min(8, REPORT.exemplars_shown) and len(samples) == 12
    assert html.count("<figure><img") == len(top) and "no-heat" not in html  # the band samples come as data
    assert "img/o/" not in html  # no per-feature pictures: every <img> is a shared thumbnail
    assert {src.split("/img/")[1] for src in re.findall(r'<img src=([^ >]+)', html)} <= {
        str(p.relative_to(out / "img")) for p in (out / "img" / "t").rglob("*.jpg")}
    # The page's packed maps are the exemplars' patch maps on one scale: the strongest shown activation.
    heat = json.loads(re.search(r'<script type="application/json" id="heat">(.*?)</script>', html).group(1))
    packed = heat["z"]
    assert heat["g"] == "6x6"
    vmax = max(r["act"] for r in top + samples)
    expected = heatmaps.quantize(np.array([r["patch_acts"] for r in top + samples]), vmax)
    assert heatmaps.unpack(packed) == expected.tobytes()
    panels = json.loads(re.search(r'<script type="application/json" id="panels">(.*?)</script>', html).group(1))
    split = read_table(run_dir, "class_split", where + " ORDER BY rank").to_pylist()
    # Labels, band names and each label's image count live once in the SAE's data file; pages name them by position.
    shared = _sae_data(out, sae_id)
    assert [shared["image_labels"][row[0]] for row in panels["split"]] == [r["label"] for r in split]
    rates = [row[1] / (row[3] if len(row) > 3 else shared["label_images"][row[0]]) for row in panels["split"]]
    assert rates == pytest.approx([r["rate"] for r in split])
    assert [row[2] for row in panels["split"]] == [charts.sig(r["mean_act"], 3) for r in split]
    similar = read_table(run_dir, "similar_features", where + " ORDER BY rank").to_pylist()
    assert [row[0] for row in panels["similar"]] == [r["similar_feature"] for r in similar]
    assert 'rel="prev"' in html and 'rel="next"' in html
    feature_row = read_table(run_dir, "features", where).to_pylist()[0]
    assert panels["hist"][0] == feature_row["hist_counts"]
    bands = [(shared["bands"][band], [(s[1], shared["image_labels"][s[2]] if s[2] >= 0 else None) for s in samples_b])
             for band, samples_b in panels["bands"]]
    image_label = {r["image_idx"]: r["label"] for r in read_table(run_dir, "images").to_pylist()}
    assert [x for _, b in bands for x in b] == [(charts.sig(r["act"], 3), image_label[r["image_idx"]]) for r in samples]
    assert [name for name, _ in bands] == ["top quarter", "third quarter", "second quarter", "lowest quarter"]
    assert "plotly" not in html  # feature pages stay light


def test_feature_pages_list_the_best_concepts_next_to_the_null(built):
    run_dir, out, _, facts = built
    sae_id = "dino/L10/relu-x1-l1_0.0004-s0"
    feature = int(np.flatnonzero(~facts["features"][sae_id]["dead"])[0])
    html = (out / addr.feature_page("dino", addr.sae_slug(sae_id, "dino"), feature)).read_text(encoding="utf-8")
    best = read_table(run_dir, "concepts", f"WHERE sae_id = '{sae_id}' AND feature = {feature} ORDER BY ap_lift DESC LIMIT 3").to_pylist()
    section = html[html.index("Concepts it detects"):]
    section = section[:section.index("</section>")]
    assert section.count("<tr") == 1 + len(best)  # header + the best three
    for row in best:
        assert f'<td>{site_mod.fmt_num(row["ap"], 3)}<td>{site_mod.fmt_num(row["null_ap"], 3)}<td>{site_mod.fmt_num(row["iou"], 3)}' in section
        assert f'--a:{round(100 * row["ap"], 1)}%;--n:{round(100 * row["null_ap"], 1)}%' in section  # the bar and the null's tick
        assert f'<td>{site_mod.fmt_num(row["threshold"], 3)}<td>{site_mod.fmt_pct(row["fire_rate"], 2)}' in section  # its rate on the concept
    # Chance and support are the concept's, not the feature's: once per SAE, in its data file.
    base = {(c[0], c[1]): c[2:] for c in _sae_data(out, sae_id)["concept_base"]}
    for row in best:
        assert base[(row["concept"], row["level"])] == [charts.sig(row["base_rate"], 3), row["support"]]
    positions = [section.index(html_escape(row["concept"], quote=True)) for row in best]
    assert positions == sorted(positions)  # best first


def _sae_data(out: Path, sae_id: str) -> dict:
    """The payload of an SAE's data file (`data/<model>/<slug>.js`)."""
    data_js = next(p for p in (out / "data").rglob("*.js") if p.name != "index.js" and f'"sae_id":"{sae_id}"' in p.read_text(encoding="utf-8"))
    return json.loads(data_js.read_text(encoding="utf-8").split("]=", 1)[1].rstrip(";\n"))


def test_feature_list_data_and_index_chart_carry_concept_ap(built):
    run_dir, out, _, _ = built
    index_js = (out / "data" / "index.js").read_text(encoding="utf-8")
    assert '"concept_ap"' in index_js and '"type":"box"' in index_js
    index_html = (out / "index.html").read_text(encoding="utf-8")
    assert 'id="chart-concept_ap"' in index_html and 'id="chart-concept_lift"' in index_html
    assert '"concept_lift"' in index_js
    sae_id = "dino/L10/relu-x1-l1_0.0004-s0"
    features = read_table(run_dir, "features", f"WHERE sae_id = '{sae_id}' ORDER BY feature").to_pylist()
    data_js = next(p for p in (out / "data").rglob("*.js") if p.name != "index.js" and f'"sae_id":"{sae_id}"' in p.read_text(encoding="utf-8"))
    payload = json.loads(data_js.read_text(encoding="utf-8").split("]=", 1)[1].rstrip(";\n"))
    got = [payload["concepts"][c] if c >= 0 else None for c in payload["concept"]]
    assert got == [f["best_concept"] for f in features]
    assert payload["concept_ap"] == charts.round_sig([f["best_concept_ap"] for f in features], 3)


def test_edit_and_match_links_on_feature_pages(built):
    run_dir, out, _, facts = built
    edit = next(e for e in facts["edits"] if not e["is_control"])
    sae = edit["sae_id"]
    page = out / addr.feature_page("dino", addr.sae_slug(sae, "dino"), edit["features"][0])
    html = page.read_text(encoding="utf-8")
    assert addr.edit_page(edit["edit_id"]) in html
    match = next(m for m in facts["matches"] if m["sae_a"] == sae and m["feature_a"] == edit["features"][0])
    # Counterparts name their comparison and SAE by position in the SAE's data file (atlas.js makes the links).
    shared = _sae_data(out, sae)
    panels = json.loads(re.search(r'<script type="application/json" id="panels">(.*?)</script>', html).group(1))
    row = next(m for m in panels["matches"] if shared["comparisons"][m[0]][0] == match["comparison"])
    assert shared["comparisons"][row[0]][1] == addr.compare_page(match["comparison"])
    other = shared["saes"][row[1]]
    assert row[2] == match["feature_b"] and other[1] + f"{row[2]}.html" == addr.feature_page(
        match["sae_b"].split("/")[0], addr.sae_slug(match["sae_b"], match["sae_b"].split("/")[0]), match["feature_b"])
    edit_html = (out / addr.edit_page(edit["edit_id"])).read_text(encoding="utf-8")
    control = next(e for e in facts["edits"] if e["edit_id"] == edit["edit_id"] + "/control")
    assert "<th>control</th>" in edit_html and f"DINOv2-40/{control['features'][0]}<" in edit_html
    assert f"{control['specificity']:.3g}" in edit_html


def test_compare_page_counts_and_pictures(built):
    _, out, _, facts = built
    html = (out / addr.compare_page("dino~clip")).read_text(encoding="utf-8")
    for sae_a in ("dino/L10/relu-x1-l1_0.0004-s0", "clip/L10/relu-x1-l1_0.0004-s1"):
        rows = [m for m in facts["matches"] if m["sae_a"] == sae_a]
        assert f"<dt>matched</dt><dd>{sum(m['matched'] for m in rows)}</dd>" in html
        assert f"<dt>features</dt><dd>{len(rows)}</dd>" in html
    assert 'class="pair"' in html and html.count('class="tile heat"') >= html.count('class="pair"')
    packed = json.loads(re.search(r'<script type="application/json" id="heat">(.*?)</script>', html).group(1))["z"]
    assert len(heatmaps.unpack(packed)) == 36 * html.count('class="tile heat"')


def test_segmentation_edit_page_has_both_maps_and_a_legend(built):
    _, out, _, facts = built
    seg = next(e for e in facts["edits"] if e["task"] == "segmentation" and not e["is_control"])
    html = (out / addr.edit_page(seg["edit_id"])).read_text(encoding="utf-8")
    assert html.count("img/s/") == 3  # before, after, after control
    assert html.count('class="swatch"') == len(set(seg["before_map"]) | set(seg["after_map"]))


def test_feature_pages_cap_keeps_the_strongest(tmp_path):
    run_dir = tmp_path / "run"
    facts = write_synthetic_run(run_dir, small_run(edits=False, matches=False, saes=[SyntheticSAE("dino", 30)]))
    stats = build_site(run_dir, tmp_path / "site", ReportSpec(feature_pages=5, thumbnail_px=48, exemplars_shown=3), workers=1)
    assert stats.n_feature_pages == 5
    f = facts["features"]["dino/L10/relu-x1-l1_0.0004-s0"]
    strongest = np.argsort(-f["max_act"])[:5]
    folder = tmp_path / "site" / addr.sae_dir("dino", "L10-relu-x1-l1_0.0004-s0")
    assert sorted(int(p.stem) for p in folder.glob("[0-9]*.html")) == sorted(strongest.tolist())
    assert not (tmp_path / "site" / "edits").exists() and not (tmp_path / "site" / "compare").exists()


def test_rebuild_reuses_images_and_swaps_atomically(tmp_path):
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir, small_run(saes=[SyntheticSAE("dino", 20)], matches=False))
    out = tmp_path / "site"
    first = build_site(run_dir, out, REPORT, workers=1)
    assert first.n_images_rendered > 0
    (out / "stale.html").write_text("old")
    second = build_site(run_dir, out, REPORT.model_copy(update={"title": "Renamed"}), workers=1)
    assert second.n_images_rendered == 0 and second.n_feature_pages == first.n_feature_pages
    assert "Renamed" in (out / "index.html").read_text(encoding="utf-8")
    assert not (out / "stale.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "site"]  # no staging or old folders left


def test_a_template_only_rebuild_reuses_the_page_contexts_and_changed_tables_do_not(tmp_path, monkeypatch):
    """The second render reads every feature page's context from `<run>/cache/render/` (no range
    query, no map packing) and writes the same pages; a changed table file, or other report
    options, give a new key, and the pages are built again."""
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir, small_run(saes=[SyntheticSAE("dino", 20)], matches=False))
    first = build_site(run_dir, tmp_path / "a", REPORT, workers=1)
    pages_a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a" / "features").rglob("*.html")}
    built_chunks = []
    real = features_mod.FeaturePages.render_feature_chunk
    monkeypatch.setattr(features_mod.FeaturePages, "render_feature_chunk", lambda self, *a, **k: (built_chunks.append(a[1]), real(self, *a, **k)))
    second = build_site(run_dir, tmp_path / "b", REPORT.model_copy(update={"title": "Retitled"}), workers=1)
    pages_b = {p.relative_to(tmp_path / "b"): p.read_bytes().replace(b"Retitled", REPORT.title.replace("<", "&lt;").replace(">", "&gt;").encode())
               for p in (tmp_path / "b" / "features").rglob("*.html")}
    assert built_chunks == [] and pages_a == pages_b  # the title reaches pages through the base context, not the cache
    assert (second.n_feature_pages, second.n_heatmaps) == (first.n_feature_pages, first.n_heatmaps) and first.n_feature_pages > 0
    assert len(list((run_dir / "cache" / site_mod.PAGE_CACHE).iterdir())) == 1  # one key's worth kept
    build_site(run_dir, tmp_path / "c", REPORT.model_copy(update={"exemplars_shown": 3}), workers=1)
    assert len(built_chunks) == 1  # other report options: built again
    part = sorted((run_dir / "tables" / "exemplars").rglob("*.parquet"))[0]
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    build_site(run_dir, tmp_path / "d", REPORT, workers=1)
    assert len(built_chunks) == 2  # a table changed: built again
    assert len(list((run_dir / "cache" / site_mod.PAGE_CACHE).iterdir())) == 1


def test_process_pool_path_draws_the_same_files(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir, small_run(saes=[SyntheticSAE("dino", 12)], edits=False, matches=False))
    inline = build_site(run_dir, tmp_path / "a", REPORT, workers=1)
    monkeypatch.setattr(builder_mod, "POOL_MIN_JOBS", 1)
    monkeypatch.setattr(builder_mod, "PAGE_POOL_MIN_PAGES", 1)
    monkeypatch.setattr(builder_mod, "PAGES_PER_TASK", 3)
    pooled = build_site(run_dir, tmp_path / "b", REPORT, workers=2)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "img").rglob("*.jpg"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b" / "img").rglob("*.jpg"))
    assert files_a == files_b and pooled.n_images_rendered == inline.n_images_rendered > 0
    pages_a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a" / "features").rglob("*.html")}
    pages_b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b" / "features").rglob("*.html")}
    assert pages_a == pages_b and len(pages_a) == pooled.n_feature_pages + 1  # rendered by the workers, identically


def test_missing_images_and_sparse_tables_still_build(tmp_path):
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir, small_run(saes=[SyntheticSAE("dino", 10)], edits=False, matches=False))
    for image in (run_dir / "images").glob("*.png"):
        image.unlink()  # every image gone: placeholders, not a failed build
    shutil.rmtree(run_dir / "tables" / "saes")  # features without an saes row still get pages
    shutil.rmtree(run_dir / "tables" / "train_log")
    stats = build_site(run_dir, tmp_path / "site", REPORT, workers=1)
    assert stats.n_feature_pages > 0 and stats.n_missing_images == 10 and stats.n_heatmaps == 0
    page = next((tmp_path / "site" / "features").rglob("[0-9]*.html")).read_text(encoding="utf-8")
    assert "assets/missing.svg" in page


def test_a_run_without_concepts_offers_no_concept_columns(tmp_path):
    # `tables.connect` declares `features.best_concept` whether or not concepts were scored.
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir, small_run(saes=[SyntheticSAE("dino", 10)], edits=False, matches=False, concepts=False))
    build_site(run_dir, tmp_path / "site", REPORT, workers=1)
    data_js = next(p for p in (tmp_path / "site" / "data").rglob("*.js") if p.name != "index.js")
    payload = json.loads(data_js.read_text(encoding="utf-8").split("]=", 1)[1].rstrip(";\n"))
    assert payload["concepts"] == [] and set(payload["concept"]) == {-1}
    [listing] = [p for p in (tmp_path / "site" / "features").rglob("index.html")]
    assert 'value="concept_ap"' not in listing.read_text(encoding="utf-8")
    from saev_report import tables
    from saev_report.render.site import SiteBuilder

    for run, scored in ((run_dir, False), (tmp_path / "scored", True)):
        if scored:
            write_synthetic_run(run, small_run(saes=[SyntheticSAE("dino", 10)], edits=False, matches=False))
        con = tables.connect(run)
        try:
            assert SiteBuilder(con, tmp_path / "staging", None, REPORT, {}, 1).has_concepts is scored
        finally:
            con.close()


def test_only_images_table(tmp_path):
    run_dir = tmp_path / "run"
    write_table(run_dir / "tables" / "images" / "p.parquet", "images", [{"dataset": "d", "image_idx": 0, "path": "/nope.png", "status": "ok"}], "h")
    stats = build_site(run_dir, tmp_path / "site", REPORT, workers=1)
    assert stats.n_saes == 0 and (tmp_path / "site" / "index.html").is_file()
    assert "No SAEs" in (tmp_path / "site" / "index.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- in a browser


def test_index_renders_its_charts(built, browser):
    _, out, _, _ = built
    from selenium.webdriver.support.ui import WebDriverWait

    logs = _open(browser, out / "index.html")
    figures = browser.execute_script("return Object.keys(SAEV.data.index.figures).length")
    assert figures == 7  # L0–MSE, L0–FVU, loss, MSE, L0, the best-concept AP distributions and AP-lift tails
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.querySelectorAll('.js-plotly-plot').length") == figures + 1)
    # The density scatter loaded its SAE's data file through a script tag and drew every live feature.
    n_points = browser.execute_script("return document.getElementById('scatter').data[0].x.length")
    run_dir = built[0]
    first = read_table(run_dir, "saes").to_pylist()
    first_id = sorted(first, key=lambda r: (r["model"], r["layer"], r["sae_id"]))[0]["sae_id"]
    assert n_points == read_table(run_dir, "features", f"WHERE sae_id = '{first_id}' AND log10_freq IS NOT NULL").num_rows
    assert browser.execute_script("return document.getElementById('scatter').data[0].type") == "scattergl"
    assert not _severe(logs), logs
    _no_xss(browser)


def test_search_finds_a_feature(built, browser):
    run_dir, out, _, facts = built
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sae_id = "clip/L10/relu-x1-l1_0.0004-s1"
    feature = int(np.flatnonzero(~facts["features"][sae_id]["dead"])[-1])
    logs = _open(browser, out / addr.sae_page("clip", addr.sae_slug(sae_id, "clip")))
    box = browser.find_element(By.ID, "q")
    box.send_keys(f"#{feature}")
    title = f"{LABELS['clip']}-40/{feature}"

    def rows(d):  # read in one script call: the list re-renders while we wait
        return d.execute_script("return Array.from(document.querySelectorAll('#rows tr td.mono')).map(td => td.textContent)")

    WebDriverWait(browser, 10).until(lambda d: len(rows(d)) == 1)
    assert rows(browser)[0].startswith(title)
    link = browser.find_element(By.CSS_SELECTOR, "#rows tr td.mono a")
    href = urlsplit(link.get_attribute("href"))
    assert href.path.endswith(f"/{feature}.html") and href.fragment == f"q=%23{feature}"  # the page knows the list's state
    # Label search (substring, case-insensitive) finds exactly the features with that top label.
    box.clear()
    box.send_keys("BIRD")
    # (the search also reads each feature's best concept, when the run has concept statistics)
    rows = read_table(run_dir, "features", f"WHERE sae_id = '{sae_id}' AND NOT dead").to_pylist()
    expected = sum(1 for r in rows if "bird" in (r["top_label"] or "").lower() or "bird" in (r.get("best_concept") or "").lower())
    # The filter state goes into the address (so a filtered list can be shared): wait for it, then count.
    WebDriverWait(browser, 10).until(lambda d: "q=BIRD" in d.current_url)
    assert browser.execute_script("return document.getElementById('count').textContent").startswith(f"{expected} of")
    assert expected > 0
    assert not _severe(logs + browser.get_log("browser"))
    _no_xss(browser)


def test_feature_list_filters_and_sorts_by_concept_and_ap(built, browser):
    run_dir, out, _, _ = built
    from selenium.webdriver.support.ui import Select, WebDriverWait

    sae_id = "dino/L10/relu-x1-l1_0.0004-s0"
    features = read_table(run_dir, "features", f"WHERE sae_id = '{sae_id}' AND NOT dead").to_pylist()
    concept = max({f["best_concept"] for f in features}, key=lambda c: sum(f["best_concept"] == c for f in features))
    logs = _open(browser, out / addr.sae_page("dino", addr.sae_slug(sae_id, "dino")))
    Select(browser.find_element("id", "concept")).select_by_visible_text(concept)
    Select(browser.find_element("id", "sort")).select_by_value("concept_ap")
    WebDriverWait(browser, 10).until(lambda d: "sort=concept_ap" in d.current_url and "concept=" in d.current_url)
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('#rows tr')).map(tr => [tr.children[7].textContent, tr.children[8].textContent])")
    want = sorted((f for f in features if f["best_concept"] == concept), key=lambda f: (-f["best_concept_ap"], f["feature"]))
    assert [c for c, _ in shown] == [concept] * min(len(want), len(shown)) and len(shown) == min(len(want), len(shown)) > 0
    assert [float(ap) for _, ap in shown] == [float(site_mod.fmt_num(f["best_concept_ap"], 3)) for f in want][:len(shown)]
    assert not _severe(logs + browser.get_log("browser"))
    _no_xss(browser)


def test_feature_page_shows_every_exemplar_image(built, browser):
    _, out, _, facts = built
    sae_id = "dino/L10/relu-x1-l1_0.0004-s0"
    pages = sorted((out / addr.sae_dir("dino", addr.sae_slug(sae_id, "dino"))).glob("[0-9]*.html"), key=lambda p: int(p.stem))
    for page in pages[:4]:
        logs = _open(browser, page)
        _wait(browser, lambda d: d.execute_script("return document.body.getAttribute('data-nav')") == "ready")  # bands drawn
        browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")  # lazy images below the fold
        script = "return Array.from(document.querySelectorAll('.exemplars img, .band-grid img')).map(i => [i.complete, i.naturalWidth])"
        _wait(browser, lambda d: all(c and w > 0 for c, w in d.execute_script(script)))
        sizes = browser.execute_script(script)
        html = page.read_text(encoding="utf-8")
        n_samples = sum(len(b[1]) for b in json.loads(re.search(r'id="panels">(.*?)</script>', html).group(1))["bands"])
        assert len(sizes) == html.count("<figure><img") + n_samples > 0
        assert all(complete and width > 0 for complete, width in sizes), sizes
        assert not _severe(logs), logs
        _no_xss(browser)


def test_every_page_kind_loads_cleanly(built, browser):
    _, out, _, _ = built
    pages = [out / "edits" / "index.html", *(out / "edits").rglob("[0-9]*.html"), *(out / "compare").glob("*.html")]
    assert len(pages) == 1 + 6 + 1
    for page in pages:
        logs = _open(browser, page)
        broken = browser.execute_script("return Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)")
        assert not broken and not _severe(logs), (page, broken, logs)
        _no_xss(browser)


# --------------------------------------------------------------------------- heat-maps, navigation, links (browser)


def _wait(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _feature_dir(out: Path, model: str, sae_id: str) -> Path:
    return out / addr.sae_dir(model, addr.sae_slug(sae_id, model))


def test_heatmaps_are_painted_from_the_patch_maps(built, browser):
    run_dir, out, _, facts = built
    sae_id = "dino/L10/relu-x1-l1_0.0004-s0"
    feature = int(np.flatnonzero(~facts["features"][sae_id]["dead"])[2])
    page = _feature_dir(out, "dino", sae_id) / f"{feature}.html"
    logs = _open(browser, page)
    html = page.read_text(encoding="utf-8")
    n_heat = html.count("<figure><img") + sum(len(b[1]) for b in json.loads(re.search(r'id="panels">(.*?)</script>', html).group(1))["bands"])
    _wait(browser, lambda d: d.execute_script("return document.body.getAttribute('data-heat-drawn')") == str(n_heat))
    # Each canvas holds one pixel per patch: compare them with the numpy reference of the table's maps.
    where = f"WHERE sae_id = '{sae_id}' AND feature = {feature}"
    rows = read_table(run_dir, "exemplars", where + f" AND rank < {REPORT.exemplars_shown} ORDER BY rank").to_pylist()
    rows += read_table(run_dir, "quantile_exemplars", where + " ORDER BY band DESC, rank").to_pylist()
    q = heatmaps.quantize(np.array([r["patch_acts"] for r in rows]), max(r["act"] for r in rows))
    painted = browser.execute_script(
        "return Array.from(document.querySelectorAll('.ex > figure')).map(f => {"
        " const c = f.querySelector('canvas'); const m = f.querySelector('.peak');"
        " return [Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data), c.width, c.height,"
        "         f.getAttribute('data-peak'), m ? [m.style.left, m.style.top] : null,"
        "         getComputedStyle(c).position, c.getBoundingClientRect().width / f.querySelector('img').getBoundingClientRect().width]; })"
    )
    assert len(painted) == len(rows) == n_heat
    n_opaque = 0
    for q_p, (pixels, width, height, peak, mark, position, scale) in zip(q, painted):
        assert (width, height) == (6, 6) and position == "absolute" and abs(scale - 1) < 0.01  # stretched over the photo
        got = np.array(pixels, dtype=np.int64).reshape(-1, 4)
        want = heatmaps.rgba(q_p).astype(np.int64)
        assert (got[:, 3] == 0).tolist() == (q_p == 0).tolist()  # silent patches are transparent
        assert np.abs(got[:, 3] - want[:, 3]).max() <= 1
        opaque = want[:, 3] >= 64  # canvases store premultiplied colour: faint patches lose precision
        assert np.abs(got[opaque, :3] - want[opaque, :3]).max(initial=0) <= 4
        n_opaque += int(opaque.sum())
        strongest = int(np.argmax(q_p))  # the outline sits on the strongest patch
        assert peak == str(strongest)
        assert [float(v.rstrip("%")) for v in mark] == pytest.approx([100 * (strongest % 6) / 6, 100 * (strongest // 6) / 6], abs=1e-3)
    assert n_opaque > 10
    assert not _severe(logs), logs
    _no_xss(browser)


def test_without_decompression_the_plain_images_show(built, browser):
    _, out, _, facts = built
    sae_id = "dino/L10/relu-x1-l1_0.0004-s0"
    feature = int(np.flatnonzero(~facts["features"][sae_id]["dead"])[1])
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": "delete window.DecompressionStream;"})
    try:
        logs = _open(browser, _feature_dir(out, "dino", sae_id) / f"{feature}.html")
        _wait(browser, lambda d: d.execute_script("return document.body.getAttribute('data-nav')") == "ready")
        state = browser.execute_script(
            "return [document.querySelectorAll('canvas').length, Array.from(document.querySelectorAll('.ex > figure img')).map(i => i.complete && i.naturalWidth > 0)]"
        )
        assert state[0] == 0 and state[1] and all(state[1])
        assert not _severe(logs), logs
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """One SAE of 130 features with a page each: more than one list page (50 rows)."""
    run_dir = tmp_path_factory.mktemp("wide")
    facts = write_synthetic_run(run_dir, small_run(saes=[SyntheticSAE("dino", 130)], edits=False, matches=False, dead_frac=0.1))
    out = run_dir / "site"
    build_site(run_dir, out, REPORT, LABELS, workers=1)
    features = read_table(run_dir, "features").to_pylist()
    return out, facts, features


def _order(features: list[dict], sort: str, ascending: bool, hide_dead: bool = True) -> list[int]:
    """The list's order in plain Python: by the column as the data file rounds it, missing last, ties by feature id."""
    rows = [r for r in features if not (hide_dead and r["dead"])]
    values = charts.round_sig([r[sort] if r[sort] is not None else math.nan for r in rows])
    keyed = [((v is None), (v if ascending else -v) if v is not None else 0.0, r["feature"]) for v, r in zip(values, rows)]
    return [int(k[2]) for k in sorted(keyed)]


def test_deep_link_restores_sort_filter_and_page(wide, browser):
    out, _, features = wide
    folder = _feature_dir(out, "dino", "dino/L10/relu-x1-l1_0.0004-s0")
    logs = _open(browser, folder / "index.html")
    browser.get((folder / "index.html").resolve().as_uri() + "#sort=freq&dir=asc&p=2")
    browser.refresh()
    _wait(browser, lambda d: d.execute_script("return document.getElementById('pageinfo').textContent").startswith("page 2 of"))
    state = browser.execute_script("return [document.getElementById('sort').value, document.getElementById('dir').value,"
                                   " Array.from(document.querySelectorAll('#rows td.mono a')).map(a => a.textContent)]")
    order = _order(features, "freq", ascending=True)
    assert state[0] == "freq" and state[1] == "asc"
    assert [int(t.split("/")[-1]) for t in state[2]] == order[50:100]
    assert not _severe(logs + browser.get_log("browser"))


def test_keyboard_steps_through_the_list_order(wide, browser):
    out, _, features = wide
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    folder = _feature_dir(out, "dino", "dino/L10/relu-x1-l1_0.0004-s0")
    order = _order(features, "max_act", ascending=False)
    start = order[10]
    _open(browser, folder / f"{start}.html")  # no state in the address: the list's default order
    _wait(browser, lambda d: d.execute_script("return document.body.getAttribute('data-nav')") == "ready")

    def at(driver) -> tuple[int, str]:
        parts = urlsplit(driver.current_url)
        return int(Path(parts.path).stem), parts.fragment

    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    _wait(browser, lambda d: at(d)[0] != start and d.execute_script("return document.readyState") == "complete")
    assert at(browser)[0] == order[11]
    # Sparsity order carried in the address: ← goes to the next rarer feature.
    by_freq = _order(features, "freq", ascending=True)
    browser.get((folder / f"{by_freq[20]}.html").resolve().as_uri() + "#sort=freq&dir=asc")
    _wait(browser, lambda d: d.execute_script("return document.body.getAttribute('data-nav')") == "ready" and at(d)[0] == by_freq[20])
    assert browser.find_element("id", "next").get_attribute("href").endswith(f"/{by_freq[21]}.html#sort=freq&dir=asc")
    ActionChains(browser).send_keys(Keys.ARROW_LEFT).perform()
    _wait(browser, lambda d: at(d)[0] == by_freq[19])
    assert at(browser)[1] == "sort=freq&dir=asc"
    assert browser.find_element("id", "back").get_attribute("href").endswith("index.html#sort=freq&dir=asc")
    # r: a random other feature of the same order, the order kept.
    _wait(browser, lambda d: d.execute_script("return document.body.getAttribute('data-nav')") == "ready")
    ActionChains(browser).send_keys("r").perform()
    _wait(browser, lambda d: at(d)[0] != by_freq[19])
    assert at(browser)[0] in by_freq and at(browser)[1] == "sort=freq&dir=asc"
    assert not _severe(browser.get_log("browser"))


def test_every_page_kind_and_every_link_in_the_browser(built, browser):
    """Every page kind loads without console errors; every link on it, including the ones scripts add, resolves."""
    _, out, _, _ = built
    features = sorted((out / "features").rglob("[0-9]*.html"))
    pages = [out / "index.html", *(out / "features").rglob("index.html"), *features[:: max(1, len(features) // 12)],
             out / "edits" / "index.html", *(out / "edits").rglob("[0-9]*.html"), *(out / "compare").glob("*.html")]
    checked = n_counterpart_links = 0
    for page in pages:
        logs = _open(browser, page)
        kind = browser.execute_script("return document.body.getAttribute('data-page')")
        if kind == "feature":
            _wait(browser, lambda d: d.execute_script("return document.body.getAttribute('data-nav')") == "ready")
            # Counterparts are drawn from positions in the SAE's data file; each concept row gets its chance as a tooltip.
            n_counterpart_links += browser.execute_script("return document.querySelectorAll('#matches tbody a').length")
            rows, tipped = browser.execute_script(
                "return [document.querySelectorAll('table.ct tr').length, document.querySelectorAll('table.ct tr[title*=chance]').length]")
            assert tipped == max(rows - 1, 0), page
        links = browser.execute_script("return Array.from(document.querySelectorAll('a[href], img[src]')).map(a => a.href || a.src)")
        for link in links:
            parts = urlsplit(link)
            assert parts.scheme == "file", (page, link)
            assert Path(unquote(parts.path)).is_file(), (page.relative_to(out), link)
            checked += 1
        broken = browser.execute_script("return Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)")
        assert not broken and not _severe(logs + browser.get_log("browser")), (page, broken, logs)
        _no_xss(browser)
    assert checked > 300 and n_counterpart_links > 0


def test_search_uses_the_best_concept_column_when_present(tmp_path, browser):
    """The concepts stage adds `features.best_concept`: feature pages show it and the list searches it."""
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir, small_run(saes=[SyntheticSAE("dino", 30)], edits=False, matches=False))
    rows = read_table(run_dir, "features", "WHERE NOT dead").to_pylist()
    concept = next(r["best_concept"] for r in rows if r["best_concept"] in ("bird", "boat"))  # plain text: the others are XSS probes
    feature = next(int(r["feature"]) for r in rows if r["best_concept"] == concept)
    out = tmp_path / "site"
    build_site(run_dir, out, REPORT, workers=1)
    folder = _feature_dir(out, "dino", "dino/L10/relu-x1-l1_0.0004-s0")
    assert f">{concept}</span>" in (folder / f"{feature}.html").read_text(encoding="utf-8")
    logs = _open(browser, folder / "index.html")
    browser.find_element("id", "q").send_keys(concept.upper())
    _wait(browser, lambda d: f"q={concept.upper()}" in d.current_url)
    count = browser.execute_script("return document.getElementById('count').textContent")
    expected = sum(1 for r in rows if concept in (r["top_label"] or "").lower() or concept in (r["best_concept"] or "").lower())
    assert count.startswith(f"{expected} of")
    assert not browser.execute_script("return document.querySelector('th[data-needs=concepts]').hidden")
    assert not _severe(logs + browser.get_log("browser"))
