"""The strict pydantic base of every spec model (here, not in `spec.py`, so the SAE kinds'
parameter models can use it while `spec.py` learns those kinds from their registry)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SpecModel(BaseModel):
    """Strict base: unknown fields are errors, docstrings document fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)
