"""Shared test setup: never touch a model hub, never draw progress bars."""

import os

# Must be set before huggingface_hub is first imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SAEV_REPORT_PROGRESS", "0")
