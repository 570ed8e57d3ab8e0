"""Published SAEs: checkpoints written here in saev's and SAELens's formats load, compute what
their own code computes, and mislabelled ones (wrong k, wrong normalisation) are refused.

The oracles are numpy transcriptions of each format's forward pass (saev HEAD
`nn/modeling.py`, saev 0.1.0, SAELens `saes/*.py`), written from their equations, and
saev-report's own `load_reference_checkpoint` for saev 0.1.0 files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saev_report.errors import InputUnavailable
from saev_report.published import (
    FORMATS,
    CheckTolerance,
    DeclarationMismatch,
    DeclaredSAE,
    LoadCheckFailed,
    PublishedSAEError,
    PublishedSAESpec,
    Selection,
    UnsupportedCheckpoint,
    check_declared,
    check_loaded,
    load_published,
    measure,
    read_published,
    save_published,
    to_sparse_autoencoder,
)
from saev_report.sae import SparseAutoencoder, load_reference_checkpoint, save_sae

D_MODEL, N_FEATURES, TRUE_K = 16, 48, 2
MEAN_NORM = 20.0  # raw ViT activations sit far from the origin: a normalisation then matters


# --------------------------------------------------------------------------- data with a known dictionary


def _dictionary_fd(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    D_fd = rng.standard_normal((N_FEATURES, D_MODEL))
    return D_fd / np.linalg.norm(D_fd, axis=1, keepdims=True)


def _mean_d(seed: int = 1) -> np.ndarray:
    mean_d = np.random.default_rng(seed).standard_normal(D_MODEL)
    return MEAN_NORM * mean_d / np.linalg.norm(mean_d)


def _acts_nd(n: int, seed: int) -> np.ndarray:
    """x = μ + Σ (2 features of the dictionary, amplitude 1–3) + a little noise."""
    rng = np.random.default_rng(seed)
    codes_nf = np.zeros((n, N_FEATURES))
    for row in range(n):
        codes_nf[row, rng.choice(N_FEATURES, TRUE_K, replace=False)] = rng.uniform(1, 3, TRUE_K)
    return _mean_d() + codes_nf @ _dictionary_fd() + 0.01 * rng.standard_normal((n, D_MODEL))


TRAIN = _acts_nd(3000, seed=10)  # what the "publisher" evaluated on
CHECK = _acts_nd(2000, seed=11)  # what the user records


# --------------------------------------------------------------------------- format oracles (numpy)


def saev_head_forward(W_enc_df, b_enc_f, W_dec_fd, b_dec_d, x_nd, kind, k=0, threshold=0.0):
    """saev HEAD: h = x W_enc + b_enc (no b_dec subtraction); TopK keeps the k largest values as
    they are (negative ones too); BatchTopK at inference: h where h > θ."""
    pre_nf = x_nd @ W_enc_df + b_enc_f
    if kind == "relu":
        f_nf = np.maximum(pre_nf, 0)
    elif kind == "topk":
        keep_nf = np.zeros_like(pre_nf, dtype=bool)
        np.put_along_axis(keep_nf, np.argsort(-pre_nf, axis=1)[:, :k], True, axis=1)
        f_nf = np.where(keep_nf, pre_nf, 0)
    else:
        f_nf = np.where(pre_nf > max(threshold, 0), pre_nf, 0)
    return f_nf @ W_dec_fd + b_dec_d, f_nf


def saelens_forward(state, cfg, x_nd, scale=1.0):
    """SAELens: x_in = x·s (its folded `expected_average_only_in`), pre = (x_in − b_dec·apply) W_enc + b_enc,
    TopK = relu of the top k, JumpReLU = relu(pre)·[pre > θ], output divided by s again."""
    W_enc, b_enc, W_dec, b_dec = (state[n].double().numpy() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x_in = x_nd * scale
    pre_nf = (x_in - b_dec * cfg.get("apply_b_dec_to_input", True)) @ W_enc + b_enc
    arch = cfg["architecture"]
    if arch == "topk":
        k = cfg["k"]
        keep_nf = np.zeros_like(pre_nf, dtype=bool)
        np.put_along_axis(keep_nf, np.argsort(-pre_nf, axis=1)[:, :k], True, axis=1)
        f_nf = np.where(keep_nf, np.maximum(pre_nf, 0), 0)
    elif arch == "jumprelu":
        f_nf = np.maximum(pre_nf, 0) * (pre_nf > state["threshold"].double().numpy())
    else:
        f_nf = np.maximum(pre_nf, 0)
    return (f_nf @ W_dec + b_dec) / scale, f_nf


def metrics(xhat_nd, f_nf, x_nd):
    """L0 (f ≠ 0, as saev and SAELens count it), MSE, centred FVU."""
    sse = float(((x_nd - xhat_nd) ** 2).sum())
    return {
        "l0": float((f_nf != 0).sum(1).mean()),
        "mse": sse / x_nd.size,
        "fvu": sse / float(((x_nd - x_nd.mean(0)) ** 2).sum()),
    }


def sae_outputs(sae: SparseAutoencoder, x_nd: np.ndarray):
    with torch.no_grad():
        xhat_nd, f_nf = sae(torch.from_numpy(x_nd).float())
    return xhat_nd.double().numpy(), f_nf.double().numpy()


# --------------------------------------------------------------------------- writers of each format


def raw_space_weights():
    """A TopK/ReLU SAE on raw activations that recovers the dictionary: pre = (x − μ)·Dᵀ, x̂ = f·D + μ."""
    D_fd, mean_d = _dictionary_fd(), _mean_d()
    return {"W_enc": D_fd.T.copy(), "b_enc": -(D_fd @ mean_d), "W_dec": D_fd.copy(), "b_dec": mean_d.copy()}


def write_saev(path: Path, header: dict, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({name: torch.as_tensor(np.asarray(value), dtype=torch.float32) for name, value in state.items()}, buffer)
    path.write_bytes(json.dumps(header).encode() + b"\n" + buffer.getvalue())
    return path


def saev_schema5_header(activation: str, top_k: int | None = None) -> dict:
    params = {"key": {"TopK": "top-k", "BatchTopK": "batch-top-k", "Relu": "relu"}[activation]}
    if top_k is not None:
        params["top_k"] = top_k
    cfg = {"d_model": D_MODEL, "d_sae": N_FEATURES, "activation": {"cls": activation, "params": params},
           "reinit_blend": 0.8, "remove_parallel_grads": True, "normalize_w_dec": True}
    return {"schema": 5, "cfg": cfg, "commit": "0000000", "lib": "0.1.0"}


def write_dinov3_repo(root: Path, header_k: int) -> Path:
    """A multi-checkpoint saev repo: layer_10/<run>/sae.pt and a manifest stating L0 and MSE measured
    by saev's own forward on the publisher's data (true k = 2, header says `header_k`)."""
    state = raw_space_weights()
    stated = metrics(*saev_head_forward(state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], TRAIN, "topk", TRUE_K), TRAIN)
    lines = []
    for run_id, layer in (("abc123", 10), ("def456", 9)):
        rel = f"layer_{layer}/{run_id}/sae.pt"
        path = write_saev(root / rel, saev_schema5_header("TopK", header_k), state)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(json.dumps({"run_id": run_id, "layer": layer, "l0": round(stated["l0"], 2), "mse": round(stated["mse"], 6), "sha256": sha, "path": rel}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def saelens_scaled_state():
    """SAELens `expected_average_only_in`: trained on x·s with s = √d / mean‖x‖ (no centring)."""
    D_fd, mean_d = _dictionary_fd(), _mean_d()
    scale = math.sqrt(D_MODEL) / float(np.linalg.norm(TRAIN, axis=1).mean())
    state = {"W_enc": D_fd.T.copy(), "b_enc": np.zeros(N_FEATURES), "W_dec": D_fd.copy(), "b_dec": scale * mean_d}
    return {name: torch.as_tensor(value, dtype=torch.float32) for name, value in state.items()}, scale


def write_saelens(folder: Path, cfg: dict, state: dict, stated_scale: float = 1.0) -> Path:
    """cfg.json, sae_weights.safetensors and sparsity.safetensors (log10 firing frequency on TRAIN, by SAELens's forward)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "sae_weights.safetensors"))
    oracle_cfg = {**cfg, "architecture": "topk" if cfg.get("activation_fn_str") == "topk" else cfg["architecture"]}
    oracle_cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    _, f_nf = saelens_forward(state, oracle_cfg, TRAIN, stated_scale)
    freq_f = (f_nf > 0).mean(0)
    save_file({"sparsity": torch.as_tensor(np.log10(freq_f + 1e-10), dtype=torch.float32)}, str(folder / "sparsity.safetensors"))
    return folder


def saelens_v6_cfg(architecture="topk", normalize="expected_average_only_in", **extra) -> dict:
    cfg = {"architecture": architecture, "d_in": D_MODEL, "d_sae": N_FEATURES, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": normalize, "reshape_activations": "none",
           "metadata": {"model_name": "facebook/dinov2-small", "hook_name": "blocks.10.hook_resid_post",
                        "dataset_path": "imagenet-1k", "sae_lens_version": "6.5.0"}}
    if architecture == "topk":
        cfg["k"] = TRUE_K
    return {**cfg, **extra}


CHECK_T = torch.from_numpy(CHECK).float()


# --------------------------------------------------------------------------- saev


def test_saev_manifest_repo_loads_by_layer_and_computes_what_saev_computes(tmp_path):
    repo = write_dinov3_repo(tmp_path / "repo", header_k=TRUE_K)
    pub = read_published(repo, Selection(layer=11))  # saev's layer 10 (from 0) is saev-report's 11
    assert (pub.format, pub.kind, pub.k, pub.layer) == ("saev", "topk", TRUE_K, 11)
    assert pub.stated.l0 == pytest.approx(TRUE_K) and pub.stated.mse_is_upper_bound
    sae = to_sparse_autoencoder(pub)
    state = raw_space_weights()
    want_xhat, want_f = saev_head_forward(state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], CHECK, "topk", TRUE_K)
    got_xhat, got_f = sae_outputs(sae, CHECK)
    np.testing.assert_allclose(got_f, want_f, atol=2e-4)
    np.testing.assert_allclose(got_xhat, want_xhat, atol=2e-4)
    check = check_loaded(pub, sae, CHECK_T)
    assert check.measured.l0 == pytest.approx(TRUE_K)
    assert check.measured.fvu < 0.3  # the encoder is the dictionary itself, not its pseudo-inverse


