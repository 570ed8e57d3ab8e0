"""Synthetic published tables for the site's tests, its benchmark and its screenshots.

Writes every table of `tables.TABLES` under `<run>/tables/<table>/part-*.parquet`
with plausible values (log-uniform frequencies, Gaussian-blob activation maps,
edits with controls, cross-model matches) and a small set of real PNG images
(crops of scikit-image's bundled photos when available, drawn shapes otherwise).
Nothing here is a result: it only exercises the renderer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from saev_report.tables import to_arrow, write_table

SPEC_HASH = "synthetic"
# scikit-image's bundled photos: astronaut and rocket are NASA (public domain), chelsea and coffee CC0.
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]
DEFAULT_LABELS = ["cat", "coffee cup", "rocket", "astronaut", "motorbike", "sky", "grass", "water"]


@dataclass
class SyntheticSAE:
    model: str
    n_features: int
    layer: int = 10
    d_model: int = 384
    seed: int = 0

    @property
    def expansion(self) -> int:
        return max(1, self.n_features // self.d_model)

    @property
    def sae_id(self) -> str:
        return f"{self.model}/L{self.layer}/relu-x{self.expansion}-l1_0.0004-s{self.seed}"


@dataclass
class SyntheticRun:
    saes: list[SyntheticSAE] = field(default_factory=lambda: [SyntheticSAE("dino", 96), SyntheticSAE("clip", 96)])
    n_images: int = 24
    image_px: int = 96
    grid: tuple[int, int] = (8, 8)
    top_k: int = 8
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS))
    dead_frac: float = 0.05
    dense_frac: float = 0.03
    edits: bool = True
    matches: bool = True
    concepts: bool = True
    experiments: bool = False
    photos: bool = True
    image_format: str = "png"  # "jpg" for large sets: faster to write and read, as ImageNet is
    features_per_part: int = 2000
    seed: int = 0


def _source_photos() -> list[np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        return []
    out = []
    for name in PHOTOS:
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:
            continue
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        out.append(image[..., :3].astype(np.uint8))
    return out


def make_images(folder: Path, n: int, px: int, rng: np.random.Generator, photos: bool = True, image_format: str = "png") -> list[Path]:
    """`n` small real image files (PNG or JPEG): random crops of bundled photos, or drawn shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = _source_photos() if photos else []
    paths = []
    for i in range(n):
        if sources:
            src = sources[i % len(sources)]
            h, w = src.shape[:2]
            side = int(min(h, w) * rng.uniform(0.45, 0.9))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(src[top : top + side, left : left + side])
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = crop.resize((px, px), Image.Resampling.LANCZOS)
        else:
            image = Image.new("RGB", (px, px), tuple(int(c) for c in rng.integers(0, 255, 3)))
            draw = ImageDraw.Draw(image)
            for _ in range(4):
                x0, y0 = rng.integers(0, px, 2)
                draw.ellipse((x0, y0, x0 + px // 3, y0 + px // 3), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path = folder / f"img_{i:05d}.{image_format}"
        image.save(path, quality=90) if image_format == "jpg" else image.save(path)
        paths.append(path)
    return paths


def _blob_maps(centres: np.ndarray, peaks: np.ndarray, grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """[n, gh*gw] ReLU'd Gaussian blobs with the given peak value at the given patches."""
    gh, gw = grid
    rows, cols = np.divmod(centres, gw)
    yy, xx = np.mgrid[0:gh, 0:gw]
    sigma = rng.uniform(0.8, 2.2, size=len(centres))[:, None, None]
    d2 = (yy[None] - rows[:, None, None]) ** 2 + (xx[None] - cols[:, None, None]) ** 2
    maps = np.exp(-d2 / (2 * sigma**2)) - 0.15
    maps = np.clip(maps, 0, None) / 0.85 * peaks[:, None, None]
    return maps.reshape(len(centres), gh * gw).astype(np.float32)


def _feature_rows(sae: SyntheticSAE, run: SyntheticRun, rng: np.random.Generator, n_patches: int) -> dict[str, Any]:
    n = sae.n_features
    dead = rng.random(n) < run.dead_frac
    log10_freq = rng.uniform(-5.0, -1.2, n)
    dense = ~dead & (rng.random(n) < run.dense_frac)
    log10_freq[dense] = rng.uniform(-1.99, -0.5, int(dense.sum()))
    freq = np.where(dead, 0.0, 10**log10_freq)
    n_fire = np.round(freq * n_patches).astype(np.int64)
    mean_act = np.where(dead, 0.0, np.exp(rng.normal(0.0, 0.8, n)))
    max_act = np.where(dead, 0.0, mean_act * rng.uniform(2.0, 6.0, n))
    bins = 24
    edges = [np.linspace(math.log10(m) - 2.5, math.log10(m), bins + 1).round(4).tolist() if m > 0 else [] for m in max_act]
    centre = rng.uniform(0.55, 0.8, n)
    grid = np.linspace(0, 1, bins)
    counts = [
        [] if d else np.round(f * np.exp(-((grid - c) ** 2) / 0.02)).astype(np.int64).tolist()
        for d, f, c in zip(dead, n_fire, centre)
    ]
    labels = run.labels
    top_label = [None if d else labels[int(i)] for d, i in zip(dead, rng.integers(0, len(labels), n))]
    purity = np.where(dead, np.nan, rng.beta(2.0, 2.0, n))
    return {
        "sae_id": [sae.sae_id] * n,
        "feature": np.arange(n, dtype=np.int32),
        "n_fire": n_fire,
        "freq": freq,
        "log10_freq": [None if d else float(v) for d, v in zip(dead, log10_freq)],
        "mean_act": mean_act,
        "log10_mean_act": [None if d else float(math.log10(m)) for d, m in zip(dead, mean_act)],
        "max_act": max_act,
        "dead": dead,
        "dense": dense,
        "hist_counts": counts,
        "hist_edges": edges,
        "top_label": top_label,
        "label_purity": [None if d else float(p) for d, p in zip(dead, purity)],
        "label_entropy": [None if d else float(-p * math.log2(max(p, 1e-9)) - (1 - p) * math.log2(max(1 - p, 1e-9))) for d, p in zip(dead, purity)],
        "_max_act": max_act,
        "_dead": dead,
    }


def _exemplar_parts(sae: SyntheticSAE, run: SyntheticRun, max_act: np.ndarray, dead: np.ndarray, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """Exemplar rows in feature order, `features_per_part` features at a time."""
    k, n_images, (gh, gw) = run.top_k, run.n_images, run.grid
    for start in range(0, sae.n_features, run.features_per_part):
        features = np.arange(start, min(start + run.features_per_part, sae.n_features))
        features = features[~dead[features]]
        if len(features) == 0:
            continue
        per = min(k, n_images)
        feature_col = np.repeat(features, per)
        rank_col = np.tile(np.arange(per), len(features))
        images = np.concatenate([rng.choice(n_images, per, replace=False) for _ in features])
        decay = np.sort(rng.uniform(0.35, 1.0, (len(features), per)), axis=1)[:, ::-1]
        decay[:, 0] = 1.0
        acts = (decay * max_act[features, None]).reshape(-1)
        centres = rng.integers(0, gh * gw, len(acts))
        maps = _blob_maps(centres, acts, (gh, gw), rng)
        yield {
            "sae_id": [sae.sae_id] * len(acts),
            "feature": feature_col.astype(np.int32),
            "rank": rank_col.astype(np.int32),
            "dataset": ["demo"] * len(acts),
            "image_idx": images.astype(np.int64),
            "act": acts,
            "patch": centres.astype(np.int32),
            "grid_h": np.full(len(acts), gh, dtype=np.int32),
            "grid_w": np.full(len(acts), gw, dtype=np.int32),
            "patch_acts": list(maps),
        }


def _panel_parts(sae: SyntheticSAE, run: SyntheticRun, max_act: np.ndarray, dead: np.ndarray, rng: np.random.Generator, labels: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(table, columns) parts of the analysis panels: quantile samples, class split and similar features."""
    gh, gw = run.grid
    bands, per_band = 4, 3
    for start in range(0, sae.n_features, run.features_per_part):
        features = np.arange(start, min(start + run.features_per_part, sae.n_features))
        features = features[~dead[features]]
        if len(features) == 0:
            continue
        per = bands * per_band
        feature_col = np.repeat(features, per)
        band_col = np.tile(np.repeat(np.arange(bands), per_band), len(features))
        rank_col = np.tile(np.arange(per_band), len(features) * bands)
        # Band b holds activations in ((b)/4, (b+1)/4] of the max, strongest first within it.
        fraction = (band_col + 1 - rng.uniform(0, 1, len(feature_col)) ** 0.5) / bands
        acts = fraction * max_act[feature_col] * 0.9
        centres = rng.integers(0, gh * gw, len(acts))
        yield "quantile_exemplars", {
            "sae_id": [sae.sae_id] * len(acts), "feature": feature_col.astype(np.int32), "band": band_col.astype(np.int32),
            "rank": rank_col.astype(np.int32), "dataset": ["demo"] * len(acts), "image_idx": rng.integers(0, run.n_images, len(acts)),
            "act": acts, "patch": centres.astype(np.int32), "grid_h": np.full(len(acts), gh, dtype=np.int32),
            "grid_w": np.full(len(acts), gw, dtype=np.int32), "patch_acts": list(_blob_maps(centres, acts, (gh, gw), rng)),
        }
        n_labels = min(len(labels), 10)
        label_idx = np.argsort(rng.random((len(features), len(labels))), axis=1)[:, :n_labels]
        n_images = max(1, run.n_images // max(len(labels), 1))
        # rate = n_fire_images / n_images exactly, as the analysis writes it (pages send the count, not the rate)
        rate = np.round(np.sort(rng.beta(1.0, 3.0, (len(features), n_labels)), axis=1)[:, ::-1] * n_images) / n_images
        yield "class_split", {
            "sae_id": [sae.sae_id] * rate.size, "feature": np.repeat(features, n_labels).astype(np.int32),
            "rank": np.tile(np.arange(n_labels), len(features)).astype(np.int32),
            "label": [labels[i] for i in label_idx.reshape(-1)], "n_images": np.full(rate.size, n_images, dtype=np.int64),
            "n_fire_images": np.round(rate.reshape(-1) * n_images).astype(np.int64), "rate": rate.reshape(-1),
            "mean_act": (rate * max_act[features, None] * 0.5).reshape(-1),
        }
        k = min(8, sae.n_features - 1)
        others = (features[:, None] + rng.integers(1, sae.n_features, (len(features), k))) % sae.n_features
        cosine = np.sort(rng.uniform(0.05, 0.6, (len(features), k)), axis=1)[:, ::-1]
        yield "similar_features", {
            "sae_id": [sae.sae_id] * others.size, "feature": np.repeat(features, k).astype(np.int32),
            "rank": np.tile(np.arange(k), len(features)).astype(np.int32), "similar_feature": others.reshape(-1).astype(np.int32),
            "cosine": cosine.reshape(-1),
        }


def write_synthetic_run(run_dir: Path, run: SyntheticRun | None = None) -> dict[str, Any]:
    """Write images and every table of a synthetic run; returns facts tests check against."""
    run = run or SyntheticRun()
    rng = np.random.default_rng(run.seed)
    run_dir = Path(run_dir)
    tables = run_dir / "tables"
    paths = make_images(run_dir / "images", run.n_images, run.image_px, rng, run.photos, run.image_format)
    image_labels = [run.labels[i % len(run.labels)] for i in range(run.n_images)]
    write_table(
        tables / "images" / "part-0.parquet",
        "images",
        {
            "dataset": ["demo"] * run.n_images,
            "image_idx": list(range(run.n_images)),
            "path": [str(p) for p in paths],
            "label": image_labels,
            "mask_path": [None] * run.n_images,
            "width": [run.image_px] * run.n_images,
            "height": [run.image_px] * run.n_images,
            "status": ["ok"] * run.n_images,
        },
        SPEC_HASH,
    )
    n_patches = run.n_images * run.grid[0] * run.grid[1]
    sae_rows, log_rows, facts = [], [], {"features": {}, "labels": image_labels, "images": paths}
    for s_i, sae in enumerate(run.saes):
        cols = _feature_rows(sae, run, rng, n_patches)
        max_act, dead = cols.pop("_max_act"), cols.pop("_dead")
        if run.concepts:
            cols |= _write_concepts(tables / "concepts" / f"part-{s_i}.parquet", sae, run, dead, rng)
        write_table(tables / "features" / f"part-{s_i}.parquet", "features", cols, SPEC_HASH)
        for p_i, part in enumerate(_exemplar_parts(sae, run, max_act, dead, rng)):
            write_table(tables / "exemplars" / f"part-{s_i}-{p_i:04d}.parquet", "exemplars", part, SPEC_HASH)
        for p_i, (table, part) in enumerate(_panel_parts(sae, run, max_act, dead, rng, run.labels)):
            write_table(tables / table / f"part-{s_i}-{p_i:04d}.parquet", table, part, SPEC_HASH)
        facts["features"][sae.sae_id] = {"dead": dead, "max_act": max_act, "top_label": cols["top_label"]}
        l0 = float(rng.uniform(20, 200))
        sae_rows.append(
            {
                "sae_id": sae.sae_id, "model": sae.model, "layer": sae.layer, "kind": "relu", "d_model": sae.d_model,
                "n_features": sae.n_features, "expansion": sae.expansion, "l1_coeff": 4e-4, "k": 0, "seed": sae.seed,
                "n_patches_trained": 1_000_000, "n_patches_eval": n_patches, "mse": float(rng.uniform(0.05, 0.12)),
                "l0": l0, "fvu": float(rng.uniform(0.1, 0.4)), "n_dead": int(dead.sum()), "n_dense": int(cols["dense"].sum()),
            }
        )
        steps = np.arange(0, 2000, 20)
        decay = np.exp(-steps / 400)
        for step, dcy in zip(steps, decay):
            mse = 0.06 + 0.5 * dcy + rng.normal(0, 0.003)
            log_rows.append(
                {
                    "sae_id": sae.sae_id, "step": int(step), "n_patches": int(step) * 4096, "loss": mse + 0.02, "mse": mse,
                    "l1": 10 * dcy + 1, "l0": l0 + 300 * dcy, "dead_frac": 0.0, "lr": 4e-4, "l1_coeff": 4e-4, "seconds": step * 0.05,
                }
            )
    write_table(tables / "saes" / "part-0.parquet", "saes", sae_rows, SPEC_HASH)
    write_table(tables / "train_log" / "part-0.parquet", "train_log", log_rows, SPEC_HASH)
    if run.edits:
        _write_edits(tables, run, rng, facts)
    if run.matches and len(run.saes) >= 2:
        _write_matches(tables, run, rng, facts)
    if run.experiments:
        _write_experiments(tables, run, rng)
    return facts


def _write_experiments(tables: Path, run: SyntheticRun, rng: np.random.Generator) -> None:
    """Segmentation concept-suppression rows for the first SAE: the concept's own arm removes most pixels, controls few."""
    sae, cells = run.saes[0], run.grid[0] * run.grid[1]
    rows = []
    for arm, removed_frac in (("concept", 0.9), ("random", 0.05), ("other", 0.1)):
        for m in (1, 4):
            for factor in (1.0, 0.0, -2.0):
                for image in range(min(3, run.n_images)):
                    before = 20 * int(rng.integers(3, 10))
                    removed = 0 if factor == 1.0 else round(before * removed_frac)
                    rows.append({
                        "experiment": "synthetic", "sae_id": sae.sae_id, "head": "seg", "task": "segmentation", "level": "patch",
                        "concept": run.labels[0], "arm": arm, "m": m, "factor": factor, "where": "all", "features": list(range(m)),
                        "dataset": "demo", "image_idx": image, "rank_dataset": "demo_train", "concept_px_before": before, "concept_px_removed": removed,
                        "removed_frac": removed / before, "other_changed_frac": 0.0,
                        "before_map": rng.integers(0, 3, cells).tolist(), "after_map": rng.integers(0, 3, cells).tolist(),
                    })
    write_table(tables / "experiments" / "part-0.parquet", "experiments", rows, SPEC_HASH)
    write_summary(tables, rows)
    _write_claims(tables, run, rows, rng)
    # the rows it ranked on, computed on the head's training data (`experiments[].rank_on`)
    write_table(tables / "experiment_concepts" / "part-0.parquet", "experiment_concepts", [
        {"experiment": "synthetic", "dataset": "demo_train", "sae_id": sae.sae_id, "feature": f, "concept": run.labels[0], "level": "patch",
         "ap": float(rng.uniform()), "support": 10} for f in range(sae.n_features)], SPEC_HASH)


def _write_claims(tables: Path, run: SyntheticRun, rows: list[dict[str, Any]], rng: np.random.Generator) -> None:
    """Per-image spliced scores of the first SAE, their summary, and one claim with its evidence."""
    import duckdb

    from saev_report import claims as cl
    from saev_report.spec import ExperimentClaim, StatsSpec
    from saev_report.stages.claims import ResolvedClaim

    sae = run.saes[0]
    splice = [{"sae_id": sae.sae_id, "head": "cls", "task": "classification", "dataset": "demo", "image_idx": i,
               "clean": [1.0], "spliced": [float(rng.uniform() < 0.8)], "ablated": [float(rng.uniform() < 0.2)]} for i in range(run.n_images)]
    write_table(tables / "splice_images" / "part-0.parquet", "splice_images", splice, SPEC_HASH)
    stats = StatsSpec(n_resamples=200)
    write_table(tables / "splice_summary" / "part-0.parquet", "splice_summary", cl.splice_summary_rows(to_arrow("splice_images", splice), stats, 0), SPEC_HASH)
    claim = ExperimentClaim.model_validate({"name": "synthetic", "kind": "experiment", "experiment": "synthetic", "setting": {"m": 4, "factor": -2.0},
                                            "conditions": [{"metric": "removed_frac", "min": 0.5}], "beats": ["random"]})
    con = duckdb.connect()
    con.register("experiments", to_arrow("experiments", rows))
    claims, evidence = cl.evaluate([ResolvedClaim(claim=claim, sae_ids=[sae.sae_id], seeds=[sae.seed])], cl.per_image(con), [], {}, stats, 0)
    write_table(tables / "claims" / "part-0.parquet", "claims", claims, SPEC_HASH)
    write_table(tables / "claim_evidence" / "part-0.parquet", "claim_evidence", evidence, SPEC_HASH)


def write_summary(tables: Path, rows: list[dict[str, Any]]) -> None:
    """`experiment_summary` of synthetic `experiments` rows, as the claims stage aggregates them."""
    from saev_report.claims import summarise_rows

    write_table(tables / "experiment_summary" / "part-0.parquet", "experiment_summary", summarise_rows(rows), SPEC_HASH)


def _write_concepts(path: Path, sae: SyntheticSAE, run: SyntheticRun, dead: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """Patch-level concept rows (the labels as concepts) for every feature; returns the features' best-concept columns."""
    n_f, n_c = sae.n_features, len(run.labels)
    base_c = rng.dirichlet(np.ones(n_c))
    ap_fc = np.clip(base_c + rng.beta(1, 6, (n_f, n_c)), 0, 1)
    lift_fc = (ap_fc - base_c) / (1 - base_c)
    null_fc = np.clip(base_c + rng.normal(0, 0.01, (n_f, n_c)), 0, 1)
    feature_fc, concept_fc = np.meshgrid(np.arange(n_f), np.arange(n_c), indexing="ij")
    support = (base_c * run.n_images * run.grid[0] * run.grid[1]).round().astype(np.int64)
    write_table(path, "concepts", {
        "sae_id": [sae.sae_id] * (n_f * n_c), "feature": feature_fc.ravel().astype(np.int32),
        "concept": [run.labels[c] for c in concept_fc.ravel()], "level": ["patch"] * (n_f * n_c),
        "ap": ap_fc.ravel(), "iou": ap_fc.ravel() / 2, "threshold": np.full(n_f * n_c, 0.5), "support": support[concept_fc.ravel()],
        "null_ap": null_fc.ravel(), "ap_low": ap_fc.ravel() - 0.01, "ap_high": ap_fc.ravel() + 0.01,
        "base_rate": base_c[concept_fc.ravel()], "ap_lift": lift_fc.ravel(), "null_iou": null_fc.ravel() / 2,
        "fire_rate": np.clip(ap_fc.ravel() * 0.8, 0, 1),
    }, SPEC_HASH)
    null_lift_fc = (null_fc - base_c) / (1 - base_c)
    write_table(path.parent.parent / "concept_nulls" / path.name, "concept_nulls", {  # two permutations: the first is null_ap's
        "sae_id": [sae.sae_id] * (2 * n_f), "level": ["patch"] * (2 * n_f), "permutation": [0] * n_f + [1] * n_f,
        "feature": list(range(n_f)) * 2, "best_lift": np.concatenate([null_lift_fc.max(1), null_lift_fc.max(1) * 0.9]),
    }, SPEC_HASH)
    order = np.argsort(-lift_fc, axis=1)
    best, second = order[:, 0], order[:, 1]
    rows = np.arange(n_f)
    return {
        "best_concept": [run.labels[c] for c in best], "best_concept_ap": ap_fc[rows, best],
        "best_concept_margin": lift_fc[rows, best] - lift_fc[rows, second], "best_concept_level": ["patch"] * n_f,
    }


def _write_edits(tables: Path, run: SyntheticRun, rng: np.random.Generator, facts: dict[str, Any]) -> None:
    sae = run.saes[0]
    dead = facts["features"][sae.sae_id]["dead"]
    alive = np.flatnonzero(~dead)
    classes = list(run.labels)
    seg_classes = ["background", *run.labels[:5]]
    n_patches = run.grid[0] * run.grid[1]
    write_table(
        tables / "heads" / "part-0.parquet",
        "heads",
        [
            {"head": "clf", "model": sae.model, "task": "classification", "classes": classes, "lr": 1e-3, "weight_decay": 1e-2, "val_accuracy": 0.81, "val_miou": None, "n_train": 100, "n_val": 20},
            {"head": "seg", "model": sae.model, "task": "segmentation", "classes": seg_classes, "lr": 1e-3, "weight_decay": 1e-2, "val_accuracy": 0.74, "val_miou": 0.41, "n_train": 100, "n_val": 20},
        ],
        SPEC_HASH,
    )
    rows = []
    for n in range(4):
        feature = int(alive[n % len(alive)])
        image = int(rng.integers(0, run.n_images))
        target = facts["labels"][image]
        for control in (False, True):
            probs_before = np.sort(rng.dirichlet(np.ones(5)))[::-1]
            top_before = [target, *[c for c in classes if c != target][:4]]
            drop = 0.02 if control else float(probs_before[0]) * 0.8
            after = probs_before.copy()
            after[0] -= drop
            after[1:] += drop / 4
            order = np.argsort(-after)
            f = int(alive[(n + 7) % len(alive)]) if control else feature
            rows.append(
                {
                    "edit": "suppress-top", "edit_id": f"suppress-top/{n}" + ("/control" if control else ""), "sae_id": sae.sae_id,
                    "head": "clf", "task": "classification", "dataset": "demo", "image_idx": image, "features": [f],
                    "action": "suppress", "value": 0.0, "patches": list(range(n_patches)) if n % 2 else [int(p) for p in rng.choice(n_patches, 6, replace=False)],
                    "is_control": control, "target_class": target,
                    "before_top": top_before, "before_probs": probs_before.tolist(),
                    "after_top": [top_before[i] for i in order], "after_probs": after[order].tolist(),
                    "target_delta": -drop, "other_delta": drop / 4, "specificity": 4.0 if not control else 0.6,
                    "flipped": bool(not control and order[0] != 0), "flip_frac": float(not control and order[0] != 0),
                }
            )
    for n in range(2):
        feature = int(alive[(n + 3) % len(alive)])
        image = int(rng.integers(0, run.n_images))
        before = rng.integers(0, len(seg_classes), n_patches)
        for control in (False, True):
            after = before.copy()
            flip = rng.random(n_patches) < (0.05 if control else 0.4)
            after[flip & (before == 1)] = 0
            after[flip & (before != 1)] = 1 if control else 0
            rows.append(
                {
                    "edit": "seg-suppress", "edit_id": f"seg-suppress/{n}" + ("/control" if control else ""), "sae_id": sae.sae_id,
                    "head": "seg", "task": "segmentation", "dataset": "demo", "image_idx": image,
                    "features": [int(alive[(n + 9) % len(alive)])] if control else [feature], "action": "scale", "value": 0.5,
                    "patches": [int(p) for p in np.flatnonzero(before == 1)], "is_control": control, "target_class": seg_classes[1],
                    "before_pixels": np.bincount(before, minlength=len(seg_classes)).astype(np.int64) * 196,
                    "after_pixels": np.bincount(after, minlength=len(seg_classes)).astype(np.int64) * 196,
                    "target_delta": float((after == 1).mean() - (before == 1).mean()), "other_delta": 0.01,
                    "specificity": 2.5 if not control else 0.4, "flipped": bool((after != before).any()),
                    "flip_frac": float((after != before).mean()), "before_map": before.tolist(), "after_map": after.tolist(),
                }
            )
    write_table(tables / "edits" / "part-0.parquet", "edits", rows, SPEC_HASH)
    import duckdb

    from saev_report.claims import edit_summary_rows
    from saev_report.spec import StatsSpec

    con = duckdb.connect()
    con.register("edits", to_arrow("edits", rows))
    write_table(tables / "edit_summary" / "part-0.parquet", "edit_summary", edit_summary_rows(con, StatsSpec(n_resamples=200), 0), SPEC_HASH)
    facts["edits"] = rows


def _write_matches(tables: Path, run: SyntheticRun, rng: np.random.Generator, facts: dict[str, Any]) -> None:
    a, b = run.saes[0], run.saes[1]
    rows = []
    for src, dst in ((a, b), (b, a)):
        alive = np.flatnonzero(~facts["features"][src.sae_id]["dead"])
        scores = np.clip(rng.beta(4, 3, len(alive)) * 1.2 - 0.1, -1, 1)
        targets = rng.integers(0, dst.n_features, len(alive))
        for f, t, s in zip(alive, targets, scores):
            rows.append(
                {
                    "comparison": f"{a.model}~{b.model}", "sae_a": src.sae_id, "feature_a": int(f), "sae_b": dst.sae_id,
                    "feature_b": int(t), "score": float(s), "matched": bool(s >= 0.5), "mutual": bool(s >= 0.75),
                }
            )
    write_table(tables / "matches" / "part-0.parquet", "matches", rows, SPEC_HASH)
    facts["matches"] = rows
