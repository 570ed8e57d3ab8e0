"""saev_report.claims: verdicts on synthetic experiments rows with known effects (one test per
verdict), held-out selection, replication, the spec's claim section, and a bit-for-bit re-run."""

from __future__ import annotations

import textwrap

import duckdb
import numpy as np
import pytest

from saev_report import claims as cl
from saev_report.spec import SpecError, StatsSpec, parse_spec_text
from saev_report.stages.claims import ResolvedClaim
from saev_report.tables import to_arrow

CONCEPTS = ("birds", "cars", "dogs")
STATS = StatsSpec(n_resamples=2000, confidence=0.95, correction="bh")


def _rows(removed_share: dict[str, float], side: float, n_images: int = 12, sae_id: str = "s0", seed: int = 0,
          random_share: float = 0.01, spread: float = 0.02, draws: int = 3, concept_spread: float | None = None) -> list[dict]:
    """Segmentation rows of one SAE at m = 4, factors 1 and −1: the concept arm removes about
    `removed_share[c]` of each image's pixels with side effect `side`, the random draws about `random_share`."""
    g = np.random.default_rng(seed)
    rows = []
    base = {"experiment": "seg", "sae_id": sae_id, "head": "h", "task": "segmentation", "level": "patch", "m": 4, "where": "all", "dataset": "d"}
    for concept in CONCEPTS:
        for i in range(n_images):
            before = int(g.integers(200, 400))
            for factor in (1.0, -1.0):
                arms = [("concept", 0, removed_share[concept], side)] + [("random", d, random_share, 0.0) for d in range(draws)] + [("other", 0, 0.05, 0.01)]
                for arm, draw, share, side_effect in arms:
                    noise = concept_spread if arm == "concept" and concept_spread is not None else spread
                    frac = 0.0 if factor == 1.0 else float(np.clip(share + g.normal(0, noise), 0, 1))
                    rows.append({**base, "concept": concept, "arm": arm, "draw": draw, "factor": factor, "image_idx": i,
                                 "concept_px_before": before, "concept_px_removed": int(round(frac * before)),
                                 "other_changed_frac": 0.0 if factor == 1.0 else float(max(0.0, side_effect + g.normal(0, spread / 4)))})
    return rows


def _groups(rows):
    con = duckdb.connect()
    con.register("experiments", to_arrow("experiments", rows))
    return cl.per_image(con)


def _claim(text: str, sae_ids=("s0",)) -> ResolvedClaim:
    header = textwrap.dedent("""\
        run: {name: t}
        datasets: {d: {kind: demo, n_images: 20}}
        models: {m: {family: imgfocus, layers: [11], image_size: 224}}
        record: {dataset: d}
        sae: {kind: [topk], seeds: [0, 1]}
        heads: {h: {task: segmentation, model: m, train: d}}
        experiments: [{name: seg, model: m, head: h, saes: [0, 1], m: [4], factors: [1, -1]}]
        claims:
        """)
    spec = parse_spec_text(header + textwrap.indent(textwrap.dedent(text).strip("\n") + "\n", "  "), check_paths=False)
    return ResolvedClaim(claim=spec.claims[0], sae_ids=list(sae_ids), seeds=list(range(len(sae_ids))))


SEG_CLAIM = """
- name: removes
  kind: experiment
  experiment: seg
  saes: [0]
  setting: {m: 4, factor: -1}
  conditions:
    - {metric: removed_frac, min: 0.5}
    - {metric: other_changed_frac, max: 0.05}
    - {metric: removed_frac, arm: random, max: 0.05}
  beats: [random, other]
"""


def _verdict(rows, claim=SEG_CLAIM, sae_ids=("s0",), stats=STATS):
    claims, evidence = cl.evaluate([_claim(claim, sae_ids)], _groups(rows), [], {}, stats, seed=0)
    return claims[0], evidence


def test_a_clear_effect_holds():
    row, evidence = _verdict(_rows({c: 0.9 for c in CONCEPTS}, side=0.01))
    assert row["verdict"] == "holds", row["summary"]
    assert {e["concept_verdict"] for e in evidence} == {"holds"}
    tests = [e for e in evidence if e["check"] == "test"]
    assert len(tests) == 6 and row["family_size"] == 6  # 3 concepts × 2 controls
    # 12 images all one way: 2^12 sign vectors > 2,000 resamples, so Monte-Carlo: p = (1 + hits) / 2,001,
    # where a resample repeats the observed signs with probability 1/4,096.
    assert all(e["p_value"] <= 3 / 2001 and not e["exact"] for e in tests)
    assert all(e["outcome"] == "beats" for e in tests)