def test_saev_manifest_with_several_candidates_lists_them(tmp_path):
    repo = write_dinov3_repo(tmp_path / "repo", header_k=TRUE_K)
    with pytest.raises(PublishedSAEError, match=r"(?s)2 SAEs.*abc123.*saev-report layer 11.*def456"):
        read_published(repo)
    assert read_published(repo, Selection(select="def456")).layer == 10


def test_saev_checkpoint_with_wrong_k_is_refused(tmp_path):
    """Header says top_k=8; the manifest's L0 (measured by saev on its data) says 2."""
    repo = write_dinov3_repo(tmp_path / "repo", header_k=8)
    spec = PublishedSAESpec(source=str(repo), select="abc123")
    with pytest.raises(LoadCheckFailed, match=r"L0 \(manifest.jsonl entry abc123\) 8 against 2 stated.*wrong k"):
        load_published(spec, CHECK_T)


def test_saev_damaged_file_fails_its_sha256(tmp_path):
    repo = write_dinov3_repo(tmp_path / "repo", header_k=TRUE_K)
    path = repo / "layer_10/abc123/sae.pt"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(LoadCheckFailed, match="sha256"):
        read_published(repo, Selection(select="abc123"))


def test_saev_topk_negative_values_are_reported(tmp_path):
    """saev keeps negative top-k values; saev-report's TopK zeros them. A strongly negative b_enc
    makes most kept values negative: refused, since the features would differ."""
    state = raw_space_weights()
    state["b_enc"] = state["b_enc"] - 10.0
    path = write_saev(tmp_path / "sae.pt", saev_schema5_header("TopK", TRUE_K), state)
    pub = read_published(path)
    with pytest.raises(LoadCheckFailed, match="negative top-k values"):
        check_loaded(pub, to_sparse_autoencoder(pub), CHECK_T, CheckTolerance(max_fvu=1e9))


