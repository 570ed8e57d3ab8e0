"""SAE checkpoints: our own format (`sae.safetensors` + `config.json`) and the paper's
reference code's (saev 0.1.0 `nn.dump`)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from saev_report.fsutil import atomic_write_bytes, atomic_write_text
from saev_report.sae.base import SparseAutoencoder
from saev_report.sae.registry import kind_named

CHECKPOINT_FORMAT = 2  # 2: the kind's parameters under `params`


WEIGHT_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


def save_sae(sae: SparseAutoencoder, out_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `sae.safetensors` and `config.json` (each atomically; the config last)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    # Serialised in memory and written by Python: safetensors' own file writer hides the errno
    # of a full disk in its message (`os error 28`), Python's keeps it.
    atomic_write_bytes(out_dir / WEIGHT_FILE, save(tensors))
    config = {"format": CHECKPOINT_FORMAT, **sae.config(), **(extra or {})}
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def load_sae(sae_dir: Path, device: torch.device | str = "cpu") -> SparseAutoencoder:
    """Load a checkpoint written by `save_sae`, in eval mode."""
    sae_dir = Path(sae_dir)
    config = json.loads((sae_dir / CONFIG_FILE).read_text())
    sae = SparseAutoencoder(config["d_model"], config["n_features"], config["kind"], params=checkpoint_params(config))
    sae.load_state_dict(load_file(str(sae_dir / WEIGHT_FILE)))
    return sae.to(device).eval()


def checkpoint_params(config: dict[str, Any]) -> Any:
    """The kind's `Params` of a checkpoint; older checkpoints (no `params`) kept them at the top level."""
    params_model = kind_named(config["kind"]).Params
    if "params" in config:
        return params_model.model_validate(config["params"])
    return params_model(**{name: config[name] for name in params_model.model_fields if name in config})


def read_sae_config(sae_dir: Path) -> dict[str, Any]:
    return json.loads((Path(sae_dir) / CONFIG_FILE).read_text())


# saev 0.1.0 (`saev.nn.dump`) parameter names → ours. Its W_enc is [d_vit, d_sae] (our
# `W_enc_df` view) and its W_dec [d_sae, d_vit], as ours.
REFERENCE_NAMES = {"W_enc": "W_enc_df", "b_enc": "b_enc_f", "W_dec": "W_dec_fd", "b_dec": "b_dec_d"}  # W_enc_df: a view


def load_reference_checkpoint(
    path: Path, act_mean_d: Tensor | None = None, act_scale: float = 1.0, device: torch.device | str = "cpu"
) -> SparseAutoencoder:
    """Load a checkpoint of the paper's reference code (saev 0.1.0 `nn.dump`): one JSON line
    with its config, then a torch state dict (read with `weights_only=True`).

    saev normalises activations in its data loader, not in the SAE, so the checkpoint holds
    no normalisation; pass the statistics the SAE was trained with (`act_mean_d`, and
    `act_scale` = 1 / saev's `scalar`) or feed it activations normalised the same way.
    """
    with open(path, "rb") as fh:
        header = json.loads(fh.readline().decode("utf-8"))
        state = torch.load(io.BytesIO(fh.read()), weights_only=True, map_location="cpu")
    missing = [name for name in REFERENCE_NAMES if name not in state]
    if missing:
        raise ValueError(f"{path}: not a saev SparseAutoencoder checkpoint (missing {', '.join(missing)})")
    d_model, n_features = state["W_enc"].shape
    if "d_vit" in header and header["d_vit"] != d_model:
        raise ValueError(f"{path}: header d_vit={header['d_vit']} but W_enc is {tuple(state['W_enc'].shape)}")
    # saev's `sparsity_coeff` is the L1 coefficient its loss used: training on from here is the same recipe.
    params = {"l1_coeff": float(header["sparsity_coeff"])} if "sparsity_coeff" in header else None
    sae = SparseAutoencoder(d_model, n_features, "relu", params=params)
    with torch.no_grad():
        for theirs, ours in REFERENCE_NAMES.items():
            getattr(sae, ours).copy_(state[theirs].float())
        if act_mean_d is not None:
            sae.act_mean_d.copy_(act_mean_d)
        sae.act_scale.fill_(act_scale)
    return sae.to(device).eval()
