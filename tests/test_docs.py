"""Docs that cannot rot: the generated reference pages match the code, the README is short and its
spec validates, every SQL example binds against the real table schemas, and every internal link
and anchor of the README and docs/ resolves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from saev_report import docs
from saev_report.spec import parse_spec_text
from saev_report.tables import TABLES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]


def _check(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "saev_report.docs", str(root), "--check"], env=env,
                          capture_output=True, text=True)


# --------------------------------------------------------------------------- the generated reference


def test_reference_pages_match_the_spec_tables_and_cli() -> None:
    result = _check(ROOT)
    assert result.returncode == 0, "reference is stale: run `python -m saev_report.docs`\n" + result.stderr


def test_check_notices_a_stale_field_description(tmp_path: Path) -> None:
    for rel in docs.PAGES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    assert _check(tmp_path).returncode == 0
    spec_page = tmp_path / "docs/reference/spec.md"
    text = spec_page.read_text()
    assert "Images per forward pass." in text
    spec_page.write_text(text.replace("Images per forward pass.", "Images per batch.", 1))
    result = _check(tmp_path)
    assert result.returncode == 1 and "docs/reference/spec.md" in result.stderr


def test_the_older_readme_argument_still_names_the_repository(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# a README\n")
    assert docs.main([str(tmp_path / "README.md")]) == 0  # `python -m saev_report.docs README.md`, as before
    assert docs.stale_pages(tmp_path) == []


def test_every_cli_command_and_option_is_in_the_cli_reference() -> None:
    import typer.main

    from saev_report.cli import app

    page = (ROOT / "docs/reference/cli.md").read_text()
    for name, command in typer.main.get_command(app).commands.items():
        assert f"## `saev-report {name}`" in page
        for param in command.params:
            for opt in param.opts:
                assert (f"`{opt}`" if opt.startswith("-") else f"`{opt.upper()}`") in page, (name, opt)


# --------------------------------------------------------------------------- the README


def fenced_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def test_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 200


def test_readme_spec_validates() -> None:
    (block,) = fenced_blocks(README.read_text(), "yaml")
    spec = parse_spec_text(block, "README.md", check_paths=False)  # references and layers checked; my-images is yours
    assert spec.run.name == "my-atlas" and spec.datasets["photos"].kind == "image_folder"


def test_the_screenshot_spec_validates() -> None:
    spec = parse_spec_text((ROOT / "scripts/screenshots.yaml").read_text(), "scripts/screenshots.yaml", check_paths=False)
    assert spec.experiments, "the concept screenshot needs an experiment"


def test_readme_has_no_measurement_diary() -> None:
    text = README.read_text()
    assert "measured" not in text.lower() and "## Performance" not in text


# --------------------------------------------------------------------------- SQL examples


def _empty_connection():
    """DuckDB with every table of `TABLES` as an empty Arrow table of its real schema."""
    import duckdb

    con = duckdb.connect()
    for name, table in TABLES.items():
        con.register(name, pa.Table.from_pylist([], schema=table.schema))
    return con


def _statements(block: str) -> list[str]:
    body = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


SQL = [(page, s) for page in PAGES for block in fenced_blocks(page.read_text(), "sql") for s in _statements(block)]


@pytest.mark.parametrize(("page", "statement"), SQL, ids=[f"{p.relative_to(ROOT)}:{i}" for i, (p, _) in enumerate(SQL)])
def test_sql_examples_bind_against_the_table_schemas(page: Path, statement: str) -> None:
    _empty_connection().execute(statement).fetchall()  # an unknown table or column raises a Binder Error


def test_the_sql_check_catches_a_wrong_column() -> None:
    import duckdb

    with pytest.raises(duckdb.BinderException):
        _empty_connection().execute("SELECT no_such_column FROM saes").fetchall()


def test_yaml_examples_parse() -> None:
    for page in PAGES:
        for block in fenced_blocks(page.read_text(), "yaml"):
            assert yaml.safe_load(block) is not None, page  # a spec or a fragment of one (a list of claims, say)


# --------------------------------------------------------------------------- links and anchors


def slugify(heading: str) -> str:
    """Python-Markdown's `toc` slug (what mkdocs gives a heading as its id)."""
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"[`*]", "", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M):
        slug = slugify(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}_{n}")
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:: not internal
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif page.is_relative_to(DOCS) and not dest.is_relative_to(DOCS):
            broken.append(f"{target}: outside docs/ (the site cannot link it; name the file in code instead)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with id #{anchor}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_internal_links_and_anchors_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_the_link_check_catches_a_missing_file_and_anchor(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading, with commas\n")
    page.write_text("[a](other.md#a-code-heading-with-commas) [b](missing.md) [c](other.md#nope) `[d](x.md)`\n"
                    "```\n[e](y.md)\n```\n[f](https://example.org)\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nope: no heading with id #nope"]


