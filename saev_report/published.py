"""Published SAEs: read saev and SAELens checkpoints, build saev-report SAEs from them, check them.

A published checkpoint is read by the reader of its format (`FORMATS`, found by what the
folder holds) into a neutral `PublishedSAE`: the weights in saev-report's orientation and
encoder convention, the kind and k, the normalisation it was trained with, and what the
checkpoint says about itself (model, layer, dataset, L0 / MSE / FVU). Then

- `check_declared` compares it with what the user declares (model, layer, normalisation,
  kind, k) and names both values of every disagreement;
- `to_sparse_autoencoder` builds a `SparseAutoencoder` with the same function;
- `check_loaded` recomputes L0, MSE and FVU on given activations (`acts_nd`) and compares
  them with the stated metrics: an SAE that loads "successfully" but with the wrong k or
  the wrong normalisation (SAELens PRs #308 and #608: a TopK SAE read as ReLU, L0 ≈ 600
  instead of 80) is refused with a message.

Conventions, once: saev-report computes `pre = (x_n − b_dec) W_encᵀ + b_enc` on normalised
activations `x_n = (x − mean) · scale`, and decodes `x̂ = (f W_dec + b_dec) / scale + mean`.
saev ≥ Aug 2025 and SAELens with `apply_b_dec_to_input: false` do not subtract b_dec in the
encoder; their b_enc is folded (`b_enc + W_enc b_dec`). Layers are saev-report's: layer L is
the output of block L counted from 1, so saev's and TransformerLens's block index N (from 0)
is layer N + 1. See docs/guides/published-saes.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from saev_report.errors import InputUnavailable, UserError
from saev_report.sae import KINDS, SparseAutoencoder, save_sae
from saev_report.spec import SpecModel


class PublishedSAEError(UserError):
    """A published checkpoint that cannot be used as declared: bad input, exit code 2."""

    exit_code = 2


class UnsupportedCheckpoint(PublishedSAEError):
    """A checkpoint whose architecture or normalisation saev-report cannot reproduce (yet)."""


class DeclarationMismatch(PublishedSAEError):
    """The checkpoint was trained on another model, layer or normalisation than declared."""


class LoadCheckFailed(PublishedSAEError):
    """The loaded SAE does not behave as the checkpoint says it did: it is not loaded as trained."""


# --------------------------------------------------------------------------- the neutral record

Normalization = Literal["none", "mean_and_scale", "scale", "per_token_norm", "layer_norm", "unrecorded"]
NORMALIZATIONS: dict[str, str] = {
    "none": "raw activations",
    "mean_and_scale": "subtract a mean activation, then scale so the mean norm is √d (saev-report, saev 0.1.0's loader)",
    "scale": "multiply by one factor so the mean norm is √d, no centring (SAELens `expected_average_only_in`)",
    "per_token_norm": "each token rescaled to norm √d (SAELens `constant_norm_rescale`)",
    "layer_norm": "each token layer-normalised (SAELens `layer_norm`)",
    "unrecorded": "normalised by the trainer's data loader; the checkpoint does not store how (saev 0.1.0)",
}
"""Every normalisation a published checkpoint may have been trained with."""

PER_TOKEN_NORMALIZATIONS = ("per_token_norm", "layer_norm")

EncoderInput = Literal["x_minus_b_dec", "x", "unknown"]


@dataclass(frozen=True)
class StatedMetrics:
    """What the publisher states about the SAE, and where it says so."""

    l0: float | None = None
    mse: float | None = None  # mean over patches and coordinates of (x − x̂)², raw activations
    fvu: float | None = None
    source: str = ""
    mse_is_upper_bound: bool = False  # saev's Matryoshka eval averages the MSE over sampled prefixes
    mse_space: Literal["raw", "normalized"] = "raw"  # normalized: in the space the SAE trained in (saev 0.1.0, the paper)


@dataclass
class PublishedSAE:
    """One published SAE, read into saev-report's orientation and conventions."""

    source: str  # file or folder it was read from (with the hub repo id when from the cache)
    format: str  # key of FORMATS
    kind: str  # relu | topk | batchtopk | jumprelu
    k: int | None
    W_enc_fd: Tensor  # F × d
    W_dec_fd: Tensor  # F × d
    b_enc_f: Tensor  # saev-report's convention when encoder_input == "x_minus_b_dec"; raw otherwise
    b_dec_d: Tensor
    threshold_f: Tensor | None = None  # per-feature JumpReLU threshold (BatchTopK: all equal)
    encoder_input: EncoderInput = "x_minus_b_dec"
    normalization: Normalization = "none"
    act_mean_d: Tensor | None = None
    act_scale: float | None = None  # None with `scale` / `mean_and_scale`: not stored, estimated from acts
    topk_keeps_negative: bool = False  # saev's TopK keeps negative top-k values; saev-report's zeros them
    model: str | None = None
    layer: int | None = None  # saev-report's numbering
    hook: str | None = None
    dataset: str | None = None
    stated: StatedMetrics = field(default_factory=StatedMetrics)
    notes: list[str] = field(default_factory=list)

    @property
    def d_model(self) -> int:
        return int(self.W_enc_fd.shape[1])

    @property
    def n_features(self) -> int:
        return int(self.W_enc_fd.shape[0])

    def describe(self) -> str:
        sparsity = f" k={self.k}" if self.k else ""
        return f"{self.source} ({self.format}: {self.kind}{sparsity}, d={self.d_model}, F={self.n_features})"


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    """A checkpoint format: how to recognise its folder and how to read one SAE from it."""

    name: str
    description: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, Selection], PublishedSAE]


@dataclass(frozen=True)
class Selection:
    """Which SAE of a folder holding several: a run id / sub-folder, or a layer (saev-report's)."""

    select: str | None = None
    layer: int | None = None


