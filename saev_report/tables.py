"""Parquet tables and the read-only DuckDB views over them.

Every table a build writes is declared here with its columns and their meaning;
the table reference (docs/reference/tables.md) is generated from `TABLES`. Stages write parts of
tables (`write_table`) inside their own cached output directories; the
pipeline's publish step links the current parts into `<run>/tables/<table>/`,
and `connect(run_dir)` exposes each folder as a DuckDB view that no SQL can write through.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from saev_report import __version__
from saev_report.fsutil import atomic_write

# --------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str


@dataclass(frozen=True)
class TableDef:
    name: str
    doc: str
    columns: tuple[Column, ...]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type) for c in self.columns])


def _table(name: str, doc: str, *columns: tuple[str, pa.DataType, str]) -> TableDef:
    return TableDef(name, doc, tuple(Column(*c) for c in columns))


def _splice_columns(prefix: str, metric: str, head: str) -> list[tuple[str, pa.DataType, str]]:
    """`saes` columns of the spliced task metric for the model's first head of one task."""
    return [
        (f"{prefix}_head", pa.string(), f"The model's first {head} in the spec (null if none): the head the next four columns score."),
        (f"{prefix}_clean", pa.float64(), f"Its validation {metric} on the unedited model."),
        (f"{prefix}_spliced", pa.float64(), f"Its {metric} with the patch tokens at the SAE's layer replaced by x̂ (no error term)."),
        (f"{prefix}_ablated", pa.float64(), f"Its {metric} with them replaced by the mean activation."),
        (f"{prefix}_recovered", pa.float64(), "(spliced − ablated) / (clean − ablated): the share of the head's skill the SAE keeps."),
    ]


KEYED_TABLES = {"saes": "sae_id"}
"""Tables whose parts from different stages add columns to the same rows: `saes` gets its metrics
from `analyse` and its spliced task metrics from `splice`; the view merges them by key."""


