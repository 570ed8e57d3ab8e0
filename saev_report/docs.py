"""The reference pages, generated from the code: spec fields, table columns, stage kinds and CLI commands.

`python -m saev_report.docs` rewrites docs/reference/{spec,tables,stages,cli}.md from the pydantic models
(`spec.py`), the table schemas (`tables.TABLES`), the stage registry (`stages.KINDS`) and the typer app (`cli.app`), so the reference
cannot drift from the code; `--check` only says whether they are stale (tests/test_docs.py runs it).
"""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Callable
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


def _model_section(model: type[BaseModel], title: str, level: str = "####") -> str:
    summary = " ".join((model.__doc__ or "").split())
    lines = [f"{level} `{title}`", "", summary, "", "| field | type | default | meaning |", "|---|---|---|---|"]
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
    ("stats", spec_module.StatsSpec),
    ("claims[] (kind: experiment)", spec_module.ExperimentClaim),
    ("claims[].setting", spec_module.FixedSetting),
    ("claims[].conditions[]", spec_module.ClaimCondition),
    ("claims[] (kind: spliced)", spec_module.SplicedClaim),
    ("claims[] (kind: ap_lift)", spec_module.APLiftClaim),
    ("compare[]", spec_module.CompareSpec),
    ("stability[]", spec_module.StabilitySpec),
    ("report", spec_module.ReportSpec),
    ("slurm", spec_module.SlurmSpec),
]


def spec_reference_markdown(level: str = "####") -> str:
    """Every spec section's fields (what `saev-report schema --markdown` prints)."""
    return "\n".join(_model_section(model, title, level) for title, model in SECTIONS)



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
             "(`saev-report build --only KIND` runs one kind and what it reads). What each reads and writes is its "
             "declaration (`StageKind.reads` / `writes`), checked when the graph is built and when tables are published.", "",
             "| stage | what it does | reads | writes | resumes a killed run | split across torchrun ranks |",
             "|---|---|---|---|---|---|"]
    for name, kind in KINDS.items():
        reads = ", ".join(f"`{role}{'/<key>' if r.per_key else ''}`{' (optional)' if r.optional else ''}" for role, r in kind.reads.items()) or "—"
        writes = ", ".join(f"`{t}`" for t in kind.writes) or "—"
        lines.append(f"| `{name}` | {stage_summary(kind)} | {reads} | {writes} | {'yes' if kind.resumable else 'restarts'} "
                     f"| {'yes' if kind.parallel else 'rank 0'} |")
    return "\n".join(lines) + "\n"


GENERATED = "<!-- Generated by `python -m saev_report.docs` from the code: edit the code's docstrings, not this file. -->"


def spec_page() -> str:
    return f"""{GENERATED}
# Spec reference

Every field of the YAML spec, from the pydantic models in `saev_report/spec.py` (their docstrings).
`saev-report validate SPEC` checks a spec against them and reports every problem as
`file:line:col: field.path: message`; `saev-report schema > spec.schema.json` gives editors the
same rules as JSON schema.

{spec_reference_markdown("##")}"""


def stages_page() -> str:
    return f"""{GENERATED}
# Stage reference

{stage_list_markdown()}"""


def tables_page() -> str:
    return f"""{GENERATED}
# Table reference

Every table a build publishes under `runs/<name>/tables/` (Parquet, one folder per table) and
`saev-report query` reads through DuckDB views, from `saev_report.tables.TABLES`.

{table_reference_markdown().replace("### ", "## ")}"""


def _cli_type(annotation: object) -> str:
    import enum

    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " / ".join(f"`{m.value}`" for m in annotation)
    if typing.get_origin(annotation) is list:
        return f"{_cli_type(typing.get_args(annotation)[0])}, repeatable"
    return _type_name(annotation)


def _param_row(param) -> str:
    """One row of a command's table, from typer's parameter objects (typer vendors its own click)."""
    if param.param_type_name == "argument":
        name, kind = f"`{param.name.upper()}`", "argument"
    else:
        name = " / ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
        kind = "flag" if getattr(param, "is_flag", False) else "option"
    default = param.default
    default = getattr(default, "value", default)
    shown = "**required**" if param.required else ("" if default in (None, ()) else f"`{default}`")
    help_text = " ".join((param.help or "").split())
    return f"| {name} | {kind} | {_cli_type(param.type_descriptor.annotation)} | {shown} | {help_text} |"


