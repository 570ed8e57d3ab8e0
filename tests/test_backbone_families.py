"""The 2026 backbone families — DINOv3, SigLIP 2, Perception Encoder, ConvNeXt — against each
library's own forward pass and its own image transform, on tiny random-weight configs of the real
model classes (no weights are available offline). Plus the registries that find them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere

import importlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from saev_report.backbones import Backbone, TokenLayout, load_backbone
from saev_report.spec import MODEL_FAMILIES, ModelSpec

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from saev_report.backbones.hf import HF_ADAPTERS, HFBackbone, hf_backbone, import_object, load_hf  # noqa: E402
from saev_report.backbones.hf_dinov3 import DINOv3Backbone  # noqa: E402
from saev_report.backbones.hf_siglip import SiglipBackbone  # noqa: E402
from saev_report.backbones.open_clip_vit import load_open_clip  # noqa: E402
from saev_report.backbones.timm_convnext import TimmConvNeXtBackbone  # noqa: E402
from saev_report.backbones.timm_eva import TimmEvaBackbone  # noqa: E402
from saev_report.backbones.timm_family import TIMM_ADAPTERS, load_timm, timm_backbone  # noqa: E402
from saev_report.backbones.timm_vit import TimmViTBackbone  # noqa: E402
from saev_report.record import StoreRequest, record_activations  # noqa: E402
from saev_report.activations import ActivationStore  # noqa: E402
from saev_report.datasets import ImageDataset, ImageRecord  # noqa: E402

from test_backbones import assert_backbone_contract, close, offline_empty_hub  # noqa: E402, F401 (a fixture)

DEPTH = 3
CPU = torch.device("cpu")


def photo(width: int = 150, height: int = 100) -> Image.Image:
    """A real photo (scikit-image's chelsea), not square, so resize and crop both matter."""
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.chelsea()).resize((width, height), Image.Resampling.LANCZOS)


def block_reference(model: torch.nn.Module, blocks, pixels: torch.Tensor, features) -> dict[int | str, torch.Tensor]:
    """hidden_states[0..n] from hooks on the library's own blocks, "final" from its forward_features."""
    outputs: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in blocks]
    hooks.append(blocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0])))
    with torch.inference_mode():
        final = features(pixels)
    for hook in hooks:
        hook.remove()
    return {0: inputs[0], **{i + 1: o for i, o in enumerate(outputs)}, "final": final}


# --------------------------------------------------------------------------- registries


def test_every_registered_family_and_adapter_resolves():
    for family, entry in MODEL_FAMILIES.items():
        module, _, name = entry.loader.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), family
    for model_type, path in HF_ADAPTERS.items():
        adapter = import_object(path)
        assert issubclass(adapter, HFBackbone), model_type
        assert hasattr(transformers, adapter.model_class), adapter.model_class
        assert getattr(transformers, adapter.model_class).config_class.model_type.removesuffix("_vision_model") == model_type.removesuffix("_vision_model")
    for class_name, path in TIMM_ADAPTERS.items():
        assert issubclass(import_object(path), Backbone), class_name


def test_timm_rejects_a_class_it_has_no_adapter_for():
    with pytest.raises(ValueError, match="ResNet"):
        timm_backbone(timm.create_model("resnet18", pretrained=False, num_classes=0), name="r18")


# --------------------------------------------------------------------------- DINOv3


def tiny_dinov3(image_size: int = 64, registers: int = 4) -> torch.nn.Module:
    torch.manual_seed(7)
    config = transformers.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=64,
                                          image_size=image_size, patch_size=16, num_register_tokens=registers)
    return transformers.DINOv3ViTModel(config).eval()


@pytest.mark.parametrize("image_size", [64, 96])
def test_dinov3_matches_hidden_states_with_rope_at_any_size(image_size: int):
    model = tiny_dinov3()
    backbone = hf_backbone(model, name="dinov3", image_size=image_size)
    assert isinstance(backbone, DINOv3Backbone)
    side = image_size // 16
    assert backbone.layout == TokenLayout(n_cls=1, n_registers=4, grid=(side, side))
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.inference_mode():
        out = model(pixel_values=pixels, output_hidden_states=True)
    reference: dict[int | str, torch.Tensor] = dict(enumerate(out.hidden_states))
    reference["final"] = out.last_hidden_state
    assert len(out.hidden_states) == DEPTH + 1
    assert_backbone_contract(backbone, pixels, reference)


