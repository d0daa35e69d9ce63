"""Llama 3.1 8B pretraining on a v5p-64 slice (32 chips, topology v5p:2x4x4), for `python -m jaxopd.plan`: fp32
params and Adam moments, bf16 compute, full remat, 8192-token sequences, 256 per step as 8 accumulated microbatches
of 32 (one sequence per chip), ZeRO-3 over all 32 chips.

    python -m jaxopd.plan --config=benchmarks/llama3_8b_v5p64.py --topology=v5p:2x4x4
"""

from jaxopd.training.config import base_config, load_model_preset


def get_config():
    config = base_config()
    config.model = load_model_preset("llama3_8b", param_dtype="float32", remat="full")
    config.seq_len = 8192
    config.batch_size = 256
    config.microbatch_size = 32
    config.mtp_weight = 0.0
    config.moe_balance_weight = 0.0
    config.moe_bias_rate = 0.0
    config.loss_chunk_size = 1024
    config.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
    return config
