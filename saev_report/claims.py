"""Claims that can fail (issue #17): the one aggregation of the `experiments` rows, intervals on
every effect, corrected tests against the controls, held-out selection, seeds as replication, and
a verdict per declared claim.

Data flow (the `claims` stage runs it; the site and `saev-report check` read its tables):

    experiments rows ──per_image()──► one value per (SAE, concept, arm, setting, image),
                                      random draws pooled image by image
        ├─ summary_rows()  ─► `experiment_summary`: every metric with its interval (the site's tables and bands)
        └─ evaluate()      ─► `claims`, `claim_evidence`: thresholds on intervals, paired sign-flip
                              tests of the concept arm against each control, corrected across the family
    splice_images rows ──splice_summary_rows()──► `splice_summary` (spliced claims, the heads' scores)
    concepts + features ──ap_lift counts──► `ap_lift` claims

Verdicts (per concept, then per replicate, then per claim):
- a threshold **passes** when its whole interval is on the right side, **fails** when the whole
  interval is on the wrong side, and **straddles** otherwise;
- a concept **holds** when every threshold passes and every corrected test beats its control,
  **fails** when a threshold fails, and is **inconclusive** otherwise;
- a replicate (one SAE) holds when at least `min_concepts` concepts hold, fails when so many fail
  that `min_concepts` can no longer be reached, else is inconclusive; a claim likewise over its
  replicates with `min_replicates`.

Every random draw is keyed by the run's seed and the group's own key (`stats.rng`), so a re-run
gives the same intervals, p-values and verdicts bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from saev_report import stats
from saev_report.spec import APLiftClaim, ClaimCondition, ClaimSpec, ExperimentClaim, SplicedClaim, StatsSpec

if TYPE_CHECKING:
    from saev_report.stages.claims import ResolvedClaim

VERDICTS = ("holds", "fails", "inconclusive")

# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """One effect the experiments report, as a statistic of per-image values.

    `num` (and `den` for a ratio of sums) are per-image columns of `per_image()`, each already the
    mean over the arm's random draws; `stronger` is the sign of a stronger edit (a larger share of
    pixels removed, a larger drop of the probability), the direction the paired tests look in."""

    name: str
    task: str
    num: str
    den: str | None
    stronger: int
    label: str

    @property
    def statistic(self) -> str:
        return "ratio" if self.den else "mean"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("removed_frac", "segmentation", "removed", "before", +1, "share of the concept's predicted pixels removed"),
    Metric("other_changed_frac", "segmentation", "other_changed_frac", None, +1, "other classes' pixels changed (share of the image)"),
    Metric("p_delta", "classification", "p_delta", None, -1, "change of the concept's probability"),
    Metric("other_p_delta", "classification", "other_p_delta", None, +1, "mean |change| of the other classes' probabilities"),
    Metric("flip_frac", "classification", "flipped", None, +1, "share of images whose top-1 class changed"),
)}
EFFECT_METRIC = {"segmentation": "removed_frac", "classification": "p_delta"}
"""The metric the paired tests compare arms on, per task."""

# --------------------------------------------------------------------------- the one aggregation

PER_IMAGE_SQL = """
SELECT experiment, sae_id, head, task, level, concept, arm, m, factor, "where", image_idx,
       count(*) AS n_draws,
       sum(concept_px_removed)::DOUBLE / count(*) AS removed, sum(concept_px_before)::DOUBLE / count(*) AS before,
       avg(other_changed_frac) AS other_changed_frac, avg(p_delta) AS p_delta, avg(other_p_delta) AS other_p_delta,
       avg(flipped::INT) AS flipped
FROM experiments GROUP BY ALL
"""
"""Per (SAE, head, concept, arm, m, factor, where, image): every metric's per-image value, the
random arm's draws averaged (so a ratio of sums over images pools every draw's pixels)."""

GroupKey = tuple[str, str, str, str, str, str, str, int, float, str]
"""(experiment, sae_id, head, task, level, concept, arm, m, factor, where)."""


@dataclass
class Group:
    """One group's per-image values, rows ordered by image."""

    key: GroupKey
    image_idx: np.ndarray
    values: dict[str, np.ndarray]
    n_draws: int

    def take(self, images: np.ndarray) -> "Group":
        keep = np.isin(self.image_idx, images)
        return Group(self.key, self.image_idx[keep], {k: v[keep] for k, v in self.values.items()}, self.n_draws)