def test_dinov3_resume_needs_the_rope_of_its_grid():
    """RoPE is what makes a patch's place matter: the same tokens resumed with another grid's
    rotary table come out different, so `run_blocks` really passes the layout's table."""
    model = tiny_dinov3()
    backbone = hf_backbone(model, name="dinov3", image_size=64)
    with torch.inference_mode():
        acts = backbone.capture(torch.randn(1, 3, 64, 64), [1])[1]
        wrong = model.rope_embeddings(torch.empty(1, 0, 32, 128))  # 2×8 patches: same count, another shape
        resumed_wrong = model.norm(model.model.layer[1](acts, position_embeddings=wrong))
        assert not close(resumed_wrong, backbone.final_norm(backbone.run_blocks(acts, 1, 2)))


def test_dinov3_preprocessing_is_the_processors(tmp_path: Path):
    """The library's DINOv3 processor (rescale, then bilinear resize, then normalise), set to the
    project's geometry, gives the same tensor as the adapter, and a saved checkpoint's
    preprocessor_config.json is read."""
    model = tiny_dinov3()
    model.save_pretrained(tmp_path / "dinov3")
    processor = transformers.DINOv3ViTImageProcessor()
    processor.save_pretrained(tmp_path / "dinov3")
    backbone = load_hf(str(tmp_path / "dinov3"), image_size=64)
    assert isinstance(backbone, DINOv3Backbone)
    assert (backbone.preprocessing.interpolation, backbone.preprocessing.resize_on) == ("bilinear", "float")
    assert backbone.mean == tuple(processor.image_mean) and backbone.std == tuple(processor.image_std)
    geometry = dict(size={"shortest_edge": 73}, do_center_crop=True, crop_size={"height": 64, "width": 64})  # 73 = 64·8/7
    expected = processor(images=photo(), return_tensors="pt", **geometry)["pixel_values"][0]
    assert close(backbone.preprocess(photo()), expected, atol=1e-5)
    with torch.inference_mode():
        pixels = torch.randn(1, 3, 64, 64)
        assert close(backbone.forward_final(pixels), model(pixel_values=pixels).last_hidden_state)


# --------------------------------------------------------------------------- SigLIP 2


def test_siglip2_fixed_resolution_checkpoint_loads_as_siglip_with_its_processor(tmp_path: Path):
    """The hub's fixed-resolution SigLIP 2 checkpoints are `SiglipModel`s (model_type siglip) with a
    SiglipImageProcessor config; the adapter takes the vision tower, no CLS, and the config's
    mean, std and resample."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=2, image_size=64, patch_size=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(8)
    full = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval()
    full.save_pretrained(tmp_path / "siglip2")
    processor = transformers.SiglipImageProcessor(resample=2, size={"height": 64, "width": 64})
    processor.save_pretrained(tmp_path / "siglip2")
    assert json.loads((tmp_path / "siglip2" / "preprocessor_config.json").read_text())["resample"] == 2

    backbone = load_hf(str(tmp_path / "siglip2"))
    assert isinstance(backbone, SiglipBackbone)
    assert backbone.layout == TokenLayout(n_cls=0, n_registers=0, grid=(4, 4))
    assert backbone.preprocessing.interpolation == "bilinear" and backbone.mean == (0.5, 0.5, 0.5)
    geometry = dict(size={"shortest_edge": 73}, do_center_crop=True, crop_size={"height": 64, "width": 64})
    expected = processor(images=photo(), return_tensors="pt", **geometry)["pixel_values"][0]
    assert close(backbone.preprocess(photo()), expected, atol=1e-5)

    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = full.vision_model(pixel_values=pixels, output_hidden_states=True)
    reference: dict[int | str, torch.Tensor] = dict(enumerate(out.hidden_states))
    reference["final"] = out.last_hidden_state
    assert_backbone_contract(backbone, pixels, reference)


def test_siglip2_from_timm_and_open_clip():
    """timm ships SigLIP 2 as a VisionTransformer without CLS (`vit_*_siglip_*.v2_webli`);
    open_clip's `ViT-B-16-SigLIP2` is that model as a trunk."""
    torch.manual_seed(9)
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, depth=DEPTH, img_size=64).eval()
    backbone = timm_backbone(model, name="siglip2")
    assert isinstance(backbone, TimmViTBackbone)
    assert backbone.layout == TokenLayout(n_cls=0, n_registers=0, grid=(4, 4))
    pixels = torch.randn(2, 3, 64, 64)
    assert_backbone_contract(backbone, pixels, block_reference(model, model.blocks, pixels, model.forward_features))

    tower = load_open_clip("ViT-B-16-SigLIP2", random_init=True, image_size=64)
    assert isinstance(tower, TimmViTBackbone) and tower.layout.n_cls == 0 and tower.n_layers == 12


