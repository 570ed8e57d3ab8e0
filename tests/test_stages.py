"""Stage declarations: every kind's shape, and exactly which keys a spec change moves."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from saev_report.graph import build_stages
from saev_report.spec import Spec, parse_spec_text
from saev_report.stages import KINDS, Stage, StageOut, StageParams

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "specs/demo.yaml").read_text())


def _keys(data: dict[str, Any]) -> dict[str, str]:
    return {s.name: s.key for s in build_stages(parse_spec_text(yaml.safe_dump(data)))}


def _changed(path: str, value: Any) -> set[str]:
    """Stage names whose key changes when the dotted spec field `path` is set to `value`
    (a stage that appears or disappears counts as changed)."""
    data = yaml.safe_load(yaml.safe_dump(DEMO))
    node = data
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(last) if isinstance(node, list) else last] = value
    before, after = _keys(DEMO), _keys(data)
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


RECORD_DINO = {"record/dinov2", "train/dinov2-L11", "analyse/dinov2-L11"}
RECORD_RANDOM = {"record/random", "train/random-L11", "analyse/random-L11"}
TOKENS = {"tokens/dinov2"}
HEADS = {"heads/category", "heads/segment"}
EDITS = {"edits/suppress-evidence"}
EXPERIMENTS = {"experiments/segment-concepts", "experiments/category-concepts"}
SPLICE = {"splice/dinov2-demo_val"}
EDITS |= EXPERIMENTS  # experiments read what edits read: a head, the SAEs and their analysis
MATCHES = {"compare/dinov2~random", "stability/dinov2"}
EVERYTHING_SEEDED = RECORD_DINO | RECORD_RANDOM | TOKENS | HEADS | EDITS | MATCHES | SPLICE

CASES = [
    # (field, new value, stages whose key must change: no more, no fewer)
    ("report.title", "another title", set()),
    ("models.dinov2.label", "DINO", set()),
    ("run.threads", 1, set()),
    ("run.name", "other", set()),
    ("edits.0.layer", 11, set()),  # the default, spelled out: resolved once, so the same key
    ("edits.0.dataset", "demo_val", set()),  # likewise (the head's validation data)
    ("record.batch_size", 16, EVERYTHING_SEEDED),
    ("record.dtype", "float32", EVERYTHING_SEEDED),
    ("record.shard_mb", 64, EVERYTHING_SEEDED),
    ("models.random.layers", [10], {"record/random", "train/random-L10", "analyse/random-L10", "train/random-L11",
                                    "analyse/random-L11", "compare/dinov2~random"}),  # L11 gone, L10 new
    ("sae.lr", 1e-3, {"train/dinov2-L11", "analyse/dinov2-L11", "train/random-L11", "analyse/random-L11"} | EDITS | MATCHES | SPLICE),
    # the control's own sweep: only its SAEs and what reads them (its record is untouched)
    ("models.random.sae", {"kind": ["topk", "relu"], "seeds": [0]}, {"train/random-L11", "analyse/random-L11", "compare/dinov2~random"}),
    ("models.dinov2.sae", {"seeds": [0, 2]}, {"train/dinov2-L11", "analyse/dinov2-L11", "stability/dinov2"} | EDITS | SPLICE | {"compare/dinov2~random"}),
    ("analysis.top_k", 8, {"analyse/dinov2-L11", "analyse/random-L11"} | EDITS),
    ("heads.category.epochs", 5, {"heads/category", "edits/suppress-evidence", "experiments/category-concepts"} | SPLICE),
    ("edits.0.value", 1.0, {"edits/suppress-evidence"}),
    ("experiments.0.n_images", 4, {"experiments/segment-concepts"}),
    ("compare.0.min_score", 0.3, {"compare/dinov2~random"}),
    ("stability.0.min_score", 0.3, {"stability/dinov2"}),
    ("run.seed", 1, EVERYTHING_SEEDED),
    ("datasets.demo_val.max_images", 50, {"images/demo_val"} | TOKENS | HEADS | EDITS | SPLICE),
    ("datasets.demo_train.max_images", 50, {"images/demo_train"} | TOKENS | HEADS | EDITS | SPLICE),
    ("experiments.0.rank_on", "head_train", {"experiments/segment-concepts"}),
    ("experiments.0.random_draws", 2, {"experiments/segment-concepts"}),
    ("stats.n_resamples", 500, {"claims/all"}),  # the statistics re-run alone
    ("stats.correction", "holm", {"claims/all"}),
]

CLAIMS = {"claims/all"}
"""The statistics read every experiment's, edit's and splice's rows, and the analyses the demo's `ap_lift`
claim counts features of (DINOv2's and the twin's): they move with any of those."""
CLAIM_INPUTS = EXPERIMENTS | SPLICE | {"edits/suppress-evidence", "analyse/dinov2-L11", "analyse/random-L11", "analyse/random-L10"}


@pytest.mark.parametrize(("field", "value", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_spec_change_moves_exactly_the_keys_that_read_it(field: str, value: Any, expected: set[str]) -> None:
    if expected & CLAIM_INPUTS or field == "run.seed":
        expected = expected | CLAIMS
    assert _changed(field, value) == expected


def test_every_kind_is_declared_in_one_shape() -> None:
    assert list(KINDS) == ["images", "record", "train", "analyse", "tokens", "heads", "edits", "experiments", "splice", "compare", "stability", "claims"]
    for kind in KINDS.values():
        assert issubclass(kind.params, StageParams) and kind.params.model_config["frozen"]
        assert issubclass(kind.out, StageOut)
        assert list(inspect.signature(kind.action).parameters) == ["params", "inputs", "out_dir"]
        # No action is handed the spec: no params field holds a Spec, however deeply it is wrapped.
        assert not _holds_spec(kind.params), kind.name


def _holds_spec(annotation: Any, seen: frozenset = frozenset()) -> bool:
    """Whether a value of this type can contain a `Spec`: the type itself, a subclass, a `Spec | None`,
    a `list[Spec]` / `dict[str, Spec]`, or a pydantic model with such a field at any depth."""
    if annotation in seen:
        return False
    if isinstance(annotation, type) and issubclass(annotation, Spec):
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return any(_holds_spec(f.annotation, seen | {annotation}) for f in annotation.model_fields.values())
    return any(_holds_spec(arg, seen) for arg in typing.get_args(annotation))


class _Nested(BaseModel):
    spec: Spec


@pytest.mark.parametrize("annotation", [Spec, Spec | None, list[Spec], dict[str, Spec], typing.Optional[_Nested],
                                        type("Sub", (Spec,), {})])
def test_the_spec_check_sees_through_wrappers(annotation: Any) -> None:
    assert _holds_spec(annotation)
    assert not _holds_spec(list[int] | None)


def test_stage_refuses_params_of_another_kind() -> None:
    demo = parse_spec_text(yaml.safe_dump(DEMO))
    record = next(s for s in build_stages(demo) if s.kind.name == "record")
    with pytest.raises(TypeError, match="TrainParams"):
        Stage(KINDS["train"], "x", record.params)


def test_defaults_are_resolved_once_in_the_builder() -> None:
    stages = {s.name: s for s in build_stages(parse_spec_text(yaml.safe_dump(DEMO)))}
    edit = stages["edits/suppress-evidence"].params
    assert edit.layer == 11 and edit.edit.layer == 11            # the model's first recorded layer
    assert edit.dataset_key == "demo_val" and edit.edit.dataset == "demo_val"  # the head's validation data
    stability = stages["stability/dinov2"].params
    assert (stability.a.sae_tag, stability.b.sae_tag) == ("topk-x4-k32-s0", "topk-x4-k32-s1")
    assert stages["stability/dinov2"].inputs["record_a"] is stages["record/dinov2"]
    experiment = stages["experiments/segment-concepts"].params
    assert experiment.level == "patch" and experiment.dataset_key == "demo_val" and experiment.experiment.layer == 11
    assert stages["experiments/category-concepts"].params.level == "image"
    splice = stages["splice/dinov2-demo_val"]
    assert splice.params.heads == {"category": "cls", "segment": "seg"}
    assert {role: s.name for role, s in splice.inputs.items()} == {
        "record": "record/dinov2", "train/L11": "train/dinov2-L11", "head/category": "heads/category", "head/segment": "heads/segment",
        "tokens": "tokens/dinov2"}
    tokens = stages["tokens/dinov2"].params
    assert tokens.from_layer == 11 and tokens.edit_layers == [11]
    assert sorted(tokens.head_datasets) == ["demo_train", "demo_val"]  # their images are found in `demo` by path at run time
    assert sorted(tokens.edit_datasets) == ["demo_val"]
    assert "tokens/random" not in stages  # no head or edit reads the random twin
    compare = stages["compare/dinov2~random"].params
    assert (compare.a.sae_tag, compare.b.sae_tag) == ("topk-x4-k32-s0", "topk-x4-k32-s0")  # the twin's own one-SAE sweep
    assert stages["train/random-L11"].params.sae.kinds == ["topk"] and stages["train/random-L11"].params.sae.seeds == [0]


def test_a_model_only_a_head_reads_gets_tokens_but_no_recording() -> None:
    data = yaml.safe_load(yaml.safe_dump(DEMO))
    data["record"]["models"] = ["random"]
    data["edits"], data["compare"], data["stability"], data["experiments"], data["claims"] = [], [], [], [], []
    stages = {s.name: s for s in build_stages(parse_spec_text(yaml.safe_dump(data)))}
    assert "record/dinov2" not in stages and stages["tokens/dinov2"].inputs == {}
    assert stages["tokens/dinov2"].params.from_layer is None
    assert sorted(stages["tokens/dinov2"].params.head_datasets) == ["demo_train", "demo_val"]
    assert set(stages["heads/category"].inputs) == {"tokens"}


def test_cache_dir_is_a_location_not_part_of_the_key(tmp_path: Path) -> None:
    spec = parse_spec_text(yaml.safe_dump(DEMO))
    assert [s.key for s in build_stages(spec, tmp_path)] == [s.key for s in build_stages(spec, tmp_path / "elsewhere")]


def test_an_experiment_keys_its_heads_training_data_whenever_it_may_rank_on_it() -> None:
    """With `rank_on: auto` (or `head_train`) the stage may read the head's training data, so its own
    params carry that dataset's spec, not only the head stage it reads; with `analysis` they do not."""

    def experiment_params(rank_on: str | None, max_images: int | None):
        data = yaml.safe_load(yaml.safe_dump(DEMO))
        if rank_on:
            data["experiments"][0]["rank_on"] = rank_on
        if max_images:
            data["datasets"]["demo_train"]["max_images"] = max_images
        spec = parse_spec_text(yaml.safe_dump(data))
        return spec, {s.name: s for s in build_stages(spec)}["experiments/segment-concepts"].params

    spec, auto = experiment_params(None, None)
    assert auto.experiment.rank_on == "auto" and auto.rank_dataset_key == "demo_train"
    assert auto.rank_dataset == spec.datasets["demo_train"] and auto.record_dataset_key == "demo"
    assert experiment_params(None, 50)[1].digest() != auto.digest()
    _, analysis = experiment_params("analysis", None)
    assert analysis.rank_dataset_key is None and analysis.rank_dataset is None
    assert experiment_params("analysis", 50)[1].digest() == analysis.digest()  # not read, not keyed (the head still is)


