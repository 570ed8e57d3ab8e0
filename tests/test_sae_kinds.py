"""The kinds added after ReLU/TopK/BatchTopK, each against a plain-autograd reference written from
its paper's equations (loss and every gradient, float64, both training paths), and their behaviour
in training: JumpReLU reaches its target L0, each Matryoshka prefix reconstructs better than the one
before, AuxK leaves fewer dead latents than no AuxK on the same data."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from saev_report.sae import KINDS, LossContext, SparseAutoencoder, load_sae, save_sae
from saev_report.sae.jumprelu import JumpReLUParams
from saev_report.sae.matryoshka import MatryoshkaParams, prefix_sizes
from saev_report.sae.topk import TopKParams
from saev_report.spec import SAESpec, sae_sweep
from saev_report.train import train_saes

pytestmark = pytest.mark.usefixtures("one_thread")

D, N_FEATURES, N_ROWS = 12, 48, 80


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("SAEV_REPORT_PROGRESS", "0")


def make_sae(kind: str, params, seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(D, N_FEATURES, kind, seed=seed, params=params).double()
    with torch.no_grad():  # away from the symmetric init so every path is exercised
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc_f.copy_(torch.randn(N_FEATURES, generator=g, dtype=torch.float64) * 0.5)
        sae.b_dec_d.copy_(torch.randn(D, generator=g, dtype=torch.float64) * 0.3)
    return sae


def batch(seed: int = 5) -> torch.Tensor:
    return torch.randn(N_ROWS, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ours(sae: SparseAutoencoder, xn_nd: torch.Tensor, sparse: bool, ctx: LossContext) -> tuple[float, dict[str, torch.Tensor]]:
    sae = copy.deepcopy(sae)
    out = sae.training_forward(xn_nd, sparse=sparse, ctx=ctx)
    out.loss.backward()
    return out.loss.item(), {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


def assert_same(loss: float, grads: dict, loss_ref: float, grads_ref: dict) -> None:
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    assert set(grads) == set(grads_ref)
    for name, g_ref in grads_ref.items():
        assert g_ref.abs().max() > 0, name  # the reference gives every parameter a gradient here
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-10, atol=1e-12)


def pre_activations(sae: SparseAutoencoder, xn_nd: torch.Tensor) -> torch.Tensor:
    return (xn_nd - sae.b_dec_d) @ sae.W_enc_fd.t() + sae.b_enc_f


def grads_of(sae: SparseAutoencoder, loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- JumpReLU


def jumprelu_reference(sae: SparseAutoencoder, xn_nd: torch.Tensor, coeff: float) -> tuple[float, dict[str, torch.Tensor]]:
    """Rajamanoharan et al. 2024, eqs. 9–12, as plain autograd: the straight-through estimators are
    written as `value + (θ − θ.detach()) · pseudo-derivative`, which adds 0 and has that θ-gradient."""
    sae = copy.deepcopy(sae)
    eps = sae.params.bandwidth
    theta_f = sae.threshold_f
    z_nf = pre_activations(sae, xn_nd)
    step_nf = (z_nf > theta_f).double()
    kernel_nf = ((z_nf - theta_f).abs() < eps / 2).double().detach()  # rectangle K((z − θ)/ε)
    theta_ste = theta_f - theta_f.detach()
    f_nf = z_nf * step_nf.detach() + theta_ste * (-(theta_f / eps) * kernel_nf).detach()
    l0_n = (step_nf.detach() + theta_ste * (-kernel_nf / eps)).sum(1)
    xhat_nd = f_nf @ sae.W_dec_fd + sae.b_dec_d
    return grads_of(sae, (xhat_nd - xn_nd).pow(2).mean() + coeff * l0_n.mean())


@pytest.mark.parametrize("sparse", [True, False])
def test_jumprelu_equals_paper_reference(sparse):
    params = JumpReLUParams(l0_target=None, l0_coeff=0.05, bandwidth=0.4)
    sae = make_sae("jumprelu", params)
    with torch.no_grad():  # thresholds spread over the pre-activations' range
        sae.threshold_f.copy_(torch.rand(N_FEATURES, generator=torch.Generator().manual_seed(3), dtype=torch.float64).mul(1.5).add(0.05))
    xn_nd = batch()
    z = pre_activations(sae, xn_nd).detach()
    theta = sae.threshold_f.detach()
    near_below = ((z <= theta) & (theta - z < 0.2)).sum()
    assert near_below > 20  # the θ-gradient of pairs just below their threshold is exercised
    loss, grads = ours(sae, xn_nd, sparse, LossContext(sparsity_scale=0.5))
    assert_same(loss, grads, *jumprelu_reference(sae, xn_nd, 0.05 * 0.5))


def test_jumprelu_inference_is_the_jump():
    sae = make_sae("jumprelu", JumpReLUParams())
    xn_nd = batch()
    z = pre_activations(sae, xn_nd).detach()
    f = sae.encode_normalized(xn_nd).detach()
    theta = float(sae.params.threshold_init)
    torch.testing.assert_close(f, torch.where(z > theta, z, torch.zeros_like(z)))


def test_jumprelu_spec_gives_one_sparsity():
    assert [c.tag for c in sae_sweep(SAESpec(kind="jumprelu", jumprelu={"l0_coeff": [1e-3, 1e-2]}))] == \
        ["jumprelu-x32-l0c_0.001-s0", "jumprelu-x32-l0c_0.01-s0"]
    assert [c.tag for c in sae_sweep(SAESpec(kind="jumprelu", jumprelu={"l0_target": [16, 64]}))] == \
        ["jumprelu-x32-l0_16-s0", "jumprelu-x32-l0_64-s0"]
    with pytest.raises(ValueError, match="exactly one of l0_target and l0_coeff"):
        SAESpec(kind="jumprelu", jumprelu={"l0_target": [16], "l0_coeff": [1e-3]})


# --------------------------------------------------------------------------- Matryoshka BatchTopK


def batch_topk_mask(z_nf: torch.Tensor, k: int) -> torch.Tensor:
    """numpy: the batch's k·n largest positive pre-activations."""
    flat = z_nf.detach().numpy().reshape(-1)
    order = np.argsort(-flat, kind="stable")[: k * z_nf.shape[0]]
    keep = np.zeros(flat.shape, dtype=bool)
    keep[order[flat[order] > 0]] = True
    return torch.from_numpy(keep.reshape(z_nf.shape))


