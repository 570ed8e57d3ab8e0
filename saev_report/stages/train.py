"""Stage `train`: the SAE sweep of one (model, layer), trained in one pass over its store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from saev_report.spec import SAESpec
from saev_report.stages.base import Inputs, Role, StageKind, StageOut, StageParams, take
from saev_report.stages.record import RecordOut

if TYPE_CHECKING:
    import torch


class TrainParams(StageParams):
    model_key: str
    layer: int
    sae: SAESpec
    seed: int
    device: str


class TrainOut(StageOut):
    def sae_dir(self, tag: str) -> Path:
        return self.root / tag

    def sae(self, tag: str, device: "torch.device | str" = "cpu"):
        """The trained `SparseAutoencoder` of sweep config `tag`."""
        from saev_report.sae import load_sae

        return load_sae(self.sae_dir(tag), device)

    def sae_config(self, tag: str) -> dict:
        from saev_report.sae import read_sae_config

        return read_sae_config(self.sae_dir(tag))


def train(params: TrainParams, inputs: Inputs, out_dir: Path) -> None:
    from saev_report import distributed
    from saev_report.progress import log
    from saev_report.runtime import pick_device, seed_everything
    from saev_report.sharded import train_across_ranks
    from saev_report.spec import sae_sweep

    seed_everything(params.seed)
    store = take(inputs, "record", RecordOut).store(params.layer)
    trained = train_across_ranks(store, params.sae, sae_sweep(params.sae), out_dir, pick_device(params.device),
                                 params.digest(), f"{params.model_key}/L{params.layer}", data_seed=params.seed,
                                 shard=distributed.current())
    distributed.barrier()  # every rank's SAEs and curves are written
    # train_saes writes its curves beside the checkpoints; publish them as table parts.
    logs = out_dir / "train_log"
    if logs.is_dir() and distributed.current().is_main:
        (out_dir / "tables").mkdir(exist_ok=True)
        os.replace(logs, out_dir / "tables" / "train_log")
    for t in trained:
        log(f"  {t.sae_id}: MSE {t.mse:.4f}, L0 {t.l0:.1f} after {t.n_patches:,} patches ({t.seconds:.0f}s)")


TRAIN = StageKind(name="train", version=1, params=TrainParams, out=TrainOut, action=train, parallel=True,
                  reads={"record": Role(RecordOut)}, writes=("train_log",))