def test_saev_batchtopk_threshold_is_the_inference_rule(tmp_path):
    state = raw_space_weights()
    state["activation.threshold"] = np.array(0.7)
    pub = read_published(write_saev(tmp_path / "sae.pt", saev_schema5_header("BatchTopK", 2), state))
    assert (pub.kind, pub.k) == ("batchtopk", 2)
    want_xhat, want_f = saev_head_forward(state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], CHECK, "batchtopk", threshold=0.7)
    got_xhat, got_f = sae_outputs(to_sparse_autoencoder(pub), CHECK)
    np.testing.assert_allclose(got_f, want_f, atol=2e-4)
    np.testing.assert_allclose(got_xhat, want_xhat, atol=2e-4)


def test_saev_0_1_0_checkpoint_matches_the_reference_loader_once_normalisation_is_declared(tmp_path):
    """saev 0.1.0 (no schema; ReLU; the encoder subtracts b_dec) stores no normalisation."""
    rng = np.random.default_rng(5)
    state = {"W_enc": rng.standard_normal((D_MODEL, N_FEATURES)) * 0.3, "b_enc": rng.standard_normal(N_FEATURES) * 0.1,
             "W_dec": rng.standard_normal((N_FEATURES, D_MODEL)) * 0.3, "b_dec": rng.standard_normal(D_MODEL)}
    header = {"d_vit": D_MODEL, "exp_factor": N_FEATURES // D_MODEL, "n_reinit_samples": 0, "l1_coeff": 4e-4, "seed": 0}
    path = write_saev(tmp_path / "sae.pt", header, state)
    pub = read_published(path)
    assert (pub.kind, pub.normalization, pub.encoder_input) == ("relu", "unrecorded", "x_minus_b_dec")
    with pytest.raises(UnsupportedCheckpoint, match="declare the normalisation"):
        to_sparse_autoencoder(pub)
    sae, _, _ = load_published(PublishedSAESpec(source=str(path), declared=DeclaredSAE(normalization="none")))
    reference = load_reference_checkpoint(path)
    x_nd = torch.from_numpy(CHECK[:64] - CHECK.mean(0)).float() / 5
    torch.testing.assert_close(sae.encode(x_nd), reference.encode(x_nd))
    torch.testing.assert_close(sae(x_nd)[0], reference(x_nd)[0])


def test_saev_0_1_0_declared_mean_and_scale_estimates_the_statistics_from_the_activations(tmp_path):
    """saev 0.1.0's loader centred and scaled (mean norm √d); declared, the statistics come from
    the given activations, as saev-report's own `fit_normalization` computes them."""
    rng = np.random.default_rng(6)
    state = {"W_enc": rng.standard_normal((D_MODEL, N_FEATURES)) * 0.3, "b_enc": rng.standard_normal(N_FEATURES) * 0.1,
             "W_dec": rng.standard_normal((N_FEATURES, D_MODEL)) * 0.3, "b_dec": rng.standard_normal(D_MODEL) * 0.1}
    path = write_saev(tmp_path / "sae.pt", {"d_vit": D_MODEL, "exp_factor": N_FEATURES // D_MODEL}, state)
    spec = PublishedSAESpec(source=str(path), declared=DeclaredSAE(normalization="mean_and_scale"),
                            tolerance=CheckTolerance(max_fvu=100))  # random weights reconstruct nothing
    sae, pub, check = load_published(spec, CHECK_T)
    assert check is not None and any("estimated from 2000 given activations" in note for note in pub.notes)
    fitted = SparseAutoencoder(D_MODEL, N_FEATURES)
    fitted.fit_normalization(CHECK_T)
    reference = load_reference_checkpoint(path, act_mean_d=fitted.act_mean_d, act_scale=float(fitted.act_scale))
    torch.testing.assert_close(sae.encode(CHECK_T[:64]), reference.encode(CHECK_T[:64]))
    torch.testing.assert_close(sae(CHECK_T[:64])[0], reference(CHECK_T[:64])[0])


def test_saev_schema_1_encoder_convention_is_decided_by_the_activations(tmp_path):
    """Schema 1 was written before and after saev stopped subtracting b_dec; with b_dec ≠ 0 the
    convention that reconstructs the activations is the one it was trained with."""
    state = raw_space_weights()  # the post-July convention: pre = x W_enc + b_enc
    cfg = {"d_model": D_MODEL, "d_sae": N_FEATURES, "activation": {"cls": "TopK", "params": {"top_k": TRUE_K}}}
    pub = read_published(write_saev(tmp_path / "sae.pt", {"schema": 1, "cls": "SparseAutoencoderConfig", "cfg": cfg}, state))
    assert pub.encoder_input == "unknown"
    pub.normalization = "none"
    with pytest.raises(UnsupportedCheckpoint, match="schema 1"):
        to_sparse_autoencoder(pub)
    sae = to_sparse_autoencoder(pub, CHECK_T)
    assert any("chosen by FVU" in note and "'x'" in note for note in pub.notes)
    want_xhat, _ = saev_head_forward(state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], CHECK, "topk", TRUE_K)
    np.testing.assert_allclose(sae_outputs(sae, CHECK)[0], want_xhat, atol=2e-4)


# --------------------------------------------------------------------------- SAELens


def test_saelens_v6_topk_with_scale_normalisation_loads_and_checks(tmp_path):
    state, scale = saelens_scaled_state()
    folder = write_saelens(tmp_path / "blocks.10.hook_resid_post", saelens_v6_cfg(), state, stated_scale=scale)
    pub = read_published(folder)
    assert (pub.format, pub.kind, pub.k, pub.normalization) == ("saelens", "topk", TRUE_K, "scale")
    assert (pub.model, pub.layer, pub.hook) == ("facebook/dinov2-small", 11, "blocks.10.hook_resid_post")
    assert pub.stated.l0 == pytest.approx(TRUE_K, rel=1e-4)  # Σ 10^log10(freq)
    assert read_published(folder / "cfg.json").format == "saelens"  # a file of the folder names the folder
    with pytest.raises(UnsupportedCheckpoint, match="does not store its statistics"):
        to_sparse_autoencoder(pub)
    sae = to_sparse_autoencoder(pub, CHECK_T)
    assert float(sae.act_scale) == pytest.approx(math.sqrt(D_MODEL) / np.linalg.norm(CHECK, axis=1).mean(), rel=1e-5)
    want_xhat, want_f = saelens_forward(state, saelens_v6_cfg(), CHECK, float(sae.act_scale))
    got_xhat, got_f = sae_outputs(sae, CHECK)
    np.testing.assert_allclose(got_xhat, want_xhat, atol=1e-3)
    np.testing.assert_allclose(got_f, want_f * 1.0, atol=1e-4)
    check = check_loaded(pub, sae, CHECK_T)
    assert check.measured.fvu < 0.3 and check.measured.l0 == pytest.approx(TRUE_K)


def test_saelens_checkpoint_with_wrong_normalisation_is_refused(tmp_path):
    """Trained on x·s (b_dec = s·μ) but its cfg says `none`: it reconstructs worse than the mean."""
    state, scale = saelens_scaled_state()
    folder = write_saelens(tmp_path / "sae", saelens_v6_cfg(normalize="none"), state, stated_scale=scale)
    spec = PublishedSAESpec(source=str(folder))
    with pytest.raises(LoadCheckFailed, match=r"(?s)FVU \d.*worse than the activations' mean.*wrong normalisation"):
        load_published(spec, CHECK_T)


def test_saelens_pre_6_topk_reads_its_k_from_activation_fn_kwargs(tmp_path):
    """SAELens < 6 wrote TopK SAEs as `architecture: standard` + `activation_fn_str: topk` (PRs #308,
    #608). Read as ReLU the same weights fire ~half the dictionary and are refused against the
    checkpoint's own sparsity file."""
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in raw_space_weights().items()}
    state["b_enc"] = torch.zeros(N_FEATURES)  # SAELens subtracts b_dec = μ itself
    cfg = {"architecture": "standard", "d_in": D_MODEL, "d_sae": N_FEATURES, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": TRUE_K}, "normalize_activations": False, "apply_b_dec_to_input": True,
           "hook_point": "blocks.10.hook_resid_post", "hook_point_layer": 10, "model_name": "vit-b-16", "sae_lens_version": "3.5.0"}
    folder = write_saelens(tmp_path / "old", cfg, state)
    pub = read_published(folder)
    assert (pub.kind, pub.k, pub.normalization, pub.layer) == ("topk", TRUE_K, "none", 11)
    sae = to_sparse_autoencoder(pub)
    assert check_loaded(pub, sae, CHECK_T).measured.l0 == pytest.approx(TRUE_K)
    # The bug: the same files read as a ReLU SAE.
    naive = json.loads((folder / "cfg.json").read_text())
    del naive["activation_fn_str"]
    (folder / "cfg.json").write_text(json.dumps(naive))
    pub = read_published(folder)
    assert pub.kind == "relu"
    with pytest.raises(LoadCheckFailed, match=r"L0 \(sparsity.safetensors\) \d+\.?\d* against 2 stated"):
        check_loaded(pub, to_sparse_autoencoder(pub), CHECK_T)


def test_saelens_batchtopk_saved_as_jumprelu_with_one_threshold_is_batchtopk(tmp_path):
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in raw_space_weights().items()}
    state["b_enc"] = torch.zeros(N_FEATURES)
    state["threshold"] = torch.full((N_FEATURES,), 0.8)
    cfg = saelens_v6_cfg(architecture="jumprelu", normalize="none")
    pub = read_published(write_saelens(tmp_path / "bt", cfg, state))
    sae = to_sparse_autoencoder(pub)
    assert (pub.kind, sae.kind, float(sae.threshold)) == ("jumprelu", "batchtopk", pytest.approx(0.8))
    want_xhat, want_f = saelens_forward(state, cfg, CHECK)
    got_xhat, got_f = sae_outputs(sae, CHECK)
    np.testing.assert_allclose(got_f, want_f, atol=2e-4)
    np.testing.assert_allclose(got_xhat, want_xhat, atol=2e-4)


