"""`--set path=value`: change one spec value from the command line, without editing the file.

    saev-report build specs/demo.yaml --set sae.n_patches=200000 --set run.name=smoke

- `path` is dotted: mapping keys and list indices (`edits.0.action`, or `edits[0].action`).
  A key that itself holds dots (`datasets.imagenet.val`) is matched against the keys the spec
  has, longest first. Missing mappings on the way are created (`models.clip.sae.k=[16]`).
- `value` is YAML: `200000` is an int, `[8, 16]` a list, `{kind: demo}` a mapping, `null`
  (or nothing) null, `"10"` a string.

Overrides apply in order to the parsed YAML before validation, so an overridden value is
checked exactly as if the file held it; `spec.parse_spec_text` then names the flag, not a file
line, for every problem inside an overridden path (`--set sae.n_patches=-1: ...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

Loc = tuple[Any, ...]


class OverrideError(ValueError):
    """A `--set` that cannot be applied: bad syntax, bad YAML, or a path through a scalar."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        self.message = message
        super().__init__(f"--set {flag}: {message}")


@dataclass(frozen=True)
class Override:
    """One `--set`, as given and parsed."""

    flag: str
    """The flag's argument as typed (`sae.n_patches=-1`): how errors and the manifest name it."""
    target: str
    """The dotted path before `=`, not yet matched against the spec's keys."""
    value: Any
    """The YAML value after `=`."""


_INDEX = re.compile(r"\[(\d+)\]")


def parse_override(flag: str) -> Override:
    """`path=value` → Override; OverrideError when there is no `=`, no path or no valid YAML."""
    target, eq, text = flag.partition("=")
    target = _INDEX.sub(r".\1", target.strip())
    if not eq or not target or any(not part for part in target.split(".")):
        raise OverrideError(flag, "expected `path=value`, e.g. `sae.n_patches=200000`")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise OverrideError(flag, f"the value is not valid YAML: {problem}") from None
    return Override(flag, target, value)


def _split(node: Any, parts: list[str], flag: str, where: Loc) -> tuple[Any, list[str]]:
    """The first path element at `node` (a mapping key, longest existing dotted key first, or a
    list index) and the parts left."""
    if isinstance(node, dict):
        for n in range(len(parts), 1, -1):
            key = ".".join(parts[:n])
            if key in node:
                return key, parts[n:]
        return parts[0], parts[1:]
    if isinstance(node, list):
        if not parts[0].isdigit():
            raise OverrideError(flag, f"{_dotted(where) or 'the spec'} is a list: expected an index, got {parts[0]!r}")
        index = int(parts[0])
        if index >= len(node):
            raise OverrideError(flag, f"{_dotted(where)} has {len(node)} item(s); index {index} is out of range")
        return index, parts[1:]
    kind = "null" if node is None else type(node).__name__
    raise OverrideError(flag, f"{_dotted(where)} is a {kind} value, not a mapping or list")


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc)


def apply_overrides(data: dict[str, Any], overrides: Sequence[Override]) -> list[tuple[Loc, Override]]:
    """Set each override's value in `data` (in place, in order); returns (resolved path, override)."""
    applied: list[tuple[Loc, Override]] = []
    for override in overrides:
        node: Any = data
        parts = override.target.split(".")
        where: Loc = ()
        while True:
            key, parts = _split(node, parts, override.flag, where)
            where = (*where, key)
            if not parts:
                node[key] = override.value
                break
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}  # a section the file leaves out
            node = node[key]
        applied.append((where, override))
    return applied


def flag_for(loc: Loc, applied: Sequence[tuple[Loc, Override]]) -> Override | None:
    """The last override whose path holds `loc` (the value an error at `loc` came from), if any."""
    for path, override in reversed(applied):
        if tuple(str(p) for p in loc[: len(path)]) == tuple(str(p) for p in path):
            return override
    return None