def matryoshka_reference(sae: SparseAutoencoder, xn_nd: torch.Tensor, dead_f: torch.Tensor | None = None):
    """Bussmann et al. 2025: BatchTopK codes, L = Σ_p ‖x − f[:, :m_p] W_dec[:m_p] − b_dec‖² (means here),
    plus Gao et al.'s AuxK term on the full reconstruction's residual when `dead_f` is given."""
    sae = copy.deepcopy(sae)
    z_nf = pre_activations(sae, xn_nd)
    f_nf = torch.relu(z_nf) * batch_topk_mask(z_nf, sae.params.k)
    loss = 0.0
    for m in prefix_sizes(sae.params, sae.n_features):
        xhat_nd = f_nf[:, :m] @ sae.W_dec_fd[:m] + sae.b_dec_d
        loss = loss + (xhat_nd - xn_nd).pow(2).mean()
    if dead_f is not None:
        loss = loss + auxk_term(sae, xn_nd, z_nf, xhat_nd, dead_f)
    return grads_of(sae, loss)


@pytest.mark.parametrize("sparse", [True, False])
def test_matryoshka_equals_paper_reference(sparse):
    sae = make_sae("matryoshka", MatryoshkaParams(k=6, prefixes=[0.125, 0.5, 1.0]))
    xn_nd = batch()
    assert prefix_sizes(sae.params, N_FEATURES) == [6, 24, 48]
    loss, grads = ours(sae, xn_nd, sparse, LossContext())
    assert_same(loss, grads, *matryoshka_reference(sae, xn_nd))


def test_matryoshka_prefixes_are_validated():
    with pytest.raises(ValueError, match="last prefix must be 1"):
        MatryoshkaParams(prefixes=[0.25, 0.5])
    with pytest.raises(ValueError, match="must increase"):
        MatryoshkaParams(prefixes=[0.5, 0.25, 1.0])
    with pytest.raises(ValueError, match="round to repeated sizes"):
        SparseAutoencoder(4, 8, "matryoshka", params=MatryoshkaParams(k=2, prefixes=[0.01, 0.02, 1.0]))


# --------------------------------------------------------------------------- AuxK


def auxk_term(sae, xn_nd, z_nf, xhat_nd, dead_f):
    """Gao et al. 2024 §A.2: ê = W_dec · TopK_aux(z over dead latents), L_aux = ‖(x − x̂) − ê‖² (means here)."""
    p = sae.params
    z_dead_nf = torch.where(dead_f, z_nf, torch.tensor(-torch.inf, dtype=z_nf.dtype))
    k_aux = min(p.aux_k, int(dead_f.sum()))
    idx_nk = z_dead_nf.detach().topk(k_aux, dim=1).indices
    keep_nf = torch.zeros_like(z_nf, dtype=torch.bool).scatter_(1, idx_nk, True)
    ehat_nd = (torch.relu(z_nf) * keep_nf) @ sae.W_dec_fd
    return p.aux_coeff * ((xn_nd - xhat_nd).detach() - ehat_nd).pow(2).mean()


