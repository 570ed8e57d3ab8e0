"""The spec: valid specs load; each kind of mistake is reported at its file:line and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from saev_report.cli import app
from saev_report.spec import SpecError, load_spec, parse_spec_text, sae_id, sae_sweep

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "tests/data/bad_specs").glob("*.yaml"))
runner = CliRunner()


def _expectation(path: Path) -> tuple[int, str | None]:
    match = re.match(r"# expect: (\d+)(?: (\S+))?", path.read_text().splitlines()[0])
    assert match, f"{path.name} lacks an `# expect: LINE FIELD` header"
    return int(match.group(1)), match.group(2)


def test_corpus_has_at_least_15_kinds_of_mistake() -> None:
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_mistake_is_located(path: Path) -> None:
    line, field = _expectation(path)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    text = result.output
    assert "Traceback" not in text
    located = re.findall(rf"{re.escape(str(path))}:(\d+):\d+: ?([^:]*)", text)
    assert located, text
    lines_fields = [(int(l), f.strip()) for l, f in located]
    assert any(l == line and (field is None or f == field) for l, f in lines_fields), (lines_fields, text)


@pytest.mark.parametrize("spec", ["specs/demo.yaml", "specs/clip_vs_dino.yaml"])
def test_shipped_specs_validate(spec: str) -> None:
    result = runner.invoke(app, ["validate", "--no-check-paths", str(ROOT / spec)])
    assert result.exit_code == 0, result.output


def test_demo_spec_validates_with_paths() -> None:
    result = runner.invoke(app, ["validate", str(ROOT / "specs/demo.yaml")])
    assert result.exit_code == 0, result.output


def test_several_problems_are_all_reported() -> None:
    text = "run: {name: t, nope: 1}\ndatasets: {d: {kind: demo, n_images: -1}}\nmodels: {m: {family: imgfocus, layers: [10]}}\nrecord: {dataset: d}\n"
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, "x.yaml")
    assert {i.field for i in info.value.issues} == {"run.nope", "datasets.d.n_images"}
    assert {i.line for i in info.value.issues} == {1, 2}


def test_sweep_expands_lists_in_order() -> None:
    text = (
        "run: {name: t}\ndatasets: {d: {kind: demo}}\nmodels: {m: {family: imgfocus, layers: [10]}}\n"
        "record: {dataset: d}\nsae: {expansion: [8, 16], l1_coeff: [0.001, 0.0004], seeds: [0, 1]}\n"
    )
    spec = parse_spec_text(text)
    configs = sae_sweep(spec.sae)
    assert len(configs) == 8
    assert [c.index for c in configs] == list(range(8))
    assert sae_id("m", 10, configs[0]) == "m/L10/relu-x8-l1_0.001-s0"
    assert len({c.tag for c in configs}) == 8


def test_unreadable_spec_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "cannot read spec" in result.output


def test_schema_is_json_and_markdown_mentions_every_section() -> None:
    import json

    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert set(schema["properties"]) >= {"run", "datasets", "models", "record", "sae", "heads", "edits"}
    md = runner.invoke(app, ["schema", "--markdown"]).output
    for section in ("`run`", "`sae`", "`edits[]`", "`models.<key>`"):
        assert section in md
    assert "Sparsity coefficient" in md  # field docstrings become the reference


def test_load_spec_roundtrip() -> None:
    spec = load_spec(ROOT / "specs/clip_vs_dino.yaml", check_paths=False)
    assert spec.models["clip"].layers == [11]
    assert spec.sae.expansion == [32]


def test_validate_and_plan_read_one_architecture_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from saev_report.plan import recording_estimates
    from saev_report.spec import KNOWN_ARCHS, Arch

    text = ("run: {name: t}\ndatasets: {d: {kind: image_folder, root: /nowhere, n_images: 10}}\n"
            "models: {m: {family: hf, source: facebook/dinov2-small, layers: [%d]}}\nrecord: {dataset: d}\n")
    monkeypatch.setitem(KNOWN_ARCHS, "facebook/dinov2-small", Arch(depth=6, d_model=100, patch_size=14, image_size=224))
    with pytest.raises(SpecError, match="has 6 blocks"):
        parse_spec_text(text % 7, check_paths=False)
    [row] = recording_estimates(parse_spec_text(text % 6, check_paths=False))
    assert row["d"] == 100


# --------------------------------------------------------------------------- --set overrides

SMALL = ("run: {name: t}\ndatasets: {d: {kind: demo}, imagenet.val: {kind: demo, n_images: 50}}\n"
         "models: {m: {family: imgfocus, layers: [10]}}\nrecord: {dataset: d}\n"
         "heads: {h: {task: classification, model: m, train: d}}\n"
         "edits: [{name: e, model: m, head: h, generate: {}}]\n")


def test_overrides_are_yaml_typed_and_reach_every_kind_of_path() -> None:
    spec = parse_spec_text(SMALL, overrides=[
        "sae.n_patches=200000", "run.name=smoke", "sae.expansion=[8, 16]", "edits.0.action=scale", "edits[0].value=2",
        "datasets.imagenet.val.n_images=7", "models.m.sae.seeds=[0, 1]", "report.title='10'"])
    assert spec.sae.n_patches == 200000 and spec.run.name == "smoke" and spec.sae.expansion == [8, 16]
    assert spec.edits[0].action == "scale" and spec.edits[0].value == 2.0
    assert spec.datasets["imagenet.val"].n_images == 7  # a key holding dots is matched whole
    assert spec.sweep_for("m").seeds == [0, 1]  # a section the file leaves out is created
    assert spec.report.title == "10"


def test_the_last_override_of_a_path_wins_and_the_file_is_unchanged() -> None:
    spec = parse_spec_text(SMALL, overrides=["sae.n_patches=5", "sae.n_patches=6"])
    assert spec.sae.n_patches == 6
    assert parse_spec_text(SMALL).sae.n_patches != 6


@pytest.mark.parametrize("flag, message", [
    ("sae.n_patches=-1", "greater than 0"),                   # validated like the file
    ("sae={n_patches: -1}", "sae.n_patches"),                 # a mapping value: the field inside it is named
    ("record.dataset=nope", "dataset 'nope' is not declared"),  # cross references too
    ("run.nope=1", "Extra inputs are not permitted"),
    ("sae.n_patches", "expected `path=value`"),
    ("=3", "expected `path=value`"),
    ("sae..k=3", "expected `path=value`"),
    ("run.name.first=x", "run.name is a str value, not a mapping or list"),
    ("edits.3.value=1", "edits has 1 item(s); index 3 is out of range"),
    ("edits.first.value=1", "expected an index"),
    ("sae.k=[1, 2", "not valid YAML"),
])
def test_a_bad_override_names_the_flag_and_exits_2(flag: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SMALL)
    result = runner.invoke(app, ["validate", "--no-check-paths", str(path), "--set", flag])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"--set {flag}: " in text and message in text, text
    assert f"{path}:" not in text.split("problem(s)")[0]  # not blamed on a line of the file


def test_a_problem_the_override_did_not_cause_stays_located_in_the_file() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec_text(SMALL.replace("layers: [10]", "layers: [0]"), "x.yaml", overrides=["sae.n_patches=5"])
    [issue] = info.value.issues
    assert issue.flag is None and str(issue).startswith("x.yaml:3:")


def test_plan_and_render_take_overrides(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(SMALL)
    plan = runner.invoke(app, ["plan", str(path), "--set", "run.name=other", "--set", "sae.expansion=[2, 4]"])
    assert plan.exit_code == 0, plan.output
    assert "stages of other" in plan.output and "train/m-L10" in plan.output
    bad = runner.invoke(app, ["render", str(path), "--set", "report.thumbnail_px=-5"])
    assert bad.exit_code == 2 and "--set report.thumbnail_px=-5: " in " ".join(bad.output.split())
    bad = runner.invoke(app, ["build", str(path), "--set", "sae.n_patches=0"])
    assert bad.exit_code == 2 and "--set sae.n_patches=0: " in " ".join(bad.output.split())
