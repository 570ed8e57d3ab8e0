"""Stage kinds, one declaration per kind (see `stages/base.py` for the shape)."""

from saev_report.stages.analyse import ANALYSE
from saev_report.stages.base import Stage, StageKind, StageOut, StageParams
from saev_report.stages.claims import CLAIMS
from saev_report.stages.compare import COMPARE, STABILITY
from saev_report.stages.edits import EDITS
from saev_report.stages.experiments import EXPERIMENTS
from saev_report.stages.heads import HEADS
from saev_report.stages.images import IMAGES
from saev_report.stages.record import RECORD
from saev_report.stages.splice import SPLICE
from saev_report.stages.tokens import TOKENS
from saev_report.stages.train import TRAIN

KINDS: dict[str, StageKind] = {
    k.name: k for k in (IMAGES, RECORD, TRAIN, ANALYSE, TOKENS, HEADS, EDITS, EXPERIMENTS, SPLICE, COMPARE, STABILITY, CLAIMS)
}
"""Every stage kind, in build order."""

__all__ = ["KINDS", "Stage", "StageKind", "StageOut", "StageParams"]
