"""Training a sweep of SAEs in one pass over the activations (the paper's recipe).

Every SAE of a (model, layer) sees the same shuffled batches, so the store is read
once however wide the sweep. Per step and per SAE: forward (sparse or dense path,
see `sae/sparse.py`), the kind's loss (`SAEKind.loss`, one signature for every kind: MSE +
λ·L1 for relu, MSE (+ AuxK) for the TopK family, …), backward, drop the gradient parallel to
each decoder atom, Adam step, renormalise the atoms, the kind's `after_step`. Learning rate
and a fixed sparsity coefficient warm up linearly. A non-finite loss or weight stops training with
`TrainingDiverged`, naming the SAE and the step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from saev_report import __version__, distributed
from saev_report.distributed import ONE, Shard
from saev_report.progress import bar
from saev_report.sae import LossContext, SparseAutoencoder, TrainForward, save_sae
from saev_report.spec import SAEConfig, SAESpec
from saev_report.tables import write_table
from saev_report.errors import UserError

# Rows used for the normalisation statistics and b_dec (the reference code uses ~500K;
# the mean and mean norm settle long before that). They are trained on afterwards.
NORM_SAMPLE_ROWS = 65_536
# Above this fraction of active (patch, feature) pairs the dense step is used: on CPU the
# sparse step stops paying off near 0.3 (bench/train.py's sizes); a fresh ReLU SAE fires
# about half its features until λ has warmed up.
SPARSE_MAX_DENSITY = 0.2
# A feature that has not fired in this many patches counts as dead in the train log.
DEAD_WINDOW_PATCHES = 10_000_000
# Shuffle buffer of the store's reader, in rows (at least a few batches).
SHUFFLE_BUFFER_ROWS = 1 << 20


class TrainingDiverged(UserError):
    """Loss or weights became NaN/inf."""

    def __init__(self, sae_id: str, step: int, what: str):
        self.sae_id, self.step = sae_id, step
        super().__init__(f"SAE {sae_id} diverged at step {step}: {what}. Lower `sae.lr`, or check the activations for NaN/inf.")


class ShuffledSource(Protocol):
    """What training needs of an activation store (`activations.ActivationStore` fits)."""

    def shuffled(self, batch_rows: int, seed: int, buffer_rows: int) -> Iterator[Tensor]: ...


# A store, or a factory `(batch_rows, seed) -> iterator of float32 [batch, d]` (tests, benches).
BatchSource = ShuffledSource | Callable[[int, int], Iterable[Tensor]]


@dataclass
class TrainedSAE:
    """One trained SAE of the sweep: where its checkpoint is and how training ended."""

    sae_id: str
    config: SAEConfig
    dir: Path
    sae: SparseAutoencoder = field(repr=False)
    n_steps: int
    n_patches: int
    mse: float  # last step, normalised space
    l0: float  # last step
    seconds: float


@dataclass
class _Run:
    """Mutable training state of one SAE."""

    sae_id: str
    config: SAEConfig
    sae: SparseAutoencoder
    optimizer: torch.optim.Optimizer
    last_fired_f: Tensor  # patches seen when each feature last fired
    density: float = 1.0  # active fraction of the previous step: picks sparse or dense
    mse: float = math.nan
    l0: float = math.nan
    log_rows: list[dict[str, Any]] = field(default_factory=list)


def warmup(step: int, warmup_steps: int) -> float:
    """Linear warm-up factor for the 0-based `step`: (step + 1) / warmup_steps, capped at 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def sae_id_for(prefix: str, config: SAEConfig) -> str:
    return f"{prefix}/{config.tag}" if prefix else config.tag


