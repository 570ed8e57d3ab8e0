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
