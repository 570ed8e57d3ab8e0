"""Glue between the spec and the stage modules: one factory per stage kind.

Each factory returns the action the pipeline runs inside the stage's work
directory. Actions read only their slice of the spec and the outputs of the
stages they depend on (`ctx.inputs`), and write table parts under
`ctx.work_dir / "tables" / <table> /`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from PIL import Image

from saev_report.pipeline import StageContext
from saev_report.progress import log
from saev_report.runtime import pick_device, seed_everything
from saev_report.spec import Spec, sae_id, sae_sweep
from saev_report.tables import write_table

Action = Callable[[StageContext], None]


def _part(ctx: StageContext, table: str, name: str = "part") -> Path:
    return ctx.work_dir / "tables" / table / f"{name}.parquet"


def _dataset(spec: Spec, key: str, cache_dir: Path):
    from saev_report.datasets import open_dataset

    return open_dataset(key, spec.datasets[key], cache_dir)


def _backbone(spec: Spec, model_key: str, cache_dir: Path):
    from saev_report.backbones import load_backbone

    device = pick_device(spec.run.device)
    return load_backbone(spec.models[model_key], cache_dir, device, seed=spec.run.seed), device


# --------------------------------------------------------------------------- images


def _image_row(dataset_key: str, record) -> dict:
    row = {"dataset": dataset_key, "image_idx": record.index, "path": str(Path(record.path).resolve()),
           "label": record.label, "mask_path": record.mask_path, "width": None, "height": None, "status": "ok"}
    try:
        with Image.open(record.path) as image:  # header only: cheap even for large sets
            row["width"], row["height"] = image.size
    except Exception as exc:
        row["status"] = f"unreadable: {type(exc).__name__}"
    return row


def images_stage(dataset_key: str) -> Action:
    def action(ctx: StageContext) -> None:
        dataset = _dataset(ctx.spec, dataset_key, ctx.cache_dir)
        rows = [_image_row(dataset_key, r) for r in dataset.records]
        write_table(_part(ctx, "images"), "images", rows, ctx.spec_hash)
        log(f"  {len(rows)} image(s) in {dataset_key}")

    return action


# --------------------------------------------------------------------------- record


def record_stage(model_key: str) -> Action:
    def action(ctx: StageContext) -> None:
        from saev_report.record import record_activations

        spec = ctx.spec
        seed_everything(spec.run.seed)
        backbone, device = _backbone(spec, model_key, ctx.cache_dir)
        dataset = _dataset(spec, spec.record.dataset, ctx.cache_dir)
        model = spec.models[model_key]
        record_activations(
            backbone, dataset, model_key=model_key, layers=model.layers, tokens=model.tokens, out_dir=ctx.work_dir,
            dtype=spec.record.dtype, batch_size=spec.record.batch_size, shard_mb=spec.record.shard_mb, device=device,
        )

    return action


# --------------------------------------------------------------------------- train


def _store(ctx: StageContext, model_key: str, layer: int):
    from saev_report.activations import ActivationStore

    return ActivationStore(ctx.inputs[f"record/{model_key}"] / f"L{layer}")


def _sae_dir(ctx: StageContext, model_key: str, layer: int, tag: str) -> Path:
    return ctx.inputs[f"train/{model_key}-L{layer}"] / tag


def train_stage(model_key: str, layer: int) -> Action:
    def action(ctx: StageContext) -> None:
        from saev_report.train import train_saes

        spec = ctx.spec
        seed_everything(spec.run.seed)
        trained = train_saes(
            _store(ctx, model_key, layer), spec.sae, sae_sweep(spec.sae), ctx.work_dir, pick_device(spec.run.device),
            ctx.spec_hash, f"{model_key}/L{layer}", data_seed=spec.run.seed,
        )
        # train_saes writes its curves beside the checkpoints; publish them as table parts.
        logs = ctx.work_dir / "train_log"
        if logs.is_dir():
            (ctx.work_dir / "tables").mkdir(exist_ok=True)
            os.replace(logs, ctx.work_dir / "tables" / "train_log")
        for t in trained:
            log(f"  {t.sae_id}: MSE {t.mse:.4f}, L0 {t.l0:.1f} after {t.n_patches:,} patches ({t.seconds:.0f}s)")

    return action


# --------------------------------------------------------------------------- analyse


def _labels(spec: Spec, cache_dir: Path) -> dict[int, str | None] | None:
    dataset = _dataset(spec, spec.record.dataset, cache_dir)
    labels = {r.index: r.label for r in dataset.records}
    return labels if any(v is not None for v in labels.values()) else None


def analyse_stage(model_key: str, layer: int) -> Action:
    def action(ctx: StageContext) -> None:
        from saev_report.analyse import analyse_store, write_analysis
        from saev_report.sae import load_sae, read_sae_config

        spec = ctx.spec
        device = pick_device(spec.run.device)
        store = _store(ctx, model_key, layer)
        labels = _labels(spec, ctx.cache_dir)
        rows = []
        for config in sae_sweep(spec.sae):
            sae_dir = _sae_dir(ctx, model_key, layer, config.tag)
            sid = sae_id(model_key, layer, config)
            result = analyse_store(store, load_sae(sae_dir, device), labels, spec.analysis, sid, spec.record.dataset, device)
            write_analysis(result, ctx.work_dir / "tables", ctx.spec_hash, stem=config.tag)
            trained = read_sae_config(sae_dir)
            rows.append({
                "sae_id": sid, "model": model_key, "layer": layer, "kind": config.kind, "d_model": trained["d_model"],
                "n_features": trained["n_features"], "expansion": config.expansion, "l1_coeff": config.l1_coeff,
                "k": config.k, "seed": config.seed, "n_patches_trained": trained.get("n_patches_trained"), **result.metrics,
            })
            m = result.metrics
            log(f"  {sid}: MSE {m['mse']:.4f}, FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, dead {m['n_dead']}, dense {m['n_dense']}")
        write_table(_part(ctx, "saes"), "saes", rows, ctx.spec_hash)

    return action


# --------------------------------------------------------------------------- heads and edits


def head_stage(head_key: str) -> Action:
    def action(ctx: StageContext) -> None:
        from saev_report.heads import build_head

        spec = ctx.spec
        head = spec.heads[head_key]
        seed_everything(spec.run.seed)
        backbone, device = _backbone(spec, head.model, ctx.cache_dir)
        train_ds = _dataset(spec, head.train, ctx.cache_dir)
        val_ds = _dataset(spec, head.val, ctx.cache_dir) if head.val else None
        row = build_head(head_key, head, backbone, train_ds, val_ds, ctx.work_dir / "head", seed=spec.run.seed,
                         device=device, batch_size=spec.record.batch_size)
        write_table(_part(ctx, "heads"), "heads", [row], ctx.spec_hash)
        score = f"accuracy {row['val_accuracy']:.3f}" + (f", mIoU {row['val_miou']:.3f}" if row.get("val_miou") is not None else "")
        log(f"  head {head_key}: validation {score} (lr {row['lr']:g}, wd {row['weight_decay']:g})")

    return action


def edit_stage(index: int) -> Action:
    def action(ctx: StageContext) -> None:
        import pyarrow.parquet as pq

        from saev_report.edits import run_edits
        from saev_report.heads import load_head
        from saev_report.sae import load_sae

        spec = ctx.spec
        edit = spec.edits[index]
        layer = edit.layer or spec.models[edit.model].layers[0]
        config = sae_sweep(spec.sae)[edit.sae]
        head_spec = spec.heads[edit.head]
        seed_everything(spec.run.seed)
        backbone, device = _backbone(spec, edit.model, ctx.cache_dir)
        dataset = _dataset(spec, edit.dataset or head_spec.val or head_spec.train, ctx.cache_dir)
        features_part = ctx.inputs[f"analyse/{edit.model}-L{layer}"] / "tables" / "features" / f"{config.tag}.parquet"
        rows = run_edits(
            edit, backbone=backbone, sae=load_sae(_sae_dir(ctx, edit.model, layer, config.tag), device),
            sae_id=sae_id(edit.model, layer, config), head=load_head(ctx.inputs[f"heads/{edit.head}"] / "head", device),
            head_key=edit.head, dataset=dataset, layer=layer, features_table=pq.read_table(features_part).to_pylist(),
            seed=spec.run.seed,
        )
        write_table(_part(ctx, "edits"), "edits", rows, ctx.spec_hash)
        _log_edit_summary(edit.name, rows)

    return action


def _log_edit_summary(name: str, rows: list[dict]) -> None:
    import numpy as np

    for is_control in (False, True):
        sel = [r for r in rows if r["is_control"] == is_control]
        if sel:
            spec_med = float(np.median([r["specificity"] for r in sel]))
            flips = float(np.mean([bool(r["flipped"]) for r in sel]))
            log(f"  {name}{' controls' if is_control else ''}: {len(sel)} edit(s), median specificity {spec_med:.2f}, flipped {flips:.0%}")


# --------------------------------------------------------------------------- experiments and spliced metrics


def _sae_tables(ctx: StageContext, model_key: str, layer: int, table: str, sid: str) -> list[dict]:
    """Rows of one SAE from the analyse stage's parts of `table` (empty if it wrote none)."""
    import pyarrow.parquet as pq

    folder = ctx.inputs[f"analyse/{model_key}-L{layer}"] / "tables" / table
    rows: list[dict] = []
    for part in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        rows += [r for r in pq.read_table(part).to_pylist() if r.get("sae_id") == sid]
    return rows