def test_an_interval_on_the_wrong_side_fails():
    # Side effects of 20 %: every interval lies above the 5 % bar.
    row, evidence = _verdict(_rows({c: 0.9 for c in CONCEPTS}, side=0.2))
    assert row["verdict"] == "fails"
    side = [e for e in evidence if e["metric"] == "other_changed_frac"]
    assert all(e["outcome"] == "fail" and e["estimate_lo"] > 0.05 for e in side)


def test_an_interval_that_straddles_a_threshold_is_inconclusive():
    # Removal right at the 50 % bar, noisy: the interval straddles it.
    row, evidence = _verdict(_rows({c: 0.5 for c in CONCEPTS}, side=0.01, concept_spread=0.2))
    assert row["verdict"] == "inconclusive", row["summary"]
    removal = [e for e in evidence if e["metric"] == "removed_frac" and e["arm"] == "concept"]
    assert any(e["outcome"] == "straddle" and e["estimate_lo"] < 0.5 < e["estimate_hi"] for e in removal)


def test_too_few_images_for_the_correction_is_inconclusive_not_a_pass():
    # Holm over 6 tests of 4 images: the smallest p is 1/16, so no test can beat its control.
    row, evidence = _verdict(_rows({c: 0.9 for c in CONCEPTS}, side=0.01, n_images=4), stats=StatsSpec(correction="holm"))
    assert row["verdict"] == "inconclusive"
    assert {e["outcome"] for e in evidence if e["check"] == "test"} == {"not shown"}
    assert {e["outcome"] for e in evidence if e["check"] == "threshold"} == {"pass"}


def test_k_of_n_concepts_and_replicates():
    shares = {"birds": 0.9, "cars": 0.9, "dogs": 0.1}  # dogs clearly fails
    text = SEG_CLAIM.replace("beats: [random, other]", "beats: [random]\n  min_concepts: 2")
    assert _verdict(_rows(shares, side=0.01), text)[0]["verdict"] == "holds"
    assert _verdict(_rows(shares, side=0.01), SEG_CLAIM)[0]["verdict"] == "fails"
    # Two seeds: one replicates, one does not; all seeds needed → fails; 1 of 2 → holds.
    rows = _rows({c: 0.9 for c in CONCEPTS}, side=0.01) + _rows({c: 0.1 for c in CONCEPTS}, side=0.01, sae_id="s1", seed=1)
    two = SEG_CLAIM.replace("saes: [0]", "saes: [0, 1]")
    row, _ = _verdict(rows, two, sae_ids=("s0", "s1"))
    assert (row["verdict"], row["replicate_verdicts"]) == ("fails", ["holds", "fails"])
    row, _ = _verdict(rows, two.replace("saes: [0, 1]", "saes: [0, 1]\n  min_replicates: 1"), sae_ids=("s0", "s1"))
    assert row["verdict"] == "holds"


def test_times_compares_with_the_random_draws():
    text = SEG_CLAIM.replace("""    - {metric: removed_frac, min: 0.5}
    - {metric: other_changed_frac, max: 0.05}
    - {metric: removed_frac, arm: random, max: 0.05}""", "    - {metric: removed_frac, times: 5, min: 0}")
    assert _verdict(_rows({c: 0.9 for c in CONCEPTS}, side=0.01, random_share=0.1), text)[0]["verdict"] == "holds"
    assert _verdict(_rows({c: 0.3 for c in CONCEPTS}, side=0.01, random_share=0.2), text)[0]["verdict"] == "fails"


def test_split_selection_chooses_on_one_half_and_reads_the_other():
    rows = _rows({c: 0.9 for c in CONCEPTS}, side=0.01, n_images=16)
    text = SEG_CLAIM.replace("setting: {m: 4, factor: -1}", "select: split")
    row, evidence = _verdict(rows, text)
    assert row["selection"] == "split" and row["verdict"] == "holds"
    assert {(e["m"], e["factor"], e["images"], e["n_images"]) for e in evidence} == {(4, -1.0, "confirmation", 8)}
    select, confirm = cl.split_images(np.arange(16), 0, "removes", "birds")
    assert len(select) == 8 and not set(select) & set(confirm) and set(select) | set(confirm) == set(range(16))
    assert np.array_equal(select, cl.split_images(np.arange(16), 0, "removes", "birds")[0])


