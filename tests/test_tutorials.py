"""The tutorials' shell and YAML blocks, run as written against small data.

Every ```bash and ```yaml block of docs/tutorials/*.md carries a directive in the HTML comment
right above it (invisible on the site):

- `<!-- doctest: file NAME -->` writes the YAML block to NAME in the tutorial's folder;
  `<!-- doctest: file NAME tiny={sae: {n_patches: 4000}} -->` first merges the `tiny` mapping into
  it: the sizes a reader should use stay on the page, the test shrinks them.
- `<!-- doctest: run -->` runs the shell block there (`set -euo pipefail`; `saev-report` is this checkout).
- `<!-- doctest: skip REASON -->` leaves it out, saying why (a GPU, a cluster, a network).

A page's `<!-- doctest-setup: ... -->` says what the reader is assumed to have, which the test
makes small and real: `images DIR` (an image folder with a sub-folder per class), `hf REPO[@KIND]`
(a random model of that architecture saved in a private HF hub cache under that repo id, read
with HF_HUB_OFFLINE=1 exactly as a downloaded one). A block with no directive fails the test.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))

BLOCK = re.compile(r"(?:<!--\s*(?P<directive>doctest:[^>]*?)\s*-->\s*\n)?```(?P<lang>bash|yaml|sh|shell)\n(?P<body>.*?)^```",
                   re.S | re.M)
SETUP = re.compile(r"<!--\s*doctest-setup:(?P<items>[^>]*?)-->")


def blocks(page: Path) -> list[tuple[str | None, str, str]]:
    """(directive or None, language, body) of every shell and YAML block, in page order."""
    return [(m["directive"], m["lang"], m["body"]) for m in BLOCK.finditer(page.read_text())]


def setup_items(page: Path) -> list[tuple[str, str]]:
    items = []
    for m in SETUP.finditer(page.read_text()):
        for item in m["items"].split(";"):
            if item.strip():
                kind, _, arg = item.strip().partition(" ")
                items.append((kind, arg.strip()))
    return items


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --------------------------------------------------------------------------- what the reader is assumed to have


def make_image_folder(folder: Path, per_class: int = 8) -> None:
    """Three colour classes of small noisy photos-to-be, with a shape each so features have something to
    find; seeded by the folder's name, so `train/` and `val/` hold different images."""
    import zlib

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(zlib.crc32(str(folder.name).encode()))
    for c, name in enumerate(["apples", "leaves", "sky"]):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (96, 96, 3), dtype=np.uint8)
            pixels[..., c] += 140
            image = Image.fromarray(pixels)
            x, y = (int(v) for v in rng.integers(10, 60, 2))
            ImageDraw.Draw(image).ellipse([x, y, x + 25, y + 25], fill=(255, 255, 255))
            image.save(folder / name / f"{name}-{i:02d}.jpg", quality=90)


def save_hub_model(hub: Path, repo: str, kind: str) -> None:
    """A seeded random HF vision model of `kind`'s architecture (12 blocks, 224 px), in the hub cache layout."""
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64, image_size=224)
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**common, patch_size=14))
    elif kind == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common, patch_size=16))
    else:
        raise ValueError(f"doctest-setup: no tiny model for kind {kind!r}")
    folder = hub / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    model.save_pretrained(folder / "snapshots" / revision)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)


def prepare(page: Path, work: Path) -> dict[str, str]:
    """The page's setup in `work`; returns the environment its commands run with."""
    hub = work.parent / "hf-cache" / "hub"
    for kind, arg in setup_items(page):
        if kind == "images":
            make_image_folder(work / arg)
        elif kind == "hf":
            repo, _, model_kind = arg.partition("@")
            save_hub_model(hub, repo, model_kind or ("clip" if "clip" in repo else "dinov2"))
        else:
            raise ValueError(f"{page.name}: unknown doctest-setup item {kind!r}")
    bin_dir = work.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "saev-report"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m saev_report "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
            "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SAEV_REPORT_PROGRESS": "0",
            "SAEV_REPORT_CACHE": str(work.parent / "saev-cache"), "PYTHONWARNINGS": "ignore"}


