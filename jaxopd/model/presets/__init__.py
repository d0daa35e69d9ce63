"""Architecture presets: the `<name>.py` files beside this one, each with `get_config() -> ModelConfig`
(a checkout also shows them as `models/`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxopd.model.config import ModelConfig

PRESETS_DIR = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_preset(name: str) -> ModelConfig:
    """`get_config()` of the bundled preset `name` (e.g. "tiny", "deepseek_v3"), or of the .py file at path `name`."""
    path = Path(name) if name.endswith(".py") else PRESETS_DIR / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"model preset {name!r} not found at {path}; known presets: {preset_names()}")
    spec = importlib.util.spec_from_file_location(f"jaxopd_preset_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if not isinstance(config, ModelConfig):
        raise ValueError(f"{path}: get_config() returned {type(config).__name__}, expected a ModelConfig")
    return config
