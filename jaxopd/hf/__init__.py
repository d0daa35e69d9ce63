"""Hugging Face checkpoints in and out: `load_hf(path) -> (model, params)` and `save_hf(model, params, path)`.

Rooms: `config` (config.json <-> ModelConfig), `mapping` (which tensor fills which parameter, and its layout),
`checkpoint` (load_hf / save_hf, one parameter at a time).
"""

from jaxopd.hf.checkpoint import load_hf, save_hf

__all__ = ["load_hf", "save_hf"]