def topk_auxk_reference(sae, xn_nd, dead_f):
    sae = copy.deepcopy(sae)
    z_nf = pre_activations(sae, xn_nd)
    idx_nk = z_nf.detach().topk(sae.params.k, dim=1).indices
    keep_nf = torch.zeros_like(z_nf, dtype=torch.bool).scatter_(1, idx_nk, True)
    xhat_nd = (torch.relu(z_nf) * keep_nf) @ sae.W_dec_fd + sae.b_dec_d
    return grads_of(sae, (xhat_nd - xn_nd).pow(2).mean() + auxk_term(sae, xn_nd, z_nf, xhat_nd, dead_f))


def dead_context(dead_f: torch.Tensor, window: int) -> LossContext:
    n_seen = 10 * window
    last_fired_f = torch.where(dead_f, n_seen - window, n_seen - window + 1).long()  # dead: exactly `window` ago
    return LossContext(n_seen=n_seen, last_fired_f=last_fired_f)


DEAD_F = torch.arange(N_FEATURES) % 3 == 0  # 16 dead latents


@pytest.mark.parametrize("sparse", [True, False])
def test_topk_auxk_equals_paper_reference(sparse):
    sae = make_sae("topk", TopKParams(k=5, aux_k=7, aux_coeff=0.25, dead_patches=1000))
    xn_nd = batch()
    loss, grads = ours(sae, xn_nd, sparse, dead_context(DEAD_F, 1000))
    assert_same(loss, grads, *topk_auxk_reference(sae, xn_nd, DEAD_F))
    # without dead latents the term is absent: plain TopK
    plain = ours(sae, xn_nd, sparse, dead_context(torch.zeros(N_FEATURES, dtype=torch.bool), 1000))[0]
    assert plain < loss


@pytest.mark.parametrize("sparse", [True, False])
def test_matryoshka_auxk_equals_paper_reference(sparse):
    sae = make_sae("matryoshka", MatryoshkaParams(k=6, prefixes=[0.25, 1.0], aux_k=4, aux_coeff=0.5, dead_patches=50))
    xn_nd = batch()
    loss, grads = ours(sae, xn_nd, sparse, dead_context(DEAD_F, 50))
    assert_same(loss, grads, *matryoshka_reference(sae, xn_nd, DEAD_F))


def test_auxk_default_coefficient_and_tag():
    assert TopKParams().aux_coeff == 1 / 32
    assert [c.tag for c in sae_sweep(SAESpec(kind="topk", topk={"k": [8], "aux_k": 64}))] == ["topk-x32-k8-aux64-s0"]


# --------------------------------------------------------------------------- every kind


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_round_trips_a_checkpoint(tmp_path, kind):
    sae = SparseAutoencoder(D, N_FEATURES, kind, seed=0, params=KINDS[kind].Params(**({"k": 4} if "k" in KINDS[kind].Params.model_fields else {})))
    save_sae(sae, tmp_path / kind)
    loaded = load_sae(tmp_path / kind)
    assert loaded.params == sae.params and loaded.kind == kind
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(x)[0], sae(x)[0])


# --------------------------------------------------------------------------- behaviour in training


D_MODEL, N_TRUE = 16, 64


