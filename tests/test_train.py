"""Training loop: planted dictionaries are learnt, sweeps share one pass, logs, divergence, seeds."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from saev_report.sae import load_sae
from saev_report.spec import SAESpec, sae_sweep
from saev_report.tables import TABLES, read_metadata
from saev_report import train
from saev_report.train import TrainingDiverged, train_saes, warmup


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("SAEV_REPORT_PROGRESS", "0")


D_MODEL, N_TRUE, L0_TRUE = 16, 48, 3


class PlantedStore:
    """Activations x = sparse non-negative codes @ a random unit dictionary + an offset."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        atoms = torch.randn(N_TRUE, D_MODEL, generator=g)
        self.dictionary = atoms / atoms.norm(dim=1, keepdim=True)
        self.d_model = D_MODEL
        self.calls: list[tuple[int, int]] = []

    def sample(self, n_rows: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.rand(n_rows, N_TRUE, generator=g).argsort(dim=1)[:, :L0_TRUE]
        codes = torch.zeros(n_rows, N_TRUE).scatter_(1, idx, torch.rand(n_rows, L0_TRUE, generator=g) * 2 + 0.5)
        return codes @ self.dictionary + 3.0

    def shuffled(self, batch_rows: int, seed: int, buffer_rows: int):
        self.calls.append((batch_rows, seed))
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_rows, g)


def spec(**overrides) -> SAESpec:
    base = dict(kind="relu", expansion=[4], l1_coeff=[0.1], k=[3], seeds=[0], batch_size=512, n_patches=512 * 40,
                lr=1e-2, lr_warmup_steps=20, l1_warmup_steps=50, log_every=10)  # fmt: skip
    return SAESpec(**{**base, **overrides})


