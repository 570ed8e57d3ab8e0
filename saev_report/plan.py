"""`saev-report plan`: the stage list with cache status, and recording and training estimates.

`gpus` > 1 shows the time on N GPUs of one node (`--launcher torchrun`) or N GPUs
per Slurm job: recording splits the images evenly; training deals the sweep's SAEs
over the ranks (ceil(S / N) SAEs per rank, each pass as long as one GPU's), or,
with fewer SAEs than GPUs, trains them data-parallel (S / N of the work per rank).
Communication and the store's read bandwidth are left out: a lower bound.

Estimates need a model's width and patch grid before any weights are loaded:
`spec.KNOWN_ARCHS` lists well-known architectures; unknown ones print `?`.
"""

from __future__ import annotations

from dataclasses import dataclass

from saev_report.graph import build_stages
from saev_report.spec import KNOWN_DATASET_SIZES, Arch, DatasetSpec, ModelSpec, Spec, known_arch, model_depth, sae_sweep


BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
CPU_FLOPS = 0.1e12  # measured order of magnitude on the 2-core CI box
GPU_FLOPS = 30e12  # one A6000-class GPU in fp16, realistic utilisation


def plan_rows(spec: Spec) -> list[dict[str, str]]:
    run_dir = spec.run_dir
    return [{"stage": s.name, "key": s.key, "status": s.status(run_dir)} for s in build_stages(spec)]


def dataset_size(ds: DatasetSpec) -> int | None:
    """Images a dataset will yield, without reading it when the spec says or the size is well known."""
    n: int | None = None
    if ds.kind == "demo":
        n = ds.n_images if ds.split == "all" else round(ds.n_images * (0.8 if ds.split == "train" else 0.2))
    elif ds.kind == "image_folder":
        n = ds.n_images
    else:
        n = KNOWN_DATASET_SIZES.get((ds.kind, getattr(ds, "split", "")))
    if ds.max_images is not None:
        n = ds.max_images if n is None else min(n, ds.max_images)
    return n


def tokens_per_image(model: ModelSpec, arch: Arch) -> int:
    side = (model.image_size or arch.image_size) // arch.patch_size
    counts = {"cls": int(arch.has_cls), "registers": arch.n_registers, "patches": side * side}
    return sum(counts[t] for t in model.tokens)