TABLES: dict[str, TableDef] = {
    t.name: t
    for t in [
        _table(
            "images",
            "One row per image of every dataset a build reads.",
            ("dataset", pa.string(), "Dataset key in the spec."),
            ("image_idx", pa.int64(), "Index of the image within its dataset."),
            ("path", pa.string(), "Absolute path of the image file (bytes of a name that is not UTF-8 shown as `\\xNN`)."),
            ("label", pa.string(), "Class label, or null for unlabelled data."),
            ("mask_path", pa.string(), "Absolute path of the segmentation mask, or null."),
            ("width", pa.int32(), "Width in pixels of the original file."),
            ("height", pa.int32(), "Height in pixels of the original file."),
            ("status", pa.string(), "`ok`, or why the record stage skips the image (the same checks): `too small (...)`, `corrupt image (...)`, `animated (...)`, `broken symlink`. A file name that is not UTF-8 is read like any other (its `path` shows the odd bytes escaped)."),
        ),
        _table(
            "saes",
            "One row per trained SAE with its hyper-parameters and evaluation metrics.",
            ("sae_id", pa.string(), "`<model>/L<layer>/<tag>`, e.g. `dino/L10/relu-x16-l1_0.0004-s0`."),
            ("model", pa.string(), "Model key."),
            ("layer", pa.int32(), "Residual-stream layer (block output, 1-based)."),
            ("kind", pa.string(), "`relu`, `topk` or `batchtopk`."),
            ("d_model", pa.int32(), "Activation width d."),
            ("n_features", pa.int32(), "Dictionary width F."),
            ("expansion", pa.int32(), "F / d."),
            ("l1_coeff", pa.float64(), "Sparsity coefficient λ (relu)."),
            ("k", pa.int32(), "k (topk, batchtopk); 0 for relu."),
            ("seed", pa.int32(), "Initialisation seed."),
            ("n_patches_trained", pa.int64(), "Patches seen in training."),
            ("n_patches_eval", pa.int64(), "Patches in the evaluation pass."),
            ("mse", pa.float64(), "Mean over patches of ‖x−x̂‖² / d, in the normalised space the SAE trains in."),
            ("l0", pa.float64(), "Mean number of active features per patch."),
            ("fvu", pa.float64(), "Σ‖x−x̂‖² / Σ‖x−x̄‖² over all patches (centred fraction of variance unexplained)."),
            ("n_dead", pa.int64(), "Features that never fire on the evaluation set."),
            ("n_dense", pa.int64(), "Features firing on more than `analysis.dense_threshold` of patches."),
            *_splice_columns("cls", "accuracy", "classification head"),
            *_splice_columns("seg", "mIoU", "segmentation head"),
        ),
        _table(
            "train_log",
            "SAE training curves, one row every `sae.log_every` steps.",
            ("sae_id", pa.string(), "SAE id."),
            ("step", pa.int64(), "Optimiser step."),
            ("n_patches", pa.int64(), "Patches seen so far."),
            ("loss", pa.float64(), "Total loss (MSE + λ·L1, or MSE for topk)."),
            ("mse", pa.float64(), "Reconstruction MSE (normalised space)."),
            ("l1", pa.float64(), "Mean ‖f‖₁ per patch."),
            ("l0", pa.float64(), "Mean active features per patch."),
            ("dead_frac", pa.float64(), "Fraction of features that have not fired in the last 10M patches (or since the start)."),
            ("lr", pa.float64(), "Learning rate at this step."),
            ("l1_coeff", pa.float64(), "λ at this step (after warm-up)."),
            ("seconds", pa.float64(), "Wall-clock seconds since training began."),
        ),
        _table(
            "features",
            "Per-feature statistics over every recorded patch.",
            ("sae_id", pa.string(), "SAE id."),
            ("feature", pa.int32(), "Feature index."),
            ("n_fire", pa.int64(), "Patches where the feature is > 0."),
            ("freq", pa.float64(), "n_fire / patches: firing frequency."),
            ("log10_freq", pa.float64(), "log10(freq), null if dead."),
            ("mean_act", pa.float64(), "Mean activation over the patches where it fires (0 if dead)."),
            ("log10_mean_act", pa.float64(), "log10(mean_act), null if dead."),
            ("max_act", pa.float64(), "Maximum activation."),
            ("dead", pa.bool_(), "Never fires."),
            ("dense", pa.bool_(), "freq > dense threshold."),
            ("hist_counts", pa.list_(pa.int64()), "Histogram of log10 activation over firing patches."),
            ("hist_edges", pa.list_(pa.float64()), "Bin edges of `hist_counts` (log10 activation)."),
            ("n_exemplars", pa.int32(), "Exemplar images kept (≤ `analysis.top_k`; fewer when the feature fires on fewer images)."),
            ("top_label", pa.string(), "Most common label among the exemplar images (null without labels)."),
            ("label_purity", pa.float64(), "Fraction of exemplar images carrying `top_label` (trivially high when `n_exemplars` is small: filter on it)."),
            ("label_entropy", pa.float64(), "Entropy (bits) of the exemplar label distribution."),
            ("best_concept", pa.string(), "Concept the feature detects best (`concepts` table, highest `ap_lift`): patch level when the dataset has masks, else image level; null without either."),
            ("best_concept_ap", pa.float64(), "AP of `best_concept`."),
            ("best_concept_margin", pa.float64(), "`ap_lift` of `best_concept` minus that of the runner-up at the same level."),
            ("best_concept_level", pa.string(), "`patch` or `image`: the level `best_concept` was chosen at."),
        ),
        _table(
            "concepts",
            "How well every feature detects every labelled concept: one row per (SAE, feature, concept, level). "
            "Patch level: the feature's activation at a patch as a detector of the patch's concept, where a patch belongs "
            "to concept c when c covers at least half of its pixels (mask classes, background included). Image level: the "
            "image's maximum activation as a detector of its class label.",
            ("sae_id", pa.string(), "SAE id."),
            ("feature", pa.int32(), "Feature index."),
            ("concept", pa.string(), "Concept name (a mask class at patch level, a class label at image level)."),
            ("level", pa.string(), "`patch` or `image`."),
            ("ap", pa.float64(), "Average precision of the activation as a detector of the concept (activations on a fine log10 grid, ties grouped as in sklearn)."),
            ("iou", pa.float64(), "Best IoU over thresholds between {activation ≥ threshold} and the concept's samples (network dissection)."),
            ("threshold", pa.float64(), "Activation threshold of `iou` (0: wherever the feature fires)."),
            ("support", pa.int64(), "Samples (patches or images) of the concept."),
            ("null_ap", pa.float64(), "`ap` with the concept labels permuted across images (seeded): what chance looks like."),
            ("ap_low", pa.float64(), "Lower bound of the AP of the unbinned activations (the order inside each bin unknown)."),
            ("ap_high", pa.float64(), "Upper bound of the AP of the unbinned activations."),
            ("base_rate", pa.float64(), "support / samples: the AP of a detector that knows nothing."),
            ("ap_lift", pa.float64(), "(ap − base_rate) / (1 − base_rate): AP above chance, 0 for a detector that knows nothing, 1 for a perfect one. Best concepts are ranked by it, since a concept covering most samples (background) gets a high AP from any feature."),
            ("null_iou", pa.float64(), "`iou` under the permuted labels."),
            ("fire_rate", pa.float64(), "Share of the concept's samples (patches or images) on which the feature fires: its activation rate on the concept."),
        ),
        _table(
            "exemplars",
            "Top-activating images per feature, with the patch activation map.",
            ("sae_id", pa.string(), "SAE id."),
            ("feature", pa.int32(), "Feature index."),
            ("rank", pa.int32(), "0 = highest-activating image."),
            ("dataset", pa.string(), "Dataset key of the image."),
            ("image_idx", pa.int64(), "Image index within its dataset."),
            ("act", pa.float64(), "Maximum activation of the feature over the image's patches."),
            ("patch", pa.int32(), "Row-major index of the maximising patch."),
            ("grid_h", pa.int32(), "Patch-grid rows."),
            ("grid_w", pa.int32(), "Patch-grid columns."),
            ("patch_acts", pa.list_(pa.float32()), "Activation of the feature at every patch (grid_h·grid_w, row-major)."),
        ),
        _table(
            "quantile_exemplars",
            "Images across each feature's activation range: a uniform sample (priority sampling in the analysis pass) of the "
            "images it fires on, cut into quantile bands of the sampled activations.",
            ("sae_id", pa.string(), "SAE id."),
            ("feature", pa.int32(), "Feature index."),
            ("band", pa.int32(), "Quantile band, 0 = the lowest quarter of the feature's image activations (4 bands)."),
            ("rank", pa.int32(), "Rank within the band, 0 = highest activation."),
            ("dataset", pa.string(), "Dataset key of the image."),
            ("image_idx", pa.int64(), "Image index within its dataset."),
            ("act", pa.float64(), "Maximum activation of the feature over the image's patches."),
            ("patch", pa.int32(), "Row-major index of the maximising patch."),
            ("grid_h", pa.int32(), "Patch-grid rows."),
            ("grid_w", pa.int32(), "Patch-grid columns."),
            ("patch_acts", pa.list_(pa.float32()), "Activation at every patch (grid_h·grid_w, row-major; float16 precision)."),
        ),
        _table(
            "class_split",
            "How often each feature fires on the images of each label: the labels with the highest rates (up to 10 per feature).",
            ("sae_id", pa.string(), "SAE id."),
            ("feature", pa.int32(), "Feature index."),
            ("rank", pa.int32(), "0 = the label with the highest activation rate."),
            ("label", pa.string(), "Image label."),
            ("n_images", pa.int64(), "Analysed images with this label."),
            ("n_fire_images", pa.int64(), "Of those, images on which the feature fires on at least one patch."),
            ("rate", pa.float64(), "n_fire_images / n_images: the activation rate."),
            ("mean_act", pa.float64(), "Mean over those firing images of the feature's maximum patch activation."),
        ),
        _table(
            "similar_features",
            "Each feature's nearest features in the same SAE by cosine of their decoder directions (8 per feature).",
            ("sae_id", pa.string(), "SAE id."),
            ("feature", pa.int32(), "Feature index."),
            ("rank", pa.int32(), "0 = most similar."),
            ("similar_feature", pa.int32(), "The other feature."),
            ("cosine", pa.float64(), "Cosine between the two decoder directions."),
        ),
        _table(
            "heads",
            "Trained task heads (linear probes) and their validation scores.",
            ("head", pa.string(), "Head key."),
            ("model", pa.string(), "Model key."),
            ("task", pa.string(), "`classification` or `segmentation`."),
            ("classes", pa.list_(pa.string()), "Class names by output index."),
            ("lr", pa.float64(), "Selected learning rate."),
            ("weight_decay", pa.float64(), "Selected weight decay."),
            ("val_accuracy", pa.float64(), "Validation accuracy (classification) or pixel accuracy (segmentation)."),
            ("val_miou", pa.float64(), "Validation mIoU with logits bilinearly upsampled (segmentation; null otherwise)."),
            ("n_train", pa.int64(), "Training images."),
            ("n_val", pa.int64(), "Validation images."),
        ),
        _table(
            "edits",
            "One row per intervention (and per random-feature control).",
            ("edit", pa.string(), "Edit name from the spec."),
            ("edit_id", pa.string(), "Unique id `<edit>/<n>` (controls: `<edit>/<n>/control`)."),
            ("sae_id", pa.string(), "SAE used."),
            ("head", pa.string(), "Head key."),
            ("task", pa.string(), "`classification` or `segmentation`."),
            ("dataset", pa.string(), "Dataset of the edited image."),
            ("image_idx", pa.int64(), "Edited image."),
            ("features", pa.list_(pa.int32()), "Modified features."),
            ("action", pa.string(), "Action (`suppress`, `set`, `scale`, `clamp`, `add`)."),
            ("value", pa.float64(), "Action argument."),
            ("patches", pa.list_(pa.int32()), "Modified patches (row-major)."),
            ("is_control", pa.bool_(), "True for the frequency-matched random-feature control."),
            ("target_class", pa.string(), "Class the edit is expected to lower (the feature's top label)."),
            ("before_top", pa.list_(pa.string()), "Classification: top-5 classes before."),
            ("before_probs", pa.list_(pa.float64()), "Classification: their probabilities."),
            ("after_top", pa.list_(pa.string()), "Classification: top-5 classes after."),
            ("after_probs", pa.list_(pa.float64()), "Classification: their probabilities."),
            ("before_pixels", pa.list_(pa.int64()), "Segmentation: pixels per class before (by class index)."),
            ("after_pixels", pa.list_(pa.int64()), "Segmentation: pixels per class after."),
            ("target_delta", pa.float64(), "Change of the target class (probability, or pixel fraction)."),
            ("other_delta", pa.float64(), "Mean absolute change over the other classes."),
            ("specificity", pa.float64(), "|target_delta| / (other_delta + 1e-9)."),
            ("flipped", pa.bool_(), "The top prediction (classification) changed, or any patch's class changed (segmentation)."),
            ("flip_frac", pa.float64(), "Fraction of patches whose predicted class changed (segmentation; 0/1 for classification)."),
            ("before_map", pa.list_(pa.int32()), "Segmentation: predicted class per patch before."),
            ("after_map", pa.list_(pa.int32()), "Segmentation: predicted class per patch after."),
        ),
        _table(
            "experiments",
            "Concept-suppression experiments: one row per (SAE, head, concept, arm, m, factor, where, image).",
            ("experiment", pa.string(), "Experiment name from the spec."),
            ("sae_id", pa.string(), "SAE edited with."),
            ("head", pa.string(), "Head key."),
            ("task", pa.string(), "`classification` or `segmentation`."),
            ("level", pa.string(), "Concept level: `patch` (mask classes) or `image` (class labels)."),
            ("concept", pa.string(), "The concept under test (a head class)."),
            ("arm", pa.string(), "`concept` (its top-m features by AP), `random` (frequency-matched random features) or `other` (another concept's top-m)."),
            ("arm_source", pa.string(), "Whose features the arm edits: the concept, the other concept, or null (random)."),
            ("draw", pa.int32(), "Which frequency-matched random draw (0 … `random_draws` − 1) a `random` row edits; 0 for the other arms."),
            ("m", pa.int32(), "Number of features edited."),
            ("factor", pa.float64(), "Features scaled by this (1 = no edit, 0 = suppressed, < 0 pushed negative)."),
            ("where", pa.string(), "`all` patches, or only the `concept`'s ground-truth patches."),
            ("features", pa.list_(pa.int32()), "Edited features."),
            ("n_patches_edited", pa.int32(), "Patches the edit was applied to."),
            ("dataset", pa.string(), "Dataset of the image."),
            ("image_idx", pa.int64(), "Edited image."),
            ("rank_dataset", pa.string(), "Dataset the concept's features were ranked on: the record dataset (the `concepts` table) or the head's training data (`experiment_concepts`)."),
            ("concept_px_before", pa.int64(), "Segmentation: pixels predicted as the concept before."),
            ("concept_px_after", pa.int64(), "Segmentation: pixels predicted as the concept after."),
            ("concept_px_removed", pa.int64(), "Segmentation: pixels predicted as the concept before and as something else after."),
            ("removed_frac", pa.float64(), "Segmentation: concept_px_removed / concept_px_before (null if the concept was not predicted)."),
            ("other_px_changed", pa.int64(), "Segmentation: pixels not predicted as the concept before whose class changed."),
            ("other_changed_frac", pa.float64(), "Segmentation: other_px_changed / image_px (the side effect, as a fraction of the image)."),
            ("image_px", pa.int64(), "Segmentation: pixels of the prediction (model input resolution)."),
            ("class_px_delta", pa.list_(pa.int64()), "Segmentation: change of every class's predicted pixels (by class index)."),
            ("before_map", pa.list_(pa.int32()), "Segmentation: predicted class per patch before."),
            ("after_map", pa.list_(pa.int32()), "Segmentation: predicted class per patch after."),
            ("p_before", pa.float64(), "Classification: the concept's probability before."),
            ("p_after", pa.float64(), "Classification: the concept's probability after."),
            ("p_delta", pa.float64(), "Classification: p_after − p_before."),
            ("other_p_delta", pa.float64(), "Classification: mean absolute change of the other classes' probabilities."),
            ("top1_before", pa.int32(), "Classification: top class index before."),
            ("top1_after", pa.int32(), "Classification: top class index after."),
            ("flipped", pa.bool_(), "Classification: the top class changed."),
        ),
        _table(
            "matches",
            "Best match of every feature of one SAE among the features of another.",
            ("comparison", pa.string(), "`<a>~<b>` for models, `<model>~seeds` for stability."),
            ("sae_a", pa.string(), "SAE id of the source feature."),
            ("feature_a", pa.int32(), "Source feature."),
            ("sae_b", pa.string(), "SAE id searched."),
            ("feature_b", pa.int32(), "Best-matching feature."),
            ("score", pa.float64(), "Pearson correlation of the two activation maps over shared images and positions."),
            ("matched", pa.bool_(), "score ≥ the comparison's `min_score`."),
            ("mutual", pa.bool_(), "The match is best in both directions."),
        ),
    ]
}