SAEV_FILE = "sae.pt"
SAEV_MANIFEST = "manifest.jsonl"
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def _fail_shape(where: str, name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    raise UnsupportedCheckpoint(f"{where}: {name} has shape {got}, expected {expected} from its config")


# ----------------------------------------------------------------- saev (OSU-NLP-Group/saev)

# saev's activation classes → saev-report kinds.
SAEV_ACTIVATIONS = {"Relu": "relu", "TopK": "topk", "BatchTopK": "batchtopk"}


def read_saev_file(path: Path, stated: StatedMetrics | None = None, layer: int | None = None) -> PublishedSAE:
    """One `sae.pt`: a JSON header line, then a torch state dict (read with weights_only=True).

    Headers: no `schema` (saev 0.1.0: d_vit, exp_factor; ReLU; encoder subtracts b_dec), schema 1
    (written both before and after saev stopped subtracting b_dec, 2025-07-31), schemas 2–5
    (`cfg.activation = {cls, params}`; encoder does not subtract b_dec).
    """
    where = str(path)
    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.readline().decode("utf-8"))
            state = torch.load(io.BytesIO(fh.read()), weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise InputUnavailable(f"{where}: no such checkpoint") from None
    except (ValueError, UnicodeDecodeError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise UnsupportedCheckpoint(f"{where}: not a saev checkpoint (a JSON header line, then a torch state dict): {exc}") from None
    if not isinstance(header, dict) or not isinstance(state, dict):
        raise UnsupportedCheckpoint(f"{where}: not a saev checkpoint (a JSON header line, then a torch state dict)")
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") if name not in state]
    if missing:
        raise UnsupportedCheckpoint(f"{where}: not a saev SparseAutoencoder checkpoint (missing {', '.join(missing)})")

    schema = header.get("schema")
    notes: list[str] = []
    if schema is None:  # saev 0.1.0
        cfg, activation, params = header, "Relu", {}
        encoder_input: EncoderInput = "x_minus_b_dec"
        normalization: Normalization = "unrecorded"
        notes.append("saev 0.1.0 centres and scales activations in its data loader and does not store the statistics")
    elif schema == 1:
        cfg = dict(header.get("cfg") or {})
        cls = header.get("cls", "SparseAutoencoderConfig")
        if cls in SAEV_ACTIVATIONS:
            activation, params = cls, {"top_k": cfg.get("top_k", 32)}
        else:
            activation, params = _saev_activation(cfg.get("activation"), where)
        encoder_input = "unknown"
        normalization = "unrecorded"
    elif isinstance(schema, int) and 2 <= schema <= 5:
        cfg = dict(header.get("cfg") or {})
        activation, params = _saev_activation(cfg.get("activation"), where)
        encoder_input = "x"
        normalization = "none"  # saev HEAD's shuffled loader has no normalisation (scale_norm is not implemented)
    else:
        raise UnsupportedCheckpoint(f"{where}: saev header schema {schema!r} is newer than this reader (knows none, 1–5)")
    if activation not in SAEV_ACTIVATIONS:
        raise UnsupportedCheckpoint(f"{where}: saev activation {activation!r} has no saev-report kind (known: {', '.join(SAEV_ACTIVATIONS)})")
    kind = SAEV_ACTIVATIONS[activation]
    ignored = sorted(set(state) - {"W_enc", "b_enc", "W_dec", "b_dec", "activation.threshold"})
    if ignored:
        notes.append(f"tensors not read: {', '.join(ignored)}")

    W_enc_df, W_dec_fd = state["W_enc"], state["W_dec"]
    d_model = int(cfg.get("d_model") or cfg.get("d_vit") or W_enc_df.shape[0])
    n_features = int(cfg.get("d_sae") or d_model * int(cfg.get("exp_factor") or 0) or W_enc_df.shape[1])
    if tuple(W_enc_df.shape) != (d_model, n_features):
        _fail_shape(where, "W_enc", tuple(W_enc_df.shape), (d_model, n_features))
    if tuple(W_dec_fd.shape) != (n_features, d_model):
        _fail_shape(where, "W_dec", tuple(W_dec_fd.shape), (n_features, d_model))
    k = int(params["top_k"]) if kind in ("topk", "batchtopk") and "top_k" in params else None
    threshold_f = None
    if kind == "batchtopk":
        threshold = float(state["activation.threshold"]) if "activation.threshold" in state else 0.0
        threshold_f = torch.full((n_features,), max(threshold, 0.0))
    return PublishedSAE(
        source=where,
        format="saev",
        kind=kind,
        k=k,
        W_enc_fd=_f32(W_enc_df.t()),
        W_dec_fd=_f32(W_dec_fd),
        b_enc_f=_f32(state["b_enc"]),
        b_dec_d=_f32(state["b_dec"]),
        threshold_f=threshold_f,
        encoder_input=encoder_input,
        normalization=normalization,
        topk_keeps_negative=kind == "topk",
        layer=layer,
        stated=stated or StatedMetrics(),
        notes=notes,
    )


def _saev_activation(payload: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(payload, dict) or "cls" not in payload:
        raise UnsupportedCheckpoint(f"{where}: saev header has no `cfg.activation` {{cls, params}}")
    return str(payload["cls"]), dict(payload.get("params") or {})


def _detect_saev(folder: Path) -> bool:
    return (folder / SAEV_FILE).is_file() or (folder / SAEV_MANIFEST).is_file()


def _read_saev_folder(folder: Path, selection: Selection) -> PublishedSAE:
    """A single-checkpoint repo (`sae.pt`) or a multi-checkpoint one (`manifest.jsonl` with
    `layer_N/<run_id>/sae.pt` entries stating run_id, layer, l0, mse, sha256, path)."""
    if not (folder / SAEV_MANIFEST).is_file():
        return read_saev_file(folder / SAEV_FILE)
    entries = _read_manifest(folder / SAEV_MANIFEST)
    entry = _select_manifest_entry(folder, entries, selection)
    path = folder / entry["path"]
    if not path.is_file():
        raise InputUnavailable(f"{folder / SAEV_MANIFEST}: entry {entry['run_id']} names {entry['path']}, which is not on disk")
    if entry.get("sha256") and _sha256(path) != entry["sha256"]:
        raise LoadCheckFailed(f"{path}: sha256 differs from {SAEV_MANIFEST}'s: the file is damaged or not the one published")
    stated = StatedMetrics(
        l0=_float_or_none(entry.get("l0")),
        mse=_float_or_none(entry.get("mse")),
        source=f"{SAEV_MANIFEST} entry {entry['run_id']}",
        mse_is_upper_bound=True,
    )
    pub = read_saev_file(path, stated=stated, layer=int(entry["layer"]) + 1)
    pub.notes.append(f"manifest layer {entry['layer']} (saev counts blocks from 0) is saev-report layer {int(entry['layer']) + 1}")
    return pub


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    entries = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise UnsupportedCheckpoint(f"{path}:{line_no}: not a JSON line: {exc}") from None
        missing = [key for key in ("run_id", "layer", "path") if key not in entry]
        if missing:
            raise UnsupportedCheckpoint(f"{path}:{line_no}: manifest entry lacks {', '.join(missing)}")
        entries.append(entry)
    if not entries:
        raise UnsupportedCheckpoint(f"{path}: empty manifest")
    return entries


def _select_manifest_entry(folder: Path, entries: list[dict[str, Any]], selection: Selection) -> dict[str, Any]:
    chosen = entries
    if selection.select is not None:
        chosen = [e for e in chosen if e["run_id"] == selection.select or e["path"] == selection.select]
    if selection.layer is not None:
        chosen = [e for e in chosen if int(e["layer"]) + 1 == selection.layer]
    if len(chosen) == 1:
        return chosen[0]
    listing = "\n".join(
        f"  {e['run_id']}: saev layer {e['layer']} (saev-report layer {int(e['layer']) + 1}), L0 {e.get('l0')}, MSE {e.get('mse')}"
        for e in entries
    )
    asked = ", ".join(part for part in (
        f"select={selection.select!r}" if selection.select is not None else "",
        f"layer={selection.layer}" if selection.layer is not None else "",
    ) if part) or "nothing"
    what = "none matches" if not chosen else f"{len(chosen)} match"
    raise PublishedSAEError(f"{folder}: {SAEV_MANIFEST} lists {len(entries)} SAEs and {what} ({asked}); choose one by run id (select):\n{listing}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


# ----------------------------------------------------------------- SAELens

# SAELens `normalize_activations` → normalisation.
SAELENS_NORMALIZATIONS: dict[str, Normalization] = {
    "none": "none",
    "expected_average_only_in": "scale",
    "constant_norm_rescale": "per_token_norm",
    "layer_norm": "layer_norm",
}
# SAELens architectures → saev-report kinds (BatchTopK and Matryoshka BatchTopK are saved as JumpReLU).
SAELENS_ARCHITECTURES = {"standard": "relu", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu", "matryoshka_batchtopk": "batchtopk"}
_HOOK_BLOCK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|mid|post)")


def _detect_saelens(folder: Path) -> bool:
    return (folder / SAELENS_CFG).is_file() and (folder / SAELENS_WEIGHTS).is_file()


def _saelens_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """SAELens configs of every version in one shape (its own `handle_pre_6_0_config` renames)."""
    flat = dict(cfg)
    for nested in ("metadata", "meta"):
        if isinstance(cfg.get(nested), dict):
            flat = {**cfg[nested], **{k: v for k, v in flat.items() if k != nested}}
    renames = {"hook_point": "hook_name", "hook_point_layer": "hook_layer", "activation_fn_str": "activation_fn"}
    flat = {renames.get(key, key): value for key, value in flat.items()}
    normalize = flat.get("normalize_activations")
    if isinstance(normalize, bool):
        flat["normalize_activations"] = "expected_average_only_in" if normalize else "none"
    elif normalize is None:
        flat["normalize_activations"] = "none"
    flat.setdefault("architecture", "standard")
    flat.setdefault("apply_b_dec_to_input", True)
    # Before SAELens 6 a TopK SAE was `architecture: standard` with `activation_fn: topk` and its k in
    # `activation_fn_kwargs`: read as standard it is a ReLU SAE (PRs #308, #608: L0 ≈ 600 instead of 80).
    if flat["architecture"] == "standard" and flat.get("activation_fn") == "topk":
        flat["architecture"] = "topk"
    if "k" not in flat and isinstance(flat.get("activation_fn_kwargs"), dict) and "k" in flat["activation_fn_kwargs"]:
        flat["k"] = flat["activation_fn_kwargs"]["k"]
    return flat


def _read_saelens_folder(folder: Path, selection: Selection) -> PublishedSAE:
    """`cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`: log10 firing frequency per feature)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = str(folder)
    try:
        cfg = _saelens_config(json.loads((folder / SAELENS_CFG).read_text()))
    except ValueError as exc:
        raise UnsupportedCheckpoint(f"{folder / SAELENS_CFG}: not JSON: {exc}") from None
    try:
        state = load_file(str(folder / SAELENS_WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise UnsupportedCheckpoint(f"{folder / SAELENS_WEIGHTS}: not a readable safetensors file: {exc}") from None
    architecture = cfg["architecture"]
    if architecture not in SAELENS_ARCHITECTURES:
        raise UnsupportedCheckpoint(f"{where}: SAELens architecture {architecture!r} has no saev-report kind (known: {', '.join(SAELENS_ARCHITECTURES)})")
    kind = SAELENS_ARCHITECTURES[architecture]
    trained_as = cfg.get("training_architecture")  # SAELens ≥ 6 keeps what a JumpReLU-saved SAE trained as
    details = cfg.get("training_architecture_details") if isinstance(cfg.get("training_architecture_details"), dict) else {}
    if kind == "jumprelu" and SAELENS_ARCHITECTURES.get(trained_as) == "batchtopk":
        kind = "batchtopk"
        cfg.setdefault("k", details.get("k"))
    activation_fn = cfg.get("activation_fn")
    if activation_fn not in (None, "relu", "topk"):  # SAELens < 6 also had e.g. tanh-relu
        raise UnsupportedCheckpoint(f"{where}: SAELens activation_fn {activation_fn!r} has no saev-report kind (relu and topk do)")
    normalization_key = str(cfg["normalize_activations"])
    if normalization_key not in SAELENS_NORMALIZATIONS:
        raise UnsupportedCheckpoint(f"{where}: SAELens normalize_activations {normalization_key!r} is unknown (known: {', '.join(SAELENS_NORMALIZATIONS)})")
    missing = [name for name in ("W_enc", "b_enc", "W_dec", "b_dec") if name not in state]
    if missing:
        raise UnsupportedCheckpoint(f"{where}: {SAELENS_WEIGHTS} lacks {', '.join(missing)}")
    d_model, n_features = int(cfg.get("d_in") or state["W_enc"].shape[0]), int(cfg.get("d_sae") or state["W_enc"].shape[1])
    if tuple(state["W_enc"].shape) != (d_model, n_features):
        _fail_shape(where, "W_enc", tuple(state["W_enc"].shape), (d_model, n_features))
    if tuple(state["W_dec"].shape) != (n_features, d_model):
        _fail_shape(where, "W_dec", tuple(state["W_dec"].shape), (n_features, d_model))
    W_enc_fd, b_enc_f = _f32(state["W_enc"].t()), _f32(state["b_enc"])
    W_dec_fd, b_dec_d = _f32(state["W_dec"]), _f32(state["b_dec"])
    notes: list[str] = []
    if "scaling_factor" in state or "finetuning_scaling_factor" in state:  # decode multiplies f by it: fold into W_dec
        scaling_f = _f32(state.get("finetuning_scaling_factor", state.get("scaling_factor")))
        W_dec_fd = W_dec_fd * scaling_f[:, None]
        notes.append("finetuning scaling factor folded into W_dec")
    if cfg.get("rescale_acts_by_decoder_norm"):  # pre ⊙ ‖W_dec‖ then f / ‖W_dec‖ in decode: fold both
        norms_f = W_dec_fd.norm(dim=1)
        W_enc_fd, b_enc_f, W_dec_fd = W_enc_fd * norms_f[:, None], b_enc_f * norms_f, W_dec_fd / norms_f.clamp(min=1e-12)[:, None]
        notes.append("rescale_acts_by_decoder_norm folded into W_enc, b_enc and W_dec")
    threshold_f = _f32(state["threshold"]) if "threshold" in state else None
    known = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "topk_threshold", "scaling_factor", "finetuning_scaling_factor"}
    if set(state) - known:
        notes.append(f"tensors not read: {', '.join(sorted(set(state) - known))}")
    if kind == "jumprelu" and threshold_f is None:
        raise UnsupportedCheckpoint(f"{where}: a jumprelu SAE without a `threshold` tensor")
    if kind == "batchtopk" and threshold_f is None and "topk_threshold" in state:
        threshold_f = torch.full((n_features,), float(state["topk_threshold"]))
    k = round(cfg["k"]) if kind in ("topk", "batchtopk") and cfg.get("k") is not None else None  # BatchTopK's k is a mean
    if kind == "topk" and k is None:
        raise UnsupportedCheckpoint(f"{where}: a topk SAE whose config states no k")
    hook = cfg.get("hook_name")
    layer = _layer_from_hook(hook, cfg.get("hook_layer"))
    stated = StatedMetrics()
    if (folder / SAELENS_SPARSITY).is_file():
        log_freq_f = load_file(str(folder / SAELENS_SPARSITY)).get("sparsity")
        if log_freq_f is not None:  # SAELens stores log10(firing frequency + 1e-10): L0 is their sum
            stated = StatedMetrics(l0=float(torch.pow(10.0, log_freq_f.double()).sum()), source=SAELENS_SPARSITY)
    return PublishedSAE(
        source=where,
        format="saelens",
        kind=kind,
        k=k,
        W_enc_fd=W_enc_fd,
        W_dec_fd=W_dec_fd,
        b_enc_f=b_enc_f,
        b_dec_d=b_dec_d,
        threshold_f=threshold_f,
        encoder_input="x_minus_b_dec" if cfg["apply_b_dec_to_input"] else "x",
        normalization=SAELENS_NORMALIZATIONS[normalization_key],
        act_mean_d=None,
        model=cfg.get("model_name"),
        layer=layer,
        hook=hook,
        dataset=cfg.get("dataset_path"),
        stated=stated,
        notes=notes,
    )


def _layer_from_hook(hook: Any, hook_layer: Any) -> int | None:
    """TransformerLens / vit_prisma hook names count blocks from 0: resid_post of block N is layer N + 1."""
    match = _HOOK_BLOCK.search(str(hook or ""))
    if match:
        block = int(match.group(1))
        return block if match.group(2) == "pre" else block + 1
    return int(hook_layer) + 1 if isinstance(hook_layer, int) else None


# ----------------------------------------------------------------- saev-report's own


def _detect_saev_report(folder: Path) -> bool:
    from saev_report.sae import CONFIG_FILE, WEIGHT_FILE

    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHT_FILE).is_file()


def _read_saev_report_folder(folder: Path, selection: Selection) -> PublishedSAE:
    from saev_report.sae import load_sae, read_sae_config

    sae, config = load_sae(folder), read_sae_config(folder)
    model, layer = None, None
    match = re.fullmatch(r"(?P<model>[^/]+)/L(?P<layer>\d+)/.+", str(config.get("sae_id", "")))
    if match:
        model, layer = match["model"], int(match["layer"])
    normalized = config.get("normalize", bool((sae.act_mean_d != 0).any() or sae.act_scale != 1))
    threshold_f = torch.full((sae.n_features,), float(sae.threshold)) if sae.kind == "batchtopk" else None
    origin = config.get("published")
    if isinstance(origin, dict):  # written by save_published: what the original checkpoint said of itself
        return PublishedSAE(
            source=str(folder), format="saev-report", kind=sae.kind, k=sae.k or None,
            W_enc_fd=_f32(sae.W_enc_fd), W_dec_fd=_f32(sae.W_dec_fd), b_enc_f=_f32(sae.b_enc_f), b_dec_d=_f32(sae.b_dec_d),
            threshold_f=threshold_f, normalization=origin["normalization"], act_mean_d=_f32(sae.act_mean_d),
            act_scale=float(sae.act_scale), model=origin.get("model"), layer=origin.get("layer"), hook=origin.get("hook"),
            dataset=origin.get("dataset"), stated=StatedMetrics(**origin["stated"]),
            notes=[f"converted from {origin['source']} ({origin['format']})", *origin.get("notes", [])],
        )
    return PublishedSAE(
        source=str(folder),
        format="saev-report",
        kind=sae.kind,
        k=sae.k or None,
        W_enc_fd=_f32(sae.W_enc_fd),
        W_dec_fd=_f32(sae.W_dec_fd),
        b_enc_f=_f32(sae.b_enc_f),
        b_dec_d=_f32(sae.b_dec_d),
        threshold_f=threshold_f,
        normalization="mean_and_scale" if normalized else "none",
        act_mean_d=_f32(sae.act_mean_d),
        act_scale=float(sae.act_scale),
        model=model,
        layer=layer,
    )


PUBLISHED_KINDS: tuple[str, ...] = tuple(dict.fromkeys([*SAEV_ACTIVATIONS.values(), *SAELENS_ARCHITECTURES.values()]))
"""Every kind a reader can report (jumprelu needs the jumprelu kind to be built)."""

FORMATS: dict[str, Format] = {
    "saev": Format("saev", "OSU-NLP-Group/saev `sae.pt` (JSON header + torch state dict), with the DINOv3 repos' `manifest.jsonl`", _detect_saev, _read_saev_folder),
    "saelens": Format("saelens", "SAELens `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`)", _detect_saelens, _read_saelens_folder),
    "saev-report": Format("saev-report", "saev-report's own `config.json` + `sae.safetensors`", _detect_saev_report, _read_saev_report_folder),
}
"""Every checkpoint format read here, in detection order."""


# --------------------------------------------------------------------------- finding a checkpoint


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """A local file or folder, or a hub repo id (`owner/name`, optionally `owner/name/sub/folder`)
    in the local Hugging Face cache: (path on disk, how to name it in messages). Never downloads."""
    local = Path(source).expanduser()
    if local.exists():
        return local, str(local)
    text = str(source)
    parts = text.split("/")
    if len(parts) < 2 or text.startswith(("/", "./", "../", "~")):
        raise InputUnavailable(f"{text}: no such file or folder (and not a hub repo id owner/name)")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        from saev_report.backbones.hf import missing_hub_message

        raise InputUnavailable(missing_hub_message(repo_id, f"published SAE {repo_id!r}", exc, "pass the checkpoint's local path")) from None
    path = folder / subfolder if subfolder else folder
    if not path.exists():
        raise InputUnavailable(f"{text}: the cached snapshot of {repo_id} ({folder}) has no {subfolder}")
    return path, f"{text} ({path})"


def read_published(source: str | Path, selection: Selection = Selection()) -> PublishedSAE:
    """Read one published SAE from a file or folder (or hub repo id in the local cache)."""
    path, name = resolve_source(source)
    if path.is_file() and path.suffix != ".pt":  # cfg.json, a weights file: the folder is the checkpoint
        path = path.parent
    if path.is_file():
        pub = read_saev_file(path)  # the only single-file format
    else:
        for fmt in FORMATS.values():
            if fmt.detect(path):
                pub = fmt.read(path, selection)
                break
        else:
            if selection.select is not None and (path / selection.select).is_dir():
                return read_published(path / selection.select, replace(selection, select=None))
            subfolders = sorted(p.name for p in path.iterdir() if p.is_dir() and any(f.detect(p) for f in FORMATS.values()))
            if subfolders:
                raise PublishedSAEError(f"{name}: holds {len(subfolders)} SAEs; choose one (select): {', '.join(subfolders)}")
            known = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())
            raise UnsupportedCheckpoint(f"{name}: no published SAE found here (known formats: {known})")
    pub.source = name if pub.source == str(path) else pub.source
    return pub


# --------------------------------------------------------------------------- declared vs stated


class DeclaredSAE(SpecModel):
    """What the user says a published SAE is; every field left out is not checked."""

    model: str | None = None
    """The model whose activations the SAE reads, compared with the checkpoint's `model_name`
    (case and punctuation ignored), e.g. `openai/clip-vit-base-patch16`."""
    layer: int | None = Field(default=None, ge=0)
    """saev-report's layer (output of block L counted from 1); the checkpoint's block N counted
    from 0 (saev, TransformerLens hooks) is layer N + 1."""
    normalization: Normalization | None = None
    """The normalisation the SAE was trained with: `none`, `mean_and_scale` (saev-report's
    `normalize: true`), `scale`, `per_token_norm`, `layer_norm`."""
    kind: str | None = None
    """SAE kind as the checkpoint names it: relu, topk, batchtopk, jumprelu."""
    k: int | None = Field(default=None, gt=0)
    """TopK / BatchTopK k."""


    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str | None) -> str | None:
        if kind is not None and kind not in PUBLISHED_KINDS:
            raise ValueError(f"unknown kind {kind!r}; published SAEs are one of {', '.join(PUBLISHED_KINDS)}")
        return kind


def _same_name(a: str, b: str) -> bool:
    """Equal but for case and punctuation; a name without an owner matches on the last part
    (`dinov2-small` is `facebook/dinov2-small`)."""

    def plain(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    if plain(a) == plain(b):
        return True
    return ("/" not in a or "/" not in b) and plain(a.rsplit("/", 1)[-1]) == plain(b.rsplit("/", 1)[-1])


def check_declared(pub: PublishedSAE, declared: DeclaredSAE) -> None:
    """Refuse a checkpoint trained on another model, layer, normalisation, kind or k than declared."""
    problems = []
    if declared.model and pub.model and not _same_name(declared.model, pub.model):
        problems.append(f"model: declared {declared.model!r}, checkpoint trained on {pub.model!r}")
    if declared.layer is not None and pub.layer is not None and declared.layer != pub.layer:
        hook = f" (hook {pub.hook})" if pub.hook else ""
        problems.append(f"layer: declared {declared.layer}, checkpoint trained on layer {pub.layer}{hook}")
    if declared.normalization and pub.normalization != "unrecorded" and declared.normalization != pub.normalization:
        problems.append(
            f"normalisation: declared {declared.normalization!r} ({NORMALIZATIONS[declared.normalization]}), "
            f"checkpoint trained with {pub.normalization!r} ({NORMALIZATIONS[pub.normalization]})"
        )
    if declared.kind and declared.kind != pub.kind:
        problems.append(f"kind: declared {declared.kind!r}, checkpoint is {pub.kind!r}")
    if declared.k is not None and pub.k is not None and declared.k != pub.k:
        problems.append(f"k: declared {declared.k}, checkpoint states {pub.k}")
    if problems:
        raise DeclarationMismatch(f"{pub.source} is not the SAE declared:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- building the SAE


def _resolve_normalization(pub: PublishedSAE, acts_nd: Tensor | None) -> tuple[Tensor, float, str | None]:
    """(mean_d, scale, note) for saev-report's `normalize`; statistics not stored are estimated from acts."""
    d = pub.d_model
    if pub.normalization == "none":
        return torch.zeros(d), 1.0, None
    if pub.normalization in PER_TOKEN_NORMALIZATIONS:
        raise UnsupportedCheckpoint(
            f"{pub.source}: trained with {pub.normalization!r} ({NORMALIZATIONS[pub.normalization]}); saev-report's SAE "
            "normalises with one fixed mean and scale, so it cannot reproduce this SAE"
        )
    if pub.normalization == "unrecorded":
        raise UnsupportedCheckpoint(
            f"{pub.source}: {NORMALIZATIONS['unrecorded']}; declare the normalisation it was trained with: "
            "`mean_and_scale` (saev 0.1.0's default; estimated from the given activations) or `none` "
            "(the activations given are normalised already)"
        )
    mean_d = torch.zeros(d) if pub.normalization == "scale" else pub.act_mean_d
    if pub.act_scale is not None and mean_d is not None:
        return mean_d, pub.act_scale, None
    if acts_nd is None:
        raise UnsupportedCheckpoint(
            f"{pub.source}: trained with {pub.normalization!r} ({NORMALIZATIONS[pub.normalization]}) but the checkpoint "
            "does not store its statistics; give activations of the same model and layer to estimate them"
        )
    acts64_nd = acts_nd.to(torch.float64)
    if mean_d is None:
        mean_d = acts64_nd.mean(0).float()
    mean_norm = float((acts64_nd - mean_d.double()).norm(dim=1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise PublishedSAEError(f"{pub.source}: cannot estimate the normalisation: the activations' mean norm is {mean_norm}")
    scale = math.sqrt(d) / mean_norm
    return mean_d, scale, f"normalisation statistics estimated from {acts_nd.shape[0]} given activations (scale {scale:.4g})"


def _encoder_bias_f(pub: PublishedSAE, acts_nd: Tensor | None, mean_d: Tensor, scale: float) -> tuple[Tensor, str | None]:
    """b_enc in saev-report's convention: a source that does not subtract b_dec in its encoder has
    pre = x W_encᵀ + b_enc = (x − b_dec) W_encᵀ + (b_enc + W_enc b_dec)."""
    folded_f = pub.b_enc_f + pub.W_enc_fd @ pub.b_dec_d
    if pub.encoder_input == "x_minus_b_dec":
        return pub.b_enc_f, None
    if pub.encoder_input == "x" or bool((pub.b_dec_d == 0).all()):
        return folded_f, None
    # saev schema 1 was written both before and after saev stopped subtracting b_dec: the one that
    # reconstructs the given activations better is the one it was trained with.
    if acts_nd is None:
        raise UnsupportedCheckpoint(
            f"{pub.source}: saev header schema 1 does not say whether its encoder subtracts b_dec (saev changed "
            "this on 2025-07-31 without a new schema) and b_dec is not zero; give activations to decide"
        )
    fvus = {}
    for name, bias_f in (("x_minus_b_dec", pub.b_enc_f), ("x", folded_f)):
        sae = _build(replace(pub, b_enc_f=bias_f, encoder_input="x_minus_b_dec"), mean_d, scale)
        fvus[name] = measure(sae, acts_nd).fvu
    chosen = min(fvus, key=fvus.get)
    note = f"encoder convention {chosen!r} chosen by FVU on the given activations ({fvus['x_minus_b_dec']:.4g} with b_dec subtracted, {fvus['x']:.4g} without)"
    return (pub.b_enc_f if chosen == "x_minus_b_dec" else folded_f), note


def _kind_and_k(pub: PublishedSAE) -> tuple[str, int, float | None]:
    """(saev-report kind, k, inference threshold) reproducing the published activation."""
    if pub.kind in ("relu", "topk"):
        return pub.kind, pub.k or 0, None
    threshold_f = pub.threshold_f
    if threshold_f is None:
        threshold_f = torch.zeros(pub.n_features)
    if bool((threshold_f == threshold_f[0]).all()):  # relu(pre)·[pre > θ] with θ < 0 is relu: θ = 0
        # One threshold for every feature is BatchTopK's inference rule, whatever the file calls it
        # (SAELens saves BatchTopK as JumpReLU); k only matters in training.
        return "batchtopk", pub.k or max(1, round(pub.stated.l0 or 1)), max(float(threshold_f[0]), 0.0)
    if "jumprelu" in KINDS:  # pragma: no cover - wired once the kinds package lands
        return "jumprelu", 0, None
    raise UnsupportedCheckpoint(
        f"{pub.source}: a JumpReLU SAE with per-feature thresholds needs the jumprelu kind, which saev-report does not have yet"
    )


def _build(pub: PublishedSAE, mean_d: Tensor, scale: float) -> SparseAutoencoder:
    kind, k, threshold = _kind_and_k(pub)
    if kind not in KINDS:
        raise UnsupportedCheckpoint(f"{pub.source}: kind {kind!r} is not one saev-report has ({', '.join(KINDS)})")
    sae = SparseAutoencoder(pub.d_model, pub.n_features, kind, k)  # type: ignore[arg-type]
    with torch.no_grad():
        sae.W_enc_fd.copy_(pub.W_enc_fd)
        sae.W_dec_fd.copy_(pub.W_dec_fd)  # as published: not renormalised
        sae.b_enc_f.copy_(pub.b_enc_f)
        sae.b_dec_d.copy_(pub.b_dec_d)
        sae.act_mean_d.copy_(mean_d)
        sae.act_scale.fill_(scale)
        if threshold is not None:
            sae.threshold.fill_(threshold)
    return sae.eval()


def to_sparse_autoencoder(pub: PublishedSAE, acts_nd: Tensor | None = None) -> SparseAutoencoder:
    """A saev-report SAE computing what the published one computes.

    `acts_nd` (activations of the same model and layer) is needed only where the checkpoint
    leaves something open: normalisation statistics it does not store, or saev schema 1's
    encoder convention. What was decided from them is added to `pub.notes`.
    """
    mean_d, scale, note = _resolve_normalization(pub, acts_nd)
    if note:
        pub.notes.append(note)
    bias_f, note = _encoder_bias_f(pub, acts_nd, mean_d, scale)
    if note:
        pub.notes.append(note)
    return _build(replace(pub, b_enc_f=bias_f, encoder_input="x_minus_b_dec"), mean_d, scale)


# --------------------------------------------------------------------------- checking what was loaded


@dataclass(frozen=True)
class Measured:
    """L0, MSE and FVU of an SAE on a set of activations (raw space, float64 sums)."""

    n: int
    l0: float  # mean number of features with f > 0 per patch
    mse: float  # mean over patches and coordinates of (x − x̂)²
    mse_normalized: float  # the same in the SAE's normalised space ((x − mean) · scale)
    fvu: float  # Σ‖x − x̂‖² / Σ‖x − x̄‖²: centred
    negative_topk_fraction: float  # share of top-k pre-activations that are negative (kept by saev, zeroed here)


@torch.no_grad()
def measure(sae: SparseAutoencoder, acts_nd: Tensor, batch_size: int = 4096) -> Measured:
    n, d = acts_nd.shape
    if n < 2:
        raise PublishedSAEError(f"need at least 2 activations to measure an SAE, got {n}")
    if d != sae.d_model:
        raise PublishedSAEError(f"activations are {d} wide but the SAE reads {sae.d_model}")
    sum_d = torch.zeros(d, dtype=torch.float64)
    sum_sq = sse = 0.0
    scale = float(sae.act_scale)
    n_fired = n_negative = 0
    for start in range(0, n, batch_size):
        x_nd = acts_nd[start : start + batch_size].to(torch.float32)
        xhat_nd, f_nf = sae(x_nd)
        x64_nd = x_nd.double()
        sum_d += x64_nd.sum(0)
        sum_sq += float(x64_nd.pow(2).sum())
        sse += float((x64_nd - xhat_nd.double()).pow(2).sum())
        n_fired += int((f_nf > 0).sum())
        if sae.kind == "topk":
            top_nk = sae.pre_activations_normalized(sae.normalize(x_nd)).topk(sae.k, dim=1).values
            n_negative += int((top_nk < 0).sum())
    sst = sum_sq - float(sum_d.dot(sum_d)) / n
    fvu = sse / sst if sst > 0 else math.inf
    negative_fraction = n_negative / (n * sae.k) if sae.kind == "topk" else 0.0
    return Measured(n, n_fired / n, sse / (n * d), sse * scale * scale / (n * d), fvu, negative_fraction)


class CheckTolerance(SpecModel):
    """How far a published SAE's behaviour on the given activations may be from what it states.

    The activations are rarely the ones the publisher evaluated on, so only gross disagreements
    are errors: the bugs this catches (a wrong k, a wrong normalisation, a wrong activation) move
    L0 or the error by large factors."""

    l0_ratio: float = Field(default=1.5, gt=1)
    """Recomputed and stated L0 may differ by at most this factor either way."""
    mse_ratio: float = Field(default=2.0, gt=1)
    """Recomputed and stated MSE (or FVU) may differ by at most this factor (only upwards where
    the stated MSE is an upper bound, as saev's Matryoshka evaluations)."""
    max_fvu: float = Field(default=1.0, gt=0)
    """A loaded SAE must explain variance: FVU above this (1 = no better than the mean) is refused."""
    max_negative_topk_fraction: float = Field(default=0.01, ge=0, le=1)
    """saev's TopK keeps negative top-k values, saev-report's zeros them: refused above this share."""


@dataclass(frozen=True)
class LoadCheck:
    """The outcome of `check_loaded`: what was measured, against what was stated."""

    measured: Measured
    stated: StatedMetrics
    lines: list[str]  # one per comparison, for the CLI


def _ratio_line(name: str, got: float, stated: float, ratio: float, upper_bound: bool) -> tuple[str, bool]:
    low_ok = upper_bound or got >= stated / ratio
    ok = low_ok and got <= stated * ratio
    bound = "at most " if upper_bound else ""
    return f"{name} {got:.4g} against {bound}{stated:.4g} stated (factor {ratio:g} allowed): {'ok' if ok else 'MISMATCH'}", ok


DEFAULT_TOLERANCE = CheckTolerance()


def check_loaded(pub: PublishedSAE, sae: SparseAutoencoder, acts_nd: Tensor, tolerance: CheckTolerance = DEFAULT_TOLERANCE) -> LoadCheck:
    """Recompute L0, MSE and FVU on `acts_nd` and compare them with what the checkpoint states;
    raise LoadCheckFailed naming each disagreement."""
    got = measure(sae, acts_nd)
    stated = pub.stated
    lines, failures = [], []

    def compare(line: str, ok: bool, hint: str) -> None:
        lines.append(line)
        if not ok:
            failures.append(f"{line} — {hint}")

    where = f" ({stated.source})" if stated.source else ""
    if stated.l0 is not None:
        compare(*_ratio_line(f"L0{where}", got.l0, stated.l0, tolerance.l0_ratio, False), "a wrong k or activation function?")
    if stated.mse is not None:
        got_mse = got.mse_normalized if stated.mse_space == "normalized" else got.mse
        space = " (normalised space)" if stated.mse_space == "normalized" else ""
        compare(*_ratio_line(f"MSE{space}{where}", got_mse, stated.mse, tolerance.mse_ratio, stated.mse_is_upper_bound), "a wrong normalisation, k or activation?")
    if stated.fvu is not None:
        compare(*_ratio_line(f"FVU{where}", got.fvu, stated.fvu, tolerance.mse_ratio, False), "a wrong normalisation?")
    compare(
        f"FVU {got.fvu:.4g} (at most {tolerance.max_fvu:g}): {'ok' if got.fvu <= tolerance.max_fvu else 'MISMATCH'}",
        got.fvu <= tolerance.max_fvu,
        "reconstructs worse than the activations' mean: a wrong normalisation, layer or model?",
    )
    if pub.topk_keeps_negative and sae.kind == "topk":
        ok = got.negative_topk_fraction <= tolerance.max_negative_topk_fraction
        compare(
            f"negative top-k values {got.negative_topk_fraction:.2%} (at most {tolerance.max_negative_topk_fraction:.2%}): {'ok' if ok else 'MISMATCH'}",
            ok,
            "saev keeps them and saev-report zeros them, so the features differ",
        )
    if failures:
        raise LoadCheckFailed(
            f"{pub.describe()} does not behave as stated on {got.n} given activations:\n  " + "\n  ".join(failures)
        )
    return LoadCheck(got, stated, lines)


# --------------------------------------------------------------------------- all together


class PublishedSAESpec(SpecModel):
    """A published SAE to use instead of training one: where it is, what it is, how to check it."""

    source: str
    """A local file or folder, or a hub repo id in the local Hugging Face cache (`owner/name`, or
    `owner/name/sub/folder` for one SAE of a repo holding several)."""
    select: str | None = None
    """Which SAE of a folder holding several: a saev manifest run id or a SAELens sub-folder."""
    declared: DeclaredSAE = DeclaredSAE()
    """What the SAE is said to be: checked against the checkpoint."""
    stated_l0: float | None = None
    """L0 the publisher states elsewhere (a model card, a paper table), if the checkpoint does not."""
    stated_mse: float | None = None
    """MSE (mean over patches and coordinates) stated elsewhere."""
    stated_mse_space: Literal["raw", "normalized"] = "raw"
    """Where `stated_mse` was measured: on raw activations, or in the SAE's normalised space (the
    paper's Table 1 and saev 0.1.0 report the latter)."""
    stated_fvu: float | None = None
    """FVU stated elsewhere."""
    act_scale: float | None = Field(default=None, gt=0)
    """The normalisation scale, where the checkpoint does not store it (SAELens keeps it in its
    release registry as `norm_scaling_factor`); estimated from the given activations otherwise."""
    tolerance: CheckTolerance = DEFAULT_TOLERANCE
    """How far recomputed metrics may be from stated ones."""


def load_published(
    spec: PublishedSAESpec, acts_nd: Tensor | None = None, declared: DeclaredSAE | None = None
) -> tuple[SparseAutoencoder, PublishedSAE, LoadCheck | None]:
    """Read, check against the declaration, build and (given activations) check what was loaded."""
    declared = declared or spec.declared
    pub = read_published(spec.source, Selection(spec.select, declared.layer))
    if any(value is not None for value in (spec.stated_l0, spec.stated_mse, spec.stated_fvu)):
        s = pub.stated
        pub.stated = StatedMetrics(
            l0=spec.stated_l0 if spec.stated_l0 is not None else s.l0,
            mse=spec.stated_mse if spec.stated_mse is not None else s.mse,
            fvu=spec.stated_fvu if spec.stated_fvu is not None else s.fvu,
            source=", ".join(filter(None, (s.source, "declared"))),
            mse_is_upper_bound=s.mse_is_upper_bound and spec.stated_mse is None,
            mse_space=spec.stated_mse_space if spec.stated_mse is not None else s.mse_space,
        )
    if spec.act_scale is not None:
        pub.act_scale = spec.act_scale
    check_declared(pub, declared)
    if pub.normalization == "unrecorded" and declared.normalization is not None:
        pub.normalization = declared.normalization
        pub.notes.append(f"normalisation {declared.normalization!r} as declared (the checkpoint does not record it)")
    sae = to_sparse_autoencoder(pub, acts_nd)
    check = check_loaded(pub, sae, acts_nd, spec.tolerance) if acts_nd is not None else None
    return sae, pub, check


def save_published(
    sae: SparseAutoencoder, pub: PublishedSAE, check: LoadCheck | None, out_dir: Path, sae_id: str | None = None
) -> Path:
    """Write a published SAE as a saev-report checkpoint (`save_sae`), so every stage that reads
    trained SAEs reads it unchanged; `config.json` keeps where it came from, what it stated and
    how it was checked (`published`), and the saev-report reader gives that back."""
    origin = {
        "source": pub.source, "format": pub.format, "kind": pub.kind, "k": pub.k, "normalization": pub.normalization,
        "model": pub.model, "layer": pub.layer, "hook": pub.hook, "dataset": pub.dataset,
        "stated": asdict(pub.stated), "notes": list(pub.notes),
        "measured": asdict(check.measured) if check else None, "check": list(check.lines) if check else None,
    }
    extra: dict[str, Any] = {"normalize": pub.normalization != "none", "published": origin}
    if sae_id is not None:
        extra["sae_id"] = sae_id
    return save_sae(sae, Path(out_dir), extra)
