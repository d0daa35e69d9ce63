"""The dense 8B pretraining run shared by `llama3_8b_v5p64.py` and `qwen3_8b_v5p64.py`, for `python -m jaxopd.plan`
on a v5p-64 slice (32 chips, topology v5p:2x4x4): fp32 params and Adam moments, bf16 compute, full remat, scanned
layers, 8192-token sequences, 256 per step as 8 accumulated microbatches of 32 (one sequence per chip), ZeRO-3 over
all 32 chips."""

import ml_collections

from jaxopd.training.config import base_config, load_model_preset


def pretrain_config(preset: str) -> ml_collections.ConfigDict:
    """The run above for model preset `preset` (a dense one: no MTP, no MoE balancing)."""
    config = base_config()
    # scan_layers set here, not left to ModelConfig's default: compile time nearly flat in depth (360 s unrolled
    # for Llama 3.1 8B on this 2-core machine).
    config.model = load_model_preset(preset, param_dtype="float32", remat="full", scan_layers=True)
    config.seq_len = 8192
    config.batch_size = 256
    config.microbatch_size = 32
    config.mtp_weight = 0.0
    config.moe_balance_weight = 0.0
    config.moe_bias_rate = 0.0
    config.loss_chunk_size = 1024
    config.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
    return config