def train_saes(
    store: BatchSource,
    sae_spec: SAESpec,
    configs: Sequence[SAEConfig],
    out_dir: Path,
    device: torch.device | str,
    spec_hash: str,
    sae_id_prefix: str,
    *,
    data_seed: int = 0,
    data_parallel: Shard = ONE,
) -> list[TrainedSAE]:
    """Train every SAE of `configs` in one pass over `store`'s shuffled batches.

    Writes `out_dir/<tag>/{sae.safetensors,config.json}` per SAE and the training curves
    as `out_dir/train_log/<tag>.parquet` (table `train_log`).

    With `data_parallel` of world > 1 (DDP), every rank reads the same shuffled batches,
    steps on its contiguous slice of each and averages the gradients (weighted by slice
    size, so the update is the full batch's); the replicas stay identical and rank 0 writes.
    """
    out_dir, device = Path(out_dir), torch.device(device)
    if device.type == "cpu":
        keep_freed_memory()
    batch_size = sae_spec.batch_size
    batches = iter(_batches(store, batch_size, data_seed))
    sample_batches = _take_rows(batches, NORM_SAMPLE_ROWS)
    if not sample_batches:
        raise ValueError("no activations to train on: the store yielded no batches")
    sample_nd = torch.cat(sample_batches).float()
    if not bool(torch.isfinite(sample_nd).all()):
        raise ValueError("the activations hold NaN/inf (found in the normalisation sample): re-record them")
    d_model = sample_nd.shape[1]
    runs = [_new_run(sae_id_for(sae_id_prefix, c), c, sae_spec, d_model, sample_nd, device) for c in configs]
    del sample_nd

    n_steps = math.ceil(sae_spec.n_patches / batch_size)
    n_seen, step = 0, 0
    start = time.perf_counter()
    with bar(f"train {sae_id_prefix or 'SAEs'} ×{len(runs)}", total=n_steps * batch_size, unit="patch") as progress:
        for x_nd in itertools.islice(itertools.chain(sample_batches, batches), n_steps):
            n_seen += x_nd.shape[0]
            step += 1
            log_now = step % sae_spec.log_every == 0 or step == n_steps
            mine = data_parallel.range(x_nd.shape[0])
            share = len(mine) / x_nd.shape[0]
            x_nd = x_nd[mine.start:mine.stop].to(device, torch.float32, non_blocking=True)
            for run in runs:
                _step(run, x_nd, step, n_seen, sae_spec, log_now, time.perf_counter() - start, data_parallel, share)
            progress.advance(len(mine) * data_parallel.world)
    seconds = time.perf_counter() - start

    results = []
    for run in runs:
        _check_weights(run, step)
        run.sae.release_workspace()
        run.sae.eval()
        sae_dir = out_dir / run.config.tag
        if data_parallel.is_main:
            save_sae(run.sae.cpu(), sae_dir, extra=_checkpoint_extra(run, sae_spec, spec_hash, step, n_seen))
            write_table(out_dir / "train_log" / f"{run.config.tag}.parquet", "train_log", run.log_rows, spec_hash)
        results.append(TrainedSAE(run.sae_id, run.config, sae_dir, run.sae, step, n_seen, run.mse, run.l0, seconds))
    return results


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system.

    A CPU training step allocates and frees several tensors of 100 MB or more (pre-activations,
    weight gradients). glibc serves each from a fresh mmap and unmaps it on free, so every step
    pays page faults on all of them: at paper width about a third of the sparse step. Serving
    large blocks from the heap and never trimming it removes that (the process keeps its peak
    memory). Process-wide and idempotent; a no-op where glibc's `mallopt` is absent.
    """
    global _MALLOPT_DONE
    if _MALLOPT_DONE is None:
        _MALLOPT_DONE = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
            _MALLOPT_DONE = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
        except (OSError, AttributeError):
            pass
    return _MALLOPT_DONE


_MALLOPT_DONE: bool | None = None


def _batches(store: BatchSource, batch_rows: int, seed: int) -> Iterable[Tensor]:
    if hasattr(store, "shuffled"):
        return store.shuffled(batch_rows=batch_rows, seed=seed, buffer_rows=max(SHUFFLE_BUFFER_ROWS, 4 * batch_rows))
    return store(batch_rows, seed)


def _take_rows(batches: Iterator[Tensor], n_rows: int) -> list[Tensor]:
    """Batches from the front of the stream until they hold `n_rows` rows (or it ends)."""
    taken: list[Tensor] = []
    total = 0
    while total < n_rows:
        batch = next(batches, None)
        if batch is None:
            break
        taken.append(batch)
        total += batch.shape[0]
    return taken


def _new_run(sae_id: str, config: SAEConfig, spec: SAESpec, d_model: int, sample_nd: Tensor, device: torch.device) -> _Run:
    sae = SparseAutoencoder(d_model, d_model * config.expansion, config.kind, seed=config.seed, params=config.params)
    sae.fit_normalization(sample_nd, spec.normalize)
    sae.init_b_dec(sample_nd)
    sae.init_from_sample(sample_nd)
    sae.to(device).train()
    optimizer = make_adam(sae, spec.lr)
    last_fired_f = torch.zeros(sae.n_features, dtype=torch.long, device=device)
    return _Run(sae_id, config, sae, optimizer, last_fired_f)


def make_adam(sae: SparseAutoencoder, lr: float) -> torch.optim.Optimizer:
    """Adam, fused where the device supports it (one pass over the weights instead of ~10)."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(sae.parameters(), lr=lr)


