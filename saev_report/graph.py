"""Spec → stages: the one place that reads a `Spec` and resolves its defaults.

Every stage gets a params model holding exactly what its action reads (see
`stages/base.py`); defaults that depend on other sections — an edit's layer and
dataset, "the first layer and the first SAE of the sweep" for comparisons, a
stability twin's seed — are resolved here, once.
"""

from __future__ import annotations

from pathlib import Path

from saev_report.spec import APLiftClaim, ExperimentClaim, ModelSpec, SAEConfig, SplicedClaim, Spec, sae_id, sae_sweep
from saev_report.stages import Stage
from saev_report.stages.analyse import ANALYSE, AnalyseParams
from saev_report.stages.claims import CLAIMS, ClaimsParams, ResolvedClaim
from saev_report.stages.compare import COMPARE, STABILITY, MatchParams, SAERef
from saev_report.stages.edits import EDITS, EditParams
from saev_report.stages.experiments import EXPERIMENTS, ExperimentParams, SAEChoice
from saev_report.stages.heads import HEADS, HeadParams
from saev_report.stages.images import IMAGES, ImagesParams
from saev_report.stages.record import RECORD, RecordParams
from saev_report.stages.splice import SPLICE, SpliceParams
from saev_report.stages.tokens import TOKENS, TokensParams
from saev_report.stages.train import TRAIN, TrainParams


def _model(spec: Spec, key: str) -> ModelSpec:
    """A model as the stages see it: the display label only matters to the site. (Its own
    sweep, `sae`, is not dumped: the stages that need it get it through `spec.sweep_for`.)"""
    return spec.models[key].model_copy(update={"label": None})


def used_datasets(spec: Spec) -> list[str]:
    """Datasets some stage reads: the record dataset and every head's and edit's."""
    used = {spec.record.dataset}
    for head in spec.heads.values():
        used.update(d for d in (head.train, head.val) if d)
    for edit in [*spec.edits, *spec.experiments]:
        used.add(edit_dataset(spec, edit.head, edit.dataset))
    return sorted(used)


def edit_dataset(spec: Spec, head_key: str, dataset: str | None) -> str:
    """An edit's images: its own dataset, else its head's validation data, else the head's training data."""
    head = spec.heads[head_key]
    return dataset or head.val or head.train


def edit_layer(spec: Spec, model_key: str, layer: int | None) -> int:
    """An edit's layer: its own, else the model's first recorded layer."""
    return layer or spec.models[model_key].layers[0]


def read_models(spec: Spec) -> list[str]:
    """Models some head or edit reads (each gets a `tokens` stage), in declaration order."""
    used = {h.model for h in spec.heads.values()} | {e.model for e in spec.edits}
    return [key for key in spec.models if key in used]


def first_sae(spec: Spec, model_key: str) -> SAEConfig:
    return sae_sweep(spec.sweep_for(model_key))[0]


def counterpart(spec: Spec, config: SAEConfig, model_key: str) -> SAEConfig:
    """The SAE of `model_key`'s sweep trained like `config` (same tag), else that sweep's first."""
    configs = sae_sweep(spec.sweep_for(model_key))
    return next((c for c in configs if c.tag == config.tag), configs[0])


def seed_twin(spec: Spec, model_key: str) -> SAEConfig:
    """The model's first SAE trained with another seed (what `stability` compares against)."""
    first, *rest = sae_sweep(spec.sweep_for(model_key))
    return next(c for c in rest if c.seed != first.seed and (c.kind, c.expansion, c.l1_coeff, c.k) == (first.kind, first.expansion, first.l1_coeff, first.k))


SPLICE_PREFIX = {"classification": "cls", "segmentation": "seg"}


def splice_groups(spec: Spec) -> dict[tuple[str, str], dict[str, str]]:
    """(model, validation dataset) → {head key: column prefix} for the model's first head of each task:
    the heads the `saes` splice columns score. Heads on one dataset share one splice stage."""
    first: dict[tuple[str, str], str] = {}
    for key, head in spec.heads.items():
        first.setdefault((head.model, head.task), key)
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for (model_key, task), key in first.items():
        head = spec.heads[key]
        groups.setdefault((model_key, head.val or head.train), {})[key] = SPLICE_PREFIX[task]
    return groups


def ap_lift_models(spec: Spec) -> list[str]:
    """Models whose analysis an `ap_lift` claim counts features of (its own and its control), in declaration order."""
    used = {k for c in spec.claims if isinstance(c, APLiftClaim) for k in (c.model, c.control_model)}
    return [key for key in spec.models if key in used]