def experiment_stage(index: int) -> Action:
    def action(ctx: StageContext) -> None:
        from saev_report.experiments import run_experiment, summarise
        from saev_report.heads import load_head
        from saev_report.sae import load_sae

        spec = ctx.spec
        exp = spec.experiments[index]
        layer = exp.layer or spec.models[exp.model].layers[0]
        head_spec = spec.heads[exp.head]
        level = "patch" if head_spec.task == "segmentation" else "image"
        seed_everything(spec.run.seed)
        backbone, device = _backbone(spec, exp.model, ctx.cache_dir)
        dataset = _dataset(spec, exp.dataset or head_spec.val or head_spec.train, ctx.cache_dir)
        head = load_head(ctx.inputs[f"heads/{exp.head}"] / "head", device)
        configs = sae_sweep(spec.sae)
        for sae_index in exp.saes:
            config = configs[sae_index]
            sid = sae_id(exp.model, layer, config)
            concepts = _sae_tables(ctx, exp.model, layer, "concepts", sid)
            if not concepts:
                raise ValueError(f"experiment {exp.name}: the analysis wrote no `concepts` rows for {sid}; "
                                 "experiments need concept statistics (a dataset with masks or labels)")
            features = {int(r["feature"]): r for r in _sae_tables(ctx, exp.model, layer, "features", sid)}
            rows = run_experiment(
                name=exp.name, backbone=backbone, sae=load_sae(_sae_dir(ctx, exp.model, layer, config.tag), device), sae_id=sid,
                head=head, head_key=exp.head, dataset=dataset, layer=layer, concept_rows=concepts, feature_rows=features,
                level=level, ms=exp.m, factors=exp.factors, wheres=exp.where, controls=exp.controls, n_images=exp.n_images,
                concepts=exp.concepts, seed=spec.run.seed,
            )
            write_table(_part(ctx, "experiments", config.tag), "experiments", rows, ctx.spec_hash)
            _log_experiment_summary(exp.name, sid, summarise(rows), max(exp.m), min(exp.factors))

    return action


