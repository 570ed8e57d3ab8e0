"""Published SAEs: checkpoints written here in saev's and SAELens's formats load into the
project's SAE exactly (against plain-torch forwards written from each library's equations), and
a mislabelled one (wrong k, wrong normalisation, wrong layer or model) is refused with a message."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saev_report.published import (
    PublishedSAEMismatch,
    PublishedSAESpec,
    check_provenance,
    load_published,
    measure,
    saelens_layer,
    verify_stated_metrics,
)
from saev_report.spec import ModelSpec

D, N_FEATURES, K, N = 16, 64, 4, 2048
DINOV3 = "facebook/dinov3-vits16-pretrain-lvd1689m"


def synthetic() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Activations made of K atoms each (plus an offset and noise) and the weights that read them:
    x [N, D]; W_enc [D, F], W_dec [F, D], b_enc [F], b_dec [D] in the libraries' layouts."""
    g = torch.Generator().manual_seed(0)
    atoms_fd = F.normalize(torch.randn(N_FEATURES, D, generator=g, dtype=torch.float64), dim=1)
    codes_nf = torch.zeros(N, N_FEATURES, dtype=torch.float64)
    chosen = torch.rand(N, N_FEATURES, generator=g).argsort(1)[:, :K]
    codes_nf.scatter_(1, chosen, 1 + 2 * torch.rand(N, K, generator=g, dtype=torch.float64))
    offset_d = torch.randn(D, generator=g, dtype=torch.float64)
    x_nd = codes_nf @ atoms_fd + offset_d + 0.01 * torch.randn(N, D, generator=g, dtype=torch.float64)
    weights = {"W_enc": atoms_fd.T.contiguous(), "W_dec": atoms_fd.clone(), "b_enc": -0.3 * torch.ones(N_FEATURES, dtype=torch.float64),
               "b_dec": offset_d.clone()}
    return x_nd.float(), {name: w.float() for name, w in weights.items()}


