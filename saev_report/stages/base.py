"""The shape every stage kind has, and one stage of a build.

A `StageKind` is declared once per kind, in its own module under `stages/`:

    TRAIN = StageKind(name="train", version=1, params=TrainParams, out=TrainOut, action=train,
                      reads={"record": Role(RecordOut)}, writes=("train_log",))

- `params` is a frozen pydantic model: exactly what the action reads and
  exactly what the stage's key hashes (the builder in `graph.py` fills it from
  the spec; no action ever sees the spec);
- `action(params, inputs, out_dir)` writes the stage's files and table parts
  under `out_dir` (`out_dir/tables/<table>/<name>.parquet`);
- `out` wraps a finished output folder in typed accessors
  (`RecordOut.store(layer)`, `TrainOut.sae(tag)`), so no stage does path
  arithmetic in another stage's folder;
- `reads` declares the roles the action reads and the output type each must be
  (`Role`); a `Stage` whose inputs do not match is refused when it is made, so
  a wiring mistake in `graph.py` fails at `validate`, not hours into a build;
- `writes` declares the tables whose parts the action leaves under
  `out_dir/tables/`; publishing refuses a part of any other table.

A `Stage` is one instance in a build: a kind, a label, its params and the
stages it reads (by role). Its key hashes the kind's name and version, the
params and the inputs' keys, so a change anywhere upstream re-runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from saev_report.spec import content_hash


class StageParams(BaseModel):
    """Base of every kind's params: frozen, strict, hashed whole (except `cache_dir`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_dir: Path = Field(default=Path("."), exclude=True)
    """Where the shared cache (converted weights, the demo set) lives: a location, not content,
    so it is left out of the key (cache entries are named by their own content hashes)."""

    def digest(self) -> str:
        """Hash of the params; written into the table parts as their provenance."""
        return content_hash(self)


class StageOut:
    """A finished stage's output folder; each kind subclasses it with typed accessors.

    `cache_dir` is the shared cache of the build reading it: outputs store paths into the cache
    relative to it (`record.write_image_index`), resolved here, so a moved cache is still found."""

    def __init__(self, root: Path, cache_dir: Path | None = None):
        self.root = Path(root)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)

    def table_part(self, table: str, name: str = "part") -> Path:
        return table_part(self.root, table, name)


def table_part(out_dir: Path, table: str, name: str = "part") -> Path:
    """Where a stage writes one part of `table`; `publish_tables` links every part it finds there."""
    return Path(out_dir) / "tables" / table / f"{name}.parquet"


@dataclass(frozen=True)
class Role:
    """One input a stage kind reads: the output type it must be; `optional`: the graph may leave it
    out; `per_key`: one input per key, in roles `<role>/<key>` (e.g. `head/<head key>`)."""

    out: type[StageOut]
    optional: bool = False
    per_key: bool = False


P = TypeVar("P", bound=StageParams)
O = TypeVar("O", bound=StageOut)
Inputs = Mapping[str, StageOut]
"""The outputs a stage reads, by role (e.g. `record`, `train`), already typed by their kind."""


@dataclass(frozen=True)
class StageKind(Generic[P, O]):
    """One kind of stage, declared once (see the module docstring)."""

    name: str
    version: int
    """Bump when the output format changes: old outputs then get new keys and are ignored."""
    params: type[P]
    out: type[O]
    action: Callable[[P, Inputs, Path], None]
    resumable: bool = False
    """A killed run keeps its `.partial` folder for the action to resume from; otherwise it is cleared."""
    parallel: bool = False
    """Under torchrun the action runs on every rank and splits its work (`distributed.current()`);
    otherwise it runs on rank 0 while the others wait."""
    reads: Mapping[str, Role] = field(default_factory=dict)
    """The inputs the action reads, by role."""
    writes: tuple[str, ...] = ()
    """The tables (`tables.TABLES`) the action writes parts of."""

    def role_of(self, role: str) -> Role | None:
        """The declared role `role` fills: itself, or `<name>/<key>` of a per-key role."""
        if role in self.reads and not self.reads[role].per_key:
            return self.reads[role]
        name, _, key = role.partition("/")
        declared = self.reads.get(name)
        return declared if declared is not None and declared.per_key and key else None

    def check_inputs(self, inputs: Mapping[str, "Stage"]) -> None:
        """Raise TypeError unless `inputs` fill the declared roles with the declared output types."""
        for role, stage in inputs.items():
            declared = self.role_of(role)
            if declared is None:
                raise TypeError(f"{self.name} stage reads no input {role!r} (it reads {', '.join(self.reads) or 'nothing'})")
            if not issubclass(stage.kind.out, declared.out):
                raise TypeError(f"{self.name} stage's input {role!r} must be a {declared.out.__name__}, "
                                f"got {stage.kind.name}'s {stage.kind.out.__name__}")
        for name, declared in self.reads.items():
            filled = any(declared.per_key and r.startswith(name + "/") for r in inputs) if declared.per_key else name in inputs
            if not declared.optional and not filled:
                raise TypeError(f"{self.name} stage needs input {name!r} ({declared.out.__name__})")


def take(inputs: Inputs, role: str, out_type: type[O]) -> O:
    """The input in `role`, checked to be the output type the action expects."""
    value = inputs[role]
    if not isinstance(value, out_type):
        raise TypeError(f"input {role!r} is a {type(value).__name__}, not a {out_type.__name__}")
    return value


@dataclass(frozen=True, eq=False)
class Stage:
    """One stage of a build: `kind` run with `params` on the outputs of `inputs`."""

    kind: StageKind
    label: str
    params: StageParams
    inputs: dict[str, "Stage"] = field(default_factory=dict)
    key: str = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.params, self.kind.params):
            raise TypeError(f"{self.kind.name} stage needs {self.kind.params.__name__}, got {type(self.params).__name__}")
        self.kind.check_inputs(self.inputs)
        input_keys = {role: f"{s.kind.name}/{s.label}-{s.key}" for role, s in self.inputs.items()}
        object.__setattr__(self, "key", content_hash(self.kind.name, self.kind.version, self.params, input_keys))

    @property
    def name(self) -> str:
        return f"{self.kind.name}/{self.label}"

    @property
    def deps(self) -> list["Stage"]:
        return list(self.inputs.values())

    def out_dir(self, run_dir: Path) -> Path:
        return Path(run_dir) / "cache" / self.kind.name / f"{self.label}-{self.key}"

    def partial_dir(self, run_dir: Path) -> Path:
        out = self.out_dir(run_dir)
        return out.with_name(out.name + ".partial")

    def status(self, run_dir: Path) -> str:
        if self.out_dir(run_dir).is_dir():
            return "done"
        if self.partial_dir(run_dir).is_dir():
            return "partial"
        return "todo"

    def output(self, run_dir: Path) -> StageOut:
        """The typed view of this stage's finished output."""
        return self.kind.out(self.out_dir(run_dir), cache_dir=self.params.cache_dir)


# --------------------------------------------------------------------------- shared loaders
# Imported lazily so building the graph (`validate`, `plan`) never loads torch.


def open_dataset(key: str, dataset, cache_dir: Path):
    """A dataset named `key` as the spec declares it (`DatasetSpec`)."""
    from saev_report.datasets import open_dataset as _open

    return _open(key, dataset, cache_dir)


def open_backbone(model, cache_dir: Path, device_name: str, seed: int):
    """(Backbone, torch device) for a `ModelSpec` on the device the run asks for."""
    from saev_report.backbones import load_backbone
    from saev_report.runtime import pick_device

    device = pick_device(device_name)
    return load_backbone(model, cache_dir, device, seed=seed), device