def test_saelens_jumprelu_with_per_feature_thresholds_needs_the_jumprelu_kind(tmp_path):
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in raw_space_weights().items()}
    state["threshold"] = torch.linspace(0.1, 1.0, N_FEATURES)
    pub = read_published(write_saelens(tmp_path / "jr", saelens_v6_cfg(architecture="jumprelu", normalize="none"), state))
    with pytest.raises(UnsupportedCheckpoint, match="needs the jumprelu kind"):
        to_sparse_autoencoder(pub)


def test_saelens_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    """Newer SAELens TopK: pre ⊙ ‖W_dec‖ before TopK, f / ‖W_dec‖ before decoding."""
    rng = np.random.default_rng(3)
    state = {"W_enc": torch.randn(D_MODEL, N_FEATURES, generator=torch.Generator().manual_seed(0)) * 0.3,
             "b_enc": torch.zeros(N_FEATURES), "W_dec": torch.randn(N_FEATURES, D_MODEL, generator=torch.Generator().manual_seed(1)),
             "b_dec": torch.as_tensor(rng.standard_normal(D_MODEL), dtype=torch.float32)}
    cfg = saelens_v6_cfg(normalize="none", rescale_acts_by_decoder_norm=True, k=4)
    sae = to_sparse_autoencoder(read_published(write_saelens(tmp_path / "r", cfg, state)))
    W_enc, W_dec, b_dec = (state[n].double().numpy() for n in ("W_enc", "W_dec", "b_dec"))
    norms_f = np.linalg.norm(W_dec, axis=1)
    pre_nf = ((CHECK - b_dec) @ W_enc) * norms_f
    keep_nf = np.zeros_like(pre_nf, dtype=bool)
    np.put_along_axis(keep_nf, np.argsort(-pre_nf, axis=1)[:, :4], True, axis=1)
    f_nf = np.where(keep_nf, np.maximum(pre_nf, 0), 0)
    want_xhat = (f_nf / norms_f) @ W_dec + b_dec
    np.testing.assert_allclose(sae_outputs(sae, CHECK)[0], want_xhat, rtol=1e-4, atol=1e-3)