def forward_gflop(model: ModelSpec, arch: Arch, depth: int) -> float:
    """≈ 24·T·d² (MLP + projections) + 4·T²·d (attention) per block, in GFLOP."""
    side = (model.image_size or arch.image_size) // arch.patch_size
    t = side * side + int(arch.has_cls) + arch.n_registers
    d = arch.d_model
    return depth * (24 * t * d * d + 4 * t * t * d) / 1e9


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _human_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def training_share(n_saes: int, gpus: int) -> float:
    """SAEs' worth of work on the busiest rank: whole SAEs per rank, or a DDP share of all."""
    if n_saes >= gpus:
        return float(-(-n_saes // gpus))
    return n_saes / gpus


def sae_train_flop(d_model: int, n_features: int, n_patches: int) -> float:
    """Dense step ≈ 12·d·F per patch: encode and decode (2·d·F each) forward, twice that backward."""
    return 12.0 * d_model * n_features * n_patches


def training_estimates(spec: Spec, gpus: int = 1) -> list[dict[str, object]]:
    """Per (model, layer): the sweep's size and its time on one GPU and on `gpus` GPUs."""
    rows = []
    for key in spec.recorded_models():
        model = spec.models[key]
        configs = sae_sweep(spec.sweep_for(key))
        arch = known_arch(model)
        for layer in model.layers:
            row: dict[str, object] = {"model": key, "layer": layer, "saes": len(configs), "patches": f"{spec.sae.n_patches:,}"}
            if arch is None:
                row.update(flop="?", gpu_time="?", gpus_time="?")
            else:
                per_sae = [sae_train_flop(arch.d_model, arch.d_model * c.expansion, spec.sae.n_patches) for c in configs]
                one = sum(per_sae) / GPU_FLOPS
                n = one * training_share(len(configs), gpus) / max(len(configs), 1)
                row.update(flop=f"{sum(per_sae) / 1e15:,.0f} PFLOP", gpu_time=_human_seconds(one), gpus_time=_human_seconds(n))
            rows.append(row)
    return rows


def recording_estimates(spec: Spec, gpus: int = 1) -> list[dict[str, object]]:
    ds = spec.datasets[spec.record.dataset]
    n_images = dataset_size(ds)
    rows = []
    for key in spec.recorded_models():
        model = spec.models[key]
        arch = known_arch(model)
        depth = model_depth(model)
        row: dict[str, object] = {"model": key, "layers": ",".join(map(str, model.layers)), "images": f"{n_images:,}" if n_images else "?", "dtype": spec.record.dtype}
        if arch is None or n_images is None:
            row.update(tokens="?", d="?", disk="?", gflop="?", cpu_time="?", gpu_time="?", gpus_time="?", disk_bytes=None)
        else:
            tokens = tokens_per_image(model, arch)
            disk = n_images * tokens * arch.d_model * BYTES[spec.record.dtype] * len(model.layers)
            gflop = forward_gflop(model, arch, max(model.layers) if depth else 12)
            row.update(tokens=tokens, d=arch.d_model, disk=_human_bytes(disk), disk_bytes=disk, gflop=f"{gflop:.1f}",
                       cpu_time=_human_seconds(n_images * gflop * 1e9 / CPU_FLOPS), gpu_time=_human_seconds(n_images * gflop * 1e9 / GPU_FLOPS),
                       gpus_time=_human_seconds(n_images * gflop * 1e9 / GPU_FLOPS / gpus))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- per stage, for plan against reality


@dataclass(frozen=True)
class StageEstimate:
    """What `plan` expects of one stage: its time on a CPU and on one GPU, and its disk."""

    cpu_s: float
    gpu_s: float
    disk_bytes: float | None
    """None where the stage's disk is not modelled."""

    def seconds_on(self, device: str) -> float:
        """The estimate for the device type a build ran on (`cpu`, `cuda`, `mps`)."""
        return self.cpu_s if device == "cpu" else self.gpu_s


def sae_checkpoint_bytes(d_model: int, n_features: int) -> int:
    """float32 W_enc, W_dec, b_enc, b_dec and the normalisation buffers of one SAE."""
    return 4 * (2 * d_model * n_features + n_features + 2 * d_model + 1)


def sae_analyse_flop(d_model: int, n_features: int, n_rows: int) -> float:
    """One pass over the store: encode and decode (2·d·F each) every recorded token."""
    return 4.0 * d_model * n_features * n_rows


def stage_estimates(spec: Spec) -> dict[str, StageEstimate]:
    """Estimates by stage name (`record/<model>`, `train/<model>-L<layer>`, `analyse/<model>-L<layer>`):
    the stages whose cost `plan` models. The others (heads, edits, ...) have no estimate yet; the
    analysis estimate is its time only (its tables are small next to the activations)."""
    n_images = dataset_size(spec.datasets[spec.record.dataset])
    found: dict[str, StageEstimate] = {}
    for key in spec.recorded_models():
        model = spec.models[key]
        arch = known_arch(model)
        if arch is None:
            continue
        if n_images is not None:
            depth = model_depth(model)
            flop = n_images * forward_gflop(model, arch, max(model.layers) if depth else 12) * 1e9
            disk = n_images * tokens_per_image(model, arch) * arch.d_model * BYTES[spec.record.dtype] * len(model.layers)
            found[f"record/{key}"] = StageEstimate(flop / CPU_FLOPS, flop / GPU_FLOPS, disk)
        configs = sae_sweep(spec.sweep_for(key))
        for layer in model.layers:
            features = [arch.d_model * c.expansion for c in configs]
            flop = sum(sae_train_flop(arch.d_model, f, spec.sae.n_patches) for f in features)
            found[f"train/{key}-L{layer}"] = StageEstimate(flop / CPU_FLOPS, flop / GPU_FLOPS,
                                                          sum(sae_checkpoint_bytes(arch.d_model, f) for f in features))
            if n_images is not None:
                rows = n_images * tokens_per_image(model, arch)
                flop = sum(sae_analyse_flop(arch.d_model, f, rows) for f in features)
                found[f"analyse/{key}-L{layer}"] = StageEstimate(flop / CPU_FLOPS, flop / GPU_FLOPS, None)
    return found


def ratio(measured: float | None, estimated: float | None) -> float | None:
    """measured / estimated: above 1 the estimate was low. None when either is missing or zero."""
    if not measured or not estimated:
        return None
    return measured / estimated


def human_bytes(n: float | None) -> str:
    return "—" if n is None else _human_bytes(n)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1:
        return f"{s * 1000:.3g} ms"
    return f"{s:.1f} s" if s < 10 else _human_seconds(s)


def against_measured(spec: Spec) -> list[dict[str, object]]:
    """Every stage's estimate next to what its last run measured (`manifest.read_measurement`), with
    measured / estimated ratios; empty when no stage of this spec has run yet."""
    from saev_report.manifest import read_measurement

    estimates = stage_estimates(spec)
    rows: list[dict[str, object]] = []
    for stage in build_stages(spec):
        out_dir = stage.out_dir(spec.run_dir)
        measured = read_measurement(out_dir) if out_dir.is_dir() else None
        estimate = estimates.get(stage.name)
        device = measured.device if measured else None
        est_s = estimate.seconds_on(device or "cpu") if estimate else None
        rows.append({
            "stage": stage.name, "device": device or "—",
            "est_time": est_s, "time": measured.wall_s if measured else None,
            "time_ratio": ratio(measured.wall_s, est_s) if measured else None,
            "est_disk": estimate.disk_bytes if estimate else None, "disk": measured.disk_bytes if measured else None,
            "disk_ratio": ratio(measured.disk_bytes, estimate.disk_bytes) if measured and estimate else None,
            "peak_rss": measured.peak_rss_bytes if measured else None,
        })
    return rows if any(r["time"] is not None for r in rows) else []