def _log_experiment_summary(name: str, sid: str, summary: list[dict], m: int, factor: float) -> None:
    import numpy as np

    key = "removed_frac" if summary and "removed_frac" in summary[0] else "p_delta"
    for arm in ("concept", "random", "other"):
        values = [s[key] for s in summary if s["arm"] == arm and s["m"] == m and s["factor"] == factor and s[key] is not None]
        if values:
            log(f"  {name} {sid} {arm}: m={m}, factor {factor:g}: median {key} {float(np.median(values)):.3f} over {len(values)} concept(s)")


def first_heads(spec: Spec) -> dict[tuple[str, str], str]:
    """(model, task) → the model's first head of that task: the one the `saes` splice columns score."""
    out: dict[tuple[str, str], str] = {}
    for key, head in spec.heads.items():
        out.setdefault((head.model, head.task), key)
    return out


def splice_stage(head_key: str) -> Action:
    def action(ctx: StageContext) -> None:
        from saev_report.experiments import spliced_scores
        from saev_report.heads import load_head
        from saev_report.sae import load_sae

        spec = ctx.spec
        head_spec = spec.heads[head_key]
        prefix = "cls" if head_spec.task == "classification" else "seg"
        seed_everything(spec.run.seed)
        backbone, device = _backbone(spec, head_spec.model, ctx.cache_dir)
        dataset = _dataset(spec, head_spec.val or head_spec.train, ctx.cache_dir)
        head = load_head(ctx.inputs[f"heads/{head_key}"] / "head", device)
        rows = []
        for layer in spec.models[head_spec.model].layers:
            store = _store(ctx, head_spec.model, layer)
            mean_d = store_patch_mean(store)
            saes = {sae_id(head_spec.model, layer, c): load_sae(_sae_dir(ctx, head_spec.model, layer, c.tag), device) for c in sae_sweep(spec.sae)}
            scores = spliced_scores(backbone, saes, {sid: mean_d for sid in saes}, head, dataset, layer, batch_size=spec.record.batch_size)
            for sid, s in scores.items():
                rows.append({"sae_id": sid, f"{prefix}_head": head_key, f"{prefix}_clean": s.clean, f"{prefix}_spliced": s.spliced,
                             f"{prefix}_ablated": s.ablated, f"{prefix}_recovered": s.recovered})
                log(f"  {sid} × {head_key}: {s.metric} clean {s.clean:.3f}, spliced {s.spliced:.3f}, mean-ablated {s.ablated:.3f}"
                    + (f", recovered {s.recovered:.2f}" if s.recovered is not None else ""))
        write_table(_part(ctx, "saes", head_key), "saes", rows, ctx.spec_hash)

    return action


