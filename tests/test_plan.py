"""`plan` estimates: the paper's disk figure and stage listing."""

from __future__ import annotations

from pathlib import Path

from saev_report.plan import plan_rows, recording_estimates
from saev_report.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_paper_spec_disk_estimate_matches_reference_code() -> None:
    # The reference code: 1,281,167 images × 197 tokens × 768 floats × 4 bytes ≈ 723 GB (GiB).
    spec = load_spec(ROOT / "specs/clip_vs_dino.yaml", check_paths=False)
    rows = {r["model"]: r for r in recording_estimates(spec)}
    assert rows["clip"]["disk_bytes"] == 1_281_167 * 197 * 768 * 4
    assert rows["clip"]["disk"].startswith("722.")
    assert rows["dinov2"]["tokens"] == 257


def test_fp16_halves_disk() -> None:
    spec = load_spec(ROOT / "specs/clip_vs_dino.yaml", check_paths=False)
    half = spec.model_copy(update={"record": spec.record.model_copy(update={"dtype": "float16"})})
    full_bytes = recording_estimates(spec)[0]["disk_bytes"]
    assert recording_estimates(half)[0]["disk_bytes"] * 2 == full_bytes


def test_plan_lists_every_stage_as_todo(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "specs/demo.yaml")
    spec = spec.model_copy(update={"run": spec.run.model_copy(update={"out_dir": tmp_path})})
    rows = plan_rows(spec)
    kinds = {r["stage"].split("/")[0] for r in rows}
    assert kinds == {"images", "record", "train", "analyse", "tokens", "heads", "edits", "experiments", "splice", "compare", "stability", "claims"}
    assert all(r["status"] == "todo" for r in rows)


def test_n_gpus_split_recording_and_deal_out_the_sweep() -> None:
    from saev_report.plan import sae_train_flop, training_estimates, training_share

    assert [training_share(9, g) for g in (1, 2, 4, 9, 18)] == [9.0, 5.0, 3.0, 1.0, 0.5]  # whole SAEs, then DDP
    spec = load_spec(ROOT / "specs/clip_vs_dino.yaml", check_paths=False)
    one, eight = recording_estimates(spec, gpus=1)[0], recording_estimates(spec, gpus=8)[0]
    assert one["gpus_time"] == one["gpu_time"] and eight["gpus_time"] != one["gpu_time"]
    [clip, _] = training_estimates(spec, gpus=8)
    assert clip["saes"] == 1 and clip["flop"] == f"{sae_train_flop(768, 24_576, spec.sae.n_patches) / 1e15:,.0f} PFLOP"
