"""Reference documentation generated from the code: spec fields, table columns, stage kinds.

`python -m saev_report.docs` rewrites the generated sections of README.md (and, with
`--architecture FILE`, docs/ARCHITECTURE.md's stage list), so the docs cannot drift from the
pydantic models, the table schemas and the stage registry (`stages.KINDS`).
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


def stage_summary(kind) -> str:
    """A stage kind's one-line description: its module's docstring, less the `Stage `name`:` prefix.
    A module declaring several kinds ("Stages `a` and `b`: ...") adds the clause naming this one."""
    doc = " ".join((sys.modules[kind.action.__module__].__doc__ or "").split())
    first, _, rest = doc.partition(". ")
    text = re.sub(r"^Stages? [^:]*:\s*", "", first).rstrip(".") + "."
    if doc.startswith("Stages "):
        own = re.search(rf"`{re.escape(kind.name)}` ([^.;]*)", rest)
        if own:
            text += f" `{kind.name}` {own.group(1)}."
    return text


def stage_list_markdown() -> str:
    """Every stage kind in build order (`stages.KINDS`): what it does, resumable, split across ranks."""
    from saev_report.stages import KINDS

    lines = [f"A build runs {len(KINDS)} kinds of stage, in this order, then publishes the tables and renders the site "
             "(`saev-report build --only KIND` runs one kind and what it reads):", "",
             "| stage | what it does | resumes a killed run | split across torchrun ranks |", "|---|---|---|---|"]
    for name, kind in KINDS.items():
        lines.append(f"| `{name}` | {stage_summary(kind)} | {'yes' if kind.resumable else 'restarts'} | {'yes' if kind.parallel else 'rank 0'} |")
    return "\n".join(lines) + "\n"


def _replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no {start} … {end} block")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def render_readme(text: str) -> str:
    text = _replace_block(text, "SPEC REFERENCE", spec_reference_markdown())
    text = _replace_block(text, "STAGE LIST", stage_list_markdown())
    return _replace_block(text, "TABLE REFERENCE", table_reference_markdown())


def render_architecture(text: str) -> str:
    return _replace_block(text, "STAGE LIST", stage_list_markdown())


RENDERERS = {"readme": render_readme, "architecture": render_architecture}
"""Each generated document and what regenerates it."""


def main(argv: list[str] | None = None) -> int:
    """`python -m saev_report.docs [README.md] [--architecture docs/ARCHITECTURE.md] [--check]`."""
    args = list(argv if argv is not None else sys.argv[1:])
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    files: list[tuple[Path, str]] = []
    if "--architecture" in args:
        i = args.index("--architecture")
        files.append((Path(args[i + 1]), "architecture"))
        del args[i : i + 2]
    if args or not files:
        files.insert(0, (Path(args[0] if args else "README.md"), "readme"))
    stale = False
    for path, kind in files:
        old = path.read_text()
        new = RENDERERS[kind](old)
        if check:
            stale |= new != old
        elif new != old:
            path.write_text(new)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
