"""Run config for the trainer tests: a very small MLA + MoE + MTP model on the bundled corpus, 20 short steps."""

from jaxopd.training.config import base_config, model_config_dict


def get_config():
    config = base_config()
    config.model = model_config_dict(dict(
        vocab_size=4096, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, attention="mla", kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, rope_layout="interleaved", num_experts=8,
        num_experts_per_token=2, num_shared_experts=1, moe_mlp_dim=16, first_k_dense=1, mtp_depth=1))
    config.steps = 20
    config.batch_size = 16
    config.microbatch_size = 8  # two accumulated microbatches per step, one row per device
    config.seq_len = 32
    config.loss_chunk_size = 16
    config.log_every = 1
    config.eval_every = 10
    config.data.eval_batches = 2
    config.unigram_entropy_batches = 2
    config.checkpoint_every = 12
    config.progress_bar = False
    config.optimizer.schedule.update(kind="warmup_cosine", peak_lr=1e-2, warmup_steps=4, decay_end=20, end_lr=1e-3)
    config.mesh.update(data=-1)
    return config