# --------------------------------------------------------------------------- declared inputs and outputs


def test_every_kind_declares_tables_the_schema_knows_and_every_table_has_a_writer() -> None:
    from saev_report.tables import TABLES

    written = set()
    for kind in KINDS.values():
        assert set(kind.writes) <= set(TABLES), (kind.name, set(kind.writes) - set(TABLES))
        written.update(kind.writes)
    assert written == set(TABLES), set(TABLES) ^ written


@pytest.mark.parametrize("spec_file", ["specs/demo.yaml", "specs/clip_vs_dino.yaml"])
def test_the_graph_fills_every_declared_role_with_its_declared_type(spec_file: str) -> None:
    """build_stages runs the check on every stage; here it is also read back, role by role."""
    from saev_report.spec import load_spec

    for stage in build_stages(load_spec(ROOT / spec_file, check_paths=False)):
        for role, dep in stage.inputs.items():
            assert issubclass(dep.kind.out, stage.kind.role_of(role).out), (stage.name, role)


def test_a_stage_with_miswired_inputs_is_refused_when_it_is_made() -> None:
    stages = {s.kind.name: s for s in build_stages(parse_spec_text(yaml.safe_dump(DEMO)))}
    train = stages["train"]
    with pytest.raises(TypeError, match="reads no input 'recording'"):
        Stage(KINDS["train"], "x", train.params, {"recording": stages["record"]})
    with pytest.raises(TypeError, match="input 'record' must be a RecordOut, got images's ImagesOut"):
        Stage(KINDS["train"], "x", train.params, {"record": stages["images"]})
    with pytest.raises(TypeError, match="needs input 'record'"):
        Stage(KINDS["train"], "x", train.params, {})
    splice = stages["splice"]
    assert any(r.startswith("head/") for r in splice.inputs) and any(r.startswith("train/") for r in splice.inputs)
    with pytest.raises(TypeError, match="reads no input 'head'"):  # a per-key role needs its key
        Stage(KINDS["splice"], "x", splice.params, {**splice.inputs, "head": splice.inputs[next(r for r in splice.inputs if r.startswith("head/"))]})


def test_publishing_refuses_a_part_of_a_table_the_kind_does_not_declare(tmp_path: Path) -> None:
    from saev_report.pipeline import publish_tables
    from saev_report.stages.base import table_part
    from saev_report.tables import write_table

    images = next(s for s in build_stages(parse_spec_text(yaml.safe_dump(DEMO))) if s.kind.name == "images")
    out = images.out_dir(tmp_path)
    write_table(table_part(out, "heads"), "heads", [], "x")
    with pytest.raises(RuntimeError, match="images/.* wrote a part of table 'heads'"):
        publish_tables([images], tmp_path)
