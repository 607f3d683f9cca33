"""Where the default model lives on disk. No torch here: the scheduler imports it too."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("ALISE_CACHE", Path.home() / ".cache" / "alise"))


def default_model_dir() -> Path:
    """The HF checkpoint converted from the packaged GGUF by `python -m services.worker.prepare_model`."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME
