"""Reference documentation generated from the code: spec fields and table columns.

`python -m saev_report.docs` rewrites the generated sections of README.md, so the
README cannot drift from the pydantic models and table schemas.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from saev_report import spec as spec_module
from saev_report.tables import table_reference_markdown


def _type_name(annotation: object) -> str:
    """Readable type of a spec field: `list[int]`, `one of: a, b`, `int | null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        if args[0] is str:
            return "name"
        return _type_name(args[0])
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        if all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            return "mapping, chosen by `kind`"
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(see below)"
    return f"`{value}`" if value is not None else "`null`"


def _model_section(model: type[BaseModel], title: str) -> str:
    summary = " ".join((model.__doc__ or "").split())
    lines = [f"#### `{title}`", "", summary, "", "| field | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        doc = " ".join((field.description or "").split())
        lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {doc} |")
    return "\n".join(lines) + "\n"


SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("(top level)", spec_module.Spec),
    ("run", spec_module.RunSpec),
    ("datasets.<key> (kind: demo)", spec_module.DemoDataset),
    ("datasets.<key> (kind: image_folder)", spec_module.ImageFolderDataset),
    ("datasets.<key> (kind: seg_folder)", spec_module.SegFolderDataset),
    ("datasets.<key> (kind: cub200)", spec_module.Cub200Dataset),
    ("datasets.<key> (kind: ade20k)", spec_module.Ade20kDataset),
    ("models.<key>", spec_module.ModelSpec),
    ("models.<key>.sae", spec_module.SweepOverride),
    ("record", spec_module.RecordSpec),
    ("sae", spec_module.SAESpec),
    *[(f"sae.{name}", kind.sweep_model()) for name, kind in spec_module.SAE_KINDS.items()],
    ("analysis", spec_module.AnalysisSpec),
    ("heads.<key>", spec_module.HeadSpec),
    ("edits[]", spec_module.EditSpec),
    ("edits[].explicit[]", spec_module.ExplicitEdit),
    ("edits[].generate", spec_module.GeneratedEdits),
    ("experiments[]", spec_module.ExperimentSpec),
    ("compare[]", spec_module.CompareSpec),
    ("stability[]", spec_module.StabilitySpec),
    ("report", spec_module.ReportSpec),
    ("slurm", spec_module.SlurmSpec),
]


def spec_reference_markdown() -> str:
    return "\n".join(_model_section(model, title) for title, model in SECTIONS)


def _replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no {start} … {end} block")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def render_readme(text: str) -> str:
    text = _replace_block(text, "SPEC REFERENCE", spec_reference_markdown())
    return _replace_block(text, "TABLE REFERENCE", table_reference_markdown())


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    readme = Path(args[0] if args else "README.md")
    new = render_readme(readme.read_text())
    if "--check" in args:
        return 0 if new == readme.read_text() else 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