TABLES["experiment_concepts"] = _table(
    "experiment_concepts",
    "The `concepts` rows an experiment ranked its features on when it computed them itself, on its head's "
    "training data (`experiments[].rank_on`), because the record dataset does not hold the head's concepts. "
    "One row per (experiment, SAE, feature, concept); the analysis's own rows are in `concepts`.",
    ("experiment", pa.string(), "Experiment name from the spec."),
    ("dataset", pa.string(), "Dataset key the statistics were computed on (the head's training data)."),
    *((c.name, c.type, c.doc) for c in TABLES["concepts"].columns),
)

TABLES["concept_nulls"] = _table(
    "concept_nulls",
    "The concept-detection null as a distribution: under each of `analysis.null_permutations` label permutations, every "
    "feature's best `ap_lift` over the concepts (permutation 0 is the one `concepts.null_ap` reports).",
    ("sae_id", pa.string(), "SAE."),
    ("level", pa.string(), "`patch` or `image`."),
    ("permutation", pa.int32(), "Which permutation (0 … null_permutations − 1)."),
    ("feature", pa.int32(), "Feature."),
    ("best_lift", pa.float64(), "Its best (AP − base rate) / (1 − base rate) under those labels (null if it never fires on a labelled sample)."),
)

TABLES["splice_images"] = _table(
    "splice_images",
    "Per validation image, what the spliced task metrics pool (the `saes` `cls_*` / `seg_*` columns): "
    "the unit the intervals over images resample. One row per (SAE, head, image).",
    ("sae_id", pa.string(), "SAE whose reconstruction was spliced in."),
    ("head", pa.string(), "Head key."),
    ("task", pa.string(), "`classification` or `segmentation`."),
    ("dataset", pa.string(), "Dataset of the image (the head's validation data)."),
    ("image_idx", pa.int64(), "The image."),
    ("clean", pa.list_(pa.float64()), "Unedited: [1 or 0] correct (classification), or the image's confusion matrix, rows = target, flattened (segmentation)."),
    ("spliced", pa.list_(pa.float64()), "The same with the patch tokens replaced by x̂."),
    ("ablated", pa.list_(pa.float64()), "The same with them replaced by the mean activation."),
)