# --------------------------------------------------------------------------- tests the docs cite

CITED_TEST = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")


def _defined_tests(path: Path) -> set[str]:
    return set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.M)) if path.exists() else set()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_test_the_docs_cite_exists(page: Path) -> None:
    """Reliability, the SAE recipe and the edits page say which test holds each claim: those tests exist."""
    missing = [f"{f}::{t}" for f, t in CITED_TEST.findall(page.read_text()) if t not in _defined_tests(ROOT / f)]
    assert missing == []


def test_the_reliability_page_cites_a_test_in_every_row() -> None:
    rows = [r for r in (DOCS / "reliability.md").read_text().splitlines() if r.startswith("| ") and r.count("|") == 5]
    body = [r for r in rows[1:] if not r.startswith("| input") and not r.startswith("|---")]
    assert len(body) >= 10 and all(CITED_TEST.search(r) for r in body)


# --------------------------------------------------------------------------- the built site


def _mkdocs_build(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def docs_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    out = tmp_path_factory.mktemp("docs-site")
    result = _mkdocs_build(out)
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + result.stdout + result.stderr
    return out


def _site_links(page: Path) -> list[str]:
    return re.findall(r"""<(?:a|link|img|script)\b[^>]*?\b(?:href|src)=["']([^"']+)["']""", page.read_text())


def test_the_docs_site_builds_strictly_with_every_link_resolved(docs_site: Path) -> None:
    pages = [p for p in sorted(docs_site.rglob("*.html")) if p.name != "404.html"]  # 404 links from the server's root
    assert len(pages) >= 20
    broken = []
    for page in pages:
        ids_cache: dict[Path, set[str]] = {}
        for href in _site_links(page):
            if re.match(r"^[a-z]+:|^//", href):
                continue
            path, _, anchor = href.partition("#")
            dest = (page.parent / path.split("?")[0]).resolve() if path else page
            if dest.is_dir():
                dest = dest / "index.html"
            if not dest.exists():
                broken.append(f"{page.relative_to(docs_site)}: {href}")
            elif anchor and dest.suffix == ".html":
                ids = ids_cache.setdefault(dest, set(re.findall(r"""\bid=["']([^"']+)["']""", dest.read_text())))
                if anchor not in ids:
                    broken.append(f"{page.relative_to(docs_site)}: {href} (no such id)")
    assert broken == []


def test_the_docs_site_renders_in_chromium(docs_site: Path, browser) -> None:
    """Every page loads from file:// with no console error, shows its navigation, and its images load."""
    from headless import open_page, severe

    for page in sorted(docs_site.rglob("*.html")):
        if page.name == "404.html":
            continue
        logs = open_page(browser, page)
        assert not severe(logs), (page.name, severe(logs))
        assert browser.execute_script("return document.querySelector('nav.md-nav') !== null"), page.name
        broken_images = browser.execute_script(
            "return [...document.images].filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)")
        assert broken_images == [], (page.name, broken_images)


def test_the_stage_lists_come_from_the_stage_registry() -> None:
    """The stage reference page, ARCHITECTURE's stage table (tests/test_architecture_doc.py) and
    `build --help` all list `stages.KINDS`, in build order."""
    import typer
    from typer.testing import CliRunner

    from saev_report.cli import app
    from saev_report.stages import KINDS

    page = (ROOT / "docs/reference/stages.md").read_text()
    assert [line.split("`")[1] for line in page.splitlines() if line.startswith("| `")] == list(KINDS)
    for name, kind in KINDS.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
        assert all(f"`{t}`" in row for t in kind.writes), name
    build = typer.main.get_command(app).commands["build"]
    assert " → ".join(KINDS) + " → tables → site" in build.help
    [only] = [p for p in build.params if p.name == "only"]
    assert only.help.endswith(", ".join(KINDS) + ".")
    assert "stability" in CliRunner().invoke(app, ["build", "--help"]).output