def cli_page() -> str:
    import typer.main

    from saev_report.cli import app

    group = typer.main.get_command(app)
    lines = [GENERATED, "# CLI reference", "", " ".join((group.help or "").split()), "",
             "`saev-report COMMAND --help` prints the same text.", ""]
    for name, command in group.commands.items():
        params = [p for p in command.params if p.name != "help"]
        usage = " ".join(["[OPTIONS]" if any(p.param_type_name == "option" for p in params) else "",
                          *(p.name.upper() for p in params if p.param_type_name == "argument")]).strip()
        doc = "\n".join(" ".join(par.split()) for par in (command.help or "").split("\n\n"))
        lines += [f"## `saev-report {name}`", "", doc.replace("\n", "\n\n"), "",
                  "```", f"saev-report {name} {usage}".rstrip(), "```", ""]
        if params:
            lines += ["| name | kind | type | default | meaning |", "|---|---|---|---|---|"]
            lines += [_param_row(p) for p in params] + [""]
    return "\n".join(lines)


BAD_SPECS = Path(__file__).resolve().parents[1] / "tests" / "data" / "bad_specs"


def spec_errors_page() -> str:
    """What `validate` answers to each mistake of the test corpus (tests/data/bad_specs), run now."""
    from saev_report.spec import SpecError, parse_spec_text

    lines = [GENERATED, "# What a mistaken spec gets", "",
             "Each row is one spec of the test corpus (`tests/data/bad_specs/`, checked by `tests/test_spec.py`) "
             "and the answer `saev-report validate` gives it, produced by the validator when this page was generated. "
             "Every answer exits with code 2 and names the file, line and column.", "",
             "| mistake | the spec (its first line is the test's expectation) | answer |", "|---|---|---|"]
    for path in sorted(BAD_SPECS.glob("*.yaml")):
        text = path.read_text()
        try:
            parse_spec_text(text, path.name, check_paths=True)
            answer = "(accepted: the corpus expects an error)"
        except SpecError as exc:
            answer = "<br>".join(_cell(str(issue)) for issue in exc.issues)
        shown = "<br>".join(_cell(line) for line in text.splitlines() if line.strip())
        lines.append(f"| `{path.stem}` | <code>{shown}</code> | {answer} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell and HTML: escaped, pipes and spaces kept."""
    import html

    return html.escape(text).replace("|", "&#124;").replace("  ", "&nbsp;&nbsp;")


# The one list of generated pages: path under the repository root → its generator.
PAGES: dict[str, Callable[[], str]] = {
    "docs/reference/spec.md": spec_page,
    "docs/reference/tables.md": tables_page,
    "docs/reference/stages.md": stages_page,
    "docs/reference/cli.md": cli_page,
    "docs/reference/spec-errors.md": spec_errors_page,
}


def stale_pages(root: Path) -> list[str]:
    """The generated pages whose file differs from what the code generates now."""
    stale = []
    for rel, make in PAGES.items():
        path = root / rel
        if not path.exists() or path.read_text() != make():
            stale.append(rel)
    return stale


def write_pages(root: Path) -> list[str]:
    from saev_report.fsutil import atomic_write_text

    for rel, make in PAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / rel, make())
    return list(PAGES)


def main(argv: list[str] | None = None) -> int:
    """`python -m saev_report.docs [ROOT] [--check]`: ROOT is the repository (default: here); a file
    such as README.md names its folder, so the older `python -m saev_report.docs README.md` still works."""
    args = argv if argv is not None else sys.argv[1:]
    paths = [a for a in args if not a.startswith("--")]
    root = Path(paths[0]) if paths else Path(".")
    if root.is_file():
        root = root.parent
    if "--check" in args:
        stale = stale_pages(root)
        for rel in stale:
            print(f"{rel} is stale: run `python -m saev_report.docs`", file=sys.stderr)
        return 1 if stale else 0
    for rel in write_pages(root):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
