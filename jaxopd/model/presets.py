"""Architecture presets: `models/<name>.py` files of a checkout, each with `get_config() -> ModelConfig`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxopd.model.config import ModelConfig

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def load_preset(name: str) -> ModelConfig:
    """`get_config()` of `models/<name>.py` (e.g. "tiny", "deepseek_v3"), or of the .py file at path `name`."""
    path = Path(name) if name.endswith(".py") else MODELS_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in MODELS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ValueError(f"model preset {name!r} not found at {path}; known presets: {known}")
    spec = importlib.util.spec_from_file_location(f"jaxopd_preset_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if not isinstance(config, ModelConfig):
        raise ValueError(f"{path}: get_config() returned {type(config).__name__}, expected a ModelConfig")
    return config
