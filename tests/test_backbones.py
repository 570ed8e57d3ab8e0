"""Backbone adapters against each library's own forward pass, on tiny random models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saev_report.backbones import Backbone, ModelUnavailable, TokenLayout, load_backbone, resize_size
from saev_report.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from saev_report.spec import ModelSpec

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from saev_report.backbones.hf import HFBackbone, hf_backbone, load_hf  # noqa: E402
from saev_report.backbones.hf_clip import CLIPBackbone  # noqa: E402
from saev_report.backbones.hf_siglip import SiglipBackbone  # noqa: E402
from saev_report.backbones.open_clip_vit import OpenClipViTBackbone, load_open_clip, parse_source  # noqa: E402
from saev_report.backbones.timm_family import load_timm  # noqa: E402
from saev_report.backbones.timm_vit import TimmViTBackbone  # noqa: E402

ATOL = 1e-5
DEPTH = 3


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=1e-5)


def assert_backbone_contract(backbone: Backbone, pixels: torch.Tensor, reference: dict[int | str, torch.Tensor]) -> None:
    """capture == the library's hidden states; resume(capture(L), L) == final; layout counts."""
    with torch.inference_mode():
        captured = backbone.capture(pixels, list(range(backbone.n_layers + 1)), final=True)
        for layer in range(backbone.n_layers + 1):
            assert close(captured[layer], reference[layer]), f"layer {layer}"
        assert close(captured["final"], reference["final"])
        for layer in range(backbone.n_layers + 1):
            assert close(backbone.resume(captured[layer], layer), reference["final"]), f"resume from {layer}"
        assert close(backbone.forward_final(pixels), reference["final"])
        only = backbone.capture(pixels, [2])
        assert list(only) == [2] and close(only[2], reference[2])
    assert captured[0].shape == (pixels.shape[0], backbone.layout.n_tokens, backbone.d_model)


# --------------------------------------------------------------------------- base