def fvu(x_nd: torch.Tensor, xhat_nd: torch.Tensor) -> float:
    x, xhat = x_nd.double(), xhat_nd.double()
    return float(((x - xhat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


# --------------------------------------------------------------------------- saev


def saev_forward(w: dict[str, torch.Tensor], x_nd: torch.Tensor, kind: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """saev HEAD's `SparseAutoencoder.forward` (schema ≥ 2): h = x W_enc + b_enc; TopK keeps the k
    largest h (no ReLU), ReLU is ReLU; x̂ = f W_dec + b_dec."""
    h_nf = x_nd @ w["W_enc"] + w["b_enc"]
    if kind == "TopK":
        _, idx = h_nf.topk(k, dim=-1)
        f_nf = torch.zeros_like(h_nf).scatter(-1, idx, 1.0) * h_nf
    else:
        f_nf = F.relu(h_nf)
    return f_nf @ w["W_dec"] + w["b_dec"], f_nf


def write_saev(path: Path, w: dict[str, torch.Tensor], activation: dict, schema: int = 5) -> Path:
    """A checkpoint as `saev.nn.dump` writes it: one JSON header line, then `torch.save(state_dict)`."""
    header = {"schema": schema, "cfg": {"d_model": D, "d_sae": N_FEATURES, "activation": activation, "reinit_blend": 0.8,
                                        "remove_parallel_grads": True, "normalize_w_dec": True},
              "commit": "test", "lib": "1.2.0"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write((json.dumps(header) + "\n").encode())
        buffer = io.BytesIO()
        torch.save({name: w[name] for name in ("W_dec", "b_dec", "W_enc", "b_enc")}, buffer)
        handle.write(buffer.getvalue())
    return path


def topk_activation(k: int) -> dict:
    return {"cls": "TopK", "params": {"key": "top-k", "top_k": k, "sparsity": {"cls": "NoSparsity", "params": {"key": "no-sparsity"}},
                                      "aux": {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512, "alpha": 0.03125}}}}


RELU = {"cls": "Relu", "params": {"key": "relu", "sparsity": {"cls": "L1Sparsity", "params": {"key": "l1-sparsity", "coeff": 4e-4}},
                                  "aux": {"cls": "NoAux", "params": {"key": "no-aux"}}}}


def write_release(root: Path, w: dict[str, torch.Tensor], activation: dict, layer: int, stated: dict) -> Path:
    """A saev release repo: layer_<L>/<run>/sae.pt and a manifest.jsonl line for it."""
    path = write_saev(root / f"layer_{layer}" / "run1" / "sae.pt", w, activation)
    import hashlib

    entry = {"run_id": "run1", "layer": layer, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
             "path": f"layer_{layer}/run1/sae.pt", **stated}
    (root / "manifest.jsonl").write_text(json.dumps(entry) + "\n")
    return path


def test_saev_topk_checkpoint_loads_exactly_and_its_manifest_is_read(tmp_path: Path):
    x_nd, w = synthetic()
    xhat_ref, f_ref = saev_forward(w, x_nd, "TopK", K)
    stated = {"l0": float((f_ref > 0).sum(1).float().mean()), "mse": 0.0, "normalized_mse": fvu(x_nd, xhat_ref)}
    path = write_release(tmp_path / "repo", w, topk_activation(K), 11, stated)
    published = load_published(PublishedSAESpec(source=str(path)))
    assert (published.format, published.layer, published.sae.kind, published.sae.k) == ("saev", 11, "topk", K)
    assert published.stated.l0 == pytest.approx(stated["l0"]) and published.stated.where.endswith("manifest.jsonl")
    with torch.no_grad():
        xhat, f = published.sae(x_nd)
    assert torch.allclose(f, f_ref, atol=1e-4) and torch.allclose(xhat, xhat_ref, atol=1e-4)
    measured = measure(published.sae, x_nd.split(500))
    assert measured.n_rows == N and measured.l0 == pytest.approx(stated["l0"]) and measured.fvu == pytest.approx(stated["normalized_mse"], abs=1e-5)
    spec = PublishedSAESpec(source=str(path))
    verify_stated_metrics(published, spec, measured)  # an honest checkpoint passes
    check_provenance(published, spec, model_key="dino", model=ModelSpec(family="hf", source=DINOV3, layers=[11]), layer=11, d_model=D)
    with pytest.raises(PublishedSAEMismatch, match="trained on layer 11, not 10"):
        check_provenance(published, spec, model_key="dino", model=ModelSpec(family="hf", source=DINOV3, layers=[10]), layer=10, d_model=D)
    with pytest.raises(PublishedSAEMismatch, match="reads 16-wide activations, the model's layer 11 is 32 wide"):
        check_provenance(published, spec, model_key="dino", model=ModelSpec(family="hf", source=DINOV3, layers=[11]), layer=11, d_model=32)


def test_saev_checkpoint_with_a_wrong_k_is_refused(tmp_path: Path):
    """Trained (and measured, by its authors) with k=4, its header says k=16: it loads, and the
    recomputed L0 (16) disagrees with the stated one (4)."""
    x_nd, w = synthetic()
    xhat_ref, f_ref = saev_forward(w, x_nd, "TopK", K)
    path = write_release(tmp_path / "repo", w, topk_activation(16), 11,
                         {"l0": float((f_ref > 0).sum(1).float().mean()), "normalized_mse": fvu(x_nd, xhat_ref)})
    spec = PublishedSAESpec(source=str(path))
    published = load_published(spec)
    with pytest.raises(PublishedSAEMismatch, match=r"L0 16\.0 measured, 4\.0 stated.*loaded as topk, k=16.*activation or k"):
        verify_stated_metrics(published, spec, measure(published.sae, [x_nd]))


def test_saev_checkpoint_trained_on_normalised_inputs_is_refused_on_raw_ones(tmp_path: Path):
    """A ReLU SAE trained on activations its loader divided by 10 (saev 0.1.0 normalised in the
    data loader, so nothing in the checkpoint says so), stated on that data, run on raw activations."""
    x_nd, w = synthetic()
    scaled = {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_enc": w["b_enc"] / 10, "b_dec": w["b_dec"] / 10}
    xhat_ref, f_ref = saev_forward(scaled, x_nd / 10, "Relu", 0)
    stated = {"l0": float((f_ref > 0).sum(1).float().mean()), "normalized_mse": fvu(x_nd / 10, xhat_ref)}
    path = write_release(tmp_path / "repo", scaled, RELU, 11, stated)
    spec = PublishedSAESpec(source=str(path))
    published = load_published(spec)
    assert published.sae.kind == "relu"
    verify_stated_metrics(published, spec, measure(published.sae, [x_nd / 10]))  # on its own data: fine
    with pytest.raises(PublishedSAEMismatch, match="normalisation"):
        verify_stated_metrics(published, spec, measure(published.sae, [x_nd]))


def test_saev_pre_schema_and_schema_1_encoder_conventions(tmp_path: Path):
    """saev 0.1.0 (no schema) encodes (x − b_dec) W_enc + b_enc; schema 1 does not say which."""
    x_nd, w = synthetic()
    old = tmp_path / "old.pt"
    with open(old, "wb") as handle:
        handle.write((json.dumps({"d_vit": D, "exp_factor": N_FEATURES // D, "l1_coeff": 4e-4, "seed": 0}) + "\n").encode())
        buffer = io.BytesIO()
        torch.save({name: w[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}, buffer)
        handle.write(buffer.getvalue())
    published = load_published(PublishedSAESpec(source=str(old)))
    with torch.no_grad():
        expected_f = F.relu((x_nd - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        assert torch.allclose(published.sae.encode(x_nd), expected_f, atol=1e-4)
    one = write_saev(tmp_path / "one.pt", w, RELU, schema=1)
    with pytest.raises(PublishedSAEMismatch, match="saev_subtract_b_dec"):
        load_published(PublishedSAESpec(source=str(one)))
    newer = load_published(PublishedSAESpec(source=str(one), saev_subtract_b_dec=False))
    with torch.no_grad():
        assert torch.allclose(newer.sae.encode(x_nd), saev_forward(w, x_nd, "Relu", 0)[1], atol=1e-4)


def test_saev_batchtopk_runs_with_its_learnt_threshold(tmp_path: Path):
    """saev's BatchTopK is a JumpReLU at inference: h if h > θ (the `activation.threshold` buffer)."""
    x_nd, w = synthetic()
    path = tmp_path / "btk.pt"
    activation = {"cls": "BatchTopK", "params": {"key": "batch-top-k", "top_k": K, "momentum": 0.1,
                                                 "sparsity": {"cls": "NoSparsity", "params": {"key": "no-sparsity"}},
                                                 "aux": {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512, "alpha": 0.03125}}}}
    write_saev(path, w, activation)
    with open(path, "rb") as handle:  # keep the header; the state dict also holds the threshold buffer, as saev's does
        header = handle.readline()
    buffer = io.BytesIO()
    torch.save({**{name: w[name] for name in ("W_dec", "b_dec", "W_enc", "b_enc")}, "activation.threshold": torch.tensor(0.7)}, buffer)
    path.write_bytes(header + buffer.getvalue())
    published = load_published(PublishedSAESpec(source=str(path)))
    assert published.sae.kind == "batchtopk" and float(published.sae.threshold) == pytest.approx(0.7)
    h_nf = x_nd @ w["W_enc"] + w["b_enc"]
    with torch.no_grad():
        assert torch.allclose(published.sae.encode(x_nd), torch.where(h_nf > 0.7, h_nf, 0.0), atol=1e-4)


def test_saev_release_from_the_local_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    _, w = synthetic()
    snapshot = tmp_path / "hub" / "models--osunlp--SAE_DINOv3_ViT-S-16_IN1K" / "snapshots" / "abc123"
    write_release(snapshot, w, topk_activation(K), 9, {"l0": float(K)})
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    published = load_published(PublishedSAESpec(source="hf://osunlp/SAE_DINOv3_ViT-S-16_IN1K/layer_9/run1/sae.pt"))
    assert published.layer == 9 and published.stated.l0 == K
    from saev_report.errors import InputUnavailable

    with pytest.raises(InputUnavailable, match="osunlp/SAE_DINOv3_ViT-S-16_IN1K"):
        load_published(PublishedSAESpec(source="hf://osunlp/SAE_DINOv3_ViT-S-16_IN1K/layer_9/missing/sae.pt"))


# --------------------------------------------------------------------------- SAELens


def saelens_forward(w: dict[str, torch.Tensor], x_nd: torch.Tensor, k: int, apply_b_dec_to_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' TopKSAE: h = (x − b_dec·apply_b_dec_to_input) W_enc + b_enc; the k largest, ReLU'd; x̂ = f W_dec + b_dec."""
    h_nf = (x_nd - w["b_dec"] * apply_b_dec_to_input) @ w["W_enc"] + w["b_enc"]
    values, idx = h_nf.topk(k, dim=-1)
    f_nf = torch.zeros_like(h_nf).scatter(-1, idx, values.relu())
    return f_nf @ w["W_dec"] + w["b_dec"], f_nf


def write_saelens(folder: Path, w: dict[str, torch.Tensor], cfg: dict, density_f: torch.Tensor | None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({name: w[name].contiguous() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}, str(folder / "sae_weights.safetensors"))
    if density_f is not None:
        save_file({"sparsity": torch.log10(density_f.clamp(min=1e-10)).float()}, str(folder / "sparsity.safetensors"))
    return folder


def saelens_cfg(k: int, **extra) -> dict:
    """SAELens ≥ 6: model and hook under `metadata`."""
    return {"architecture": "topk", "d_in": D, "d_sae": N_FEATURES, "dtype": "float32", "device": "cpu", "k": k,
            "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"model_name": DINOV3, "hook_name": "blocks.10.hook_resid_post", "sae_lens_version": "6.5.0"}, **extra}


def test_saelens_topk_loads_exactly_with_its_layer_and_stated_l0(tmp_path: Path):
    x_nd, w = synthetic()
    xhat_ref, f_ref = saelens_forward(w, x_nd, K, apply_b_dec_to_input=False)
    folder = write_saelens(tmp_path / "sae", w, saelens_cfg(K), (f_ref > 0).double().mean(0))
    spec = PublishedSAESpec(source=str(folder))
    published = load_published(spec)
    assert (published.format, published.layer, published.model_name, published.sae.k) == ("saelens", 11, DINOV3, K)
    with torch.no_grad():
        xhat, f = published.sae(x_nd)
    assert torch.allclose(f, f_ref, atol=1e-4) and torch.allclose(xhat, xhat_ref, atol=1e-4)
    assert published.stated.l0 == pytest.approx(K, rel=1e-4)
    verify_stated_metrics(published, spec, measure(published.sae, [x_nd]))
    model = ModelSpec(family="hf", source=DINOV3, layers=[11])
    check_provenance(published, spec, model_key="dino", model=model, layer=11, d_model=D)
    other = ModelSpec(family="hf", source="facebook/dinov2-small", layers=[11])
    with pytest.raises(PublishedSAEMismatch, match=f"trained on '{DINOV3}'.*model_name: {DINOV3}"):
        check_provenance(published, spec, model_key="dino", model=other, layer=11, d_model=D)
    renamed = PublishedSAESpec(source=str(folder), model_name=DINOV3)
    check_provenance(published, renamed, model_key="dino", model=other, layer=11, d_model=D)


def test_saelens_5x_flat_config_and_a_mislabelled_k(tmp_path: Path):
    """SAELens 5.x keeps model and hook flat and TopK as `activation_fn_str`; its k says 32, the
    densities it saved say L0 = 4: refused."""
    x_nd, w = synthetic()
    _, f_ref = saelens_forward(w, x_nd, K, apply_b_dec_to_input=True)
    cfg = {"architecture": "standard", "d_in": D, "d_sae": N_FEATURES, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 32},
           "model_name": DINOV3, "hook_name": "blocks.3.hook_resid_pre", "hook_layer": 3, "apply_b_dec_to_input": True,
           "normalize_activations": "none"}
    folder = write_saelens(tmp_path / "sae", w, cfg, (f_ref > 0).double().mean(0))
    spec = PublishedSAESpec(source=str(folder))
    published = load_published(spec)
    assert (published.layer, published.sae.kind, published.sae.k) == (3, "topk", 32)
    measured = measure(published.sae, [x_nd])
    _, f32_ref = saelens_forward(w, x_nd, 32, apply_b_dec_to_input=True)  # what k=32 really gives (ReLU drops negatives)
    assert measured.l0 == pytest.approx(float((f32_ref > 0).sum(1).float().mean()))
    with pytest.raises(PublishedSAEMismatch, match=rf"L0 {measured.l0:.1f} measured, 4\.0 stated.*sparsity\.safetensors"):
        verify_stated_metrics(published, spec, measured)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"normalize_activations": "layer_norm"}, "normalize_activations is 'layer_norm'"),
        ({"normalize_activations": "expected_average_only_in"}, "folded into the weights"),
        ({"architecture": "jumprelu"}, "architecture 'jumprelu' is not supported"),
        ({"d_sae": 65}, "d_sae=65"),
    ],
)
def test_saelens_configs_it_cannot_honour_are_refused(tmp_path: Path, extra: dict, message: str):
    _, w = synthetic()
    folder = write_saelens(tmp_path / "sae", w, saelens_cfg(K, **extra), None)
    with pytest.raises(PublishedSAEMismatch, match=message):
        load_published(PublishedSAESpec(source=str(folder)))


def test_hook_names_map_to_hidden_states_layers():
    assert saelens_layer("blocks.10.hook_resid_post") == 11
    assert saelens_layer("blocks.10.hook_resid_pre") == 10
    assert saelens_layer("blocks.10.attn.hook_z") is None


def test_unknown_files_are_refused(tmp_path: Path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(PublishedSAEMismatch, match="not a checkpoint of any known format"):
        load_published(PublishedSAESpec(source=str(tmp_path / "x.bin")))