def resolve_claims(spec: Spec) -> list[ResolvedClaim]:
    """Each claim with its replicates' SAE ids and seeds, its spliced head, its control SAE."""
    out = []
    for claim in spec.claims:
        if isinstance(claim, ExperimentClaim):
            exp = next(e for e in spec.experiments if e.name == claim.experiment)
            model_key, layer = exp.model, exp.layer or spec.models[exp.model].layers[0]
        else:
            model_key, layer = claim.model, spec.models[claim.model].layers[0]
        configs = sae_sweep(spec.sweep_for(model_key))
        chosen = [configs[i] for i in claim.saes]
        extra: dict = {}
        if isinstance(claim, SplicedClaim):
            extra["head"] = next(key for key, h in spec.heads.items() if h.model == claim.model and h.task == claim.task)
        if isinstance(claim, APLiftClaim):
            control = first_sae(spec, claim.control_model)
            extra["control_sae_id"] = sae_id(claim.control_model, spec.models[claim.control_model].layers[0], control)
        out.append(ResolvedClaim(claim=claim, sae_ids=[sae_id(model_key, layer, c) for c in chosen], seeds=[c.seed for c in chosen], **extra))
    return out


def build_stages(spec: Spec, cache_dir: Path = Path(".")) -> list[Stage]:
    """Every stage of the spec, in dependency order."""
    common = {"cache_dir": cache_dir}
    run = spec.run
    stages: list[Stage] = []

    images: dict[str, Stage] = {}
    for ds_key in used_datasets(spec):
        images[ds_key] = Stage(IMAGES, ds_key, ImagesParams(dataset_key=ds_key, dataset=spec.datasets[ds_key], **common))
        stages.append(images[ds_key])

    record: dict[str, Stage] = {}
    train: dict[tuple[str, int], Stage] = {}
    analyse: dict[tuple[str, int], Stage] = {}
    rec = spec.record
    recorded = spec.recorded_models()
    for model_key in recorded:
        record[model_key] = Stage(RECORD, model_key, RecordParams(
            model_key=model_key, model=_model(spec, model_key), dataset_key=rec.dataset, dataset=spec.datasets[rec.dataset],
            dtype=rec.dtype, batch_size=rec.batch_size, shard_mb=rec.shard_mb, seed=run.seed, device=run.device, **common))
        stages.append(record[model_key])
        for layer in spec.models[model_key].layers:
            label = f"{model_key}-L{layer}"
            train[(model_key, layer)] = Stage(TRAIN, label, TrainParams(
                model_key=model_key, layer=layer, sae=spec.sweep_for(model_key), seed=run.seed, device=run.device, **common),
                {"record": record[model_key]})
            analyse[(model_key, layer)] = Stage(ANALYSE, label, AnalyseParams(
                model_key=model_key, layer=layer, dataset_key=rec.dataset, dataset=spec.datasets[rec.dataset], sae=spec.sweep_for(model_key),
                analysis=spec.analysis, seed=run.seed, device=run.device, **common),
                {"record": record[model_key], "train": train[(model_key, layer)], "images": images[rec.dataset]})
            stages += [train[(model_key, layer)], analyse[(model_key, layer)]]

    tokens: dict[str, Stage] = {}
    for model_key in read_models(spec):
        head_datasets = {d for h in spec.heads.values() if h.model == model_key for d in (h.train, h.val) if d}
        edit_layers = sorted({edit_layer(spec, e.model, e.layer) for e in spec.edits if e.model == model_key})
        edit_datasets = {edit_dataset(spec, e.head, e.dataset) for e in spec.edits if e.model == model_key}
        main = model_key in record
        tokens[model_key] = Stage(TOKENS, model_key, TokensParams(
            model_key=model_key, model=_model(spec, model_key),
            from_layer=max(spec.models[model_key].layers) if main else None, edit_layers=edit_layers,
            head_datasets={ds: spec.datasets[ds] for ds in sorted(head_datasets)},
            edit_datasets={ds: spec.datasets[ds] for ds in sorted(edit_datasets)}, dtype=rec.dtype,
            batch_size=rec.batch_size, shard_mb=rec.shard_mb, seed=run.seed, device=run.device, **common),
            {"record": record[model_key]} if main else {})
        stages.append(tokens[model_key])

    heads: dict[str, Stage] = {}
    for head_key, head in spec.heads.items():
        inputs = {"tokens": tokens[head.model]} | ({"record": record[head.model]} if head.model in record else {})
        heads[head_key] = Stage(HEADS, head_key, HeadParams(
            head_key=head_key, head=head, train_key=head.train, train_dataset=spec.datasets[head.train],
            val_key=head.val, val_dataset=spec.datasets[head.val] if head.val else None, seed=run.seed, device=run.device,
            **common), inputs)
        stages.append(heads[head_key])

    edit_stages: dict[str, Stage] = {}
    for edit in spec.edits:
        layer = edit_layer(spec, edit.model, edit.layer)
        config = sae_sweep(spec.sweep_for(edit.model))[edit.sae]
        ds_key = edit_dataset(spec, edit.head, edit.dataset)
        edit_stages[edit.name] = Stage(EDITS, edit.name, EditParams(
            edit=edit.model_copy(update={"layer": layer, "dataset": ds_key}), model=_model(spec, edit.model),
            sae_tag=config.tag, sae_id=sae_id(edit.model, layer, config), dataset=spec.datasets[ds_key],
            seed=run.seed, device=run.device, **common),
            {"head": heads[edit.head], "train": train[(edit.model, layer)], "analyse": analyse[(edit.model, layer)],
             "record": record[edit.model], "tokens": tokens[edit.model]})
        stages.append(edit_stages[edit.name])

    experiments: dict[str, Stage] = {}
    for exp in spec.experiments:
        configs = sae_sweep(spec.sweep_for(exp.model))
        layer = exp.layer or spec.models[exp.model].layers[0]
        ds_key = edit_dataset(spec, exp.head, exp.dataset)
        rank_key = None if exp.rank_on == "analysis" else spec.heads[exp.head].train  # read only then: keyed only then
        experiments[exp.name] = Stage(EXPERIMENTS, exp.name, ExperimentParams(
            experiment=exp.model_copy(update={"layer": layer, "dataset": ds_key}), layer=layer,
            level="patch" if spec.heads[exp.head].task == "segmentation" else "image",
            saes=[SAEChoice(sae_tag=configs[i].tag, sae_id=sae_id(exp.model, layer, configs[i])) for i in exp.saes],
            model=_model(spec, exp.model), dataset_key=ds_key, dataset=spec.datasets[ds_key], record_dataset_key=rec.dataset,
            rank_dataset_key=rank_key, rank_dataset=spec.datasets[rank_key] if rank_key else None, seed=run.seed, device=run.device,
            **common),
            {"head": heads[exp.head], "train": train[(exp.model, layer)], "analyse": analyse[(exp.model, layer)]})
        stages.append(experiments[exp.name])

    splices: dict[str, Stage] = {}
    for (model_key, ds_key), head_keys in splice_groups(spec).items():
        if model_key not in record:
            continue  # an unrecorded model has no SAE to splice
        inputs = {"record": record[model_key], **{f"train/L{layer}": train[(model_key, layer)] for layer in spec.models[model_key].layers},
                  **{f"head/{key}": heads[key] for key in head_keys}, "tokens": tokens[model_key]}
        splices[f"{model_key}-{ds_key}"] = Stage(SPLICE, f"{model_key}-{ds_key}", SpliceParams(
            model_key=model_key, model=_model(spec, model_key), heads=head_keys, sae=spec.sweep_for(model_key), dataset_key=ds_key,
            dataset=spec.datasets[ds_key], batch_size=rec.batch_size, seed=run.seed, device=run.device, **common), inputs)
        stages.append(splices[f"{model_key}-{ds_key}"])

    if experiments or splices or edit_stages or spec.claims:
        claim_analyses = {f"analyse/{m}-L{spec.models[m].layers[0]}": analyse[(m, spec.models[m].layers[0])]
                          for m in ap_lift_models(spec)}
        stages.append(Stage(CLAIMS, "all", ClaimsParams(stats=spec.stats, claims=resolve_claims(spec), seed=run.seed, **common),
                            {**{f"experiments/{k}": s for k, s in experiments.items()}, **{f"splice/{k}": s for k, s in splices.items()},
                             **{f"edits/{k}": s for k, s in edit_stages.items()},
                             **claim_analyses}))

    for cmp in spec.compare:
        first = first_sae(spec, cmp.a)
        sides = {}
        for side, model_key in (("a", cmp.a), ("b", cmp.b)):
            layer = spec.models[model_key].layers[0]
            config = counterpart(spec, first, model_key)
            sides[side] = (SAERef(model_key=model_key, layer=layer, sae_tag=config.tag, sae_id=sae_id(model_key, layer, config)),
                           record[model_key], train[(model_key, layer)])
        stages.append(Stage(COMPARE, f"{cmp.a}~{cmp.b}", MatchParams(
            a=sides["a"][0], b=sides["b"][0], min_score=cmp.min_score, **common),
            {"record_a": sides["a"][1], "train_a": sides["a"][2], "record_b": sides["b"][1], "train_b": sides["b"][2]}))

    for stab in spec.stability:
        layer = spec.models[stab.model].layers[0]
        first, twin = first_sae(spec, stab.model), seed_twin(spec, stab.model)
        refs = [SAERef(model_key=stab.model, layer=layer, sae_tag=c.tag, sae_id=sae_id(stab.model, layer, c)) for c in (first, twin)]
        inputs = {"record_a": record[stab.model], "train_a": train[(stab.model, layer)]}
        inputs.update(record_b=inputs["record_a"], train_b=inputs["train_a"])
        stages.append(Stage(STABILITY, stab.model, MatchParams(
            a=refs[0], b=refs[1], min_score=stab.min_score, **common), inputs))
    return stages