def fvu(x: np.ndarray, xhat: np.ndarray) -> float:
    """Centred fraction of variance unexplained."""
    return float(((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_warmup_schedule():
    assert [warmup(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup(0, 0) == 1.0


def test_sweep_learns_planted_dictionary_in_one_pass(tmp_path):
    store = PlantedStore()
    sae_spec = spec(l1_coeff=[0.03, 0.1], n_patches=512 * 700)
    results = train_saes(store, sae_spec, sae_sweep(sae_spec), tmp_path, "cpu", "hash123", "m/L3")
    assert len(store.calls) == 1  # one pass over the data for the whole sweep
    assert [r.sae_id for r in results] == ["m/L3/relu-x4-l1_0.03-s0", "m/L3/relu-x4-l1_0.1-s0"]
    x = store.sample(4096, torch.Generator().manual_seed(99))
    for result in results:
        sae = load_sae(result.dir)
        with torch.no_grad():
            xhat, f = sae(x)
        assert fvu(x.numpy(), xhat.numpy()) < 0.3, result.sae_id
        l0 = float((f > 0).sum(1).float().mean())
        assert l0 < 0.5 * sae.n_features  # sparse: a fresh ReLU SAE fires about half its features
        assert result.n_patches == 512 * 700 and result.n_steps == 700
        torch.testing.assert_close(sae.W_dec_fd.norm(dim=1), torch.ones(sae.n_features))
    # the stronger penalty is sparser, and recovers the planted atoms
    l0s = [r.l0 for r in results]
    assert l0s[1] < l0s[0]
    best_cos = (store.dictionary @ load_sae(results[1].dir).W_dec_fd.T).max(dim=1).values
    assert float((best_cos > 0.9).float().mean()) >= 0.8


def test_train_log_table(tmp_path):
    store = PlantedStore()
    sae_spec = spec(n_patches=512 * 25, log_every=10)
    (result,) = train_saes(store, sae_spec, sae_sweep(sae_spec), tmp_path, "cpu", "hash123", "m/L3")
    part = tmp_path / "train_log" / "relu-x4-l1_0.1-s0.parquet"
    table = pq.read_table(part)
    assert table.schema.names == TABLES["train_log"].schema.names
    assert read_metadata(part)["saev_report.spec_hash"] == "hash123"
    rows = table.to_pylist()
    assert [r["step"] for r in rows] == [10, 20, 25]  # every log_every steps and the last
    assert [r["n_patches"] for r in rows] == [5120, 10240, 12800]
    assert rows[0]["lr"] == pytest.approx(1e-2 * 10 / 20) and rows[-1]["lr"] == pytest.approx(1e-2)
    assert rows[0]["l1_coeff"] == pytest.approx(0.1 * 10 / 50)
    for r in rows:
        assert r["sae_id"] == result.sae_id
        assert r["loss"] == pytest.approx(r["mse"] + r["l1_coeff"] * r["l1"], rel=1e-5)
        assert 0 <= r["dead_frac"] <= 1 and 0 < r["l0"] < 192
    assert [r["seconds"] for r in rows] == sorted(r["seconds"] for r in rows)
    assert rows[-1]["mse"] < rows[0]["mse"]


def test_nan_batch_stops_with_step_and_sae(tmp_path):
    store = PlantedStore()

    def batches(batch_rows, seed):
        g = torch.Generator().manual_seed(seed)
        for step in range(1, 1000):
            x = store.sample(batch_rows, g)
            if step == 134:  # after the 128 batches (65,536 rows) of the normalisation sample
                x[5, 2] = float("nan")
            yield x

    sae_spec = spec(n_patches=512 * 200)
    with pytest.raises(TrainingDiverged, match=r"m/L3/relu-x4-l1_0.1-s0 diverged at step 134.*input batch holds NaN") as exc:
        train_saes(batches, sae_spec, sae_sweep(sae_spec), tmp_path, "cpu", "h", "m/L3")
    assert exc.value.step == 134 and exc.value.sae_id == "m/L3/relu-x4-l1_0.1-s0"


def test_divergent_learning_rate_is_caught(tmp_path):
    store = PlantedStore()
    sae_spec = spec(lr=1e30, lr_warmup_steps=0, n_patches=512 * 30)
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        train_saes(store, sae_spec, sae_sweep(sae_spec), tmp_path, "cpu", "h", "m/L3")


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    sae_spec = spec(seeds=[0, 1], n_patches=512 * 15)
    a = train_saes(PlantedStore(), sae_spec, sae_sweep(sae_spec), tmp_path / "a", "cpu", "h", "m")
    b = train_saes(PlantedStore(), sae_spec, sae_sweep(sae_spec), tmp_path / "b", "cpu", "h", "m")
    for ra, rb in zip(a, b):
        for name, tensor in ra.sae.state_dict().items():
            assert torch.equal(tensor, rb.sae.state_dict()[name]), name
    assert not torch.equal(a[0].sae.W_enc_df, a[1].sae.W_enc_df)


def test_sparse_and_dense_paths_train_alike(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "SPARSE_MAX_DENSITY", 1.0)  # the sparse path from the first step on
    runs = {}
    for sparse in (True, False):
        sae_spec = spec(sparse_backward=sparse, n_patches=512 * 120)
        (runs[sparse],) = train_saes(PlantedStore(), sae_spec, sae_sweep(sae_spec), tmp_path / str(sparse), "cpu", "h", "m")
    assert runs[True].mse == pytest.approx(runs[False].mse, rel=0.02)
    assert runs[True].l0 == pytest.approx(runs[False].l0, rel=0.02)
    torch.testing.assert_close(runs[True].sae.W_dec_fd, runs[False].sae.W_dec_fd, atol=2e-3, rtol=0)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_topk_kinds_train(tmp_path, kind):
    store = PlantedStore()
    sae_spec = spec(kind=kind, k=[3], n_patches=512 * 150)
    (result,) = train_saes(store, sae_spec, sae_sweep(sae_spec), tmp_path, "cpu", "h", "m")
    assert result.sae_id == f"m/{kind}-x4-k3-s0"
    assert result.l0 == pytest.approx(3.0, abs=1e-6)  # exactly k per patch on average, in training
    sae = load_sae(result.dir)
    x = store.sample(2048, torch.Generator().manual_seed(5))
    with torch.no_grad():
        xhat, f = sae(x)
    l0 = float((f > 0).sum(1).float().mean())
    if kind == "topk":
        assert l0 <= 3.0
    else:  # a fixed threshold at inference keeps about k per patch on average
        assert float(sae.threshold) > 0
        assert 1.5 < l0 < 6.0
    assert fvu(x.numpy(), xhat.numpy()) < 0.6


def test_nan_in_normalisation_sample_is_an_error(tmp_path):
    def batches(batch_rows, seed):
        x = torch.ones(batch_rows, D_MODEL)
        x[0, 0] = float("inf")
        yield x

    with pytest.raises(ValueError, match="NaN/inf"):
        train_saes(batches, spec(), sae_sweep(spec()), tmp_path, "cpu", "h", "m")


def test_short_store_ends_training_early(tmp_path):
    store = PlantedStore()

    def batches(batch_rows, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(7):
            yield store.sample(batch_rows, g)

    (result,) = train_saes(batches, spec(), sae_sweep(spec()), tmp_path, "cpu", "h", "m")
    assert result.n_steps == 7 and result.n_patches == 7 * 512
    assert np.isfinite(result.mse) and result.l0 > 0


def test_empty_store_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no activations"):
        train_saes(lambda rows, seed: iter(()), spec(), sae_sweep(spec()), tmp_path, "cpu", "h", "m")
