"""saev-report: declarative SAE reports for vision transformers."""

__version__ = "0.1.0"
