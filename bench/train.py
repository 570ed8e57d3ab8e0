"""SAE training throughput: our sparse step vs our dense step vs the paper's reference code.

    python bench/train.py            # demo scale (d=384, F=6,144) and paper scale (d=768, F=24,576)
    python bench/train.py --quick    # smaller batches, fewer rounds
    python bench/train.py --fresh    # from the paper's init (L0 ≈ F / 2): where training uses the dense step
    python bench/train.py --kinds-only   # only the per-kind lines (below)

Per kind (`kinds` section, at the demo's SAE size: d=384, F=1,536, batch 4,096): each registered
kind's sparse step against its own plain dense reference (`DenseCoder`: autograd through n × F codes;
ReLU's own memory-lean dense step), AuxK with 30 % of the latents dead.

The reference is PyPI `saev==0.1.0`'s `saev.nn.SparseAutoencoder` with its training step
(normalise decoder, forward, backward, remove parallel gradients, Adam). It needs einops,
beartype and jaxtyping; keep it out of the main environment:

    python3 -m venv --system-site-packages /tmp/saev-venv
    /tmp/saev-venv/bin/pip install --no-deps saev==0.1.0 && /tmp/saev-venv/bin/pip install einops beartype jaxtyping
    /tmp/saev-venv/bin/python bench/train.py

Without saev the reference column is skipped.

All three start from the same "settled" ReLU SAE: synthetic activations are sparse
non-negative codes (Zipf-distributed feature frequencies, exponential magnitudes) over
a random unit dictionary plus noise and an offset; the SAE starts at that dictionary
with the encoder bias set so the mean L0 sits at the target (≈ the paper's Table 1
L0 / F), then takes a few steps before timing. So the timed steps run at the sparsity
of a trained SAE without hundreds of warm-up steps on 2 cores. Each round runs one
step of every method on the same batch, in rotating order, so a load spike from other
processes hits all of them; the median over rounds is reported.

The sparse limit is what a step would reach if the sparse part were free of overhead:
matmul FLOP/s (timed in the same rounds) / (2·d·F + 8·L0·d) flop per patch.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")

import saev_report.train as train_module  # noqa: E402
from saev_report.sae import KINDS, LossContext, SparseAutoencoder  # noqa: E402
from saev_report.sae.relu import ReluParams  # noqa: E402
from saev_report.spec import SAESpec, sae_sweep  # noqa: E402
from saev_report.train import keep_freed_memory, make_adam, optimizer_step, train_saes  # noqa: E402

LR, L1_COEFF = 4e-4, 4e-4  # the paper's values


@dataclass(frozen=True)
class Scale:
    name: str
    d: int
    n_features: int
    batch: int
    l0_target: int  # ≈ paper Table 1 L0 / F (CLIP 413 / 24,576 ≈ 1.7 %)
    l0_true: int  # atoms per synthetic patch


def scales(quick: bool, batch_demo: int | None, batch_paper: int | None) -> list[Scale]:
    return [
        Scale("demo", 384, 16 * 384, batch_demo or (1024 if quick else 4096), 100, 24),
        Scale("paper", 768, 24_576, batch_paper or (1024 if quick else 4096), 400, 64),
    ]


# --------------------------------------------------------------------------- synthetic activations


class Planted:
    """x = codes @ dictionary + noise + offset, codes sparse with Zipf feature frequencies."""

    def __init__(self, d: int, n_atoms: int, l0: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n_atoms, d, generator=g)
        self.dictionary = atoms / atoms.norm(dim=1, keepdim=True)
        self.freq = 1.0 / torch.arange(1, n_atoms + 1).float() ** 0.8  # some features frequent, most rare
        self.offset = torch.randn(d, generator=g) * 2.0
        self.l0, self.g = l0, g

    def batch(self, n: int) -> torch.Tensor:
        idx = torch.multinomial(self.freq, n * self.l0, replacement=True, generator=self.g).view(n, self.l0)
        mag = torch.empty(n, self.l0).exponential_(1.0, generator=self.g)
        # codes @ dictionary without the dense n × F code matrix (1.6 GB at the paper's batch)
        x_nd = torch.nn.functional.embedding_bag(idx, self.dictionary, mode="sum", per_sample_weights=mag)
        return x_nd + 0.05 * torch.randn(n, self.dictionary.shape[1], generator=self.g) + self.offset


def settled_sae(scale: Scale, data: Planted, fresh: bool = False) -> SparseAutoencoder:
    """A ReLU SAE near the planted dictionary with mean L0 ≈ the target, or (`fresh`) the
    paper's initialisation, which fires about half of its features."""
    sae = SparseAutoencoder(scale.d, scale.n_features, "relu", seed=0, params=ReluParams(l1_coeff=L1_COEFF))
    sample = data.batch(2048)
    sae.fit_normalization(sample)
    sae.init_b_dec(sample)
    if fresh:
        return sae
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_dec_fd.copy_(data.dictionary + 0.3 * torch.randn(data.dictionary.shape, generator=g) / scale.d**0.5)
        sae.normalize_decoder_()
        sae.W_enc_df.copy_(sae.W_dec_fd.t())
        sae.b_enc_f.zero_()
        pre = sae.pre_activations_normalized(sae.normalize(sample[:512]))
        cut = torch.quantile(pre.flatten()[:: max(1, pre.numel() // 1_000_000)], 1 - scale.l0_target / scale.n_features)
        sae.b_enc_f.fill_(-float(cut))
    return sae


# --------------------------------------------------------------------------- the steps compared


def load_saev():
    try:
        import saev.config
        import saev.nn
    except ImportError as exc:
        print(f"(saev 0.1.0 not importable: {exc}; reference column skipped — see the module docstring)")
        return None
    return saev


def saev_model(saev, ours: SparseAutoencoder):
    expansion = ours.n_features // ours.d_model
    cfg = saev.config.SparseAutoencoder(d_vit=ours.d_model, exp_factor=expansion, sparsity_coeff=L1_COEFF, seed=0)
    ref = saev.nn.SparseAutoencoder(cfg)
    with torch.no_grad():
        ref.W_enc.copy_(ours.W_enc_df)
        ref.b_enc.copy_(ours.b_enc_f)
        ref.W_dec.copy_(ours.W_dec_fd)
        ref.b_dec.copy_(ours.b_dec_d)
    return ref


def saev_adam(ref) -> torch.optim.Optimizer:
    try:  # saev.training uses fused Adam
        return torch.optim.Adam(ref.parameters(), lr=LR, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(ref.parameters(), lr=LR)


def saev_step(ref, optimizer, xn_nd: torch.Tensor, chunk_rows: int) -> None:
    """saev.training.train's loop body. Batches over `chunk_rows` run as chunks whose gradients
    add up to the batch's (its losses are batch means): the same update, in a quarter of the
    memory at batch 16,384, where its forward holds about five n × F float tensors (10 GB)."""
    ref.normalize_w_dec()
    for chunk_nd in xn_nd.split(chunk_rows):
        _, _, loss = ref(chunk_nd)
        (loss.loss * (chunk_nd.shape[0] / xn_nd.shape[0])).backward()
    ref.remove_parallel_grads()
    optimizer.step()
    optimizer.zero_grad()


def ours_step(sae: SparseAutoencoder, optimizer, xn_nd: torch.Tensor, sparse: bool) -> float:
    out, _ = optimizer_step(sae, optimizer, xn_nd, LossContext(), sparse)
    return out.l0


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, xn_nd: torch.Tensor) -> tuple[float, float]:
    f_nf = sae.encode_normalized(xn_nd)
    mse = float((sae.decode_normalized(f_nf) - xn_nd).pow(2).mean())
    return mse, float((f_nf > 0).sum(1).float().mean())


# --------------------------------------------------------------------------- one scale


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a step's time is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_scale(scale: Scale, rounds: int, warm_steps: int, saev, fresh: bool = False, saev_chunk: int = 4096,
                device: torch.device = torch.device("cpu")) -> dict[str, float]:
    init = "fresh init" if fresh else "settled"
    print(f"\n== {scale.name}: d={scale.d}, F={scale.n_features:,}, batch={scale.batch:,}, {init}, {device} ==", flush=True)
    data = Planted(scale.d, scale.n_features, scale.l0_true)
    base = settled_sae(scale, data, fresh).to(device)
    batches = [base.normalize(data.batch(scale.batch).to(device)) for _ in range(rounds)]
    held_out = base.normalize(data.batch(scale.batch).to(device))
    if not fresh:
        warm_optimizer = make_adam(base, LR)
        for _ in range(warm_steps):  # settle a little under training before the copies fork
            ours_step(base, warm_optimizer, base.normalize(data.batch(scale.batch).to(device)), sparse=True)
        del warm_optimizer
    base.release_workspace()  # only the copies train from here: don't hold an n × F buffer for it

    sparse_sae, dense_sae = copy.deepcopy(base), copy.deepcopy(base)
    # Each contender's lasting state (Adam moments, the sparse step's workspace) is allocated in
    # the first round, which is not timed. Nothing else outlives a step, so freed step memory is
    # reused by the next step instead of fragmenting the heap (glibc keeps it: keep_freed_memory).
    contenders = {
        "sparse": (lambda xn, s=sparse_sae, o=make_adam(sparse_sae, LR): ours_step(s, o, xn, True)),
        "dense": (lambda xn, s=dense_sae, o=make_adam(dense_sae, LR): ours_step(s, o, xn, False)),
    }
    if saev is not None:
        ref = saev_model(saev, base.cpu()).to(device)
        base.to(device)
        contenders["saev"] = lambda xn, r=ref, o=saev_adam(ref): saev_step(r, o, xn, saev_chunk)
    W_df = base.W_enc_df.detach().clone()
    contenders["matmul"] = lambda xn: xn @ W_df

    times: dict[str, list[float]] = {name: [] for name in contenders}
    l0s: list[float] = []
    names = list(contenders)
    for r, xn_nd in enumerate(batches):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            _sync(device)
            start = time.perf_counter()
            result = contenders[name](xn_nd)
            _sync(device)
            times[name].append(time.perf_counter() - start)
            if name == "sparse":
                l0s.append(result)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:,.0f} ms" for n in names), flush=True)

    keep = slice(1, None) if rounds > 2 else slice(None)  # the first round warms caches and allocators
    step_s = {name: statistics.median(ts[keep]) for name, ts in times.items()}
    pps = {name: scale.batch / s for name, s in step_s.items() if name != "matmul"}
    flops = 2 * scale.batch * scale.d * scale.n_features / step_s["matmul"]
    l0 = statistics.mean(l0s)
    limit = flops / (2 * scale.d * scale.n_features + 8 * l0 * scale.d)
    mse_s, l0_s = evaluate(sparse_sae, held_out)
    mse_d, l0_d = evaluate(dense_sae, held_out)

    print(f"  L0 during timing {l0:.0f} ({l0 / scale.n_features:.2%} of F); matmul {flops / 1e9:.0f} GFLOP/s")
    for name, value in pps.items():
        print(f"  {name:>6}: {value:>9,.0f} patches/s  ({step_s[name] * 1e3:,.0f} ms/step)")
    if "saev" in pps:
        print(f"  ratio sparse / saev  = {pps['sparse'] / pps['saev']:.2f}×   dense / saev = {pps['dense'] / pps['saev']:.2f}×")
    print(f"  ratio sparse / dense = {pps['sparse'] / pps['dense']:.2f}×")
    print(f"  sparse limit {limit:,.0f} patches/s → sparse step reaches {pps['sparse'] / limit:.0%} of it")
    within = abs(mse_s / mse_d - 1) <= 0.02 and abs(l0_s / l0_d - 1) <= 0.02
    print(f"  after {rounds} steps: MSE sparse {mse_s:.5f} vs dense {mse_d:.5f} ({abs(mse_s / mse_d - 1):.2%} apart), "
          f"L0 {l0_s:.1f} vs {l0_d:.1f} ({abs(l0_s / l0_d - 1):.2%} apart): {'within' if within else 'NOT within'} 2 %")  # fmt: skip
    return {"sparse_pps": pps["sparse"], "dense_pps": pps["dense"], "saev_pps": pps.get("saev", float("nan"))}


def agreement_from_scratch(steps: int) -> None:
    """Train the same SAE from the paper's init with the sparse and the dense path (train_saes,
    demo width, a small batch) and compare final MSE and L0. The sparse run takes the sparse
    path from the first step, although a fresh ReLU SAE is dense (train_saes would use the
    dense step until the active fraction drops under SPARSE_MAX_DENSITY)."""
    print(f"\n== agreement: train_saes from the paper's init, {steps} steps, d=384, F=6,144, batch 1,024 ==", flush=True)
    data = Planted(384, 6144, 24, seed=3)

    def factory(batch_rows: int, seed: int):
        while True:
            yield data.batch(batch_rows)

    results = {}
    default_max_density = train_module.SPARSE_MAX_DENSITY
    out_root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    for sparse in (True, False):
        data.g.manual_seed(7)
        train_module.SPARSE_MAX_DENSITY = 1.0 if sparse else default_max_density
        spec = SAESpec(expansion=[16], l1_coeff=[4e-3], batch_size=1024, n_patches=1024 * steps, lr=2e-3,
                       lr_warmup_steps=10, l1_warmup_steps=20, sparse_backward=sparse, log_every=steps)  # fmt: skip
        start = time.perf_counter()
        (result,) = train_saes(factory, spec, sae_sweep(spec), out_root / str(sparse), "cpu", "bench", "bench")
        results[sparse] = (result, time.perf_counter() - start)
    train_module.SPARSE_MAX_DENSITY = default_max_density
    shutil.rmtree(out_root, ignore_errors=True)
    (rs, ts), (rd, td) = results[True], results[False]
    print(f"  sparse: MSE {rs.mse:.5f}, L0 {rs.l0:.1f}, {ts:.1f} s   dense: MSE {rd.mse:.5f}, L0 {rd.l0:.1f}, {td:.1f} s")
    print(f"  MSE {abs(rs.mse / rd.mse - 1):.2%} apart, L0 {abs(rs.l0 / rd.l0 - 1):.2%} apart "
          f"(L0 / F = {rs.l0 / 6144:.1%}: the sparse path is forced here, train_saes would run dense steps)")  # fmt: skip


# --------------------------------------------------------------------------- one line per kind

# (label, kind, params) at the demo's sparsity (k = 32; JumpReLU's target L0 32). AuxK's pairs add
# n · aux_k to the n · k of the main code: at k_aux = d / 2 = 192 they are 6× the main pairs.
KIND_CASES = [
    ("relu (settled)", "relu", {}),  # no params: `settled_sae` at L0 ≈ 32 (a fresh ReLU SAE fires half of F: dense steps)
    ("topk", "topk", {"k": 32}),
    ("topk + AuxK 64", "topk", {"k": 32, "aux_k": 64, "dead_patches": 1}),
    ("topk + AuxK 192", "topk", {"k": 32, "aux_k": 192, "dead_patches": 1}),  # Gao et al.'s k_aux = d / 2
    ("batchtopk", "batchtopk", {"k": 32}),
    ("batchtopk + AuxK 64", "batchtopk", {"k": 32, "aux_k": 64, "dead_patches": 1}),
    ("matryoshka", "matryoshka", {"k": 32}),
    ("matryoshka + AuxK 64", "matryoshka", {"k": 32, "aux_k": 64, "dead_patches": 1}),
    ("jumprelu", "jumprelu", {"l0_target": 32}),
]
DEAD_FRACTION = 0.3  # of the latents, for the AuxK cases


def bench_kinds(rounds: int, d: int, n_features: int, batch: int, device: torch.device) -> dict[str, float]:
    """Each kind's sparse step against its own dense reference, same batches, rotating order."""
    print(f"\n== kinds: d={d}, F={n_features:,}, batch={batch:,}, {device}: sparse step / the kind's own dense step ==", flush=True)
    data = Planted(d, n_features, 24, seed=1)
    sample = data.batch(4096)
    batches = [data.batch(batch).to(device) for _ in range(rounds)]
    g = torch.Generator().manual_seed(2)
    dead_f = torch.rand(n_features, generator=g) < DEAD_FRACTION
    n_seen = 10 * batch
    ctx = LossContext(n_seen=n_seen, last_fired_f=torch.where(dead_f, 0, n_seen).long().to(device))
    ratios = {}
    for label, kind, given in KIND_CASES:
        if not given:  # ReLU: the settled state of the other lines (λ = the paper's)
            base = settled_sae(Scale("kinds", d, n_features, batch, 32, 24), data)
        else:
            base = SparseAutoencoder(d, n_features, kind, seed=0, params=KINDS[kind].Params(**given))
            base.fit_normalization(sample)
            base.init_b_dec(sample)
            base.init_from_sample(sample)
        base.to(device).train()
        steps = {}
        for sparse in (True, False):
            sae = copy.deepcopy(base)
            optimizer = make_adam(sae, LR)
            steps[sparse] = (lambda xn, s=sae, o=optimizer, sp=sparse: optimizer_step(s, o, xn, ctx, sp)[0])
        times: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}  # process CPU time: less moved by other processes' load
        l0s = []
        for r, x_nd in enumerate(batches):
            xn_nd = base.normalize(x_nd)
            for sparse in ((True, False) if r % 2 == 0 else (False, True)):
                _sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                out = steps[sparse](xn_nd)
                _sync(device)
                times[sparse].append(time.perf_counter() - start)
                cpu[sparse].append(time.process_time() - start_cpu)
                if sparse:
                    l0s.append(out.l0)
        keep = slice(1, None) if rounds > 2 else slice(None)
        sparse_s, dense_s = statistics.median(times[True][keep]), statistics.median(times[False][keep])
        cpu_ratio = statistics.median(cpu[False][keep]) / statistics.median(cpu[True][keep])
        ratios[label] = dense_s / sparse_s
        print(f"  {label:>20}: sparse {sparse_s * 1e3:7,.0f} ms, dense {dense_s * 1e3:7,.0f} ms  → ratio {ratios[label]:.2f}× wall, "
              f"{cpu_ratio:.2f}× CPU time  (L0 {statistics.mean(l0s):.0f})", flush=True)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches and few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="steps per method at demo scale (paper scale: 3)")
    parser.add_argument("--scales", default="demo,paper", help="comma-separated: demo, paper")
    parser.add_argument("--batch-demo", type=int, default=None)
    parser.add_argument("--batch-paper", type=int, default=None)
    parser.add_argument("--agreement-steps", type=int, default=None, help="0 skips the from-scratch agreement run")
    parser.add_argument("--fresh", action="store_true", help="time from the paper's init (L0 ≈ half of F) instead of a settled SAE")
    parser.add_argument("--saev-chunk", type=int, default=4096, help="saev's step accumulates gradients over chunks of this many rows")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc's mmap/trim behaviour as it is")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every contender runs there)")
    parser.add_argument("--kinds-only", action="store_true", help="only the per-kind sparse / dense lines")
    parser.add_argument("--kind-rounds", type=int, default=None, help="steps per path and kind (default 5; --quick 3)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.system_malloc:
        keep_freed_memory()  # as train_saes does on CPU; applies to every contender alike
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, "
          f"{'system malloc' if args.system_malloc else 'freed memory kept for reuse'}")  # fmt: skip
    kind_rounds = args.kind_rounds or (3 if args.quick else 5)
    bench_kinds(kind_rounds, 384, 4 * 384, 1024 if args.quick else 4096, device)
    if args.kinds_only:
        print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
        return
    saev = load_saev()
    rounds = args.rounds or (3 if args.quick else 6)
    wanted = set(args.scales.split(","))
    for scale in scales(args.quick, args.batch_demo, args.batch_paper):
        if scale.name in wanted:
            bench_scale(scale, rounds if scale.name == "demo" else 3, warm_steps=2, saev=saev, fresh=args.fresh, saev_chunk=args.saev_chunk,
                        device=device)
    agreement_steps = args.agreement_steps if args.agreement_steps is not None else (0 if args.quick else 40)
    if agreement_steps:
        agreement_from_scratch(agreement_steps)
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


if __name__ == "__main__":
    main()