def test_a_rerun_gives_the_same_intervals_and_verdicts_bit_for_bit():
    rows = _rows({c: 0.6 for c in CONCEPTS}, side=0.03, spread=0.1)
    assert _verdict(rows) == _verdict(rows)
    assert cl.summary_rows(_groups(rows), STATS, 0) == cl.summary_rows(_groups(list(reversed(rows))), STATS, 0)


def test_the_summary_carries_an_interval_around_every_estimate():
    summary = cl.summary_rows(_groups(_rows({c: 0.6 for c in CONCEPTS}, side=0.03, spread=0.1)), STATS, 0)
    edited = [s for s in summary if s["factor"] == -1.0]
    assert edited and all(s["removed_frac_lo"] <= s["removed_frac"] <= s["removed_frac_hi"] for s in edited)
    assert all(s["removed_frac_lo"] < s["removed_frac_hi"] for s in edited)
    assert {s["n_draws"] for s in edited if s["arm"] == "random"} == {3}


def test_spliced_claims_read_the_recovered_interval():
    text = """
    - {name: spliced, kind: spliced, model: m, task: segmentation, min: 0.9}
    """
    resolved = _claim(text).model_copy(update={"head": "h"})
    g = np.random.default_rng(0)
    hits = {arm: g.binomial(1, p, 200).astype(float) for arm, p in (("clean", 0.9), ("spliced", 0.88), ("ablated", 0.1))}
    images = to_arrow("splice_images", [{"sae_id": "s0", "head": "h", "task": "classification", "dataset": "d", "image_idx": i,
                                        **{arm: [hits[arm][i]] for arm in hits}} for i in range(200)])
    splice = cl.splice_summary_rows(images, STATS, 0)
    [row] = splice
    assert row["clean"] == pytest.approx(hits["clean"].mean()) and row["clean_lo"] < row["clean"] < row["clean_hi"]
    claims, _ = cl.evaluate([resolved], {}, splice, {}, STATS, 0)
    expected = "holds" if row["recovered_lo"] >= 0.9 else "fails" if row["recovered_hi"] < 0.9 else "inconclusive"
    assert claims[0]["verdict"] == expected


def test_ap_lift_claims_count_against_the_control_and_the_null():
    resolved = _claim("- {name: lift, kind: ap_lift, model: m, control_model: m, times: 3}").model_copy(update={"control_sae_id": "twin"})
    counts = {("s0", "patch", 0.2): (30, 0), ("twin", "patch", 0.2): (8, 0)}
    assert cl.evaluate([resolved], {}, [], counts, STATS, 0)[0][0]["verdict"] == "holds"
    counts[("twin", "patch", 0.2)] = (11, 0)
    assert cl.evaluate([resolved], {}, [], counts, STATS, 0)[0][0]["verdict"] == "fails"
    # Against a null distribution of several permutations: more than every one of them.
    counts[("twin", "patch", 0.2)] = (8, 0)
    nulls = {("s0", "patch", 0.2): [0, 2, 31]}
    claims, evidence = cl.evaluate([resolved], {}, [], counts, STATS, 0, nulls)
    assert claims[0]["verdict"] == "fails" and "every one of 3 label permutations" in evidence[1]["label"]
    assert cl.evaluate([resolved], {}, [], counts, STATS, 0, {("s0", "patch", 0.2): [0, 2, 5]})[0][0]["verdict"] == "holds"


def test_null_counts_come_from_every_permutation():
    con = duckdb.connect()
    con.register("features", to_arrow("features", [{"sae_id": "s0", "feature": f, "dead": f == 3} for f in range(4)]))
    con.register("concept_nulls", to_arrow("concept_nulls", [
        {"sae_id": "s0", "level": "patch", "permutation": k, "feature": f, "best_lift": 0.1 * (f + k)} for k in range(3) for f in range(4)]))
    resolved = _claim("- {name: lift, kind: ap_lift, model: m, control_model: m, threshold: 0.2}")
    # permutation k: lifts 0.1k … 0.1(k + 3), feature 3 dead
    assert cl.null_lift_counts(con, [resolved]) == {("s0", "patch", 0.2): [1, 2, 3]}