class Planted:
    """x = sparse non-negative codes (Zipf-like frequencies, 4 per patch) @ a random unit dictionary + offset."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        atoms = torch.randn(N_TRUE, D_MODEL, generator=g)
        self.dictionary = atoms / atoms.norm(dim=1, keepdim=True)
        self.freq = 1.0 / torch.arange(1, N_TRUE + 1).float() ** 0.7

    def sample(self, n_rows: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(self.freq, n_rows * 4, replacement=True, generator=g).view(n_rows, 4)
        codes = torch.zeros(n_rows, N_TRUE).scatter_add_(1, idx, torch.rand(n_rows, 4, generator=g) * 2 + 0.5)
        return codes @ self.dictionary + 2.0

    def __call__(self, batch_rows: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_rows, g)


def train_one(tmp_path, name: str, steps: int = 150, **spec_fields):
    base = dict(expansion=[4], seeds=[0], batch_size=256, n_patches=256 * steps, lr=5e-3, lr_warmup_steps=10,
                l1_warmup_steps=10, log_every=10)
    sae_spec = SAESpec(**{**base, **spec_fields})
    (result,) = train_saes(Planted(), sae_spec, sae_sweep(sae_spec), tmp_path / name, "cpu", "h", "m")
    return load_sae(result.dir)


def held_out(n: int = 4096) -> torch.Tensor:
    return Planted().sample(n, torch.Generator().manual_seed(99))


def fvu(x: torch.Tensor, xhat: torch.Tensor) -> float:
    return float(((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_jumprelu_reaches_its_target_l0(tmp_path):
    target = 6.0
    sae = train_one(tmp_path, "jump", steps=200, kind="jumprelu", jumprelu={"l0_target": [target], "bandwidth": 0.05})
    with torch.no_grad():
        xhat, f = sae(held_out())
    l0 = float((f > 0).sum(1).float().mean())
    # Stated tolerance: ±25 % on held-out patches after 200 steps. Measured: 6.14 (+2 %); with the integral
    # term alone (gain 0) 8.2 (+36 %): the encoder first drops L0 to ~2.8, θ follows slowly (docs/explanation/sae-kinds.md).
    assert l0 == pytest.approx(target, rel=0.25)
    assert fvu(held_out(), xhat) < 0.5


def test_each_matryoshka_prefix_reconstructs_better_than_the_one_before(tmp_path):
    sae = train_one(tmp_path, "mat", kind="matryoshka", k=[4], matryoshka={"prefixes": [0.0625, 0.25, 1.0]})
    x = held_out()
    with torch.no_grad():
        xn = sae.normalize(x)
        f = sae.encode_normalized(xn)
        fvus = [fvu(xn, f[:, :m] @ sae.W_dec_fd[:m] + sae.b_dec_d) for m in prefix_sizes(sae.params, sae.n_features)]
    assert all(b < a for a, b in zip(fvus, fvus[1:])), fvus
    assert fvus[0] < 0.9 and fvus[-1] < 0.35, fvus


def n_dead(sae: SparseAutoencoder) -> int:
    with torch.no_grad():
        f = sae.encode(held_out(8192))
    return int((f.amax(0) <= 0).sum())


def test_auxk_leaves_fewer_dead_latents(tmp_path):
    # k = 1 of 64 latents at a high learning rate starves many latents; AuxK at its default α = 1/32.
    # Measured: 39 dead without AuxK, 6 with it.
    common = dict(kind="topk", k=[1], expansion=[4], lr=3e-2, steps=200)
    plain = train_one(tmp_path, "plain", **common)
    aux = train_one(tmp_path, "aux", topk={"aux_k": 16, "dead_patches": 256 * 5}, **common)
    assert n_dead(plain) > 20
    assert n_dead(aux) < 0.5 * n_dead(plain), (n_dead(aux), n_dead(plain))


# --------------------------------------------------------------------------- analysis and site


def test_matryoshka_prefix_metrics_match_numpy(tmp_path):
    from saev_report.activations import ActivationStore, ShardWriter, StoreMeta
    from saev_report.analyse import sub_model_metrics

    class Layout:
        n_cls, n_registers, grid = 0, 0, (2, 3)

    g = torch.Generator().manual_seed(4)
    acts_ipd = torch.randn(9, 6, D, generator=g) * 2 + 1
    meta = StoreMeta.create(model="m", layer=3, dataset="ds", d_model=D, dtype="float32", token_kinds=["patches"], layout=Layout)
    writer = ShardWriter(tmp_path, meta, images_per_shard=4)
    writer.add(np.arange(9), acts_ipd)
    writer.close()
    sae = SparseAutoencoder(D, N_FEATURES, "matryoshka", seed=0, params=MatryoshkaParams(k=5, prefixes=[0.25, 0.5, 1.0]))
    sae.fit_normalization(acts_ipd.reshape(-1, D))
    sae.threshold.fill_(0.3)
    subs = KINDS["matryoshka"].sub_models(sae.params, N_FEATURES)
    assert [(s.name, s.n_features) for s in subs] == [("prefix 1", 12), ("prefix 2", 24)]  # the whole SAE is the `saes` row
    rows = sub_model_metrics(ActivationStore(tmp_path), sae, subs, batch_size=13, device=torch.device("cpu"))
    with torch.no_grad():  # numpy, float64
        xn = sae.normalize(acts_ipd.reshape(-1, D)).double().numpy()
        f = sae.encode_normalized(torch.from_numpy(xn).float()).double().numpy()
        W, b = sae.W_dec_fd.double().numpy(), sae.b_dec_d.double().numpy()
    for row, sub in zip(rows, subs):
        m = sub.n_features
        err = ((xn - (f[:, :m] @ W[:m] + b)) ** 2).sum()
        assert row["fvu"] == pytest.approx(err / ((xn - xn.mean(0)) ** 2).sum(), rel=1e-5)
        assert row["l0"] == pytest.approx((f[:, :m] > 0).sum(1).mean())
        assert row["n_patches_eval"] == 54


def test_feature_page_line_names_the_prefix():
    kind, params = KINDS["matryoshka"], MatryoshkaParams(prefixes=[0.25, 0.5, 1.0])
    assert kind.feature_group(params, 48, 0).startswith("Matryoshka prefix 1 of 3: features 0–11")
    assert kind.feature_group(params, 48, 12).startswith("Matryoshka prefix 2 of 3: features 12–23")
    assert kind.feature_group(params, 48, 47).startswith("Matryoshka prefix 3 of 3: features 24–47")
    assert KINDS["topk"].feature_group(TopKParams(), 48, 3) is None


def test_l0_plot_draws_each_kinds_frontier_and_the_prefixes():
    from saev_report.render.charts import metric_scatter, pareto_front

    assert pareto_front([(1, 0.5), (2, 0.6), (3, 0.2), (0.5, 0.9)]) == [(0.5, 0.9), (1, 0.5), (3, 0.2)]
    saes = [{"sae_id": f"m/L1/{kind}-{i}", "model_label": "M", "kind": kind, "l0": l0, "fvu": fvu, "list_page": "p.html"}
            for kind, points in {"topk": [(8, 0.3), (32, 0.2)], "matryoshka": [(32, 0.25)]}.items() for i, (l0, fvu) in enumerate(points)]
    subs = [{"sae_id": "m/L1/matryoshka-0", "model_label": "M", "kind": "matryoshka", "name": "prefix 1", "n_features": 96,
             "l0": 4.0, "fvu": 0.6, "list_page": "p.html"}]
    traces = metric_scatter(saes, "fvu", "FVU", subs)["data"]
    names = [t["name"] for t in traces]
    assert names == ["M · topk", "M · topk frontier", "M · matryoshka", "M · matryoshka prefixes"]
    assert traces[1]["x"] == [8, 32] and traces[1]["showlegend"] is False
    assert traces[0]["marker"]["symbol"] != traces[2]["marker"]["symbol"]
    assert traces[3]["x"] == [4.0] and "prefix 1 (96 features)" in traces[3]["text"][0]


def test_a_kind_section_may_train_fewer_seeds():
    spec = SAESpec(kind=["topk", "matryoshka"], expansion=[4], k=[32], seeds=[0, 1], matryoshka={"seeds": [0]})
    assert [c.tag for c in sae_sweep(spec)] == ["topk-x4-k32-s0", "topk-x4-k32-s1", "matryoshka-x4-k32-s0"]


# --------------------------------------------------------------------------- data-parallel


DDP_CASES = {
    "jumprelu": dict(kind="jumprelu", jumprelu={"l0_target": [6.0], "bandwidth": 0.05}),  # λ from the full batch's L0
    "topk-auxk": dict(kind="topk", k=[1], topk={"aux_k": 16, "dead_patches": 256 * 3}),  # dead latents shared by the ranks
    "matryoshka": dict(kind="matryoshka", k=[4], matryoshka={"aux_k": 8, "dead_patches": 256 * 3}),  # per-rank BatchTopK
}


def _train_state(rank: int, world: int, out: str, case: str) -> dict[str, torch.Tensor]:
    from saev_report.distributed import Shard

    spec = SAESpec(**{**dict(expansion=[4], seeds=[0], batch_size=256, n_patches=256 * 30, lr=5e-3, lr_warmup_steps=5,
                             l1_warmup_steps=5, log_every=10), **DDP_CASES[case]})
    (result,) = train_saes(Planted(), spec, sae_sweep(spec), Path(out) / f"r{rank}", "cpu", "h", "m",
                           data_parallel=Shard(rank, world))
    return {name: t.detach().clone() for name, t in result.sae.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DDP_CASES))
def test_new_kinds_train_data_parallel(tmp_path, case):
    """2 gloo ranks: the replicas stay equal, and (where the kind's rule does not see the batch
    split: not BatchTopK's per-rank top k·n) match one process within float tolerance."""
    from gloo import run_on_ranks

    torch.set_num_threads(1)
    rank0, rank1 = run_on_ranks(_train_state, 2, tmp_path, 2, str(tmp_path), case)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    if case != "matryoshka":
        one = _train_state(0, 1, str(tmp_path / "one"), case)
        for name in one:
            torch.testing.assert_close(rank0[name], one[name], rtol=1e-3, atol=1e-4, msg=name)
