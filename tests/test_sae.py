"""SAE module: shapes, normalisation, activations, sparse == dense gradients, checkpoints."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from saev_report.sae import (
    SparseAutoencoder,
    load_reference_checkpoint,
    load_sae,
    read_sae_config,
    save_sae,
    select_active,
    stable_argsort,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sae(kind: str = "relu", d: int = 12, n_features: int = 48, k: int = 4, seed: int = 0, dtype=torch.float32):
    sae = SparseAutoencoder(d, n_features, kind, k, seed=seed).to(dtype)
    with torch.no_grad():  # move away from the symmetric init so every path is exercised
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc_f.copy_(torch.randn(n_features, generator=g) * 0.5)
        sae.b_dec_d.copy_(torch.randn(d, generator=g) * 0.3)
    return sae


def raw_batch(n: int = 64, d: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3.0 + torch.linspace(-5, 5, d)


# --------------------------------------------------------------------------- shapes, normalisation, init


def test_encode_decode_shapes_and_forward_consistency():
    sae = make_sae()
    x_nd = raw_batch()
    f_nf = sae.encode(x_nd)
    xhat_nd = sae.decode(f_nf)
    assert f_nf.shape == (64, 48) and xhat_nd.shape == (64, 12)
    xhat2_nd, f2_nf = sae(x_nd)
    torch.testing.assert_close(f2_nf, f_nf)
    torch.testing.assert_close(xhat2_nd, xhat_nd)
    assert (f_nf >= 0).all()


def test_relu_encode_matches_numpy_formula():
    sae = make_sae()
    x_nd = raw_batch()
    sae.fit_normalization(x_nd)
    W_enc, b_enc = sae.W_enc_df.detach().numpy(), sae.b_enc_f.detach().numpy()
    W_dec, b_dec = sae.W_dec_fd.detach().numpy(), sae.b_dec_d.detach().numpy()
    mean, scale = sae.act_mean_d.numpy(), float(sae.act_scale)
    xn = (x_nd.numpy() - mean) * scale
    f = np.maximum((xn - b_dec) @ W_enc + b_enc, 0)
    xhat = (f @ W_dec + b_dec) / scale + mean
    np.testing.assert_allclose(sae.encode(x_nd).detach().numpy(), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae(x_nd)[0].detach().numpy(), xhat, rtol=1e-4, atol=1e-4)


def test_normalization_statistics_and_round_trip():
    sae = make_sae()
    x_nd = raw_batch(n=2000)
    sae.fit_normalization(x_nd)
    x = x_nd.double().numpy()
    mean = x.mean(0)
    np.testing.assert_allclose(sae.act_mean_d.numpy(), mean, rtol=1e-5, atol=1e-5)
    expected_scale = math.sqrt(12) / np.linalg.norm(x - mean, axis=1).mean()
    assert float(sae.act_scale) == pytest.approx(expected_scale, rel=1e-5)
    xn_nd = sae.normalize(x_nd)
    assert float(xn_nd.norm(dim=1).mean()) == pytest.approx(math.sqrt(12), rel=1e-4)  # mean norm √d
    assert float(xn_nd.mean(0).abs().max()) < 1e-4
    torch.testing.assert_close(sae.denormalize(xn_nd), x_nd, rtol=1e-5, atol=1e-4)


def test_normalization_off_is_identity():
    sae = make_sae()
    x_nd = raw_batch()
    sae.fit_normalization(x_nd, normalize=False)
    torch.testing.assert_close(sae.normalize(x_nd), x_nd)


def test_init_recipe():
    sae = SparseAutoencoder(12, 48, "relu", seed=3)
    x_nd = raw_batch(n=500)
    sae.fit_normalization(x_nd)
    sae.init_b_dec(x_nd)
    torch.testing.assert_close(sae.b_dec_d.detach(), sae.normalize(x_nd).mean(0))
    assert torch.equal(sae.b_enc_f.detach(), torch.zeros(48))
    torch.testing.assert_close(sae.W_dec_fd.detach().norm(dim=1), torch.ones(48))
    bound = math.sqrt(6 / 48)  # kaiming-uniform, ReLU gain: √(6 / fan_in), fan_in = F for a [d, F] tensor
    assert sae.W_enc_df.abs().max() <= bound
    assert not torch.equal(SparseAutoencoder(12, 48, seed=4).W_enc_df, sae.W_enc_df)
    torch.testing.assert_close(SparseAutoencoder(12, 48, seed=3).W_enc_df, sae.W_enc_df)


def test_bad_kind_and_k():
    with pytest.raises(ValueError, match="unknown SAE kind"):
        SparseAutoencoder(4, 8, "gated")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 0 < k"):
        SparseAutoencoder(4, 8, "topk", k=0)


# --------------------------------------------------------------------------- sparsity patterns


def test_topk_keeps_exactly_k_per_row():
    sae = make_sae("topk", k=5)
    with torch.no_grad():
        sae.b_enc_f.fill_(10.0)  # every pre-activation positive: exactly k survive the ReLU
    x_nd = raw_batch()
    f_nf = sae.encode(x_nd)
    assert ((f_nf > 0).sum(dim=1) == 5).all()
    pre = sae.pre_activations_normalized(sae.normalize(x_nd)).detach().numpy()
    top = np.argsort(-pre, axis=1)[:, :5]
    expected = np.zeros_like(pre)
    np.put_along_axis(expected, top, np.take_along_axis(pre, top, axis=1), axis=1)
    np.testing.assert_allclose(f_nf.detach().numpy(), expected, rtol=1e-6)
    active = select_active(torch.from_numpy(pre), "topk", 5)
    assert active.nnz == 64 * 5 and torch.equal(torch.bincount(active.rows_a), torch.full((64,), 5))


@pytest.mark.parametrize("n_rows,n_features,k", [(64, 48, 4), (200, 1000, 3), (8, 16, 16)])
def test_batch_topk_selection_matches_flat_topk(n_rows, n_features, k):
    g = torch.Generator().manual_seed(n_features)
    pre_nf = torch.randn(n_rows, n_features, generator=g)
    active = select_active(pre_nf, "batchtopk", k)
    flat = pre_nf.numpy().reshape(-1)
    n_keep = min(k * n_rows, int((flat > 0).sum()))
    expected = set(np.argsort(-flat)[:n_keep].tolist())
    got = (active.rows_a * n_features + active.cols_a).tolist()
    assert set(got) == expected and len(got) == len(expected)
    assert got == sorted(got)  # patch-major order
    assert active.min_kept == pytest.approx(float(np.sort(flat)[::-1][n_keep - 1]))


def test_batch_topk_with_ties_keeps_exactly_k_per_row_on_average():
    # all values equal: the sampled cut keeps nothing, so the exact fallback runs
    pre_nf = torch.ones(300, 400)
    active = select_active(pre_nf, "batchtopk", 5)
    assert active.nnz == 1500 and active.min_kept == 1.0
    assert torch.equal(active.rows_a, active.rows_a.sort().values)


def test_batch_topk_threshold_used_at_inference():
    sae = make_sae("batchtopk", k=4)
    x_nd = raw_batch()
    sae.update_threshold(0.5)
    sae.update_threshold(1.5)
    assert float(sae.threshold) == pytest.approx(1.0)  # running mean while young
    f_nf = sae.encode(x_nd)
    pre_nf = sae.pre_activations_normalized(sae.normalize(x_nd))
    torch.testing.assert_close(f_nf, torch.where(pre_nf > 1.0, pre_nf, 0.0))
    # one row alone encodes as it does inside the batch: no dependence on the batch
    torch.testing.assert_close(sae.encode(x_nd[3:4]), f_nf[3:4])


def test_threshold_becomes_ema():
    sae = make_sae("batchtopk", k=4)
    for _ in range(5000):
        sae.update_threshold(1.0)
    for _ in range(1000):
        sae.update_threshold(3.0)
    # an EMA with β = 0.999 after 1000 steps at 3.0 sits at 3 − 2·0.999¹⁰⁰⁰ ≈ 2.26; a plain mean at 1.33
    assert float(sae.threshold) == pytest.approx(3 - 2 * 0.999**1000, rel=1e-3)


def test_stable_argsort_paths_agree():
    keys = torch.randint(0, 300, (5000,), generator=torch.Generator().manual_seed(0))
    fast = stable_argsort(keys, 300)
    slow = torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    assert torch.equal(fast, slow)
    assert torch.equal(stable_argsort(keys, 1 << 20), slow)  # torch path (keys too wide for uint16)


# --------------------------------------------------------------------------- gradients


def _grads(sae: SparseAutoencoder, xn_nd: torch.Tensor, sparse: bool, l1_coeff: float) -> tuple[float, dict[str, torch.Tensor]]:
    sae = copy.deepcopy(sae)
    out = sae.training_forward(xn_nd, sparse=sparse)
    loss = out.mse + l1_coeff * out.l1
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk"])
def test_sparse_gradients_equal_dense_autograd(kind):
    sae = make_sae(kind, k=5)
    xn_nd = torch.randn(96, 12, generator=torch.Generator().manual_seed(7))
    loss_s, grads_s = _grads(sae, xn_nd, sparse=True, l1_coeff=0.03)
    loss_d, grads_d = _grads(sae, xn_nd, sparse=False, l1_coeff=0.03)
    assert loss_s == pytest.approx(loss_d, rel=1e-6)
    for name, g_dense in grads_d.items():
        assert g_dense.abs().max() > 0, name
        torch.testing.assert_close(grads_s[name], g_dense, rtol=1e-5, atol=1e-5 * float(g_dense.abs().max()))


def test_sparse_gradients_equal_dense_float64_and_topk_zeros():
    # topk with mostly negative pre-activations: kept entries that the ReLU zeroes get no gradient
    sae = make_sae("topk", k=6, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc_f.sub_(1.5)
    xn_nd = torch.randn(40, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sae.training_forward(xn_nd)
    assert out.n_active > out.n_fired > 0  # some kept pairs are zero
    _, grads_s = _grads(sae, xn_nd, sparse=True, l1_coeff=0.0)
    _, grads_d = _grads(sae, xn_nd, sparse=False, l1_coeff=0.0)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-12, atol=1e-12)


def test_parallel_gradient_removed():
    sae = make_sae()
    out = sae.training_forward(torch.randn(64, 12, generator=torch.Generator().manual_seed(2)))
    (out.mse + 0.01 * out.l1).backward()
    before = sae.W_dec_fd.grad.clone()
    sae.remove_parallel_grad_()
    W = sae.W_dec_fd.detach()
    after = sae.W_dec_fd.grad
    assert (before * W).sum(1).abs().max() > 1e-4  # there was a parallel part
    assert (after * W).sum(1).abs().max() < 1e-6  # ⟂ every atom now
    # and only the parallel part went: numpy projection
    b, w = before.double().numpy(), W.double().numpy()
    expected = b - (b * w).sum(1, keepdims=True) * w
    np.testing.assert_allclose(after.numpy(), expected, atol=1e-6)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk"])
def test_save_load_round_trip(tmp_path, kind):
    sae = make_sae(kind, k=3)
    sae.fit_normalization(raw_batch(n=300))
    sae.update_threshold(0.7)
    save_sae(sae, tmp_path / "sae", extra={"sae_id": "m/L1/x"})
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["config.json", "sae.safetensors"]  # no temp files left
    loaded = load_sae(tmp_path / "sae")
    assert not loaded.training
    assert (loaded.kind, loaded.k, loaded.d_model, loaded.n_features) == (kind, 3, 12, 48)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x_nd = raw_batch()
    torch.testing.assert_close(loaded(x_nd)[0], sae(x_nd)[0])
    assert read_sae_config(tmp_path / "sae")["sae_id"] == "m/L1/x"


def _write_reference_checkpoint(path, state: dict[str, torch.Tensor], header: dict) -> None:
    """The saev 0.1.0 `nn.dump` layout: one JSON line, then `torch.save(state_dict)`."""
    with open(path, "wb") as fh:
        fh.write((json.dumps(header) + "\n").encode("utf-8"))
        torch.save(state, fh)


def test_load_reference_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(5)
    d, n_features = 8, 32
    state = {
        "W_enc": torch.randn(d, n_features, generator=g),
        "b_enc": torch.randn(n_features, generator=g),
        "W_dec": torch.randn(n_features, d, generator=g),
        "b_dec": torch.randn(d, generator=g),
    }
    header = {"d_vit": d, "exp_factor": 4, "sparsity_coeff": 4e-4, "n_reinit_samples": 0, "ghost_grads": False,
              "remove_parallel_grads": True, "normalize_w_dec": True, "seed": 0}  # fmt: skip
    path = tmp_path / "sae.pt"
    _write_reference_checkpoint(path, state, header)
    sae = load_reference_checkpoint(path)
    x = torch.randn(20, d, generator=g)
    f_ref = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])  # saev's forward
    xhat_ref = f_ref @ state["W_dec"] + state["b_dec"]
    xhat, f = sae(x)
    torch.testing.assert_close(f, f_ref)
    torch.testing.assert_close(xhat, xhat_ref)
    # with the statistics the reference data loader applied: (x − mean) / scalar
    mean, scalar = torch.randn(d, generator=g), 2.5
    sae2 = load_reference_checkpoint(path, act_mean_d=mean, act_scale=1 / scalar)
    expected = torch.relu(((x - mean) / scalar - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    torch.testing.assert_close(sae2.encode(x), expected)


def test_load_reference_checkpoint_rejects_other_files(tmp_path):
    path = tmp_path / "other.pt"
    _write_reference_checkpoint(path, {"weight": torch.zeros(3)}, {"d_vit": 3})
    with pytest.raises(ValueError, match="missing W_enc"):
        load_reference_checkpoint(path)
    bad = tmp_path / "bad.pt"
    state = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)}
    _write_reference_checkpoint(bad, state, {"d_vit": 5})
    with pytest.raises(ValueError, match="d_vit=5"):
        load_reference_checkpoint(bad)


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk"])
def test_both_paths_report_the_same_firing_statistics(kind):
    sae = make_sae(kind, k=4)
    xn_nd = torch.randn(50, 12, generator=torch.Generator().manual_seed(3))
    sparse, dense = sae.training_forward(xn_nd, sparse=True), sae.training_forward(xn_nd, sparse=False)
    with torch.no_grad():  # numpy reference from the dense features
        f_nf = sae.pre_activations_normalized(xn_nd).numpy()
    if kind == "relu":
        f_nf = np.maximum(f_nf, 0)
        assert dense.n_fired == int((f_nf > 0).sum())
        np.testing.assert_array_equal(dense.fired_f.numpy(), (f_nf > 0).any(0))
    for name in ("n_active", "n_fired", "l0", "min_kept"):
        assert getattr(sparse, name) == pytest.approx(getattr(dense, name)), name
    assert torch.equal(sparse.fired_f, dense.fired_f)
    assert dense.l0 == pytest.approx(dense.n_fired / 50)


def _plain_autograd_relu(sae: SparseAutoencoder, xn_nd: torch.Tensor, l1_coeff: float) -> tuple[float, dict[str, torch.Tensor]]:
    """The paper's loss written with nothing but torch ops: the reference for both paths."""
    sae = copy.deepcopy(sae)
    f_nf = torch.relu((xn_nd - sae.b_dec_d) @ sae.W_enc_fd.t() + sae.b_enc_f)
    xhat_nd = f_nf @ sae.W_dec_fd + sae.b_dec_d
    loss = (xhat_nd - xn_nd).pow(2).mean() + l1_coeff * f_nf.sum(1).mean()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("sparse", [False, True])
def test_relu_paths_equal_plain_autograd(sparse):
    sae = make_sae("relu", dtype=torch.float64)
    xn_nd = torch.randn(80, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss_ref, grads_ref = _plain_autograd_relu(sae, xn_nd, 0.05)
    loss, grads = _grads(sae, xn_nd, sparse=sparse, l1_coeff=0.05)
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    for name, g_ref in grads_ref.items():
        assert g_ref.abs().max() > 0, name
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-10, atol=1e-12)
