"""Stage `claims`: the statistics of a build. It reads the experiments', splices' and analyses'
table parts and writes `experiment_summary` (the one aggregation of the `experiments` rows, with
intervals), `edit_summary`, `splice_summary`, and the verdicts of the spec's `claims:` (`claims`, `claim_evidence`).

It is cheap (seconds) and keyed on `stats:`, `claims:` and its inputs, so changing a threshold
re-runs only this stage."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from saev_report.spec import ClaimSpec, StatsSpec
from saev_report.stages.analyse import AnalyseOut
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, table_part
from saev_report.stages.edits import EditsOut
from saev_report.stages.experiments import ExperimentsOut
from saev_report.stages.splice import SpliceOut

READS = ("experiments", "splice_images", "concepts", "concept_nulls", "features", "edits")
"""The tables this stage reads from its inputs' parts."""


class ResolvedClaim(BaseModel):
    """A claim with the names the stage needs resolved from the spec (`graph.py` fills it); `claims.evaluate` reads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    claim: ClaimSpec
    sae_ids: list[str]
    """The replicates, in the claim's order."""
    seeds: list[int]
    """Their training seeds."""
    head: str | None = None
    """Spliced claims: the head scored."""
    control_sae_id: str | None = None
    """AP-lift claims: the control SAE counted."""


class ClaimsParams(StageParams):
    stats: StatsSpec
    claims: list[ResolvedClaim]
    seed: int
    """`run.seed`: every bootstrap and test draw is keyed by it."""


class ClaimsOut(StageOut):
    pass


def input_tables(inputs: Inputs) -> dict[str, "object"]:
    """Every part of the tables in `READS` that the inputs wrote, one Arrow table per name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from saev_report.tables import TABLES

    found: dict[str, list] = {}
    for role in sorted(inputs):
        for name in READS:
            folder = inputs[role].root / "tables" / name
            for part in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
                found.setdefault(name, []).append(pq.read_table(part))
    return {name: pa.concat_tables([t.select(TABLES[name].schema.names).cast(TABLES[name].schema) for t in parts])
            for name, parts in found.items()}


def claims_action(params: ClaimsParams, inputs: Inputs, out_dir: Path) -> None:
    import duckdb

    from saev_report import claims as cl
    from saev_report.progress import log
    from saev_report.tables import to_arrow, write_table

    tables = input_tables(inputs)
    con = duckdb.connect()
    for name in READS:
        con.register(name, tables[name] if name in tables else to_arrow(name, []))
    groups = cl.per_image(con)
    digest = params.digest()
    write_table(table_part(out_dir, "experiment_summary"), "experiment_summary", cl.summary_rows(groups, params.stats, params.seed), digest)
    write_table(table_part(out_dir, "edit_summary"), "edit_summary", cl.edit_summary_rows(con, params.stats, params.seed), digest)
    splice = cl.splice_summary_rows(tables.get("splice_images"), params.stats, params.seed)
    write_table(table_part(out_dir, "splice_summary"), "splice_summary", splice, digest)
    claim_rows, evidence = cl.evaluate(params.claims, groups, splice, cl.ap_lift_counts(con, params.claims), params.stats, params.seed,
                                       cl.null_lift_counts(con, params.claims))
    write_table(table_part(out_dir, "claims"), "claims", claim_rows, digest)
    write_table(table_part(out_dir, "claim_evidence"), "claim_evidence", evidence, digest)
    for row in claim_rows:
        colour = {"holds": "green", "fails": "red"}.get(row["verdict"], "yellow")
        log(f"  claim {row['claim']}: [{colour}]{row['verdict']}[/] ({row['summary']})")


CLAIMS = StageKind(
    name="claims", version=1, params=ClaimsParams, out=ClaimsOut, action=claims_action,
    reads={"experiments": Role(ExperimentsOut, optional=True, per_key=True), "splice": Role(SpliceOut, optional=True, per_key=True),
           "edits": Role(EditsOut, optional=True, per_key=True), "analyse": Role(AnalyseOut, optional=True, per_key=True)},
    writes=("experiment_summary", "edit_summary", "splice_summary", "claims", "claim_evidence"))