VALUE_COLUMNS = ("removed", "before", "other_changed_frac", "p_delta", "other_p_delta", "flipped")


def per_image(con: Any) -> dict[GroupKey, Group]:
    """The per-image values of every group, from a DuckDB connection with an `experiments` view."""
    from saev_report.tables import fetch_arrow

    table = fetch_arrow(con.sql(PER_IMAGE_SQL + ' ORDER BY experiment, sae_id, head, concept, arm, m, factor, "where", image_idx'))
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    n = table.num_rows
    keys = list(zip(*(cols[c] for c in ("experiment", "sae_id", "head", "task", "level", "concept", "arm", "m", "factor", "where"))))
    groups: dict[GroupKey, Group] = {}
    start = 0
    for i in range(1, n + 1):
        if i == n or keys[i] != keys[start]:
            key = tuple(_plain(v) for v in keys[start])
            groups[key] = Group(key, cols["image_idx"][start:i].astype(np.int64),  # type: ignore[arg-type]
                                {c: np.asarray(cols[c][start:i], dtype=np.float64) for c in VALUE_COLUMNS}, int(cols["n_draws"][start]))
            start = i
    return groups


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def metric_arrays(metric: Metric, group: Group) -> tuple[np.ndarray, ...]:
    """The arrays `metric`'s statistic takes for `group` (images where the metric is defined)."""
    num = group.values[metric.num]
    if metric.den is None:
        return (num[np.isfinite(num)],)
    den = group.values[metric.den]
    ok = np.isfinite(num) & np.isfinite(den)
    return num[ok], den[ok]


def interval(metric: Metric, group: Group, spec: StatsSpec, seed: int, *key: Any) -> stats.Interval:
    """`metric` of `group` with its bootstrap interval over images."""
    return stats.bootstrap(metric.statistic, metric_arrays(metric, group), n_resamples=spec.n_resamples,
                           confidence=spec.confidence, method=spec.interval, generator=stats.rng(seed, *group.key, metric.name, *key))


def summary_rows(groups: Mapping[GroupKey, Group], spec: StatsSpec, seed: int) -> list[dict[str, Any]]:
    """The `experiment_summary` rows: every group's metrics of its task, each with its interval."""
    rows = []
    for key, group in groups.items():
        experiment, sae_id, head, task, level, concept, arm, m, factor, where = key
        row: dict[str, Any] = {"experiment": experiment, "sae_id": sae_id, "head": head, "task": task, "level": level,
                               "concept": concept, "arm": arm, "m": m, "factor": factor, "where": where,
                               "n_images": len(group.image_idx), "n_draws": group.n_draws}
        for metric in METRICS.values():
            if metric.task != task:
                continue
            got = interval(metric, group, spec, seed)
            row.update({metric.name: _finite(got.estimate), f"{metric.name}_lo": _finite(got.lo), f"{metric.name}_hi": _finite(got.hi)})
        rows.append(row)
    return rows


