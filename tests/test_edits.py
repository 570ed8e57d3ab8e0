"""Error-preserving edits: identity when nothing changes, equal to a hooked full forward pass,
and a planted feature whose suppression moves its class far more than a matched control."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saev_report import edits
from saev_report.datasets import ImageDataset, ImageRecord
from saev_report.heads import LinearHead
from saev_report.record import RecordedTokens, record_layers, record_reach
from saev_report.stages.record import RecordOut
from saev_report.stages.tokens import TokensOut
from saev_report.sae import SparseAutoencoder
from saev_report.spec import EditSpec, ExplicitEdit, GeneratedEdits
from saev_report.tables import to_arrow

transformers = pytest.importorskip("transformers")
from saev_report.backbones.hf import HFBackbone  # noqa: E402
from tiny_models import tiny_dinov2, orthonormal_sae  # noqa: E402

IMAGE, D, N_LAYERS = 56, 32, 3  # 4×4 patch grid


@pytest.fixture(scope="module")
def backbone() -> HFBackbone:
    return tiny_dinov2(D, N_LAYERS, IMAGE)


@pytest.fixture(scope="module")
def sae() -> SparseAutoencoder:
    model = SparseAutoencoder(D, 4 * D, seed=0)
    with torch.no_grad():
        model.b_enc_f.fill_(0.5)  # fires on a good share of patches
        model.act_mean_d.normal_(generator=torch.Generator().manual_seed(1))
        model.act_scale.fill_(0.7)
    return model.eval().requires_grad_(False)


def random_head(task: str, n_classes: int, seed: int = 0) -> LinearHead:
    torch.manual_seed(seed)
    return LinearHead(torch.nn.Linear(D, n_classes), task, [f"c{i}" for i in range(n_classes)]).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------- step 2


def test_actions_modify_only_chosen_features_and_patches():
    f = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.5, 4.0], [0.0, 1.5, 2.5]])
    for action, value, expected in [
        ("suppress", 9.0, [0.0, 0.0]), ("set", 9.0, [9.0, 9.0]), ("scale", 2.0, [4.0, 3.0]),
        ("clamp", 1.0, [1.0, 1.0]), ("add", -1.0, [1.0, 0.5]),
    ]:
        out = edits.modify_features(f, [1], action, value, [0, 2])
        assert out[[0, 2], 1].tolist() == expected, action
        keep = torch.ones_like(f, dtype=torch.bool)
        keep[[0, 2], 1] = False
        assert torch.equal(out[keep], f[keep]) and f[0, 1] == 2.0  # input untouched
    with pytest.raises(ValueError, match="unknown edit action"):
        edits.modify_features(f, [1], "flip", 0.0, [0])


def test_patch_choices():
    f = torch.tensor([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    assert edits.resolve_patches(f, [0], "all") == [0, 1, 2]
    assert edits.resolve_patches(f, [0], "active") == [2]
    assert edits.resolve_patches(f, [0, 1], "active") == [0, 2]
    assert edits.resolve_patches(f, [0], [2, 0, 2]) == [0, 2]
    with pytest.raises(ValueError, match="patch indices"):
        edits.resolve_patches(f, [0], [3])


# --------------------------------------------------------------------------- steps 1–4


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_no_op_edits_are_the_identity(backbone, sae, pixels, task):
    head = random_head(task, 5)
    with torch.no_grad():
        plain_final = backbone.forward_final(pixels[None])[0]
        plain_out = head(plain_final[None], backbone.layout)[0]
    captured = edits.capture_image(backbone, sae, pixels, 2)
    active = int((captured.f_pf > 0).sum(0).argmax())  # a feature that fires: the edits touch real values
    for action, value in [("scale", 1.0), ("add", 0.0), ("clamp", 1e9)]:
        outcome = edits.edit_image(backbone, sae, head, pixels, 2, [active, 3], action, value, "all")
        assert torch.allclose(outcome.final_after, plain_final, atol=1e-6, rtol=0)
        assert torch.allclose(outcome.after, plain_out, atol=1e-6, rtol=0)
        assert torch.allclose(outcome.before, plain_out, atol=1e-6, rtol=0)
    # "set to its current value" at one patch
    patch = int(captured.f_pf[:, active].argmax())
    outcome = edits.edit_image(backbone, sae, head, pixels, 2, [active], "set", float(captured.f_pf[patch, active]), [patch])
    assert torch.allclose(outcome.final_after, plain_final, atol=1e-6, rtol=0)
    # and a real edit does change things (the comparison above can fail)
    outcome = edits.edit_image(backbone, sae, head, pixels, 2, [active], "scale", 5.0, "all")
    assert (outcome.final_after - plain_final).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_resumed_edit_equals_a_hooked_full_forward(backbone, sae, pixels, layer):
    features, patches = [4, 9, 17], [0, 5, 6, 15]
    captured = edits.capture_image(backbone, sae, pixels, layer)
    assert (captured.f_pf[patches][:, features] > 0).any()  # the edit is not a no-op
    outcome = edits.edit_image(backbone, sae, random_head("classification", 3), pixels, layer, features, "set", 3.0, patches)

    patch_slice = backbone.layout.patch_slice

    def hook(module, inputs, output):
        tokens = output[0] if isinstance(output, tuple) else output
        x = tokens[0, patch_slice]
        f = sae.encode(x)
        f_edit = f.clone()
        for p in patches:
            f_edit[p, features] = 3.0
        x_edit = sae.decode(f_edit) + (x - sae.decode(f))  # dec(f') + err, written the paper's way
        tokens = tokens.clone()
        tokens[0, patch_slice] = x_edit
        return (tokens, *output[1:]) if isinstance(output, tuple) else tokens

    handle = backbone.model.encoder.layer[layer - 1].register_forward_hook(hook)  # block L−1 makes hidden_states[L]
    try:
        with torch.no_grad():
            hooked_final = backbone.forward_final(pixels[None])[0]
    finally:
        handle.remove()
    assert torch.allclose(outcome.final_after, hooked_final, atol=1e-5, rtol=0)
    assert (outcome.final_after - outcome.final_before).abs().max() > 1e-3
    assert outcome.patches_used == patches


def test_cls_and_registers_are_untouched_at_the_edited_layer(backbone, sae, pixels):
    captured = edits.capture_image(backbone, sae, pixels, 2)
    acts, used = edits.edited_acts(backbone, sae, captured, edits.FeatureEdit((1, 2, 3), "add", 2.0, "all"))
    assert torch.equal(acts[0], captured.acts_td[0]) and used == list(range(16))
    assert (acts[1:] - captured.acts_td[1:]).abs().min() > 0  # every patch moved


# --------------------------------------------------------------------------- planted feature, run_edits


def _photo_dataset(tmp_path: Path, n: int = 4) -> ImageDataset:
    from skimage import data as skdata

    records = []
    for i, name in enumerate(["chelsea", "astronaut", "coffee", "rocket", "horse", "camera"][:n]):
        image = getattr(skdata, name)()
        Image.fromarray(image).convert("RGB").resize((64, 64)).save(tmp_path / f"{name}.png")
        records.append(ImageRecord(i, str(tmp_path / f"{name}.png"), "cat", None))
    return ImageDataset("photos", records, ["cat"], ["background", "cat", "dog"], 255)


def recorded_layer(backbone, dataset, layer: int, out_dir: Path) -> RecordedTokens:
    """Layer-L tokens of every image as the record and tokens stages give them to an edit (float32 here)."""
    common = dict(model_key="tiny", dtype="float32", batch_size=4, shard_mb=1, device=torch.device("cpu"))
    record_layers(backbone, dataset, layers=[layer], tokens=["patches"], out_dir=out_dir / "record", **common)
    record_reach(backbone, None, [], [], [], from_layer=None, edit_layers=[layer], final=False, out_dir=out_dir / "tokens", **common)
    return TokensOut(out_dir / "tokens").layer(RecordOut(out_dir / "record"), layer)


def planted_setup(backbone, dataset):
    """An orthonormal SAE at the last layer and a segmentation head whose `cat` logit reads exactly
    the decoder direction of one feature (the one that fires most on these images)."""
    sae = orthonormal_sae(D)
    q_fd = sae.W_dec_fd.detach()  # row f: feature f's decoder direction
    pixels = torch.stack([backbone.preprocess(dataset.image(i)) for i in range(len(dataset))])
    with torch.no_grad():
        acts = backbone.capture(pixels, [N_LAYERS])[N_LAYERS][:, backbone.layout.patch_slice].flatten(0, 1)
        f = sae.encode(acts)
    planted = int(f.mean(0).argmax())
    other = int(f.mean(0).argsort()[-2])
    linear = torch.nn.Linear(D, 3)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[1] = 8 * q_fd[planted]  # cat: the planted direction
        linear.weight[2] = 8 * q_fd[other] - 1.0  # dog: another direction, slightly handicapped
    head = LinearHead(linear, "segmentation", dataset.seg_classes).eval().requires_grad_(False)
    freq = (f > 0).double().mean(0)
    table = [
        {"sae_id": "tiny/L3/x", "feature": j, "top_label": "cat" if j == planted else "dog",
         "label_purity": 1.0 if j == planted else 0.4, "freq": float(freq[j]) or 1e-4, "dead": False, "dense": False}
        for j in range(D)
    ]
    table.append({"sae_id": "another/sae", "feature": 0, "top_label": "x", "label_purity": 1.0, "freq": 0.1, "dead": False, "dense": False})
    return sae, head, table, planted


def test_suppressing_a_planted_feature_beats_a_matched_control(backbone, tmp_path):
    dataset = _photo_dataset(tmp_path)
    sae, head, table, planted = planted_setup(backbone, dataset)
    tokens = recorded_layer(backbone, dataset, N_LAYERS, tmp_path / "rec")
    spec = EditSpec(name="plant", model="tiny", head="seg", generate=GeneratedEdits(top_purity=1, images_per_feature=3, patches="all"))
    rows = edits.run_edits(spec, backbone=backbone, sae=sae, sae_id="tiny/L3/x", head=head, head_key="seg",
                           dataset=dataset, layer=N_LAYERS, tokens=tokens, features_table=table, seed=0)
    to_arrow("edits", rows)  # every row fits the declared schema
    main = [r for r in rows if not r["is_control"]]
    controls = [r for r in rows if r["is_control"]]
    assert len(main) == len(controls) == 3
    assert [r["edit_id"] for r in rows[:2]] == ["plant/0", "plant/0/control"]
    for edit, control in zip(main, controls):
        assert edit["features"] == [planted] and control["features"] != [planted]
        assert edit["target_class"] == control["target_class"] == "cat"
        assert edit["before_pixels"][1] > 0.3 * IMAGE * IMAGE  # cat is predicted before
        assert edit["target_delta"] < -0.2  # and mostly gone after
        assert abs(edit["target_delta"]) > 4 * abs(control["target_delta"])
        assert sum(edit["after_pixels"]) == IMAGE * IMAGE and len(edit["before_map"]) == 16
        assert edit["flipped"] and edit["flip_frac"] > control["flip_frac"]
    # images are chosen where the feature fires most, deterministically
    again = edits.run_edits(spec, backbone=backbone, sae=sae, sae_id="tiny/L3/x", head=head, head_key="seg",
                            dataset=dataset, layer=N_LAYERS, tokens=tokens, features_table=table, seed=0)
    assert [r["image_idx"] for r in again] == [r["image_idx"] for r in rows]
    assert [r["features"] for r in again] == [r["features"] for r in rows]


def test_matched_control_is_alive_and_nearest_in_log_frequency():
    rows = {
        0: {"feature": 0, "freq": 0.01, "dead": False},
        1: {"feature": 1, "freq": 0.011, "dead": False},
        2: {"feature": 2, "freq": 0.0, "dead": True},
        3: {"feature": 3, "freq": 0.5, "dead": False},
        4: {"feature": 4, "freq": 0.0095, "dead": True},
    }
    rng = np.random.default_rng(0)
    assert edits.matched_control(rows, 0, {0}, rng) == 1
    assert edits.matched_control(rows, 0, {0, 1}, rng) == 3
    assert edits.matched_control(rows, 2, {2}, rng) is None  # a dead target has no control


def test_purest_features_skip_dead_dense_and_unlabelled():
    rows = {
        0: {"feature": 0, "freq": 0.01, "dead": False, "dense": False, "top_label": "a", "label_purity": 0.9},
        1: {"feature": 1, "freq": 0.2, "dead": False, "dense": True, "top_label": "a", "label_purity": 1.0},
        2: {"feature": 2, "freq": 0.0, "dead": True, "dense": False, "top_label": "a", "label_purity": 1.0},
        3: {"feature": 3, "freq": 0.02, "dead": False, "dense": False, "top_label": None, "label_purity": None},
        4: {"feature": 4, "freq": 0.03, "dead": False, "dense": False, "top_label": "b", "label_purity": 0.9},
        5: {"feature": 5, "freq": 0.03, "dead": False, "dense": False, "top_label": "b", "label_purity": 0.5},
    }
    assert [r["feature"] for r in edits.purest_features(rows, 2)] == [4, 0]


def test_explicit_classification_edits_make_schema_rows(backbone, sae, tmp_path):
    dataset = _photo_dataset(tmp_path, n=2)
    dataset.records.append(ImageRecord(2, str(tmp_path / "missing.png"), "cat", None))
    head = LinearHead(torch.nn.Linear(D, 7), "classification", [f"bird{i}" for i in range(7)]).eval().requires_grad_(False)
    spec = EditSpec(
        name="ex", model="tiny", head="cls", layer=2, action="scale", value=0.0,
        explicit=[ExplicitEdit(image=1, features=[1, 2], patches=[0, 3]), ExplicitEdit(image="chelsea.png", features=[5]),
                  ExplicitEdit(image=2, features=[5])],
        random_control=True,
    )
    rows = edits.run_edits(spec, backbone=backbone, sae=sae, sae_id="s", head=head, head_key="cls", dataset=dataset,
                           layer=2, tokens=recorded_layer(backbone, dataset, 2, tmp_path / "rec"), features_table=None)
    to_arrow("edits", rows)
    assert [r["edit_id"] for r in rows] == ["ex/0", "ex/1"]  # no table → no controls; the unreadable image is skipped
    first, second = rows
    assert first["image_idx"] == 1 and first["patches"] == [0, 3] and first["features"] == [1, 2]
    assert second["image_idx"] == 0 and second["patches"] == list(range(16))
    for row in rows:
        assert len(row["before_top"]) == len(row["after_probs"]) == 5
        assert row["before_probs"] == sorted(row["before_probs"], reverse=True)
        assert row["target_class"] == row["before_top"][0]  # without a table: the top prediction
        assert row["flip_frac"] in (0.0, 1.0) and row.get("before_pixels") is None
        assert row["specificity"] == pytest.approx(abs(row["target_delta"]) / (row["other_delta"] + 1e-9))
    assert second["target_delta"] != 0  # zeroing a feature everywhere moves the CLS prediction


def test_attribution_finds_the_feature_the_head_reads(backbone, tmp_path):
    dataset = _photo_dataset(tmp_path)
    sae, head, table, planted = planted_setup(backbone, dataset)
    tokens = recorded_layer(backbone, dataset, N_LAYERS, tmp_path / "rec")
    spec = EditSpec(name="evidence", model="tiny", head="seg",
                    generate=GeneratedEdits(select="attribution", top_purity=1, images_per_feature=2, features_per_edit=1))
    rows = edits.run_edits(spec, backbone=backbone, sae=sae, sae_id="tiny/L3/x", head=head, head_key="seg",
                           dataset=dataset, layer=N_LAYERS, tokens=tokens, features_table=table, seed=0)
    main = [r for r in rows if not r["is_control"]]
    assert [r["image_idx"] for r in main] == [0, 1]  # round-robin over labels, index order
    for edit in main:
        assert edit["features"] == [planted]
        assert edit["target_class"] == "cat" and edit["target_delta"] < -0.2


def test_segmentation_set_without_labels_offers_its_mask_classes(tmp_path):
    """ADE20K has masks and no image labels: `select: attribution` found no image of any class, so the
    paper spec's `ade-suppress` generated nothing (found by the rehearsal). Images now show their mask classes."""
    from PIL import Image

    from saev_report.datasets import ImageDataset, ImageRecord

    masks = [np.array([[0, 0], [2, 255]], np.uint8), np.array([[1, 1], [1, 1]], np.uint8), np.array([[2, 0], [0, 0]], np.uint8)]
    records = []
    for i, mask in enumerate(masks):
        Image.fromarray(mask, "L").save(tmp_path / f"{i}.png")
        records.append(ImageRecord(i, str(tmp_path / f"{i}.png"), None, str(tmp_path / f"{i}.png")))
    records.append(ImageRecord(3, str(tmp_path / "3.png"), None, str(tmp_path / "missing.png")))  # unreadable: shows nothing
    dataset = ImageDataset("seg", records, [], ["sky", "road", "tree"])
    expected = {name: [i for i, m in enumerate(masks) if k in np.unique(m)] for k, name in enumerate(dataset.seg_classes)}
    assert edits.labelled_positions(dataset) == expected == {"sky": [0, 2], "road": [1], "tree": [0, 2]}
    assert edits.attribution_positions(dataset, ["tree", "sky"], 3) == [(0, "tree"), (0, "sky"), (2, "tree")]
    labelled = ImageDataset("cls", [ImageRecord(0, "a", "cat"), ImageRecord(1, "b", None), ImageRecord(2, "c", "cat")], ["cat"])
    assert edits.labelled_positions(labelled) == {"cat": [0, 2]}
