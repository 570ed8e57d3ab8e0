"""Write tests/data/published/: tiny checkpoints written by saev HEAD's and SAELens's own code,
with the features and reconstructions their own code computes on a fixed batch.

Not run by the tests: the checkpoints and outputs are committed, so CI checks the readers
against the libraries' own code without having them. To regenerate, in a venv with
`sae-lens` (6.54.12 wrote the committed files) and saev HEAD's `src/` on PYTHONPATH
(OSU-NLP-Group/saev 3d73f1f; `saev.nn` needs beartype, einops, jaxtyping, orjson, tyro):

    python tests/reference/make_published_fixtures.py tests/data/published

The weights are random (seeded); d = 16, F = 48.
"""

import json
import pathlib
import sys

import torch

D_MODEL, N_FEATURES, K = 16, 48, 4


def batch() -> torch.Tensor:
    return torch.randn(32, D_MODEL, generator=torch.Generator().manual_seed(1)) * 2 + 3


def randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.4)


def saev_head(out: pathlib.Path, x: torch.Tensor) -> dict:
    from saev import nn
    from saev.nn import modeling

    outputs = {}
    activations = {"relu": modeling.Relu(), "topk": modeling.TopK(top_k=K), "batchtopk": modeling.BatchTopK(top_k=K)}
    for seed, (name, activation) in enumerate(activations.items()):
        sae = nn.SparseAutoencoder(nn.SparseAutoencoderConfig(d_model=D_MODEL, d_sae=N_FEATURES, activation=activation))
        randomise(sae, seed)
        with torch.no_grad():
            sae.b_enc.sub_(0.3)
        if name == "batchtopk":
            sae.train()
            with torch.no_grad():
                for _ in range(20):  # training forwards move the inference threshold (an EMA)
                    sae(x)
        sae.eval()
        with torch.no_grad():
            result = sae(x)
        outputs[f"saev/{name}"] = {"f": result.f_x, "xhat": result.x_hats[:, -1, :]}
        nn.dump(out / "saev" / name / "sae.pt", sae)
    return outputs


def saelens(out: pathlib.Path, x: torch.Tensor) -> dict:
    import sae_lens
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    metadata = {"model_name": "facebook/dinov2-small", "hook_name": "blocks.10.hook_resid_post", "dataset_path": "imagenet-1k"}
    saes = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=N_FEATURES)),
        "standard_no_b_dec_in": StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=N_FEATURES, apply_b_dec_to_input=False)),
        "topk": TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=N_FEATURES, k=K)),
        "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=N_FEATURES, k=K, rescale_acts_by_decoder_norm=True)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_MODEL, d_sae=N_FEATURES)),
    }
    outputs = {}
    for seed, (name, sae) in enumerate(saes.items()):
        for key, value in metadata.items():
            setattr(sae.cfg.metadata, key, value)
        randomise(sae, 10 + seed)
        if name == "jumprelu":
            with torch.no_grad():
                sae.threshold.copy_(torch.rand(N_FEATURES, generator=torch.Generator().manual_seed(3)) * 0.5)
        sae.save_model(out / "saelens" / name)
        loaded = sae_lens.SAE.load_from_disk(str(out / "saelens" / name))
        with torch.no_grad():
            f = loaded.encode(x)
            outputs[f"saelens/{name}"] = {"f": f, "xhat": loaded.decode(f)}
    # BatchTopK trains with a batch-wide top-k and is saved as a JumpReLU SAE with one threshold.
    trainer = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=N_FEATURES, k=K))
    for key, value in metadata.items():
        setattr(trainer.cfg.metadata, key, value)
    randomise(trainer, 20)
    for _ in range(50):
        trainer.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False))
    trainer.save_inference_model(str(out / "saelens" / "batchtopk"))
    loaded = sae_lens.SAE.load_from_disk(str(out / "saelens" / "batchtopk"))
    with torch.no_grad():
        f = loaded.encode(x)
        outputs["saelens/batchtopk"] = {"f": f, "xhat": loaded.decode(f)}
    return outputs


def main(out: pathlib.Path) -> None:
    import sae_lens

    x = batch()
    outputs = {**saev_head(out, x), **saelens(out, x)}
    from safetensors.torch import save_file

    tensors = {"x": x, **{f"{name}/{what}": t.contiguous() for name, pair in outputs.items() for what, t in pair.items()}}
    save_file(tensors, str(out / "outputs.safetensors"))
    (out / "VERSIONS.json").write_text(json.dumps({"sae_lens": sae_lens.__version__, "saev": "OSU-NLP-Group/saev 3d73f1f"}) + "\n")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