def summarise_rows(rows: Sequence[Mapping[str, Any]] | pa.Table, spec: StatsSpec | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """`experiment_summary` rows straight from `experiments` rows (tests, notebooks): the same aggregation."""
    import duckdb

    from saev_report.tables import to_arrow

    con = duckdb.connect()
    con.register("experiments", rows if isinstance(rows, pa.Table) else to_arrow("experiments", list(rows)))
    return summary_rows(per_image(con), spec or StatsSpec(), seed)


def _finite(value: float) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# --------------------------------------------------------------------------- edits

EDIT_PER_IMAGE_SQL = """
SELECT edit, sae_id, head, task, is_control, image_idx, count(*) AS n_edits,
       avg(target_delta) AS target_delta, avg(other_delta) AS other_delta, avg(flipped::INT)::DOUBLE AS flipped
FROM edits GROUP BY ALL ORDER BY edit, sae_id, head, is_control, image_idx
"""
"""Per (edit, SAE, head, real or control, image): the image's edits averaged, so that an image
edited for several features counts once (the image is the unit the intervals resample)."""


def edit_summary_rows(con: Any, spec: StatsSpec, seed: int) -> list[dict[str, Any]]:
    """`edit_summary`: each edit's (and its controls') mean target change, side change and flip
    rate over images, with bootstrap intervals."""
    from saev_report.tables import fetch_arrow

    rows = fetch_arrow(con.sql(EDIT_PER_IMAGE_SQL)).to_pylist()
    out = []
    for key, items in _group_by(rows, lambda r: (r["edit"], r["sae_id"], r["head"], r["task"], bool(r["is_control"]))).items():
        row: dict[str, Any] = {"edit": key[0], "sae_id": key[1], "head": key[2], "task": key[3], "is_control": key[4],
                               "n_images": len(items), "n_edits": int(sum(r["n_edits"] for r in items))}
        for name, column in (("target_delta", "target_delta"), ("other_delta", "other_delta"), ("flip_frac", "flipped")):
            values = np.array([r[column] for r in items if r[column] is not None], dtype=np.float64)
            got = stats.bootstrap("mean", (values[np.isfinite(values)],), n_resamples=spec.n_resamples, confidence=spec.confidence,
                                  method=spec.interval, generator=stats.rng(seed, "edit", *key, name))
            row.update({name: _finite(got.estimate), f"{name}_lo": _finite(got.lo), f"{name}_hi": _finite(got.hi)})
        out.append(row)
    return out


# --------------------------------------------------------------------------- spliced metrics


def splice_summary_rows(splice_images: pa.Table | None, spec: StatsSpec, seed: int) -> list[dict[str, Any]]:
    """`splice_summary`: clean, spliced, ablated and recovered of every (SAE, head), each with its
    interval over the same resampled images (clean is the head's validation score)."""
    if splice_images is None or splice_images.num_rows == 0:
        return []
    rows = sorted(splice_images.to_pylist(), key=lambda r: (r["sae_id"], r["head"], r["image_idx"]))
    out = []
    for (sae_id, head), items in _group_by(rows, lambda r: (r["sae_id"], r["head"])).items():
        task = items[0]["task"]
        arms = {arm: np.array([r[arm] for r in items], dtype=np.float64) for arm in ("clean", "spliced", "ablated")}
        if task == "classification":
            arms = {arm: values[:, 0] for arm, values in arms.items()}
        row: dict[str, Any] = {"sae_id": sae_id, "head": head, "metric": "accuracy" if task == "classification" else "miou", "n_images": len(items)}
        for name, kind, arrays in (*((arm, "score", (arms[arm],)) for arm in arms),
                                   ("recovered", "recovered", (arms["clean"], arms["spliced"], arms["ablated"]))):
            got = stats.bootstrap(kind, arrays, n_resamples=spec.n_resamples, confidence=spec.confidence, method=spec.interval,
                                  generator=stats.rng(seed, "splice", sae_id, head, name))
            row.update({name: _finite(got.estimate), f"{name}_lo": _finite(got.lo), f"{name}_hi": _finite(got.hi)})
        out.append(row)
    return out


def _group_by(rows: Iterable[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], Any]) -> dict[Any, list[Mapping[str, Any]]]:
    out: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


# --------------------------------------------------------------------------- claims


def statement(claim: ClaimSpec) -> str:
    """The claim in words: its own `statement`, else one generated from its fields."""
    if claim.statement:
        return claim.statement
    reps = f"on {claim.min_replicates} of {len(claim.saes)} SAEs" if claim.min_replicates else f"on every one of {len(claim.saes)} SAE(s)"
    if isinstance(claim, ExperimentClaim):
        where = (f"at m = {claim.setting.m}, factor {claim.setting.factor:g}" if claim.setting
                 else "at the setting chosen on a selection half of the images (read on the other half)")
        conds = "; ".join(condition_label(c) for c in claim.conditions)
        beats = f"; the concept's features beat {' and '.join(claim.beats)} controls in corrected paired tests" if claim.beats else ""
        who = f"at least {claim.min_concepts} concepts" if claim.min_concepts else "every concept"
        return f"Experiment {claim.experiment}, {where}: {conds}{beats}, for {who}, {reps}."
    if isinstance(claim, SplicedClaim):
        return f"Spliced into the {claim.model} {claim.task} head, the SAE recovers ≥ {claim.min:g} of its skill, {reps}."
    return (f"At least {claim.times:g}× as many {claim.model} features reach {claim.level} AP lift ≥ {claim.threshold:g} as "
            f"{claim.control_model}'s, and more than under permuted labels, {reps}.")