def test_saelens_pre_6_activation_without_a_kind_is_refused(tmp_path):
    state = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in raw_space_weights().items()}
    cfg = {"architecture": "standard", "d_in": D_MODEL, "d_sae": N_FEATURES, "activation_fn_str": "tanh-relu"}
    with pytest.raises(UnsupportedCheckpoint, match="'tanh-relu'"):
        read_published(write_saelens(tmp_path / "t", cfg, state))


def test_saelens_per_token_normalisation_is_refused_with_its_name(tmp_path):
    state, _ = saelens_scaled_state()
    pub = read_published(write_saelens(tmp_path / "ln", saelens_v6_cfg(normalize="layer_norm"), state))
    with pytest.raises(UnsupportedCheckpoint, match="'layer_norm'.*one fixed mean and scale"):
        to_sparse_autoencoder(pub, CHECK_T)


# --------------------------------------------------------------------------- declarations


def test_declared_model_layer_normalisation_and_k_are_checked_naming_both_values(tmp_path):
    state, scale = saelens_scaled_state()
    pub = read_published(write_saelens(tmp_path / "s", saelens_v6_cfg(), state, stated_scale=scale))
    check_declared(pub, DeclaredSAE(model="Facebook/DINOv2-Small", layer=11, normalization="scale", kind="topk", k=2))
    check_declared(pub, DeclaredSAE(model="dinov2_small"))  # no owner: the last part is compared
    with pytest.raises(DeclarationMismatch, match="model"):
        check_declared(pub, DeclaredSAE(model="google/dinov2-small"))
    with pytest.raises(DeclarationMismatch) as info:
        check_declared(pub, DeclaredSAE(model="openai/clip-vit-base-patch16", layer=10, normalization="mean_and_scale", k=8))
    message = str(info.value)
    for fragment in ("declared 'openai/clip-vit-base-patch16', checkpoint trained on 'facebook/dinov2-small'",
                     "declared 10, checkpoint trained on layer 11 (hook blocks.10.hook_resid_post)",
                     "declared 'mean_and_scale'", "trained with 'scale'", "declared 8, checkpoint states 2"):
        assert fragment in message
    assert DeclarationMismatch.exit_code == 2