def test_token_layout_indices():
    layout = TokenLayout(n_cls=1, n_registers=4, grid=(2, 3))
    assert (layout.n_patches, layout.n_tokens, layout.cls_index) == (6, 11, 0)
    assert layout.patch_slice == slice(5, 11)
    assert layout.indices(["patches"]) == list(range(5, 11))
    assert layout.indices(["registers", "cls"]) == [0, 1, 2, 3, 4]
    assert layout.indices(["patches", "cls"]) == [0, *range(5, 11)]
    no_cls = TokenLayout(n_cls=0, n_registers=0, grid=(2, 2))
    assert no_cls.cls_index is None and no_cls.indices(["cls", "patches"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        layout.indices(["pixels"])


def test_resize_size_follows_paper():
    assert resize_size(224) == 256
    assert resize_size(448) == 512
    assert resize_size(28) == 32


def _tiny_dinov2(image_size: int = 56) -> HFBackbone:
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, image_size=image_size, patch_size=14
    )
    return hf_backbone(transformers.Dinov2Model(config).eval(), name="tiny", image_size=image_size)


def test_preprocess_shape_normalisation_and_centre_crop():
    backbone = _tiny_dinov2(56)
    # A 128×64 image (w×h): shorter side 64 → 64 (56·8/7); the centre 56×56 crop of the width
    # keeps only the middle band, so red borders wider than (128−56)/2 = 36 px disappear.
    image = np.zeros((64, 128, 3), dtype=np.uint8)
    image[:, :30] = (255, 0, 0)
    image[:, -30:] = (255, 0, 0)
    image[:, 30:-30] = (0, 128, 255)
    pixels = backbone.preprocess(Image.fromarray(image))
    assert pixels.shape == (3, 56, 56) and pixels.dtype == torch.float32
    expected = (np.array([0, 128, 255]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(pixels.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    # Non-RGB input is converted; the output is still [3, S, S].
    assert backbone.preprocess(Image.new("L", (90, 300), 7)).shape == (3, 56, 56)


def test_capture_rejects_bad_layers():
    backbone = _tiny_dinov2()
    pixels = torch.randn(1, 3, 56, 56)
    with pytest.raises(ValueError):
        backbone.capture(pixels, [DEPTH + 1])
    with pytest.raises(ValueError):
        backbone.resume(torch.randn(1, 17, 32), -1)


# --------------------------------------------------------------------------- HF


def _hf_case(kind: str) -> tuple[torch.nn.Module, str, int, int]:
    """(model, adapter kind, native image size, registers)."""
    torch.manual_seed(1)
    common = dict(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2)
    if kind == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(**common, image_size=56, patch_size=14)), "dinov2", 56, 0
    if kind == "dinov2_registers":
        config = transformers.Dinov2WithRegistersConfig(**common, image_size=56, patch_size=14, num_register_tokens=4)
        return transformers.Dinov2WithRegistersModel(config), "dinov2", 56, 4
    if kind == "clip":
        config = transformers.CLIPVisionConfig(**common, intermediate_size=64, image_size=32, patch_size=8)
        return transformers.CLIPVisionModel(config), "clip", 32, 0
    config = transformers.SiglipVisionConfig(**common, intermediate_size=64, image_size=32, patch_size=8)
    return transformers.SiglipVisionModel(config), "siglip", 32, 0


@pytest.mark.parametrize("case", ["dinov2", "dinov2_registers", "clip", "siglip"])
@pytest.mark.parametrize("resized", [False, True])
def test_hf_matches_hidden_states(case: str, resized: bool):
    model, kind, native, n_registers = _hf_case(case)
    model.eval()
    image_size = native + 2 * model.config.patch_size if resized else native
    backbone = hf_backbone(model, name=case, image_size=image_size)
    pixels = torch.randn(2, 3, image_size, image_size)
    kwargs = {} if kind == "dinov2" else {"interpolate_pos_encoding": resized}
    with torch.inference_mode():
        out = model(pixel_values=pixels, output_hidden_states=True, **kwargs)
        reference: dict[int | str, torch.Tensor] = dict(enumerate(out.hidden_states))
        if kind == "clip":
            # HF's CLIP leaves last_hidden_state un-normed and norms only the pooled CLS.
            reference["final"] = model.post_layernorm(out.last_hidden_state)
            assert close(reference["final"][:, 0], out.pooler_output)
        else:
            reference["final"] = out.last_hidden_state
    assert len(reference) == DEPTH + 2
    assert_backbone_contract(backbone, pixels, reference)
    side = image_size // model.config.patch_size
    n_cls = 0 if kind == "siglip" else 1
    assert backbone.layout == TokenLayout(n_cls=n_cls, n_registers=n_registers, grid=(side, side))
    assert (backbone.n_layers, backbone.d_model, backbone.patch_size) == (DEPTH, 32, model.config.patch_size)


def test_hf_resume_uses_replaced_activations():
    model, kind, native, _ = _hf_case("dinov2")
    backbone = hf_backbone(model.eval(), name="x", image_size=native)
    pixels = torch.randn(1, 3, native, native)
    with torch.inference_mode():
        acts = backbone.capture(pixels, [1])[1]
        edited = acts.clone()
        edited[:, 3] += 5.0 * torch.randn(acts.shape[-1])  # not a uniform shift: LayerNorm would erase that
        assert not close(backbone.resume(edited, 1), backbone.resume(acts, 1))


def _save_tiny_hf(path: Path, kind: str) -> torch.nn.Module:
    model, _, _, _ = _hf_case(kind)
    model.save_pretrained(path)
    return model.eval()


def test_load_backbone_hf_local_folder(tmp_path: Path):
    model = _save_tiny_hf(tmp_path / "clip", "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})
    )
    spec = ModelSpec(family="hf", source=str(tmp_path / "clip"), layers=[2])
    backbone = load_backbone(spec, tmp_path / "cache", torch.device("cpu"))
    assert isinstance(backbone, CLIPBackbone)
    assert backbone.image_size == 32 and backbone.mean == (0.1, 0.2, 0.3) and backbone.std == (0.4, 0.5, 0.6)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    pixels = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        expected = model(pixel_values=pixels, output_hidden_states=True).hidden_states[2]
        assert close(backbone.capture(pixels, [2])[2], expected)


def test_load_backbone_hf_image_size_and_random_twin(tmp_path: Path):
    source = str(tmp_path / "dino")
    real = _save_tiny_hf(tmp_path / "dino", "dinov2")
    pixels = torch.randn(1, 3, 42, 42)
    with torch.inference_mode():
        sized = load_backbone(ModelSpec(family="hf", source=source, layers=[1], image_size=42), tmp_path, torch.device("cpu"))
        assert sized.image_size == 42 and sized.layout.grid == (3, 3)
        assert close(sized.forward_final(pixels), real(pixel_values=pixels).last_hidden_state)
        twin_spec = ModelSpec(family="hf", source=source, layers=[1], random_init=True, image_size=42)
        twin_a, twin_b, twin_c = (load_backbone(twin_spec, tmp_path, torch.device("cpu"), seed=s) for s in (3, 3, 4))
        assert "random" in twin_a.name
        assert close(twin_a.forward_final(pixels), twin_b.forward_final(pixels), atol=0)
        assert not close(twin_a.forward_final(pixels), twin_c.forward_final(pixels))
        assert not close(twin_a.forward_final(pixels), sized.forward_final(pixels))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_load_hf_full_checkpoint_uses_vision_tower(tmp_path: Path, kind: str):
    """Hub CLIP/SigLIP checkpoints hold both towers; the adapter loads the vision one."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(5)
    if kind == "clip":
        full = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text))
    else:
        full = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text))
    full.eval().save_pretrained(tmp_path / kind)
    backbone = load_hf(str(tmp_path / kind))
    assert isinstance(backbone, {"clip": CLIPBackbone, "siglip": SiglipBackbone}[kind]) and backbone.n_layers == 2
    pixels = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        expected = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        captured = backbone.capture(pixels, [1, 2])
        assert close(captured[1], expected[1]) and close(captured[2], expected[2])
    twin = load_hf(str(tmp_path / kind), random_init=True)
    assert twin.n_layers == 2 and twin.layout == backbone.layout


# --------------------------------------------------------------------------- timm


def _tiny_timm(**kwargs) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(2)
    defaults = dict(img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=0)
    return VisionTransformer(**{**defaults, **kwargs}).eval()


@pytest.mark.parametrize(
    "kwargs, n_cls, n_registers",
    [
        (dict(), 1, 0),
        (dict(reg_tokens=4), 1, 4),
        (dict(class_token=False, global_pool="avg"), 0, 0),
        (dict(no_embed_class=True, reg_tokens=2), 1, 2),
        (dict(dynamic_img_size=True), 1, 0),
    ],
)
def test_timm_matches_forward_intermediates(kwargs: dict, n_cls: int, n_registers: int):
    model = _tiny_timm(**kwargs)
    backbone = TimmViTBackbone(model, name="tiny")
    assert backbone.layout == TokenLayout(n_cls=n_cls, n_registers=n_registers, grid=(4, 4))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        final, intermediates = model.forward_intermediates(pixels, norm=False, output_fmt="NLC")
        # forward_intermediates drops prefix tokens; rebuild whole streams with block hooks.
        outputs: list[torch.Tensor] = []
        hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in model.blocks]
        inputs: list[torch.Tensor] = []
        hooks.append(model.blocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0])))
        features = model.forward_features(pixels)
        for hook in hooks:
            hook.remove()
    reference: dict[int | str, torch.Tensor] = {0: inputs[0], **{i + 1: o for i, o in enumerate(outputs)}, "final": features}
    for layer, patches_bnd in enumerate(intermediates, start=1):  # the library's own view of patches
        assert close(reference[layer][:, n_cls + n_registers :], patches_bnd)
    assert close(features, final)
    assert_backbone_contract(backbone, pixels, reference)


def test_load_timm_local_folder_image_size_and_random_twin(tmp_path: Path):
    from timm.models._hub import save_for_hf

    args = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, reg_tokens=2)
    torch.manual_seed(4)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args).eval()
    save_for_hf(model, str(tmp_path / "vit"), model_args=args)
    source = str(tmp_path / "vit")
    pixels = torch.randn(1, 3, 32, 32)

    real = load_backbone(ModelSpec(family="timm", source=source, layers=[1]), tmp_path, torch.device("cpu"))
    assert real.layout == TokenLayout(n_cls=1, n_registers=2, grid=(2, 2)) and real.mean == (0.5, 0.5, 0.5)
    resized = load_timm(source, image_size=48)
    assert resized.image_size == 48 and resized.layout.grid == (3, 3)
    # timm resamples the patch positions on load and leaves CLS/register positions alone
    assert torch.equal(resized.model.pos_embed[:, :3], model.pos_embed[:, :3])
    twins = [load_timm(source, random_init=True, seed=seed) for seed in (5, 5, 6)]
    with torch.inference_mode():
        assert close(real.forward_final(pixels), model.forward_features(pixels))
        outs = [twin.forward_final(pixels) for twin in twins]
        assert close(outs[0], outs[1], atol=0) and not close(outs[0], outs[2])
        assert not close(outs[0], real.forward_final(pixels))


# --------------------------------------------------------------------------- open_clip


def _tiny_open_clip() -> torch.nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(3)
    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=DEPTH, heads=2, mlp_ratio=2.0, output_dim=16).eval()


def test_open_clip_blocks_are_batch_first():
    visual = _tiny_open_clip()
    assert visual.transformer.batch_first  # open_clip 3.x runs resblocks on [batch, tokens, d]


def test_open_clip_matches_forward_intermediates():
    visual = _tiny_open_clip()
    backbone = OpenClipViTBackbone(visual, name="tiny")
    assert backbone.layout == TokenLayout(n_cls=1, n_registers=0, grid=(4, 4))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = visual.forward_intermediates(pixels, output_fmt="NLC", output_extra_tokens=True)
        embeds = visual._embeds(pixels)
        final = visual.ln_post(visual.transformer(embeds))
        projected_cls = final[:, 0] @ visual.proj
    reference: dict[int | str, torch.Tensor] = {0: embeds, "final": final}
    for layer, (prefix, patches) in enumerate(zip(out["image_intermediates_prefix"], out["image_intermediates"]), start=1):
        reference[layer] = torch.cat([prefix, patches], dim=1)
    # the pooled image feature is CLS of the final-norm tokens, projected
    assert close(out["image_features"], projected_cls)
    assert_backbone_contract(backbone, pixels, reference)


def test_load_open_clip_local_weights_file(tmp_path: Path):
    torch.manual_seed(6)
    model = open_clip.create_model("ViT-S-32", pretrained=None, force_image_size=64).eval()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    spec = ModelSpec(family="open_clip", source=f"ViT-S-32/{tmp_path}/clip.pt", layers=[11], image_size=64)
    backbone = load_backbone(spec, tmp_path, torch.device("cpu"))
    assert isinstance(backbone, OpenClipViTBackbone)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        pooled = model.visual(pixels)
        assert close(backbone.forward_final(pixels)[:, 0] @ model.visual.proj, pooled)
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_open_clip(f"ViT-S-32/{tmp_path}/missing.pt")


def test_load_open_clip_local_checkpoint_folder(tmp_path: Path):
    """`source:` may be a local folder (ModelSpec says so): open_clip's own format, config beside weights.
    On main this failed with "unknown open_clip architecture" (the rehearsal's first defect)."""
    from safetensors.torch import save_file

    config = open_clip.get_model_config("ViT-S-32")
    config["vision_cfg"] |= {"image_size": 64, "width": 32, "layers": 3, "head_width": 16}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
    torch.manual_seed(7)
    model = open_clip.create_model(f"local-dir:{tmp_path}", pretrained=None, load_weights=False).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    backbone = load_backbone(ModelSpec(family="open_clip", source=str(tmp_path), layers=[3]), tmp_path, torch.device("cpu"))
    assert (backbone.image_size, backbone.layout.grid, backbone.n_layers, backbone.d_model) == (64, (2, 2), 3, 32)
    assert (backbone.mean, backbone.std) == ((0.5,) * 3, (0.25,) * 3)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert close(backbone.forward_final(pixels)[:, 0] @ model.visual.proj, model.visual(pixels))
        twin = load_open_clip(str(tmp_path), random_init=True, seed=1)
        assert not close(twin.forward_final(pixels), backbone.forward_final(pixels))
    (tmp_path / "open_clip_config.json").unlink()
    with pytest.raises(ModelUnavailable, match="open_clip_config.json"):
        load_open_clip(str(tmp_path))


def test_open_clip_source_parsing():
    assert parse_source("ViT-B-16/openai") == ("ViT-B-16", "openai")
    assert parse_source("ViT-B-16//data/clip.pt") == ("ViT-B-16", "/data/clip.pt")
    assert parse_source("ViT-B-16") == ("ViT-B-16", None)
    assert parse_source("hf-hub:org/repo") == ("hf-hub:org/repo", None)


def test_load_open_clip_random_twin_and_image_size():
    a, b, c = (load_open_clip("ViT-S-32", random_init=True, image_size=64, seed=seed) for seed in (1, 1, 2))
    assert (a.image_size, a.layout.grid, a.n_layers, a.d_model) == (64, (2, 2), 12, 384)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert close(a.forward_final(pixels), b.forward_final(pixels), atol=0)
        assert not close(a.forward_final(pixels), c.forward_final(pixels))
    with pytest.raises(ValueError, match="no pretrained tag"):
        load_open_clip("ViT-B-16/no-such-tag")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_open_clip("ViT-Nope/openai", random_init=True)


# --------------------------------------------------------------------------- unavailable models


@pytest.fixture
def offline_empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline mode with an empty hub cache, whatever this machine has cached."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    return cache


@pytest.mark.parametrize(
    "family, source, needle",
    [
        ("hf", "facebook/dinov2-small", "models--facebook--dinov2-small"),
        ("timm", "vit_small_patch16_224", "timm/vit_small_patch16_224"),
        ("open_clip", "ViT-B-16/openai", "timm/vit_base_patch16_clip_224.openai"),
    ],
)
def test_uncached_hub_model_is_unavailable(offline_empty_hub: Path, family: str, source: str, needle: str):
    spec = ModelSpec(family=family, source=source, layers=[11])
    with pytest.raises(ModelUnavailable) as info:
        load_backbone(spec, offline_empty_hub, torch.device("cpu"))
    message = str(info.value)
    assert needle in message and "download" in message
    if family == "hf":
        assert str(offline_empty_hub) in message and "HF_HUB_OFFLINE" in message


def test_missing_local_folder_is_unavailable(tmp_path: Path):
    spec = ModelSpec(family="hf", source=str(tmp_path / "nowhere"), layers=[1])
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_backbone(spec, tmp_path, torch.device("cpu"))


def test_unsupported_hf_model_type(tmp_path: Path):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert'.*dinov3_vit"):
        load_hf(str(tmp_path / "bert"), random_init=True)