_SUMMARY_METRICS = (
    ("removed_frac", "Segmentation: Σ concept_px_removed / Σ concept_px_before over the images (random draws pooled)."),
    ("other_changed_frac", "Segmentation: mean side effect (other classes' pixels changed, as a fraction of the image)."),
    ("p_delta", "Classification: mean change of the concept's probability."),
    ("other_p_delta", "Classification: mean absolute change of the other classes' probabilities."),
    ("flip_frac", "Classification: share of images whose top-1 class changed."),
)


def _with_interval(name: str, doc: str) -> list[tuple[str, pa.DataType, str]]:
    return [(name, pa.float64(), doc), (f"{name}_lo", pa.float64(), f"Lower end of {name}'s bootstrap interval over images."),
            (f"{name}_hi", pa.float64(), f"Upper end of {name}'s bootstrap interval over images.")]


TABLES["experiment_summary"] = _table(
    "experiment_summary",
    "The one aggregation of the `experiments` rows (the site and `check` read it): per (SAE, head, concept, arm, "
    "m, factor, where), each metric with its bootstrap interval over images (`stats:` sets resamples and level). "
    "The `random` arm pools its draws image by image.",
    ("experiment", pa.string(), "Experiment name."),
    ("sae_id", pa.string(), "SAE edited with."),
    ("head", pa.string(), "Head key."),
    ("task", pa.string(), "`classification` or `segmentation`."),
    ("level", pa.string(), "`patch` or `image`."),
    ("concept", pa.string(), "Concept under test."),
    ("arm", pa.string(), "`concept`, `random` or `other`."),
    ("m", pa.int32(), "Features edited."),
    ("factor", pa.float64(), "Scale factor."),
    ("where", pa.string(), "`all` or `concept` patches."),
    ("n_images", pa.int32(), "Images pooled."),
    ("n_draws", pa.int32(), "Random draws pooled per image (1 for the other arms)."),
    *(c for name, doc in _SUMMARY_METRICS for c in _with_interval(name, doc)),
)