def optimizer_step(
    sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, xn_nd: Tensor, ctx: LossContext, sparse: bool,
    data_parallel: Shard = ONE, share: float = 1.0,
) -> tuple[TrainForward, Tensor]:
    """The paper's update on one normalised batch: the kind's loss, backward, drop the gradient
    parallel to each atom, Adam, renormalise the atoms, then the kind's `after_step` (BatchTopK's
    threshold, JumpReLU's λ). Raises FloatingPointError on a non-finite loss.

    Data-parallel: this rank's batch is `share` of the full one; the gradients are summed over
    ranks weighted by their shares (the full batch's mean-loss gradient), and the kinds'
    `after_step` reduce what they fold over ranks, so every replica stays equal."""
    out = sae.training_forward(xn_nd, sparse=sparse, ctx=ctx)
    loss = out.loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if data_parallel.world > 1:
        for param in sae.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            distributed.sum_(param.grad.mul_(share))
    sae.remove_parallel_grad_()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # the gradients (2·d·F floats) are not held between steps
    sae.normalize_decoder_()
    sae.kind_impl.after_step(sae, out, data_parallel, share)
    return out, loss.detach()


def _step(run: _Run, x_nd: Tensor, step: int, n_seen: int, spec: SAESpec, log_now: bool, seconds: float,
          data_parallel: Shard = ONE, share: float = 1.0) -> None:
    """One optimiser step of one SAE on one batch (`step` is 1-based; data-parallel: this rank's slice)."""
    sae = run.sae
    lr = spec.lr * warmup(step - 1, spec.lr_warmup_steps)
    sparsity_scale = warmup(step - 1, spec.l1_warmup_steps)
    l1_coeff = run.config.l1_coeff * sparsity_scale  # logged (0 for kinds without λ)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if data_parallel.world > 1 and sae.kind_impl.reads_dead_latents(sae.params):  # every rank: the same dead latents
        distributed.max_(run.last_fired_f)
    ctx = LossContext(sparsity_scale, n_seen, run.last_fired_f)  # n_seen includes this batch: `last_fired_f` counts so too

    sparse = spec.sparse_backward and run.density <= SPARSE_MAX_DENSITY
    try:
        out, loss = optimizer_step(sae, run.optimizer, sae.normalize(x_nd), ctx, sparse, data_parallel, share)
    except FloatingPointError as exc:
        bad_input = not bool(torch.isfinite(x_nd).all())
        raise TrainingDiverged(run.sae_id, step, str(exc) + (" (the input batch holds NaN/inf)" if bad_input else "")) from None

    with torch.no_grad():
        run.last_fired_f[out.fired_f] = n_seen
        run.density = out.n_active / (x_nd.shape[0] * sae.n_features)
        run.mse, run.l0 = out.mse.item(), out.l0
        if log_now:
            _check_weights(run, step)
            l1, loss_value = out.l1.item(), loss.item()
            if data_parallel.world > 1:  # the full batch's figures: share-weighted sums over ranks
                figures = torch.tensor([run.mse, run.l0, l1, loss_value], dtype=torch.float64) * share
                run.mse, run.l0, l1, loss_value = distributed.sum_(figures).tolist()
                distributed.max_(run.last_fired_f)
            window = min(DEAD_WINDOW_PATCHES, n_seen)
            dead_frac = float(((n_seen - run.last_fired_f) >= window).float().mean())
            run.log_rows.append(
                {
                    "sae_id": run.sae_id,
                    "step": step,
                    "n_patches": n_seen,
                    "loss": loss_value,
                    "mse": run.mse,
                    "l1": l1,
                    "l0": run.l0,
                    "dead_frac": dead_frac,
                    "lr": lr,
                    "l1_coeff": l1_coeff,
                    "seconds": seconds,
                }
            )


def _check_weights(run: _Run, step: int) -> None:
    for name, param in run.sae.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise TrainingDiverged(run.sae_id, step, f"{name} holds NaN/inf")


def _checkpoint_extra(run: _Run, spec: SAESpec, spec_hash: str, n_steps: int, n_patches: int) -> dict[str, Any]:
    c = run.config
    return {
        "sae_id": run.sae_id,
        "tag": c.tag,
        "sweep_index": c.index,
        "expansion": c.expansion,
        "l1_coeff": c.l1_coeff,
        "seed": c.seed,
        "normalize": spec.normalize,
        "n_steps": n_steps,
        "n_patches_trained": n_patches,
        "spec_hash": spec_hash,
        "version": __version__,
    }