def store_patch_mean(store) -> "torch.Tensor":
    """Mean patch activation [d] over a recorded store (float64 accumulation), for mean ablation."""
    import torch

    patches = store.meta.patch_slice
    total, count = torch.zeros(store.d_model, dtype=torch.float64), 0
    for pos in range(store.n_images):
        acts_pd = store.image_acts(pos)[patches].double()
        total += acts_pd.sum(0)
        count += acts_pd.shape[0]
    return (total / max(count, 1)).float()


# --------------------------------------------------------------------------- compare


def _aligned_maps(store_a, store_b, sae_a, sae_b, batch_images: int = 16):
    """Per-side iterables of feature maps over the images both stores hold, in the same order."""
    import numpy as np
    import torch

    from saev_report.compare import Repeatable, feature_maps

    pos_a = {int(i): p for p, i in enumerate(store_a.image_indices)}
    pos_b = {int(i): p for p, i in enumerate(store_b.image_indices)}
    common = sorted(set(pos_a) & set(pos_b))

    def side(store, positions: dict[int, int], sae):
        grid = (store.meta.grid_h, store.meta.grid_w)
        patches = store.meta.patch_slice

        def batches():
            for start in range(0, len(common), batch_images):
                chunk = common[start:start + batch_images]
                acts_bpd = torch.stack([store.image_acts(positions[i])[patches] for i in chunk]).float()
                with torch.inference_mode():
                    yield feature_maps(acts_bpd, sae, grid)

        return Repeatable(batches)

    return side(store_a, pos_a, sae_a), side(store_b, pos_b, sae_b), np.array(common)


def _match_and_write(ctx: StageContext, comparison: str, store_a, store_b, dir_a: Path, dir_b: Path, sid_a: str, sid_b: str, min_score: float) -> None:
    from saev_report.compare import match_features, match_rows
    from saev_report.sae import load_sae

    sae_a, sae_b = load_sae(dir_a), load_sae(dir_b)
    maps_a, maps_b, common = _aligned_maps(store_a, store_b, sae_a, sae_b)
    result = match_features(maps_a, maps_b, min_score=min_score, label=comparison)
    rows = match_rows(result, comparison, sid_a, sid_b, min_score)
    write_table(_part(ctx, "matches"), "matches", rows, ctx.spec_hash)
    matched = [r for r in rows if r["sae_a"] == sid_a]
    n_matched = sum(bool(r["matched"]) for r in matched)
    scores = [r["score"] for r in matched if r["score"] is not None]
    median = sorted(scores)[len(scores) // 2] if scores else float("nan")
    log(f"  {comparison}: {n_matched}/{len(matched)} features of {sid_a} matched (median best r {median:.3f}) over {len(common)} images")


def compare_stage(index: int) -> Action:
    def action(ctx: StageContext) -> None:
        from saev_report.compare import comparison_name

        spec = ctx.spec
        cmp = spec.compare[index]
        config = sae_sweep(spec.sae)[0]
        layer_a, layer_b = spec.models[cmp.a].layers[0], spec.models[cmp.b].layers[0]
        _match_and_write(
            ctx, comparison_name(cmp.a, cmp.b), _store(ctx, cmp.a, layer_a), _store(ctx, cmp.b, layer_b),
            _sae_dir(ctx, cmp.a, layer_a, config.tag), _sae_dir(ctx, cmp.b, layer_b, config.tag),
            sae_id(cmp.a, layer_a, config), sae_id(cmp.b, layer_b, config), cmp.min_score,
        )

    return action


def stability_stage(index: int) -> Action:
    def action(ctx: StageContext) -> None:
        from saev_report.compare import stability_name

        spec = ctx.spec
        model_key = spec.stability[index].model
        layer = spec.models[model_key].layers[0]
        configs = sae_sweep(spec.sae)
        first = configs[0]
        twin = next(c for c in configs if c.seed != first.seed and (c.expansion, c.l1_coeff, c.k) == (first.expansion, first.l1_coeff, first.k))
        store = _store(ctx, model_key, layer)
        _match_and_write(
            ctx, stability_name(model_key), store, store, _sae_dir(ctx, model_key, layer, first.tag),
            _sae_dir(ctx, model_key, layer, twin.tag), sae_id(model_key, layer, first), sae_id(model_key, layer, twin), 0.5,
        )

    return action


# --------------------------------------------------------------------------- render


def render_site(spec: Spec, run_dir: Path) -> Path:
    """Render `<run>/site` from the published tables (cheap enough to redo on every build)."""
    from saev_report.render import build_site

    out = run_dir / "site"
    labels = {key: model.label or key for key, model in spec.models.items()}
    stats = build_site(run_dir, out, spec.report, model_labels=labels)
    log(f"[green]✓[/] site: {stats}")
    return out