def condition_label(cond: ClaimCondition) -> str:
    metric = METRICS[cond.metric].label
    bound = "≥" if cond.min is not None else "≤"
    value = cond.min if cond.min is not None else (cond.max if cond.max is not None else 0.0)
    if cond.times is not None:
        return f"{metric} − {cond.times:g} × random {bound} {value:g}"
    arm = {"concept": "", "random": " (random controls)", "other": " (another concept's features)"}[cond.arm]
    return f"{metric}{arm} {bound} {value:g}"


@dataclass
class _Check:
    row: dict[str, Any]
    replicate: int
    concept: str | None


@dataclass
class _ClaimWork:
    resolved: ResolvedClaim
    checks: list[_Check] = field(default_factory=list)
    fixed_verdicts: dict[int, str] = field(default_factory=dict)
    """Replicates decided without concepts (spliced, ap_lift)."""
    concepts: dict[int, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _threshold_outcome(lo: float, hi: float, bound: str, value: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "straddle"
    if bound == "min":
        return "pass" if lo >= value else "fail" if hi < value else "straddle"
    return "pass" if hi <= value else "fail" if lo > value else "straddle"


def split_images(images: np.ndarray, seed: int, claim: str, concept: str) -> tuple[np.ndarray, np.ndarray]:
    """(selection half, confirmation half) of a concept's images: a seeded shuffle, the first
    ⌊n/2⌋ select, the rest confirm. The same split for every replicate."""
    order = stats.rng(seed, "split", claim, concept).permutation(np.sort(images))
    half = len(order) // 2
    return np.sort(order[:half]), np.sort(order[half:])


def _condition_check(cond: ClaimCondition, groups: Mapping[str, Group], spec: StatsSpec, seed: int) -> dict[str, Any] | None:
    """One threshold's estimate and interval on the groups of one (replicate, concept, setting) by arm."""
    metric = METRICS[cond.metric]
    bound = "min" if cond.min is not None else "max"
    value = cond.min if cond.min is not None else (cond.max if cond.max is not None else 0.0)
    if cond.times is None:
        group = groups.get(cond.arm)
        if group is None:
            return None
        got = interval(metric, group, spec, seed, "claim")
        n = len(metric_arrays(metric, group)[0])
    else:
        own, rnd = groups.get("concept"), groups.get("random")
        if own is None or rnd is None:
            return None
        images = np.intersect1d(own.image_idx, rnd.image_idx)
        a, b = own.take(images), rnd.take(images)
        num = a.values[metric.num] - cond.times * b.values[metric.num]
        if metric.den:
            den = a.values[metric.den]
            ok = np.isfinite(num) & np.isfinite(den)
            arrays, kind = (num[ok], den[ok]), "ratio"
        else:
            ok = np.isfinite(num)
            arrays, kind = (a.values[metric.num][ok], cond.times * b.values[metric.num][ok]), "paired_diff"
        got = stats.bootstrap(kind, arrays, n_resamples=spec.n_resamples, confidence=spec.confidence, method=spec.interval,
                              generator=stats.rng(seed, *own.key, metric.name, "times", cond.times))
        n = int(ok.sum())
    return {"check": "threshold", "label": condition_label(cond), "metric": cond.metric, "arm": cond.arm if cond.times is None else "concept − random",
            "n_images": n, "estimate": _finite(got.estimate), "estimate_lo": _finite(got.lo), "estimate_hi": _finite(got.hi),
            "threshold": value, "bound": bound,
            "outcome": _threshold_outcome(got.lo, got.hi, bound, value)}


def _test_check(control: str, task: str, groups: Mapping[str, Group], spec: StatsSpec, seed: int) -> dict[str, Any] | None:
    """The concept arm against one control, paired over images on the task's effect metric."""
    metric = METRICS[EFFECT_METRIC[task]]
    own, other = groups.get("concept"), groups.get(control)
    if own is None or other is None:
        return None
    images = np.intersect1d(own.image_idx, other.image_idx)
    a, b = own.take(images), other.take(images)
    diff = metric.stronger * (a.values[metric.num] - b.values[metric.num])
    diff = diff[np.isfinite(diff)]
    result = stats.paired_test(diff, n_resamples=spec.n_resamples, generator=stats.rng(seed, *own.key, "test", control))
    scale = None
    if metric.den:  # report the difference as a share: Σ diff / Σ before
        den = a.values[metric.den][np.isfinite(a.values[metric.den])]
        scale = float(den.sum()) / len(den) if len(den) and den.sum() > 0 else None
    estimate = result.statistic / scale if scale else result.statistic
    return {"check": "test", "label": f"{metric.label}: its top features against {control} controls (paired sign-flip, one-sided)",
            "metric": metric.name, "arm": control, "n_images": result.n, "estimate": _finite(estimate),
            "p_value": _finite(result.p_value), "exact": result.exact}


def _select_setting(claim: ExperimentClaim, by_setting: Mapping[tuple[int, float, str], Mapping[str, Mapping[str, Group]]],
                    selection: Mapping[str, np.ndarray]) -> tuple[int, float, str] | None:
    """The setting where most concepts meet every condition's point estimate (and the concept arm's
    effect exceeds each control's) on the selection half; ties: fewer features, then the factor
    nearest 1, then `all` patches."""
    best, best_key = None, None
    for setting, concepts in by_setting.items():
        if setting[1] == 1.0:
            continue  # no edit
        met = 0
        for concept, arms in concepts.items():
            images = selection.get(concept)
            if images is None or len(images) == 0:
                continue
            taken = {arm: g.take(images) for arm, g in arms.items()}
            if all(_point_meets(c, taken) for c in claim.conditions) and all(_point_beats(b, taken) for b in claim.beats):
                met += 1
        rank = (-met, setting[0], -setting[1], setting[2] != "all")
        if best_key is None or rank < best_key:
            best, best_key = setting, rank
    return best


def _point_estimate(metric: Metric, group: Group) -> float:
    arrays = metric_arrays(metric, group)
    if len(arrays[0]) == 0:
        return float("nan")
    return float(stats.STATISTICS[metric.statistic].value(arrays, np.arange(len(arrays[0]))[None])[0])


def _point_meets(cond: ClaimCondition, arms: Mapping[str, Group]) -> bool:
    metric = METRICS[cond.metric]
    value = cond.min if cond.min is not None else (cond.max if cond.max is not None else 0.0)
    if cond.times is None:
        if cond.arm not in arms:
            return False
        x = _point_estimate(metric, arms[cond.arm])
    else:
        if "concept" not in arms or "random" not in arms:
            return False
        x = _point_estimate(metric, arms["concept"]) - cond.times * _point_estimate(metric, arms["random"])
    return math.isfinite(x) and (x >= value if cond.min is not None else x <= value)


def _point_beats(control: str, arms: Mapping[str, Group]) -> bool:
    if "concept" not in arms or control not in arms:
        return False
    metric = METRICS[EFFECT_METRIC[arms["concept"].key[3]]]
    return metric.stronger * (_point_estimate(metric, arms["concept"]) - _point_estimate(metric, arms[control])) > 0


def _experiment_claim(work: _ClaimWork, groups: Mapping[GroupKey, Group], spec: StatsSpec, seed: int) -> None:
    claim = work.resolved.claim
    assert isinstance(claim, ExperimentClaim)
    for r, sae_id in enumerate(work.resolved.sae_ids):
        mine = [g for k, g in groups.items() if k[0] == claim.experiment and k[1] == sae_id]
        if not mine:
            work.notes.append(f"no experiment rows for {sae_id}")
            work.fixed_verdicts[r] = "inconclusive"
            continue
        task = mine[0].key[3]
        by_setting: dict[tuple[int, float, str], dict[str, dict[str, Group]]] = {}
        for g in mine:
            _, _, _, _, _, concept, arm, m, factor, where = g.key
            by_setting.setdefault((m, factor, where), {}).setdefault(concept, {})[arm] = g
        tested = sorted({g.key[5] for g in mine})
        concepts = sorted(claim.concepts) if claim.concepts else tested
        work.concepts[r] = concepts
        missing = [c for c in concepts if c not in tested]
        if missing:
            work.notes.append(f"{sae_id}: not tested: {', '.join(missing)}")
        concepts_here = [c for c in concepts if c in tested]
        images_of = {c: np.unique(np.concatenate([g.image_idx for g in mine if g.key[5] == c and g.key[6] == "concept"] or [np.zeros(0, np.int64)]))
                     for c in concepts_here}
        if claim.select == "split":
            halves = {c: split_images(images_of[c], seed, claim.name, c) for c in concepts_here}
            setting = _select_setting(claim, by_setting, {c: h[0] for c, h in halves.items()})
            read_on = {c: h[1] for c, h in halves.items()}
            label = "confirmation"
        else:
            assert claim.setting is not None
            setting = (claim.setting.m, float(claim.setting.factor), claim.setting.where)
            read_on, label = images_of, "all"
        if setting is None or setting not in by_setting:
            work.notes.append(f"{sae_id}: the setting {setting} was not run")
            work.fixed_verdicts[r] = "inconclusive"
            continue
        m, factor, where = setting
        for concept in concepts_here:
            arms = {arm: g.take(read_on[concept]) for arm, g in by_setting[setting].get(concept, {}).items()}
            base = {"sae_id": sae_id, "seed": work.resolved.seeds[r], "concept": concept, "level": mine[0].key[4],
                    "m": m, "factor": factor, "where": where, "images": label}
            for cond in claim.conditions:
                row = _condition_check(cond, arms, spec, seed)
                if row is not None:
                    work.checks.append(_Check({**base, **row}, r, concept))
            for control in claim.beats:
                row = _test_check(control, task, arms, spec, seed)
                if row is not None:
                    work.checks.append(_Check({**base, **row}, r, concept))


def _spliced_claim(work: _ClaimWork, splice: Sequence[Mapping[str, Any]]) -> None:
    claim = work.resolved.claim
    assert isinstance(claim, SplicedClaim)
    for r, sae_id in enumerate(work.resolved.sae_ids):
        row = next((s for s in splice if s["sae_id"] == sae_id and s["head"] == work.resolved.head), None)
        if row is None or row["recovered"] is None:
            work.notes.append(f"no spliced scores for {sae_id} × {work.resolved.head}")
            work.fixed_verdicts[r] = "inconclusive"
            continue
        lo, hi = row["recovered_lo"], row["recovered_hi"]
        outcome = _threshold_outcome(lo if lo is not None else math.nan, hi if hi is not None else math.nan, "min", claim.min)
        work.checks.append(_Check({
            "sae_id": sae_id, "seed": work.resolved.seeds[r], "check": "threshold", "label": f"recovered {row['metric']} ≥ {claim.min:g}",
            "metric": f"recovered ({row['metric']})", "images": "all", "n_images": row["n_images"], "estimate": row["recovered"],
            "estimate_lo": lo, "estimate_hi": hi, "threshold": claim.min, "bound": "min", "outcome": outcome}, r, None))
        work.fixed_verdicts[r] = {"pass": "holds", "fail": "fails"}.get(outcome, "inconclusive")


AP_LIFT_COUNT_SQL = """
WITH best AS (
  SELECT c.sae_id, c.feature, max(c.ap_lift) AS lift, max((c.null_ap - c.base_rate) / nullif(1 - c.base_rate, 0)) AS null_lift
  FROM concepts c JOIN features f USING (sae_id, feature)
  WHERE c.level = ? AND NOT f.dead GROUP BY ALL)
SELECT sae_id, count(*) FILTER (WHERE lift >= ?) AS n_lift, count(*) FILTER (WHERE null_lift >= ?) AS n_null
FROM best GROUP BY sae_id
"""
"""Per SAE: live features whose best concept reaches the AP lift, and the same under the (first) permuted-label null."""

NULL_COUNTS_SQL = """
SELECT n.sae_id, n.permutation, count(*) FILTER (WHERE n.best_lift >= ?) AS n_null
FROM concept_nulls n JOIN features f USING (sae_id, feature)
WHERE n.level = ? AND NOT f.dead GROUP BY ALL ORDER BY n.sae_id, n.permutation
"""
"""Per SAE and null permutation: live features whose best lift under those labels reaches the threshold."""


def _ap_lift_claim(work: _ClaimWork, counts: Mapping[tuple[str, str, float], tuple[int, int]],
                   null_counts: Mapping[tuple[str, str, float], list[int]]) -> None:
    claim = work.resolved.claim
    assert isinstance(claim, APLiftClaim)
    control = counts.get((str(work.resolved.control_sae_id), claim.level, claim.threshold))
    for r, sae_id in enumerate(work.resolved.sae_ids):
        own = counts.get((sae_id, claim.level, claim.threshold))
        if own is None or control is None:
            work.notes.append(f"no {claim.level}-level concept rows for {sae_id if own is None else work.resolved.control_sae_id}")
            work.fixed_verdicts[r] = "inconclusive"
            continue
        n, n_null = own
        nulls = null_counts.get((sae_id, claim.level, claim.threshold)) or [n_null]
        base = {"sae_id": sae_id, "seed": work.resolved.seeds[r], "check": "threshold", "metric": f"features with AP lift ≥ {claim.threshold:g}",
                "images": "all", "estimate": float(n)}
        vs_control = "pass" if n >= claim.times * control[0] else "fail"
        vs_null = "pass" if n > max(nulls) else "fail"
        if len(nulls) > 1:  # more than every permutation's count: a permutation test at p ≤ 1 / (permutations + 1)
            null_label = f"> every one of {len(nulls)} label permutations' counts (max {max(nulls)}; p ≤ 1/{len(nulls) + 1})"
        else:
            null_label = f"> the permuted-label null's {nulls[0]}"
        work.checks.append(_Check({**base, "label": f"≥ {claim.times:g} × the control's {control[0]}", "arm": "control",
                                   "threshold": claim.times * control[0], "bound": "min", "outcome": vs_control}, r, None))
        work.checks.append(_Check({**base, "label": null_label, "arm": "null",
                                   "threshold": float(max(nulls)), "bound": "min", "outcome": vs_null}, r, None))
        work.fixed_verdicts[r] = "holds" if vs_control == vs_null == "pass" else "fails"


def _count_verdict(n_hold: int, n_fail: int, n_total: int, need: int) -> str:
    if n_hold >= need:
        return "holds"
    if n_fail > n_total - need:
        return "fails"
    return "inconclusive"


def _concept_verdict(checks: Sequence[_Check]) -> str:
    outcomes = [c.row["outcome"] for c in checks]
    if "fail" in outcomes:
        return "fails"
    if all(o in ("pass", "beats") for o in outcomes) and outcomes:
        return "holds"
    return "inconclusive"


def evaluate(claims: Sequence[ResolvedClaim], groups: Mapping[GroupKey, Group], splice: Sequence[Mapping[str, Any]],
             ap_counts: Mapping[tuple[str, str, float], tuple[int, int]], spec: StatsSpec, seed: int,
             null_counts: Mapping[tuple[str, str, float], list[int]] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(`claims` rows, `claim_evidence` rows) of every claim; the tests of all claims form one
    family, corrected together (`spec.correction`)."""
    works = [_ClaimWork(c) for c in claims]
    for work in works:
        claim = work.resolved.claim
        if isinstance(claim, ExperimentClaim):
            _experiment_claim(work, groups, spec, seed)
        elif isinstance(claim, SplicedClaim):
            _spliced_claim(work, splice)
        else:
            _ap_lift_claim(work, ap_counts, null_counts or {})
    tests = [c for w in works for c in w.checks if c.row["check"] == "test"]
    adjusted = stats.correct([c.row["p_value"] if c.row["p_value"] is not None else math.nan for c in tests], spec.correction)
    family = int(np.isfinite(adjusted).sum())
    for check, p in zip(tests, adjusted):
        check.row["p_adjusted"] = _finite(float(p))
        ok = math.isfinite(p) and p <= spec.alpha and (check.row["estimate"] or 0) > 0
        check.row["outcome"] = "beats" if ok else "not shown"

    claim_rows, evidence = [], []
    for work in works:
        claim = work.resolved.claim
        verdicts: list[str] = []
        for r, sae_id in enumerate(work.resolved.sae_ids):
            if r in work.fixed_verdicts:
                verdicts.append(work.fixed_verdicts[r])
                for c in work.checks:
                    if c.replicate == r:
                        evidence.append({"claim": claim.name, **c.row})
                continue
            concepts = work.concepts.get(r, [])
            per_concept = {k: _concept_verdict([c for c in work.checks if c.replicate == r and c.concept == k]) for k in concepts}
            for c in work.checks:
                if c.replicate == r:
                    evidence.append({"claim": claim.name, **c.row, "concept_verdict": per_concept.get(c.concept or "")})
            need = getattr(claim, "min_concepts", None) or len(concepts)
            n_hold = sum(v == "holds" for v in per_concept.values())
            n_fail = sum(v == "fails" for v in per_concept.values())
            verdicts.append(_count_verdict(n_hold, n_fail, len(concepts), min(need, len(concepts))) if concepts else "inconclusive")
        need = claim.min_replicates or len(verdicts)
        verdict = _count_verdict(verdicts.count("holds"), verdicts.count("fails"), len(verdicts), need)
        claim_rows.append({
            "claim": claim.name, "kind": claim.kind, "statement": statement(claim), "verdict": verdict,
            "selection": getattr(claim, "select", None), "replicates": list(work.resolved.sae_ids),
            "replicate_verdicts": verdicts, "min_replicates": need, "family_size": family, "correction": spec.correction,
            "alpha": spec.alpha, "confidence": spec.confidence,
            "summary": _summary_line(work, verdicts, need),
        })
    return claim_rows, evidence


def _summary_line(work: _ClaimWork, verdicts: Sequence[str], need: int) -> str:
    parts = [f"{verdicts.count('holds')} of {len(verdicts)} replicate(s) hold (need {need})"]
    claim = work.resolved.claim
    if isinstance(claim, ExperimentClaim):
        for r, sae_id in enumerate(work.resolved.sae_ids):
            checks = [c for c in work.checks if c.replicate == r]
            concepts = work.concepts.get(r, [])
            held = [k for k in concepts if _concept_verdict([c for c in checks if c.concept == k]) == "holds"]
            setting = next(((c.row["m"], c.row["factor"]) for c in checks), None)
            at = f" at m = {setting[0]}, factor {setting[1]:g}" if setting else ""
            parts.append(f"{sae_id}: {len(held)} of {len(concepts)} concepts hold{at}")
    parts += work.notes
    return "; ".join(parts)


def null_lift_counts(con: Any, claims: Sequence[ResolvedClaim]) -> dict[tuple[str, str, float], list[int]]:
    """(sae_id, level, threshold) → the count of features reaching the lift under each null permutation (`concept_nulls`)."""
    out: dict[tuple[str, str, float], list[int]] = {}
    for c in claims:
        if not isinstance(c.claim, APLiftClaim):
            continue
        for sae_id, _, n in con.execute(NULL_COUNTS_SQL, [c.claim.threshold, c.claim.level]).fetchall():
            out.setdefault((sae_id, c.claim.level, c.claim.threshold), []).append(int(n))
    return out


def ap_lift_counts(con: Any, claims: Sequence[ResolvedClaim]) -> dict[tuple[str, str, float], tuple[int, int]]:
    """(sae_id, level, threshold) → (features reaching the AP lift, the same under permuted labels)."""
    out: dict[tuple[str, str, float], tuple[int, int]] = {}
    for c in claims:
        if not isinstance(c.claim, APLiftClaim):
            continue
        for sae_id, n, n_null in con.execute(AP_LIFT_COUNT_SQL, [c.claim.level, c.claim.threshold, c.claim.threshold]).fetchall():
            out[(sae_id, c.claim.level, c.claim.threshold)] = (int(n), int(n_null))
    return out


__all__ = ["EFFECT_METRIC", "edit_summary_rows", "METRICS", "Metric", "PER_IMAGE_SQL", "VERDICTS", "ap_lift_counts", "evaluate",
           "null_lift_counts", "per_image", "splice_summary_rows", "summarise_rows", "split_images", "statement", "summary_rows"]
