"""Exemplar scan throughput, against the encoder matmul and against saev 0.1.0, in one run.

Throughput is (patches × features) / s. For each (d, F) it times, on the same
batches of whole images (256 patches each, 4096 patches a batch, k = 16):

- `peak`         x @ W_enc alone: the matmul every method must do (the goal is ≥ 50 % of it);
- `encode`       the SAE's encode alone (matmul + bias + ReLU), the floor of any scan;
- `scan`         `analyse.scan(..., reconstruction=False)`: encode, per-feature counts / sums /
                 max / log10 histograms, running top-k images per feature with their patch
                 maps — the exemplar scan;
- `analyse`      `analyse.analyse_sae` end to end: the scan plus decode and float64 metrics
                 and the Arrow tables (two matmuls per patch, so 50 % of `peak` is its ceiling);
- `saev-0.1.0`   the inner loop of saev 0.1.0's `visuals.get_topk_patch`, reproduced line by
                 line below (SAE forward with decode and loss, per-patch percentile estimator,
                 mean / sparsity sums, per-patch top-k, gather of the [F, k, patches] buffer);
- `saev-topk`    the same loop without the decode and the percentile estimator (its top-k alone).
                 (saev picks the batch's top-k *patches* first, so an image can fill several
                 slots of one feature; ours ranks images, each at most once.)

The SAE has random weights; the encoder bias is set so that about 2.9 % of
features fire per patch (L0 ≈ 180 at F = 6144, ≈ 710 at F = 24576, near the
paper's DINOv2 L0 of 729), since cost depends on sparsity.

    python bench/exemplars.py            # d=384/F=6144 and d=768/F=24576, 200,704 patches each
    python bench/exemplars.py --quick    # 16,384 patches, d=384/F=6144 only
    python bench/exemplars.py --threads 1   # steadier figures on a busy machine
    python bench/exemplars.py --config large --patches 65536 --device cuda

Ratios are given by wall time and by process-CPU time; on a busy machine with
--threads 1, the CPU-time ratios are the ones to trust.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator

import numpy as np
import torch

from saev_report import analyse
from saev_report.spec import AnalysisSpec

PATCHES_PER_IMAGE = 256
GRID = (16, 16)
BATCH_PATCHES = 4096
TOP_K = 16
ENC_BIAS = -1.9  # P(N(0,1) > 1.9) ≈ 2.9 % of features fire per patch


class RandomSAE(torch.nn.Module):
    """ReLU SAE with the `sae.py` interface and identity normalisation; random weights."""

    def __init__(self, d: int, n_features: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W_enc_df", torch.randn(d, n_features, generator=g) / math.sqrt(d))
        self.register_buffer("W_dec_fd", torch.randn(n_features, d, generator=g) / math.sqrt(n_features))
        self.register_buffer("b_enc_f", torch.full((n_features,), ENC_BIAS))
        self.register_buffer("b_dec_d", torch.zeros(d))
        self.n_features, self.d_model = n_features, d

    def normalize(self, x_nd: torch.Tensor) -> torch.Tensor:
        return x_nd

    def encode_normalized(self, xn_nd: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc_f, xn_nd - self.b_dec_d, self.W_enc_df).relu_()

    def decode_normalized(self, f_nf: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec_d, f_nf, self.W_dec_fd)


class Batches:
    """Re-iterable whole-image batches cycling a small pool of random activations (distinct image ids)."""

    def __init__(self, d: int, n_patches: int, device: torch.device, pool_size: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images_per_batch = BATCH_PATCHES // PATCHES_PER_IMAGE
        self.n_batches = max(1, n_patches // BATCH_PATCHES)
        self.device = device
        self.pool = [torch.randn(self.images_per_batch, PATCHES_PER_IMAGE, d, generator=g).to(device) for _ in range(pool_size)]

    @property
    def n_patches(self) -> int:
        return self.n_batches * BATCH_PATCHES

    def __call__(self) -> Iterator[analyse.Batch]:
        for i in range(self.n_batches):
            first = i * self.images_per_batch
            yield self.pool[i % len(self.pool)], np.arange(first, first + self.images_per_batch)


class Timer:
    """Wall and process-CPU seconds: on a shared machine the CPU time is what this process actually got."""

    def __init__(self, device: torch.device):
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "Timer":
        self._sync()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


# --------------------------------------------------------------------------- the methods


def peak(batches: Batches, sae: RandomSAE) -> None:
    out = torch.empty(BATCH_PATCHES, sae.n_features, device=batches.device)
    for acts_bpd, _ in batches():
        torch.mm(acts_bpd.reshape(-1, sae.d_model), sae.W_enc_df, out=out)


def encode(batches: Batches, sae: RandomSAE) -> None:
    for acts_bpd, _ in batches():
        sae.encode_normalized(sae.normalize(acts_bpd.reshape(-1, sae.d_model)))


def ours_scan(batches: Batches, sae: RandomSAE) -> None:
    analyse.scan(batches(), sae, TOP_K, batches.device, reconstruction=False)


def ours_analyse(batches: Batches, sae: RandomSAE) -> None:
    spec = AnalysisSpec(top_k=TOP_K, batch_size=BATCH_PATCHES)
    analyse.analyse_sae(batches(), sae, GRID, None, spec, "bench", "bench", batches.device)


class PercentileEstimator:
    """saev 0.1.0 `visuals.PercentileEstimator` (MIT), verbatim minus decorators."""

    def __init__(self, percentile: float, total: int, lr: float = 1e-3, shape: tuple[int, ...] = ()):
        self.percentile, self.total, self.lr = percentile, total, lr
        self._estimate = torch.zeros(shape)
        self._step = 0

    def update(self, x: torch.Tensor) -> None:
        self._step += 1
        step_size = self.lr * (self.total - self._step) / self.total
        self._estimate = self._estimate.to(x.device)
        self._estimate += step_size * (torch.sign(x - self._estimate) + 2 * self.percentile / 100 - 1.0)


def gather_batched(value: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """saev 0.1.0 `visuals.gather_batched`."""
    batch_size, n, dim = value.shape
    _, k = i.shape
    batch_i = torch.arange(batch_size, device=value.device)[:, None].expand(-1, k)
    return value[batch_i, i]


def saev_forward(sae: RandomSAE, x: torch.Tensor, full: bool) -> torch.Tensor:
    """saev 0.1.0 `nn.SparseAutoencoder.forward` (einops.einsum → matmul); `full=False` stops after the encoder."""
    f_x = torch.relu((x - sae.b_dec_d) @ sae.W_enc_df + sae.b_enc_f)
    if full:  # decode, safe_mse and the loss terms it returns
        x_hat = f_x @ sae.W_dec_fd + sae.b_dec_d
        upper = x.abs().max()
        mse_loss = (((x_hat / upper) - (x / upper)) ** 2 * upper * upper).mean()
        l0 = (f_x > 0).float().sum(axis=1).mean(axis=0)
        l1 = f_x.sum(axis=1).mean(axis=0)
        _ = (mse_loss, l0, l1)
    return f_x


@torch.inference_mode()
def saev_topk_patch(batches: Batches, sae: RandomSAE, full: bool = True, n_distributions: int = 25) -> None:
    """The loop of saev 0.1.0 `visuals.get_topk_patch` (its defaults: percentile 99, 25 distributions)."""
    d_sae, top_k, n_patches_per_img, device = sae.n_features, TOP_K, PATCHES_PER_IMAGE, batches.device
    top_values_p = torch.full((d_sae, top_k, n_patches_per_img), -1.0, device=device)
    top_i_im = torch.zeros((d_sae, top_k), dtype=torch.int, device=device)
    sparsity_S = torch.zeros((d_sae,), device=device)
    mean_values_S = torch.zeros((d_sae,), device=device)
    n_images = batches.n_batches * batches.images_per_batch
    distributions_MN = torch.zeros((n_distributions, batches.n_patches))
    estimator = PercentileEstimator(99, batches.n_patches, shape=(d_sae,))
    for b, (acts_bpd, image_idx_b) in enumerate(batches()):
        vit_acts_BD = acts_bpd.reshape(-1, sae.d_model)
        image_i = torch.from_numpy(np.repeat(image_idx_b, n_patches_per_img)).to(torch.int)  # its Dataset gives int32
        sae_acts_BS = saev_forward(sae, vit_acts_BD, full)
        if full:
            for sae_act_S in sae_acts_BS:
                estimator.update(sae_act_S)
        sae_acts_SB = sae_acts_BS.T  # einops.rearrange("batch d_sae -> d_sae batch") is this view
        if full:
            distributions_MN[:, b * BATCH_PATCHES:(b + 1) * BATCH_PATCHES] = sae_acts_SB[:n_distributions].to("cpu")
        mean_values_S += sae_acts_SB.sum(-1)
        sparsity_S += (sae_acts_SB > 0).sum(-1)

        i_im = torch.sort(torch.unique(image_i)).values
        values_p = sae_acts_SB.view(d_sae, len(i_im), n_patches_per_img)
        _, k = torch.topk(sae_acts_SB, k=top_k, dim=1)
        k_im = k // n_patches_per_img
        values_p = gather_batched(values_p, k_im)
        i_im = i_im.to(device)[k_im]
        all_values_p = torch.cat((top_values_p, values_p), axis=1)
        _, k = torch.topk(all_values_p.max(axis=-1).values, k=top_k, axis=1)
        top_values_p = gather_batched(all_values_p, k)
        top_i_im = torch.gather(torch.cat((top_i_im, i_im), axis=1), 1, k)
    mean_values_S /= sparsity_S
    sparsity_S /= n_images


METHODS = {
    "peak": peak,
    "encode": encode,
    "scan": ours_scan,
    "analyse": ours_analyse,
    "saev-0.1.0": saev_topk_patch,
    "saev-topk": lambda batches, sae: saev_topk_patch(batches, sae, full=False),
}


def bench(d: int, n_features: int, n_patches: int, device: torch.device) -> dict[str, Timer]:
    sae = RandomSAE(d, n_features).to(device)
    batches = Batches(d, n_patches, device)
    peak(Batches(d, BATCH_PATCHES, device), sae)  # warm-up
    times = {}
    for name, method in METHODS.items():
        with Timer(device) as timer:
            method(batches, sae)
        times[name] = timer
    with Timer(device) as again:  # peak once more; keep the faster, so a noisy neighbour cannot flatter the ratios
        peak(batches, sae)
    if again.wall < times["peak"].wall:
        times["peak"] = again
    print(f"\nd={d}  F={n_features}  patches={batches.n_patches:,}  k={TOP_K}  "
          f"({device}, threads {torch.get_num_threads()}, L0 ≈ {n_features * 0.0287:.0f})")
    print(f"{'method':<12}{'wall s':>8}{'cpu s':>8}{'G(patch·feat)/s':>17}"
          f"{'of peak':>9}{'(cpu)':>8}{'vs saev':>9}{'(cpu)':>8}")
    work = batches.n_patches * n_features
    base, saev = times["peak"], times["saev-0.1.0"]
    for name, t in times.items():
        print(f"{name:<12}{t.wall:8.2f}{t.cpu:8.2f}{work / t.wall / 1e9:17.3f}"
              f"{base.wall / t.wall:9.1%}{base.cpu / t.cpu:8.1%}{saev.wall / t.wall:8.2f}×{saev.cpu / t.cpu:7.2f}×", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16,384 patches, d=384/F=6144 only")
    parser.add_argument("--patches", type=int, default=None, help="patches per configuration (default 200,704)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared machine)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    parser.add_argument("--config", choices=["small", "large", "both"], default="both",
                        help="small: d=384/F=6144, large: d=768/F=24576")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = {"small": [(384, 6144)], "large": [(768, 24576)], "both": [(384, 6144), (768, 24576)]}[args.config]
    if args.quick:
        configs = configs[:1]
    n_patches = args.patches or (16_384 if args.quick else 200_704)
    torch.manual_seed(0)
    for d, n_features in configs:
        bench(d, n_features, n_patches, device)


if __name__ == "__main__":
    main()
