"""Published SAEs: saev's released checkpoints and SAELens-format SAEs, loaded and checked.

A published SAE is loaded into the project's `SparseAutoencoder` (exactly: each format's encoder
convention is folded into the weights), with what the checkpoint says about itself: the model
and layer it was trained on, its normalisation, and the metrics it states. Two checks guard
against one that loads "successfully" and is wrong (SAELens PRs #308 and #608: a TopK SAE that
read L0 ≈ 600 instead of 80):

- `check_provenance`: width, layer, model name and normalisation against the spec's model;
- `verify_stated_metrics`: L0 and FVU recomputed on recorded activations (`measure`) against
  the checkpoint's own statement, where it makes one (saev: the repo's `manifest.jsonl`;
  SAELens: `sparsity.safetensors`, whose feature densities sum to the L0).

Formats (`PUBLISHED_FORMATS`, one loader each):

- `saev`: one JSON header line, then a torch state dict (`saev.nn.dump`, schemas 0–5), e.g.
  `layer_23/<run-id>/sae.pt` in the `osunlp/SAE_DINOv3_*` repos, whose root `manifest.jsonl`
  has one line per checkpoint (`run_id`, `layer`, `l0`, `mse`, `sha256`, `path`). saev trains on
  raw activations (no normalisation is recorded) and, from July 2025, encodes `x @ W_enc + b_enc`
  (before: `(x − b_dec) @ W_enc + b_enc`). Its layers count blocks from 0 after the embeddings
  the way `hidden_states` does, so `layer` is the spec's.
- `saelens`: a folder with `cfg.json` and `sae_weights.safetensors` (SAELens ≥ 6 nests the model
  and hook under `metadata`; 5.x keeps them flat). `blocks.L.hook_resid_post` is the spec's
  layer L + 1, `hook_resid_pre` layer L.

Sources: a local file or folder, or `hf://org/repo/path/in/repo` read from the local Hugging
Face cache (nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
from pydantic import Field
from torch import Tensor

from saev_report.errors import InputUnavailable, UserError
from saev_report.sae import SparseAutoencoder
from saev_report.spec import ModelSpec, SpecModel

MANIFEST = "manifest.jsonl"
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"


class PublishedSAEMismatch(UserError):
    """A published SAE disagrees with the spec or with its own stated metrics."""

    exit_code = 2


class PublishedSAESpec(SpecModel):
    """A published SAE to use instead of training one."""

    source: str
    """Local checkpoint file or folder, or `hf://org/repo/path/in/repo` from the local HF cache."""
    format: Literal["auto", "saev", "saelens"] = "auto"
    """Checkpoint format; `auto` tells them apart by what is on disk."""
    model_name: str | None = None
    """The checkpoint's own name for the model, when it differs from the model's `source`."""
    saev_subtract_b_dec: bool | None = None
    """saev schema-1 checkpoints only, whose encoder input changed in July 2025: whether it is
    x − b_dec (older) or x (newer); other schemas say it themselves."""
    l0_rtol: float = Field(default=0.5, gt=0)
    """Largest relative difference between the measured and the stated L0 (data differ; a wrong k
    or activation differs by far more)."""
    fvu_atol: float = Field(default=0.1, gt=0)
    """Largest absolute difference between the measured and the stated FVU."""


@dataclass(frozen=True)
class StatedMetrics:
    """What a checkpoint says it measured, and where it says so."""

    l0: float | None = None
    fvu: float | None = None
    where: str = ""


@dataclass
class PublishedSAE:
    sae: SparseAutoencoder
    format: str
    source: str
    model_name: str | None
    layer: int | None
    """In the spec's convention (`hidden_states[layer]`), when the checkpoint says."""
    normalization: str
    """How the checkpoint expects inputs normalised: `none` is the only one loaded."""
    stated: StatedMetrics = field(default_factory=StatedMetrics)


# --------------------------------------------------------------------------- sources


def resolve_source(source: str) -> Path:
    """A local path, or `hf://org/repo/path` found in the local Hugging Face cache."""
    if not source.startswith("hf://"):
        path = Path(source).expanduser()
        if not path.exists():
            raise InputUnavailable(f"published SAE {source!r} does not exist")
        return path
    parts = source.removeprefix("hf://").split("/")
    if len(parts) < 3:
        raise ValueError(f"{source!r}: use hf://org/repo/path/in/repo")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import try_to_load_from_cache

    from saev_report.backbones.hf import missing_hub_message

    found = try_to_load_from_cache(repo_id, filename)
    if not isinstance(found, str):
        # A folder (a SAELens SAE) is cached file by file: look for its config.
        config = try_to_load_from_cache(repo_id, f"{filename}/{SAELENS_CFG}")
        if isinstance(config, str):
            return Path(config).parent
        raise InputUnavailable(missing_hub_message(repo_id, f"published SAE {filename!r}"))
    return Path(found)


