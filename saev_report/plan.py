"""`saev-report plan`: the stage list with cache status, and recording estimates.

Estimates need a model's width and patch grid before any weights are loaded,
so well-known architectures are listed here; unknown ones print `?`.
"""

from __future__ import annotations

from dataclasses import dataclass

from saev_report.graph import build_stages
from saev_report.spec import KNOWN_DATASET_SIZES, DatasetSpec, ModelSpec, Spec, model_depth


@dataclass(frozen=True)
class Arch:
    d_model: int
    patch_size: int
    image_size: int
    n_registers: int = 0
    has_cls: bool = True


KNOWN_ARCHS: dict[str, Arch] = {
    "imgfocus": Arch(384, 14, 224),
    "openai/clip-vit-base-patch16": Arch(768, 16, 224),
    "openai/clip-vit-base-patch32": Arch(768, 32, 224),
    "openai/clip-vit-large-patch14": Arch(1024, 14, 224),
    "ViT-B-16/openai": Arch(768, 16, 224),
    "ViT-B-32/openai": Arch(768, 32, 224),
    "ViT-L-14/openai": Arch(1024, 14, 224),
    "facebook/dinov2-small": Arch(384, 14, 224),
    "facebook/dinov2-base": Arch(768, 14, 224),
    "facebook/dinov2-large": Arch(1024, 14, 224),
    "facebook/dinov2-with-registers-base": Arch(768, 14, 224, n_registers=4),
    "google/siglip-base-patch16-224": Arch(768, 16, 224, has_cls=False),
    "vit_base_patch16_224": Arch(768, 16, 224),
    "vit_small_patch16_224": Arch(384, 16, 224),
    "vit_base_patch14_dinov2": Arch(768, 14, 224),
}

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


def recording_estimates(spec: Spec) -> list[dict[str, object]]:
    ds = spec.datasets[spec.record.dataset]
    n_images = dataset_size(ds)
    rows = []
    for key in spec.recorded_models():
        model = spec.models[key]
        arch = KNOWN_ARCHS.get("imgfocus" if model.family == "imgfocus" else (model.source or ""))
        depth = model_depth(model)
        row: dict[str, object] = {"model": key, "layers": ",".join(map(str, model.layers)), "images": f"{n_images:,}" if n_images else "?", "dtype": spec.record.dtype}
        if arch is None or n_images is None:
            row.update(tokens="?", d="?", disk="?", gflop="?", cpu_time="?", gpu_time="?", disk_bytes=None)
        else:
            tokens = tokens_per_image(model, arch)
            disk = n_images * tokens * arch.d_model * BYTES[spec.record.dtype] * len(model.layers)
            gflop = forward_gflop(model, arch, max(model.layers) if depth else 12)
            row.update(tokens=tokens, d=arch.d_model, disk=_human_bytes(disk), disk_bytes=disk, gflop=f"{gflop:.1f}",
                       cpu_time=_human_seconds(n_images * gflop * 1e9 / CPU_FLOPS), gpu_time=_human_seconds(n_images * gflop * 1e9 / GPU_FLOPS))
        rows.append(row)
    return rows