def test_siglip2_naflex_at_a_fixed_resolution_matches_the_library():
    """`Siglip2VisionModel` (NaFlex) fed whole square images: the adapter's patches are the
    library's `convert_image_to_patches`, and every layer and the final tokens equal the library's
    forward with an all-ones mask and the layout's `spatial_shapes`."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    from saev_report.backbones.hf_siglip2 import Siglip2Backbone, to_patches

    torch.manual_seed(12)
    config = transformers.Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=2,
                                              num_patches=16, patch_size=16)
    model = transformers.Siglip2VisionModel(config).eval()
    backbone = hf_backbone(model, name="siglip2-naflex", image_size=96)  # 6×6 patches: the 4×4 position grid is resized
    assert isinstance(backbone, Siglip2Backbone) and backbone.native_size == 64
    assert backbone.layout == TokenLayout(n_cls=0, n_registers=0, grid=(6, 6))
    pixels = torch.randn(2, 3, 96, 96)
    patches = to_patches(pixels, 16)
    assert torch.equal(patches[1], convert_image_to_patches(pixels[1], 16))
    kwargs = dict(pixel_attention_mask=torch.ones(2, 36, dtype=torch.long), spatial_shapes=torch.tensor([[6, 6], [6, 6]]))
    layers = model.encoder.layers
    reference = block_reference(model, layers, patches, lambda p: model(pixel_values=p, **kwargs).last_hidden_state)
    assert_backbone_contract(backbone, pixels, reference)

    # photometry and patch order against the library's processor, on an image already cut to the project's geometry
    processor = transformers.Siglip2ImageProcessor(max_num_patches=36, patch_size=16)
    assert (backbone.mean, backbone.std) == (tuple(processor.image_mean), tuple(processor.image_std))
    from torchvision.transforms import v2 as T

    cut = T.Compose([T.ToImage(), T.Resize(110, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(96)])(photo())
    expected = processor(images=cut, return_tensors="pt")["pixel_values"][0]
    assert close(to_patches(backbone.preprocess(photo())[None], 16)[0], expected, atol=1e-5)


def test_siglip2_naflex_full_checkpoint_loads_its_vision_tower(tmp_path: Path):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_patches=16, patch_size=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(13)
    full = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=vision, text_config=text)).eval()
    full.save_pretrained(tmp_path / "naflex")
    backbone = load_hf(str(tmp_path / "naflex"))
    assert type(backbone).__name__ == "Siglip2Backbone" and (backbone.image_size, backbone.n_layers) == (64, 2)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        from saev_report.backbones.hf_siglip2 import to_patches

        expected = full.vision_model(pixel_values=to_patches(pixels, 16), pixel_attention_mask=torch.ones(1, 16, dtype=torch.long),
                                     spatial_shapes=torch.tensor([[4, 4]])).last_hidden_state
        assert close(backbone.forward_final(pixels), expected)
    twin = load_hf(str(tmp_path / "naflex"), random_init=True)
    assert twin.layout == backbone.layout


# --------------------------------------------------------------------------- Perception Encoder


@pytest.mark.parametrize(
    "name, n_cls",
    [("vit_pe_core_tiny_patch16_384", 1), ("vit_pe_spatial_tiny_patch16_512", 1)],
)
def test_perception_encoder_matches_timm_forward(name: str, n_cls: int):
    torch.manual_seed(10)
    model = timm.create_model(name, pretrained=False, num_classes=0, depth=DEPTH, img_size=64).eval()
    backbone = timm_backbone(model, name=name)
    assert isinstance(backbone, TimmEvaBackbone) and model.rope is not None
    assert backbone.layout == TokenLayout(n_cls=n_cls, n_registers=0, grid=(4, 4))
    pixels = torch.randn(2, 3, 64, 64)
    reference = block_reference(model, model.blocks, pixels, model.forward_features)
    with torch.inference_mode():
        final, intermediates = model.forward_intermediates(pixels, norm=False, output_fmt="NLC")
    for layer, patches_bnd in enumerate(intermediates, start=1):  # the library's own view of the patches
        assert close(reference[layer][:, n_cls:], patches_bnd)
    assert close(final, reference["final"])
    assert_backbone_contract(backbone, pixels, reference)


def test_perception_encoder_preprocessing_is_timms_transform():
    model = timm.create_model("vit_pe_core_tiny_patch16_384", pretrained=False, num_classes=0, depth=1, img_size=64).eval()
    backbone = timm_backbone(model, name="pe")
    config = timm.data.resolve_data_config({}, model=model)
    assert (backbone.mean, backbone.std, backbone.preprocessing.interpolation) == (config["mean"], config["std"], config["interpolation"])
    # timm's own eval transform, at the project's geometry (crop 7/8 instead of PE's 1.0)
    transform = timm.data.create_transform(**{**config, "input_size": (3, 64, 64), "crop_pct": 7 / 8})
    assert close(backbone.preprocess(photo()), transform(photo()), atol=1e-6)


def test_perception_encoder_through_the_registry_and_open_clip():
    spec = ModelSpec(family="timm", source="vit_pe_core_tiny_patch16_384", random_init=True, image_size=64, layers=[11])
    core = load_backbone(spec, Path("unused"), CPU, seed=1)
    assert isinstance(core, TimmEvaBackbone) and (core.n_layers, core.d_model, core.layout.grid) == (12, 192, (4, 4))
    assert "random" in core.name and core.mean == (0.5, 0.5, 0.5)
    tower = load_open_clip("PE-Core-T-16-384", random_init=True, image_size=64, seed=1)
    assert isinstance(tower, TimmEvaBackbone) and tower.layout == core.layout
    assert tower.preprocessing.resize_on == "pil"


# --------------------------------------------------------------------------- ConvNeXt


def tiny_convnext() -> torch.nn.Module:
    torch.manual_seed(11)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=0).eval()


def test_convnext_stages_are_layers_with_their_own_grid_and_width():
    model = tiny_convnext()
    backbone = timm_backbone(model, name="convnext", image_size=64)
    assert isinstance(backbone, TimmConvNeXtBackbone) and backbone.n_layers == 4
    grids = [backbone.layer_layout(layer).grid for layer in range(5)]
    widths = [backbone.layer_width(layer) for layer in range(5)]
    assert grids == [(16, 16), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert widths == [40, 40, 80, 160, 320]
    assert backbone.layout == TokenLayout(n_cls=0, n_registers=0, grid=(2, 2)) and backbone.d_model == 320
    assert backbone.layer_layout(2).indices(["cls", "registers", "patches"]) == list(range(64))

    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        stages = model.forward_intermediates(pixels, intermediates_only=True)  # the library's own stage outputs, NCHW
        stem = model.stem(pixels)
        features = model.forward_features(pixels)
        captured = backbone.capture(pixels, list(range(5)), final=True)
        for layer, map_bchw in enumerate([stem, *stages]):
            assert captured[layer].shape == (2, grids[layer][0] * grids[layer][1], widths[layer])
            assert close(captured[layer], map_bchw.flatten(2).transpose(1, 2)), f"layer {layer}"
        assert close(captured["final"], features.flatten(2).transpose(1, 2))
        for layer in range(5):
            assert close(backbone.resume(captured[layer], layer), captured["final"]), f"resume from {layer}"
        # the head timm would put on it pools the final map: the mean of the final tokens
        assert close(model.forward_head(features, pre_logits=True), model.head.norm(captured["final"].mean(1)[:, :, None, None]).flatten(1))
        edited = captured[2].clone()
        edited[:, 5] += 3.0 * torch.randn(edited.shape[-1])  # not a uniform shift: LayerNorm would erase that
        assert not close(backbone.resume(edited, 2), captured["final"])


def test_convnext_preprocessing_is_timms_transform_and_loads_by_name():
    backbone = load_timm("convnext_atto", random_init=True, image_size=64, seed=3)
    assert isinstance(backbone, TimmConvNeXtBackbone) and backbone.image_size == 64 and backbone.patch_size == 32
    config = timm.data.resolve_data_config({}, model=backbone.model)
    transform = timm.data.create_transform(**{**config, "input_size": (3, 64, 64), "crop_pct": 7 / 8})
    assert close(backbone.preprocess(photo()), transform(photo()), atol=1e-6)
    again = load_timm("convnext_atto", random_init=True, image_size=64, seed=3)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert close(backbone.forward_final(pixels), again.forward_final(pixels), atol=0)


def test_convnext_records_each_stage_at_its_own_width(tmp_path: Path):
    backbone = timm_backbone(tiny_convnext(), name="convnext", image_size=64)
    folder = tmp_path / "img"
    folder.mkdir()
    records = []
    for i in range(3):
        photo(90 + 10 * i, 80).save(folder / f"p{i}.png")
        records.append(ImageRecord(i, str(folder / f"p{i}.png"), "cat"))
    dataset = ImageDataset("toy", records, ["cat"])
    stores = [StoreRequest("L2", 2, ("patches",)), StoreRequest("final", "final", ("patches",))]
    record_activations(backbone, dataset, model_key="cnn", stores=stores, out_dir=tmp_path / "rec", dtype="float32",
                       batch_size=2, shard_mb=1, device=CPU, num_workers=0)
    stage2, final = ActivationStore(tmp_path / "rec" / "L2"), ActivationStore(tmp_path / "rec" / "final")
    assert (stage2.d_model, stage2.tokens_per_image, final.d_model, final.tokens_per_image) == (80, 64, 320, 4)
    pixels = torch.stack([backbone.preprocess(dataset.image(i)) for i in range(3)])
    with torch.inference_mode():
        expected = backbone.capture(pixels, [2])[2]
    assert close(stage2.image_acts(1), expected[1])


def test_convnext_edit_at_a_stage_encodes_that_stages_patches():
    """An edit at stage 2 encodes all 8×8 patches of that stage (not the final stage's 2×2), and
    x̂ = x (an orthonormal SAE) leaves the resumed forward pass unchanged."""
    from saev_report.edits import captured_from_acts

    from tiny_models import orthonormal_sae

    backbone = timm_backbone(tiny_convnext(), name="convnext", image_size=64)
    with torch.inference_mode():
        acts_td = backbone.capture(torch.randn(1, 3, 64, 64), [2])[2][0]
    captured = captured_from_acts(backbone, orthonormal_sae(80), acts_td, 2)
    assert captured.f_pf.shape == (64, 80)
    assert captured.final_td.shape == (4, 320)
    with torch.inference_mode():
        assert close(captured.final_td, backbone.resume(acts_td[None], 2)[0])


@pytest.mark.parametrize(
    "family, source, needle",
    [
        ("hf", "facebook/dinov3-vitb16-pretrain-lvd1689m", "models--facebook--dinov3-vitb16-pretrain-lvd1689m"),
        ("hf", "google/siglip2-base-patch16-224", "models--google--siglip2-base-patch16-224"),
        ("timm", "vit_pe_core_base_patch16_224", "timm/vit_pe_core_base_patch16_224.fb"),
        ("timm", "vit_pe_spatial_base_patch16_512", "timm/vit_pe_spatial_base_patch16_512.fb"),
        ("timm", "convnext_tiny", "timm/convnext_tiny"),
        ("open_clip", "PE-Core-B-16/meta", "timm/PE-Core-B-16"),
    ],
)
def test_new_families_without_weights_say_where_to_put_them(offline_empty_hub: Path, family: str, source: str, needle: str):
    from saev_report.backbones import ModelUnavailable

    with pytest.raises(ModelUnavailable) as info:
        load_backbone(ModelSpec(family=family, source=source, layers=[2]), offline_empty_hub, CPU)
    assert needle in str(info.value) and "download" in str(info.value)