TABLES["edit_summary"] = _table(
    "edit_summary",
    "Each edit's pooled effect with bootstrap intervals over images (an image edited several times counts once, its edits "
    "averaged), its frequency-matched controls in their own rows.",
    ("edit", pa.string(), "Edit name."),
    ("sae_id", pa.string(), "SAE used."),
    ("head", pa.string(), "Head key."),
    ("task", pa.string(), "`classification` or `segmentation`."),
    ("is_control", pa.bool_(), "The random-feature controls."),
    ("n_images", pa.int32(), "Images."),
    ("n_edits", pa.int32(), "Edits."),
    *_with_interval("target_delta", "Mean change of the target class (probability, or pixel fraction)."),
    *_with_interval("other_delta", "Mean absolute change of the other classes."),
    *_with_interval("flip_frac", "Share of edits whose top prediction (any patch's class, for segmentation) changed."),
)

TABLES["splice_summary"] = _table(
    "splice_summary",
    "Spliced task metrics with bootstrap intervals over the validation images (paired: clean, spliced and ablated on the "
    "same resampled images). `clean` is the head's validation score, so its interval is the head's too.",
    ("sae_id", pa.string(), "SAE spliced in."),
    ("head", pa.string(), "Head key."),
    ("metric", pa.string(), "`accuracy` (classification) or `miou` (segmentation)."),
    ("n_images", pa.int32(), "Validation images."),
    *_with_interval("clean", "The head's score on the unedited model."),
    *_with_interval("spliced", "Its score with x̂ spliced in."),
    *_with_interval("ablated", "Its score with the mean activation spliced in."),
    *_with_interval("recovered", "(spliced − ablated) / (clean − ablated)."),
)