@pytest.mark.parametrize(("text", "message"), [
    ("- {name: a, kind: experiment, experiment: nope, setting: {m: 4, factor: -1}, conditions: [{metric: removed_frac, min: 0.5}]}",
     "experiment 'nope' is not declared"),
    ("- {name: a, kind: experiment, experiment: seg, setting: {m: 16, factor: -1}, conditions: [{metric: removed_frac, min: 0.5}]}",
     "does not run m 16"),
    ("- {name: a, kind: experiment, experiment: seg, conditions: [{metric: removed_frac, min: 0.5}]}", "needs `setting"),
    ("- {name: a, kind: experiment, experiment: seg, setting: {m: 4, factor: -1}, conditions: [{metric: p_delta, max: 0}]}",
     "a segmentation experiment reports"),
    ("- {name: a, kind: experiment, experiment: seg, setting: {m: 4, factor: -1}, conditions: [{metric: removed_frac}]}",
     "exactly one of `min` or `max`"),
    ("- {name: a, kind: spliced, model: m, task: classification, min: 0.9}", "no classification head"),
    ("- {name: a, kind: experiment, experiment: seg, saes: [0], min_replicates: 2, setting: {m: 4, factor: -1}, conditions: [{metric: removed_frac, min: 0.5}]}",
     "2 replicates asked of 1"),
])
def test_bad_claims_are_located_errors(text, message):
    with pytest.raises(SpecError) as err:
        _claim(text)
    assert message in str(err.value)
    assert all(issue.field.startswith("claims.0") and issue.line > 1 for issue in err.value.issues)


def test_edit_summaries_count_each_image_once():
    base = {"edit": "e", "sae_id": "s0", "head": "h", "task": "classification", "other_delta": 0.0}
    rows = [{**base, "edit_id": "e/0", "is_control": False, "image_idx": 0, "target_delta": -0.4, "flipped": True},
            {**base, "edit_id": "e/1", "is_control": False, "image_idx": 0, "target_delta": -0.2, "flipped": False},
            {**base, "edit_id": "e/2", "is_control": False, "image_idx": 1, "target_delta": -0.6, "flipped": True},
            {**base, "edit_id": "e/0/control", "is_control": True, "image_idx": 0, "target_delta": 0.01, "flipped": False}]
    con = duckdb.connect()
    con.register("edits", to_arrow("edits", rows))
    summary = {r["is_control"]: r for r in cl.edit_summary_rows(con, STATS, 0)}
    real = summary[False]
    assert (real["n_images"], real["n_edits"]) == (2, 3)
    assert real["target_delta"] == pytest.approx((-0.3 - 0.6) / 2)  # image 0's two edits averaged first
    assert real["flip_frac"] == pytest.approx((0.5 + 1.0) / 2)
    assert real["target_delta_lo"] <= real["target_delta"] <= real["target_delta_hi"]
    assert summary[True]["target_delta"] == pytest.approx(0.01)


def test_the_stage_reads_its_inputs_parts_and_writes_every_table(tmp_path):
    import pyarrow.parquet as pq

    from saev_report.stages.base import StageOut, table_part
    from saev_report.stages.claims import ClaimsParams, claims_action
    from saev_report.tables import write_table

    rows = _rows({c: 0.9 for c in CONCEPTS}, side=0.01)
    half = len(rows) // 2  # two experiment stages' parts: the stage concatenates them
    write_table(table_part(tmp_path / "a", "experiments", "x"), "experiments", rows[:half], "t")
    write_table(table_part(tmp_path / "b", "experiments", "y"), "experiments", rows[half:], "t")
    params = ClaimsParams(stats=STATS, claims=[_claim(SEG_CLAIM)], seed=0)
    inputs = {"experiments/a": StageOut(tmp_path / "a"), "experiments/b": StageOut(tmp_path / "b")}
    claims_action(params, inputs, tmp_path / "out")
    read = {t: pq.read_table(table_part(tmp_path / "out", t)).to_pylist()
            for t in ("experiment_summary", "edit_summary", "splice_summary", "claims", "claim_evidence")}
    assert read["claims"][0]["verdict"] == "holds" and len(read["claim_evidence"]) > 0
    assert read["edit_summary"] == [] and read["splice_summary"] == []
    expected = to_arrow("experiment_summary", cl.summary_rows(_groups(rows), STATS, 0)).to_pylist()
    assert read["experiment_summary"] == expected  # the same aggregation, whatever the parts
    claims_action(params, inputs, tmp_path / "again")
    assert pq.read_table(table_part(tmp_path / "again", "claim_evidence")).to_pylist() == read["claim_evidence"]