def _repo_root(path: Path) -> Path | None:
    """The folder above `path` holding a manifest.jsonl (a saev release's repo root)."""
    for parent in path.parents:
        if (parent / MANIFEST).is_file():
            return parent
    return None


# --------------------------------------------------------------------------- saev


def _saev_activation(header: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(cfg, activation class name, activation params) of any saev schema."""
    schema = header.get("schema")
    if schema is None:  # saev 0.1.0: the header is the config, ReLU
        return dict(header), "Relu", {}
    cfg = dict(header["cfg"])
    if schema == 1 and header.get("cls") in ("Relu", "TopK", "BatchTopK"):  # schema 1A
        return cfg, header["cls"], {"top_k": cfg.get("top_k", 32)}
    if schema not in (1, 2, 3, 4, 5):
        raise ValueError(f"unknown saev checkpoint schema {schema!r}")
    activation = cfg.get("activation") or {"cls": "Relu", "params": {}}
    return cfg, str(activation["cls"]), dict(activation.get("params") or {})


SAEV_KINDS = {"Relu": "relu", "TopK": "topk", "BatchTopK": "batchtopk"}


def _saev_manifest_entry(path: Path) -> tuple[dict[str, Any] | None, str]:
    path = path.absolute()  # not resolved: a hub cache's snapshot files link to blobs elsewhere
    root = _repo_root(path)
    if root is None:
        return None, ""
    relative = path.relative_to(root).as_posix()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    for line in (root / MANIFEST).read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            if entry.get("path") == relative or entry.get("sha256") == digest:
                if entry.get("sha256") not in (None, digest):
                    raise PublishedSAEMismatch(f"{path}: its sha256 is {digest}, {root / MANIFEST} says {entry['sha256']}")
                return entry, str(root / MANIFEST)
    return None, ""


def load_saev(path: Path, spec: PublishedSAESpec) -> PublishedSAE:
    """A saev `nn.dump` checkpoint (JSON header line + torch state dict)."""
    with open(path, "rb") as handle:
        header = json.loads(handle.readline().decode("utf-8"))
        state = torch.load(io.BytesIO(handle.read()), weights_only=True, map_location="cpu")
    cfg, activation, params = _saev_activation(header)
    if activation not in SAEV_KINDS:
        raise PublishedSAEMismatch(f"{path}: saev activation {activation!r} is not one of {sorted(SAEV_KINDS)}")
    W_enc_df, W_dec_fd, b_enc_f, b_dec_d = (state[name].double() for name in ("W_enc", "W_dec", "b_enc", "b_dec"))
    d_model, n_features = W_enc_df.shape
    if int(cfg.get("d_model", cfg.get("d_vit", d_model))) != d_model or tuple(W_dec_fd.shape) != (n_features, d_model):
        raise PublishedSAEMismatch(f"{path}: header says d_model={cfg.get('d_model', cfg.get('d_vit'))}, "
                                   f"weights are W_enc {tuple(W_enc_df.shape)}, W_dec {tuple(W_dec_fd.shape)}")
    schema = header.get("schema")
    if schema is None:
        subtract = True
    elif schema == 1:
        subtract = spec.saev_subtract_b_dec
        if subtract is None and bool(b_dec_d.abs().max() > 0):
            raise PublishedSAEMismatch(
                f"{path}: saev schema-1 checkpoints encode x − b_dec (before July 2025) or x (after), and this one "
                "does not say which; set `saev_subtract_b_dec: true` or `false`")
    else:
        subtract = False
    kind = SAEV_KINDS[activation]
    k = int(params.get("top_k", 0)) if kind != "relu" else 0
    sae = SparseAutoencoder(d_model, n_features, kind, k=k)  # type: ignore[arg-type]
    with torch.no_grad():
        # ours: (x − b_dec) W_enc + b_enc'; saev ≥ July 2025: x W_enc + b_enc, so b_enc' = b_enc + b_dec W_enc
        sae.W_enc_fd.copy_(W_enc_df.t().float())
        sae.b_enc_f.copy_((b_enc_f if subtract else b_enc_f + b_dec_d @ W_enc_df).float())
        sae.W_dec_fd.copy_(W_dec_fd.float())
        sae.b_dec_d.copy_(b_dec_d.float())
        if kind == "batchtopk" and "activation.threshold" in state:
            sae.threshold.copy_(state["activation.threshold"].float())
    entry, where = _saev_manifest_entry(path)
    stated = StatedMetrics()
    if entry is not None:
        fvu = entry.get("normalized_mse", entry.get("fvu"))
        stated = StatedMetrics(l0=_float(entry.get("l0")), fvu=_float(fvu), where=where)
    layer = int(entry["layer"]) if entry is not None and "layer" in entry else None
    return PublishedSAE(sae.eval(), "saev", str(path), None, layer, "none", stated)


# --------------------------------------------------------------------------- SAELens


SAELENS_KINDS = {"standard": "relu", "topk": "topk"}
HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)$")


def saelens_layer(hook_name: str | None) -> int | None:
    """`blocks.L.hook_resid_post` → L + 1, `blocks.L.hook_resid_pre` → L (hidden_states' count)."""
    match = HOOK.search(hook_name or "")
    if match is None:
        return None
    return int(match.group(1)) + (1 if match.group(2) == "post" else 0)


def load_saelens(folder: Path, spec: PublishedSAESpec) -> PublishedSAE:
    """A SAELens SAE folder: cfg.json + sae_weights.safetensors (+ sparsity.safetensors)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / SAELENS_CFG).read_text())
    metadata = {**cfg, **(cfg.get("metadata") or {})}  # 5.x: flat; ≥ 6: under `metadata`
    architecture = str(cfg.get("architecture", "standard"))
    if architecture == "standard" and cfg.get("activation_fn_str") == "topk":  # 5.x TopK
        architecture = "topk"
    if architecture not in SAELENS_KINDS:
        raise PublishedSAEMismatch(f"{folder}: SAELens architecture {architecture!r} is not supported here "
                                   f"(supported: {sorted(SAELENS_KINDS)})")
    normalization = str(cfg.get("normalize_activations", "none"))
    if normalization != "none":
        raise PublishedSAEMismatch(
            f"{folder}: normalize_activations is {normalization!r}; only 'none' is supported (an "
            "'expected_average_only_in' factor must be folded into the weights first, as SAELens does on save)")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise PublishedSAEMismatch(f"{folder}: rescale_acts_by_decoder_norm is not supported")
    weights = {name: tensor.double() for name, tensor in load_file(str(folder / SAELENS_WEIGHTS)).items()}
    W_enc_df, W_dec_fd, b_enc_f, b_dec_d = (weights[name] for name in ("W_enc", "W_dec", "b_enc", "b_dec"))
    d_model, n_features = W_enc_df.shape
    if (int(cfg.get("d_in", d_model)), int(cfg.get("d_sae", n_features))) != (d_model, n_features):
        raise PublishedSAEMismatch(f"{folder}: cfg says d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')}; "
                                   f"W_enc is {tuple(W_enc_df.shape)}")
    kind = SAELENS_KINDS[architecture]
    k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0) if kind == "topk" else 0
    sae = SparseAutoencoder(d_model, n_features, kind, k=k)  # type: ignore[arg-type]
    subtract = bool(cfg.get("apply_b_dec_to_input", True))
    with torch.no_grad():
        sae.W_enc_fd.copy_(W_enc_df.t().float())
        sae.b_enc_f.copy_((b_enc_f if subtract else b_enc_f + b_dec_d @ W_enc_df).float())
        sae.W_dec_fd.copy_(W_dec_fd.float())
        sae.b_dec_d.copy_(b_dec_d.float())
    stated = StatedMetrics()
    if (folder / SAELENS_SPARSITY).is_file():
        log10_density_f = load_file(str(folder / SAELENS_SPARSITY))["sparsity"].double()
        stated = StatedMetrics(l0=float((10.0 ** log10_density_f).sum()), where=str(folder / SAELENS_SPARSITY))
    layer = saelens_layer(metadata.get("hook_name"))
    if layer is None and metadata.get("hook_layer") is not None and "resid_post" in str(metadata.get("hook_name", "")):
        layer = int(metadata["hook_layer"]) + 1
    return PublishedSAE(sae.eval(), "saelens", str(folder), metadata.get("model_name"), layer, normalization, stated)


# --------------------------------------------------------------------------- registry


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(1)


@dataclass(frozen=True)
class PublishedFormat:
    detect: Callable[[Path], bool]
    load: Callable[[Path, PublishedSAESpec], PublishedSAE]


PUBLISHED_FORMATS: dict[str, PublishedFormat] = {
    "saelens": PublishedFormat(lambda p: p.is_dir() and (p / SAELENS_CFG).is_file() and (p / SAELENS_WEIGHTS).is_file(), load_saelens),
    "saev": PublishedFormat(lambda p: p.is_file() and _first_byte(p) == b"{", load_saev),
}
"""Format name → how to recognise it on disk and load it."""


def load_published(spec: PublishedSAESpec) -> PublishedSAE:
    path = resolve_source(spec.source)
    if spec.format != "auto":
        return PUBLISHED_FORMATS[spec.format].load(path, spec)
    for published_format in PUBLISHED_FORMATS.values():
        if published_format.detect(path):
            return published_format.load(path, spec)
    raise PublishedSAEMismatch(f"{spec.source}: not a checkpoint of any known format ({', '.join(PUBLISHED_FORMATS)})")


# --------------------------------------------------------------------------- checks


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _same_model(theirs: str, ours: str) -> bool:
    def norm(name: str) -> str:
        return name.lower().removeprefix("hf-hub:").strip("/")

    return norm(theirs) == norm(ours) or norm(theirs).split("/")[-1] == norm(ours).split("/")[-1]


def check_provenance(published: PublishedSAE, spec: PublishedSAESpec, *, model_key: str, model: ModelSpec,
                     layer: int, d_model: int) -> None:
    """Width, layer, model and normalisation of the checkpoint against the spec's model."""
    where = f"{published.source} (for models.{model_key}, layer {layer})"
    if published.sae.d_model != d_model:
        raise PublishedSAEMismatch(f"{where}: the SAE reads {published.sae.d_model}-wide activations, the model's "
                                   f"layer {layer} is {d_model} wide")
    if published.layer is not None and published.layer != layer:
        raise PublishedSAEMismatch(f"{where}: the checkpoint was trained on layer {published.layer}, not {layer}")
    expected = spec.model_name or model.source or ""
    if published.model_name and not _same_model(published.model_name, expected):
        raise PublishedSAEMismatch(
            f"{where}: the checkpoint was trained on {published.model_name!r}, the spec's model is {expected!r}; "
            f"if they are the same model, set `model_name: {published.model_name}`")
    if published.normalization != "none":
        raise PublishedSAEMismatch(f"{where}: normalisation {published.normalization!r} is not supported")


@dataclass(frozen=True)
class Measured:
    l0: float
    fvu: float
    n_rows: int


@torch.no_grad()
def measure(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> Measured:
    """L0 (mean active features per row) and the centred FVU Σ‖x − x̂‖² / Σ‖x − x̄‖² over all rows."""
    n, active, sse = 0, 0.0, 0.0
    sum_d: Tensor | None = None
    sum_sq = 0.0
    for x_nd in batches:
        x_nd = x_nd.to(sae.b_dec_d.device, torch.float32)
        xhat_nd, f_nf = sae(x_nd)
        x64 = x_nd.double()
        active += float((f_nf > 0).sum())
        sse += float(((x64 - xhat_nd.double()) ** 2).sum())
        sum_sq += float((x64 * x64).sum())
        sum_d = x64.sum(0) if sum_d is None else sum_d + x64.sum(0)
        n += x_nd.shape[0]
    if n == 0 or sum_d is None:
        raise ValueError("no activations to measure the SAE on")
    baseline = sum_sq - float(sum_d @ sum_d) / n
    return Measured(active / n, sse / baseline if baseline > 0 else math.inf, n)


def verify_stated_metrics(published: PublishedSAE, spec: PublishedSAESpec, measured: Measured) -> None:
    """Refuse a checkpoint whose recomputed L0 or FVU is far from what it states."""
    stated = published.stated
    problems = []
    if stated.l0 is not None and abs(measured.l0 - stated.l0) > spec.l0_rtol * stated.l0:
        problems.append(f"L0 {measured.l0:.1f} measured, {stated.l0:.1f} stated")
    if stated.fvu is not None and abs(measured.fvu - stated.fvu) > spec.fvu_atol:
        problems.append(f"FVU {measured.fvu:.3f} measured, {stated.fvu:.3f} stated")
    if not problems:
        return
    sae = published.sae
    loaded_as = f"{sae.kind}" + (f", k={sae.k}" if sae.k else "")
    raise PublishedSAEMismatch(
        f"{published.source}: {'; '.join(problems)} (stated in {stated.where}; measured on {measured.n_rows:,} "
        f"recorded rows). It loaded as {loaded_as} with normalisation {published.normalization!r}: the activation "
        "or k in its config is likely not the one it was trained with, or its inputs need a normalisation the "
        "checkpoint does not record, or it belongs to another model or layer.")