def test_saev_report_checkpoint_round_trips_and_its_normalisation_is_checked(tmp_path):
    sae = SparseAutoencoder(D_MODEL, N_FEATURES, "topk", TRUE_K, seed=0)
    sae.fit_normalization(torch.from_numpy(TRAIN).float())
    save_sae(sae, tmp_path / "ours", extra={"sae_id": "dino/L11/topk-x3-k2-s0", "normalize": True})
    pub = read_published(tmp_path / "ours")
    assert (pub.format, pub.model, pub.layer, pub.normalization) == ("saev-report", "dino", 11, "mean_and_scale")
    rebuilt = to_sparse_autoencoder(pub)
    x_nd = torch.from_numpy(CHECK[:100]).float()
    torch.testing.assert_close(rebuilt(x_nd)[0], sae.eval()(x_nd)[0])
    with pytest.raises(DeclarationMismatch, match="declared 'none'"):
        check_declared(pub, DeclaredSAE(normalization="none"))


# --------------------------------------------------------------------------- finding checkpoints


def _fake_hub_cache(cache: Path, repo_id: str) -> Path:
    """The local HF cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0" * 40
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_repo_id_is_read_from_the_local_hub_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _fake_hub_cache(tmp_path / "hub", "osunlp/SAE_DINOv3_TopK_ViT-L-16_IN1K")
    write_dinov3_repo(snapshot, header_k=TRUE_K)
    pub = read_published("osunlp/SAE_DINOv3_TopK_ViT-L-16_IN1K", Selection(select="abc123"))
    assert pub.k == TRUE_K and "layer_10/abc123/sae.pt" in pub.source
    with pytest.raises(InputUnavailable, match="not in the local Hugging Face cache"):
        read_published("osunlp/SAE_not_downloaded")


def test_unknown_folder_names_the_formats_it_knows(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UnsupportedCheckpoint, match="known formats") as info:
        read_published(tmp_path / "x")
    for name in FORMATS:
        assert name in str(info.value)


def test_measure_fvu_is_centred_and_mse_is_in_both_spaces_against_numpy():
    sae = SparseAutoencoder(D_MODEL, N_FEATURES, "relu", seed=1)
    sae.fit_normalization(torch.from_numpy(TRAIN).float())
    sae.eval()
    got = measure(sae, CHECK_T, batch_size=300)  # several batches
    xhat, f = sae_outputs(sae, CHECK)
    want = metrics(xhat, f, CHECK)
    assert got.fvu == pytest.approx(want["fvu"], rel=1e-5)
    assert got.mse == pytest.approx(want["mse"], rel=1e-5)
    assert got.l0 == pytest.approx(want["l0"])
    mean_d, scale = sae.act_mean_d.double().numpy(), float(sae.act_scale)
    want_normalized = float(((((CHECK - mean_d) - (xhat - mean_d)) * scale) ** 2).mean())
    assert got.mse_normalized == pytest.approx(want_normalized, rel=1e-5)


def test_a_stated_mse_in_the_normalised_space_is_compared_there(tmp_path):
    sae = SparseAutoencoder(D_MODEL, N_FEATURES, "topk", TRUE_K, seed=0)
    sae.fit_normalization(torch.from_numpy(TRAIN).float())
    save_sae(sae, tmp_path / "ours", extra={"normalize": True})
    got = measure(sae.eval(), CHECK_T)
    assert got.mse_normalized != pytest.approx(got.mse, rel=0.5)  # the spaces differ by scale²
    for space, value in (("normalized", got.mse_normalized), ("raw", got.mse)):
        spec = PublishedSAESpec(source=str(tmp_path / "ours"), stated_mse=value, stated_mse_space=space, tolerance=CheckTolerance(max_fvu=10))
        load_published(spec, CHECK_T)
    wrong = PublishedSAESpec(source=str(tmp_path / "ours"), stated_mse=got.mse, stated_mse_space="normalized", tolerance=CheckTolerance(max_fvu=10))
    with pytest.raises(LoadCheckFailed, match=r"MSE \(normalised space\)"):
        load_published(wrong, CHECK_T)


# --------------------------------------------------------------------------- the paper's own code, and the CLI


def test_a_checkpoint_dumped_by_saev_0_1_0_meets_its_own_metrics(tmp_path):
    """saev 0.1.0 (its own venv) dumps a checkpoint and measures its first batch; the loaded SAE
    gives the same features, and check_loaded recomputes saev's own L0 and MSE."""
    import os
    import subprocess

    from test_reference_saev import SCRIPT, reference_python

    python = reference_python()
    if not python.exists():
        if os.environ.get("SAEV_REPORT_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"saev 0.1.0's venv is missing at {python}: run `make reference-venv`")
        pytest.skip("saev 0.1.0's venv is not built (`make reference-venv`)")
    subprocess.run([str(python), str(SCRIPT), str(tmp_path)], check=True, env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    trace = torch.load(tmp_path / "trace.pt", weights_only=True)
    mse, _, l0, _ = trace["losses"][0].tolist()
    spec = PublishedSAESpec(source=str(tmp_path / "init" / "sae.pt"), declared=DeclaredSAE(normalization="none"),
                            stated_l0=l0, stated_mse=mse, tolerance=CheckTolerance(l0_ratio=1.0001, mse_ratio=1.0001, max_fvu=10))
    sae, pub, check = load_published(spec, trace["batches"][0])
    assert pub.format == "saev" and pub.kind == "relu"
    xhat_nd, f_nf = sae(trace["batches"][0])
    torch.testing.assert_close(f_nf, trace["first"]["f"])
    torch.testing.assert_close(xhat_nd, trace["first"]["xhat"])
    assert check.measured.l0 == pytest.approx(l0, rel=1e-5) and check.measured.mse == pytest.approx(mse, rel=1e-5)


def test_cli_sae_check_passes_a_good_checkpoint_and_refuses_a_mislabelled_one(tmp_path):
    from typer.testing import CliRunner

    from saev_report.cli import app

    runner = CliRunner()
    acts = tmp_path / "acts.npy"
    np.save(acts, CHECK.astype(np.float32))
    state, scale = saelens_scaled_state()
    good = write_saelens(tmp_path / "good", saelens_v6_cfg(), state, stated_scale=scale)
    result = runner.invoke(app, ["sae-check", str(good), "--acts", str(acts), "--layer", "11", "--k", "2", "--save", str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    assert "L0 (sparsity.safetensors) 2 against 2 stated" in result.output and "ok: loaded as saev-report topk" in result.output
    assert read_published(tmp_path / "ours").layer == 11
    bad = write_saelens(tmp_path / "bad", saelens_v6_cfg(normalize="none"), state, stated_scale=scale)
    result = runner.invoke(app, ["sae-check", str(bad), "--acts", str(acts)])
    assert result.exit_code == 2 and "worse than the activations' mean" in result.output
    result = runner.invoke(app, ["sae-check", str(good), "--layer", "10"])
    assert result.exit_code == 2 and "declared 10, checkpoint trained on layer 11" in result.output
    result = runner.invoke(app, ["sae-check", str(good), "--normalization", "bogus"])
    assert result.exit_code == 2 and "--normalization" in result.output


def test_declared_kind_must_be_one_a_reader_reports():
    with pytest.raises(ValueError, match="unknown kind 'gated'"):
        DeclaredSAE(kind="gated")


def test_a_published_sae_saved_as_a_saev_report_checkpoint_keeps_its_origin(tmp_path):
    """Stages read trained SAEs with `load_sae`: the saved checkpoint computes the same, and
    reading it back gives what the original said of itself and how it was checked."""
    from saev_report.sae import load_sae, read_sae_config

    state, scale = saelens_scaled_state()
    spec = PublishedSAESpec(source=str(write_saelens(tmp_path / "s", saelens_v6_cfg(), state, stated_scale=scale)))
    sae, pub, check = load_published(spec, CHECK_T)
    save_published(sae, pub, check, tmp_path / "ours", sae_id="dinov2/L11/published-topk")
    loaded = load_sae(tmp_path / "ours")
    torch.testing.assert_close(loaded(CHECK_T[:50])[0], sae(CHECK_T[:50])[0])
    config = read_sae_config(tmp_path / "ours")
    assert config["sae_id"] == "dinov2/L11/published-topk" and config["published"]["measured"]["l0"] == pytest.approx(TRUE_K)
    again = read_published(tmp_path / "ours")
    assert (again.model, again.layer, again.normalization, again.stated.l0) == ("facebook/dinov2-small", 11, "scale", pub.stated.l0)
    assert check_loaded(again, to_sparse_autoencoder(again), CHECK_T).measured.fvu == pytest.approx(check.measured.fvu, rel=1e-5)


def test_files_that_are_not_checkpoints_are_refused_clearly(tmp_path):
    (tmp_path / "sae.pt").write_bytes(b'{"schema": 5, "cfg": {}}\n' + b"not a torch pickle")
    with pytest.raises(UnsupportedCheckpoint, match="not a saev checkpoint"):
        read_published(tmp_path / "sae.pt")
    (tmp_path / "lens").mkdir()
    (tmp_path / "lens" / "cfg.json").write_text(json.dumps(saelens_v6_cfg()))
    (tmp_path / "lens" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(UnsupportedCheckpoint, match="not a readable safetensors file"):
        read_published(tmp_path / "lens")


# --------------------------------------------------------------------------- written by the libraries themselves

LIBRARY_FIXTURES = Path(__file__).parent / "data" / "published"  # tests/reference/make_published_fixtures.py


@pytest.mark.parametrize(
    ("name", "kind", "k", "built_as"),
    [
        ("saev/relu", "relu", None, "relu"),
        ("saev/topk", "topk", 4, "topk"),
        ("saev/batchtopk", "batchtopk", 4, "batchtopk"),
        ("saelens/standard", "relu", None, "relu"),
        ("saelens/standard_no_b_dec_in", "relu", None, "relu"),
        ("saelens/topk", "topk", 4, "topk"),
        ("saelens/topk_rescaled", "topk", 4, "topk"),
        ("saelens/batchtopk", "batchtopk", 4, "batchtopk"),  # saved by SAELens as jumprelu
    ],
)
def test_checkpoints_written_by_saev_and_saelens_compute_what_their_own_code_computes(name, kind, k, built_as):
    """saev HEAD's `nn.dump` and SAELens 6's `save_model` wrote these; their own forward computed
    the outputs (see tests/reference/make_published_fixtures.py)."""
    from safetensors.torch import load_file

    recorded = load_file(str(LIBRARY_FIXTURES / "outputs.safetensors"))
    pub = read_published(LIBRARY_FIXTURES / name)
    assert (pub.kind, pub.k) == (kind, k)
    if pub.format == "saelens":
        assert (pub.model, pub.layer) == ("facebook/dinov2-small", 11)
    sae = to_sparse_autoencoder(pub)
    assert sae.kind == built_as
    with torch.no_grad():
        xhat_nd, f_nf = sae(recorded["x"])
    torch.testing.assert_close(f_nf, recorded[f"{name}/f"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(xhat_nd, recorded[f"{name}/xhat"], atol=2e-5, rtol=1e-5)


def test_a_saelens_jumprelu_with_per_feature_thresholds_from_saelens_itself_is_refused():
    with pytest.raises(UnsupportedCheckpoint, match="needs the jumprelu kind"):
        to_sparse_autoencoder(read_published(LIBRARY_FIXTURES / "saelens" / "jumprelu"))
