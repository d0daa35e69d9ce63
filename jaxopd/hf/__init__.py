"""Hugging Face checkpoints in and out: `load_hf(path) -> (model, params)` and `save_hf(model, params, path)`.

Rooms: `config` (config.json <-> ModelConfig), `mapping` (which tensor fills which parameter, and its layout),
`safetensors_io` (reading and writing the tensor files), `fp8` (DeepSeek's block-wise fp8 dequantization),
`checkpoint` (load_hf / save_hf, one parameter at a time; what a checkpoint directory holds: its ModelConfig,
dtype and tokenizer files).
"""

from jaxopd.hf.checkpoint import (TOKENIZER_FILES, copy_tokenizer_files, hf_model_config, is_hf_checkpoint, load_hf,
                                  save_hf)
from jaxopd.hf.fp8 import dequantize_fp8_blockwise

__all__ = ["TOKENIZER_FILES", "copy_tokenizer_files", "dequantize_fp8_blockwise", "hf_model_config",
           "is_hf_checkpoint", "load_hf", "save_hf"]