def run_block(directive: str, lang: str, body: str, work: Path, env: dict[str, str], page: Path) -> None:
    action, _, rest = directive.removeprefix("doctest:").strip().partition(" ")
    if action == "skip":
        assert rest.strip(), f"{page.name}: `doctest: skip` needs a reason"
    elif action == "file":
        assert lang == "yaml", f"{page.name}: `doctest: file` is for YAML blocks"
        name, _, tiny = rest.strip().partition(" ")
        data = yaml.safe_load(body)
        if tiny:
            assert tiny.startswith("tiny="), f"{page.name}: unknown option {tiny!r}"
            data = deep_merge(data, yaml.safe_load(tiny.removeprefix("tiny=")))
        (work / name).write_text(yaml.safe_dump(data, sort_keys=False))
    elif action == "run":
        assert lang in ("bash", "sh", "shell"), f"{page.name}: `doctest: run` is for shell blocks"
        result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + body], cwd=work, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{page.name}: this block failed:\n{body}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    else:
        raise AssertionError(f"{page.name}: unknown doctest directive {directive!r}")


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("page", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_every_block_says_how_it_is_tested(page: Path) -> None:
    found = blocks(page)
    assert found, f"{page.name} has no shell or YAML block"
    missing = [body.splitlines()[0] for directive, _, body in found if directive is None]
    assert missing == [], f"{page.name}: blocks without a `<!-- doctest: ... -->` directive"


def run_tutorial(page: Path, tmp: Path) -> Path:
    """Every block of `page` in a fresh folder under `tmp`; returns that folder."""
    work = tmp / "tutorial"
    work.mkdir()
    env = prepare(page, work)
    ran = 0
    for directive, lang, body in blocks(page):
        assert directive is not None
        run_block(directive, lang, body, work, env, page)
        ran += directive.startswith("doctest: run")
    assert ran > 0, f"{page.name}: no block ran"
    return work


@pytest.fixture(scope="module")
def tutorial_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tutorial run once, on demand (the screenshot test reuses the hypothesis tutorial's build)."""
    class Runs(dict):
        def __missing__(self, stem: str) -> Path:
            page = next(p for p in TUTORIALS if p.stem == stem)
            self[stem] = run_tutorial(page, tmp_path_factory.mktemp(stem))
            return self[stem]

    return Runs()


@pytest.mark.slow  # a real build (record, train, analyse, heads, …) of every tutorial, on tiny models
@pytest.mark.parametrize("page", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_as_written(page: Path, tutorial_runs: dict[str, Path]) -> None:
    assert (tutorial_runs[page.stem] / "runs").is_dir()


@pytest.mark.slow
def test_the_screenshot_script_shoots_a_feature_and_a_concept_page(tutorial_runs: dict[str, Path], browser, tmp_path: Path) -> None:
    """scripts/screenshots.py (the README's pictures) on a built site with concept experiments."""
    from PIL import Image

    site = tutorial_runs["hypothesis"] / "runs" / "hypothesis" / "site"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshots.py"), str(site), "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("feature.png", "concept.png"):
        with Image.open(tmp_path / name) as shot:
            assert shot.width == 1280 and shot.height >= 600
            grey = shot.convert("L").resize((64, 64))
            assert len(set(grey.tobytes())) > 8  # a page, not a blank window


def test_a_failing_block_fails_the_test(tmp_path: Path) -> None:
    env = {**os.environ}
    with pytest.raises(AssertionError, match="this block failed"):
        run_block("doctest: run", "bash", "true\nfalse\necho never\n", tmp_path, env, Path("x.md"))
    run_block("doctest: file s.yaml tiny={a: {b: 2}}", "yaml", "a: {b: 1, c: 3}\n", tmp_path, env, Path("x.md"))
    assert yaml.safe_load((tmp_path / "s.yaml").read_text()) == {"a": {"b": 2, "c": 3}}
    with pytest.raises(AssertionError, match="needs a reason"):
        run_block("doctest: skip", "bash", "x\n", tmp_path, env, Path("x.md"))


def test_blocks_without_a_directive_are_found(tmp_path: Path) -> None:
    page = tmp_path / "t.md"
    page.write_text("<!-- doctest: run -->\n```bash\necho hi\n```\n\n```yaml\na: 1\n```\n<!-- doctest-setup: images pics; hf a/b -->\n")
    assert [d for d, _, _ in blocks(page)] == ["doctest: run", None]
    assert setup_items(page) == [("images", "pics"), ("hf", "a/b")]