TABLES["claims"] = _table(
    "claims",
    "One row per declared claim (`claims:` in the spec) with its verdict: `holds` (every interval on the right side of "
    "its threshold and every corrected test beats its control), `fails` (an interval on the wrong side) or `inconclusive`.",
    ("claim", pa.string(), "Claim name."),
    ("kind", pa.string(), "`experiment`, `spliced` or `ap_lift`."),
    ("statement", pa.string(), "The hypothesis in words."),
    ("verdict", pa.string(), "`holds`, `fails` or `inconclusive`."),
    ("selection", pa.string(), "`fixed` (setting declared up front), `split` (chosen on a selection half, read on the confirmation half), or null."),
    ("replicates", pa.list_(pa.string()), "SAEs of the replication set."),
    ("replicate_verdicts", pa.list_(pa.string()), "Each replicate's verdict, in the same order."),
    ("min_replicates", pa.int32(), "Replicates that must hold."),
    ("family_size", pa.int32(), "Tests in the corrected family (all claims together)."),
    ("correction", pa.string(), "`holm` or `bh`."),
    ("alpha", pa.float64(), "Level of the corrected tests."),
    ("confidence", pa.float64(), "Confidence level of the intervals."),
    ("summary", pa.string(), "One line: what decided the verdict."),
)

