"""Small random models shared by the edit, record and experiment tests (not a test module)."""

from __future__ import annotations

import torch

from saev_report.sae import SparseAutoencoder


def tiny_dinov2(d: int, n_layers: int, image: int):
    """A random HF DINOv2 (2 heads, patch 14) behind the project's `HFBackbone`, seeded."""
    import transformers

    from saev_report.backbones.hf import hf_backbone

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=2, intermediate_size=64,
                                       image_size=image, patch_size=14)
    return hf_backbone(transformers.Dinov2Model(config), name="tiny", image_size=image).eval().requires_grad_(False)


def orthonormal_sae(d: int, seed: int = 5) -> SparseAutoencoder:
    """A d-feature SAE whose encoder and decoder are one random rotation (and no biases): x̂ = x exactly."""
    q_fd, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    sae = SparseAutoencoder(d, d, seed=0)
    with torch.no_grad():
        sae.W_dec_fd.copy_(q_fd)
        sae.W_enc_df.copy_(q_fd.T)
        sae.b_enc_f.zero_()
        sae.b_dec_d.zero_()
    return sae
