"""docs/ARCHITECTURE.md matches the code: every module it lists exists and every module is listed,
the classes it declares have the bases it says, the functions it cites exist, its CLI line names
the typer app's commands and its stage table the stage registry's kinds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "saev_report"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def module_diagram(text: str) -> list[str]:
    """The names in the first column of the opening module diagram: `cli.py`, `stages/`, …"""
    block = re.search(r"^```\n(.*?)^```", text, re.S | re.M)
    assert block, "ARCHITECTURE.md opens with a module diagram in a ``` block"
    names = []
    for line in block.group(1).splitlines():
        if line and not line[0].isspace():
            first = re.split(r"\s{2,}", line, maxsplit=1)[0]
            names += [n.strip() for n in first.split(",") if n.strip()]
    return names


def code_modules() -> tuple[set[str], dict[str, set[str]]]:
    """Top-level modules (`cli.py`) and packages (`stages/`), and each package's own modules."""
    top = {p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    packages = {f"{p.name}/": {m.name for m in p.glob("*.py") if m.name != "__init__.py"}
                for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    return top | set(packages), packages


def code_definitions() -> tuple[dict[str, list[list[str]]], set[str]]:
    """Every class (name → the last names of its bases, one list per definition) and every function name."""
    classes: dict[str, list[list[str]]] = {}
    functions: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, []).append([_last_name(b) for b in node.bases])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.add(node.name)
    return classes, functions


def _last_name(expr: ast.expr) -> str:
    if isinstance(expr, ast.Subscript):
        expr = expr.value
    if isinstance(expr, ast.Attribute):
        return expr.attr
    return expr.id if isinstance(expr, ast.Name) else ast.unparse(expr)


def cited_classes(text: str) -> list[tuple[str, list[str]]]:
    """`class Name(Base, …)` in the doc's code blocks, as (name, last names of the bases)."""
    out = []
    for name, bases in re.findall(r"^\s*class (\w+)\(([^)]*)\)", "\n".join(code_blocks(text)), re.M):
        (node,) = ast.parse(f"class {name}({bases}): pass").body
        out.append((name, [_last_name(b) for b in node.bases]))
    return out


def wrong_classes(text: str) -> list[tuple]:
    """(name, the doc's bases, the code's) of every cited class the code lacks or derives otherwise."""
    classes, _ = code_definitions()
    return [(name, bases, classes.get(name)) for name, bases in cited_classes(text)
            if name not in classes or not any(set(bases) <= set(real) for real in classes[name])]


def cli_commands(text: str) -> list[str]:
    match = re.search(r"^cli\.py\s+typer app \(([^)]*)\)", text, re.M)
    assert match, "the module diagram's cli.py line lists the commands: `typer app (build, …)`"
    return sorted(c.strip() for c in match.group(1).split(","))


def app_commands() -> list[str]:
    import typer.main

    from saev_report.cli import app

    return sorted(typer.main.get_command(app).commands)


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M)


TEXT = DOC.read_text()


def test_every_module_it_lists_exists() -> None:
    listed = module_diagram(TEXT)
    everything, _ = code_modules()
    assert sorted(set(listed) - everything) == [], "ARCHITECTURE.md lists modules the code does not have"


def test_every_module_is_listed() -> None:
    everything, packages = code_modules()
    missing = sorted(everything - set(module_diagram(TEXT)))
    assert missing == [], f"add these to the module diagram of docs/ARCHITECTURE.md: {missing}"
    unnamed = sorted(f"{pkg}{m}" for pkg, mods in packages.items() for m in mods if m not in TEXT)
    assert unnamed == [], f"name these package modules in docs/ARCHITECTURE.md: {unnamed}"


def test_the_classes_it_declares_have_the_bases_it_says() -> None:
    assert any(name == "ModelUnavailable" for name, _ in cited_classes(TEXT))
    assert wrong_classes(TEXT) == [], "classes in ARCHITECTURE.md that the code lacks, or whose bases differ: (name, doc, code)"


def test_the_functions_it_cites_exist() -> None:
    _, functions = code_definitions()
    cited = set(re.findall(r"\bdef (\w+)\(", "\n".join(code_blocks(TEXT))))
    assert cited, "the doc cites functions"
    assert sorted(cited - functions) == [], "functions in ARCHITECTURE.md that the code does not define"


def test_the_cli_line_names_the_commands() -> None:
    assert cli_commands(TEXT) == app_commands()


def test_the_stage_table_names_every_kind() -> None:
    from saev_report.stages import KINDS

    table = re.search(r"^\| kind \|.*?\n((?:\|.*\n)+)", TEXT, re.M)
    assert table, "ARCHITECTURE.md has a `| kind | params | inputs | outputs |` table"
    kinds = []
    for row in table.group(1).splitlines()[1:]:
        kinds += re.findall(r"`(\w+)`", row.split("|")[1])
    assert sorted(kinds) == sorted(KINDS)


def test_the_checks_catch_the_drift_issue_20_found() -> None:
    assert cli_commands(TEXT.replace("typer app (", "typer app (serve, ", 1)) != app_commands()
    drifted = TEXT.replace("class ModelUnavailable(InputUnavailable)", "class ModelUnavailable(Exception)", 1)
    assert drifted != TEXT and [w[0] for w in wrong_classes(drifted)] == ["ModelUnavailable"]


def test_the_registries_and_constants_it_names_exist() -> None:
    """`TABLES`, `KNOWN_ARCHS`, `EDIT_ACTIONS`, …: module-level names the code assigns."""
    assigned = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            assigned |= {t.id for t in targets if isinstance(t, ast.Name)}
    named = set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", TEXT)) | set(re.findall(r"\b([A-Z][A-Z0-9]*_[A-Z0-9_]+)\b", TEXT))
    assert {"TABLES", "KNOWN_ARCHS"} <= named
    assert sorted(named - assigned) == []