TABLES["claim_evidence"] = _table(
    "claim_evidence",
    "What each verdict rests on: one row per (claim, SAE, concept, check), a check being a threshold on an interval "
    "or a corrected paired test against a control.",
    ("claim", pa.string(), "Claim name."),
    ("sae_id", pa.string(), "Replicate (SAE)."),
    ("seed", pa.int32(), "Its training seed."),
    ("concept", pa.string(), "Concept (null for claims without concepts)."),
    ("level", pa.string(), "Concept level, for the link to the concept page."),
    ("check", pa.string(), "`threshold` or `test`."),
    ("label", pa.string(), "The check in words."),
    ("metric", pa.string(), "Metric checked."),
    ("arm", pa.string(), "Arm (tests: the control beaten)."),
    ("m", pa.int32(), "Setting read: features edited."),
    ("factor", pa.float64(), "Setting read: scale factor."),
    ("where", pa.string(), "Setting read: patches."),
    ("images", pa.string(), "`all`, or `confirmation` (split selection)."),
    ("n_images", pa.int32(), "Images the check used."),
    *_with_interval("estimate", "The estimate (tests: mean per-image difference, positive = the concept arm is stronger)."),
    ("threshold", pa.float64(), "The bound (thresholds)."),
    ("bound", pa.string(), "`min` or `max` (thresholds)."),
    ("p_value", pa.float64(), "One-sided sign-flip p-value (tests)."),
    ("p_adjusted", pa.float64(), "After the family's correction (tests)."),
    ("exact", pa.bool_(), "The test enumerated every sign vector (tests)."),
    ("outcome", pa.string(), "`pass`, `fail` or `straddle` (a threshold), `beats` or `not shown` (a test)."),
    ("concept_verdict", pa.string(), "The concept's verdict on this replicate (null without concepts)."),
)

# --------------------------------------------------------------------------- writing


def _metadata(spec_hash: str, extra: Mapping[str, str] | None = None) -> dict[bytes, bytes]:
    meta = {"saev_report.version": __version__, "saev_report.spec_hash": spec_hash, **(extra or {})}
    return {k.encode(): str(v).encode() for k, v in meta.items()}


def to_arrow(table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]] | pa.Table) -> pa.Table:
    """Build a table of the declared schema from row dicts, a column dict or an arrow table."""
    schema = TABLES[table].schema
    if isinstance(rows, pa.Table):
        return rows.select(schema.names).cast(schema)
    if isinstance(rows, Mapping):  # columns; a missing column is all null, as a missing key is for row dicts
        n = len(next(iter(rows.values()))) if rows else 0
        return pa.table({name: pa.array(rows[name], type=schema.field(name).type) if name in rows else pa.nulls(n, schema.field(name).type)
                         for name in schema.names}, schema=schema)
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def write_table(path: Path, table: str, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]] | pa.Table, spec_hash: str) -> Path:
    """Write one part of `table` to `path` atomically, with version and spec hash in its metadata."""
    arrow = to_arrow(table, rows)
    arrow = arrow.replace_schema_metadata(_metadata(spec_hash, {"saev_report.table": table}))
    # Through a Python file object, so that a full disk raises OSError with its errno.
    return atomic_write(path, lambda f: pq.write_table(arrow, f, compression="zstd"))


def read_metadata(path: Path) -> dict[str, str]:
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


# --------------------------------------------------------------------------- querying


class QueryError(Exception):
    """A query that cannot run (a write attempt, bad SQL, no tables)."""

    exit_code = 2  # bad input, as the CLI documents


class QueryAborted(QueryError):
    """A query stopped by its time or memory bound."""

    exit_code = 1


# Bounds of `query` (the CLI's `--timeout` and `--memory-limit` defaults).
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MEMORY_LIMIT = "2GB"


def tables_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "tables"


def table_parts(run_dir: Path) -> dict[str, list[Path]]:
    """Published Parquet parts per table name."""
    root = tables_dir(run_dir)
    parts: dict[str, list[Path]] = {}
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(folder.glob("*.parquet"))
            if files:
                parts[folder.name] = files
    return parts


def connect(run_dir: Path, memory_limit: str | None = None, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with one view per table, through which no statement can touch a file.

    The Parquet parts are opened here, by pyarrow, and handed to DuckDB as Arrow datasets
    (scanned lazily, with projection and filter push-down). DuckDB itself then gets no file
    system at all: `enable_external_access = false` with no allowed directories, no temp
    directory (nothing spills: a query over `memory_limit` fails instead), and a locked
    configuration. So `COPY ... TO`, `EXPLAIN ANALYZE COPY`, `ATTACH`, `read_csv('/etc/..')`
    and `INSTALL` fail whatever the statement check lets through. Each part is read with
    the declared schema: a column that an older part lacks reads as null.
    """
    parts = table_parts(run_dir)
    if not parts:
        raise QueryError(f"no tables under {tables_dir(run_dir)}: run `saev-report build` first")
    config: dict[str, Any] = {"temp_directory": ""}
    if memory_limit:
        config["memory_limit"] = memory_limit
    if threads:
        config["threads"] = threads
    try:
        con = duckdb.connect(":memory:", config=config)
    except duckdb.Error as exc:
        raise QueryError(f"cannot open the tables: {str(exc).strip()}") from None
    for name, files in parts.items():
        declared = TABLES[name].schema if name in TABLES else None
        source = ds.dataset([str(f) for f in files], format="parquet", schema=declared)  # missing columns read as null
        key = KEYED_TABLES.get(name)
        if key is None:
            con.register(name, source)
        else:  # one row per key; any_value skips the nulls of parts that lack a column
            con.register(f"_{name}_parts", source)
            cols = ", ".join(f'any_value("{c.name}") AS "{c.name}"' for c in TABLES[name].columns if c.name != key)
            con.execute(f'CREATE VIEW "{name}" AS SELECT "{key}", {cols} FROM "_{name}_parts" GROUP BY "{key}" ORDER BY "{key}"')
    for name, table_def in TABLES.items():
        if name not in parts:  # empty, with the declared columns, so queries never fail on absence
            con.register(name, table_def.schema.empty_table())
    con.execute("SET enable_progress_bar = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def fetch_arrow(result: duckdb.DuckDBPyRelation | duckdb.DuckDBPyConnection) -> pa.Table:
    """Arrow result across DuckDB 1.x (`fetch_arrow_table`) and 2.x (`to_arrow_table`)."""
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    return fetch()


_READ_STATEMENTS = {"SELECT", "EXPLAIN"}


def check_read_only(sql: str) -> None:
    """Refuse anything but one SELECT-like statement, using DuckDB's own parser.

    A first line of defence with a clear message; `connect` is what makes writes impossible
    (`EXPLAIN ANALYZE` passes this check and executes what it explains).
    """
    try:
        statements = duckdb.connect(":memory:").extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"SQL does not parse: {str(exc).strip()}") from None
    if len(statements) != 1:
        raise QueryError(f"one statement at a time, got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _READ_STATEMENTS:
        raise QueryError(f"{kind} statements are refused: the tables are read-only (use SELECT, WITH, DESCRIBE, SUMMARIZE or EXPLAIN)")


def query(run_dir: Path, sql: str, timeout_s: float | None = DEFAULT_TIMEOUT_S, memory_limit: str | None = DEFAULT_MEMORY_LIMIT) -> pa.Table:
    """Run one read-only statement over a run's tables, stopped after `timeout_s` seconds
    (None: no bound) or when it needs more than `memory_limit` (DuckDB syntax, e.g. `2GB`)."""
    check_read_only(sql)
    con = connect(run_dir, memory_limit=memory_limit)
    timer = threading.Timer(timeout_s, con.interrupt) if timeout_s else None
    try:
        if timer:
            timer.daemon = True
            timer.start()
        return fetch_arrow(con.sql(sql))
    except duckdb.InterruptException:
        raise QueryAborted(f"query stopped after {timeout_s:g} s (--timeout); narrow it down (WHERE, LIMIT) or raise the timeout") from None
    except duckdb.OutOfMemoryException as exc:
        raise QueryAborted(f"query needs more than {memory_limit} of memory (--memory-limit): {str(exc).strip().splitlines()[0]}") from None
    except duckdb.Error as exc:
        raise QueryError(str(exc).strip()) from None
    finally:
        if timer:
            timer.cancel()
        con.close()


def read_table(run_dir: Path, table: str, where: str = "") -> pa.Table:
    """A whole published table (optionally filtered) as arrow."""
    con = connect(run_dir)
    try:
        return fetch_arrow(con.sql(f'SELECT * FROM "{table}" {where}'))
    finally:
        con.close()


def table_reference_markdown(tables: Iterable[TableDef] | None = None) -> str:
    """The table reference: every table and column (docs/reference/tables.md)."""
    out = []
    for t in tables or TABLES.values():
        out.append(f"### `{t.name}`\n\n{t.doc}\n\n| column | type | meaning |\n|---|---|---|")
        for c in t.columns:
            out.append(f"| `{c.name}` | {c.type} | {c.doc} |")
        out.append("")
    return "\n".join(out)
