"""DeepSeek-V3 (671B total, 37B active) pretraining on a TPU pod, with the paper's recipe (DeepSeek-V3 technical
report, arXiv:2412.19437, §4.2):

- 14.8T tokens of 4K sequences; batch size ramped from 3072 to 15360 sequences over the first 469B tokens.
- AdamW b1=0.9, b2=0.95, weight decay 0.1, gradient clipping 1.0.
- LR: linear warmup 0 -> 2.2e-4 over 2K steps; constant until 10T tokens; cosine to 2.2e-5 over the next 4.3T;
  2.2e-5 for 333B tokens; 7.3e-6 for the last 167B. Token breakpoints are turned into steps through the ramp.
- Balance-loss alpha 1e-4; bias update speed gamma 1e-3 (0 for the last 500B tokens); MTP depth 1 with
  lambda 0.3 for the first 10T tokens and 0.1 after. The two switches are run as later stages: relaunch with
  `--config.mtp_weight=0.1` once step `mtp_switch_step` is reached and `--config.moe_bias_rate=0` at
  `bias_freeze_step` (printed by `python configs/deepseek_v3_671b_pretrain.py`).

- Plain RoPE over the 4K window; the long-context extension with YaRN follows in two stages of 1000 steps each
  (§4.3): configs/deepseek_v3_671b_32k.py, then configs/deepseek_v3_671b_128k.py.

Mesh (v5p-2048: 1024 chips): expert=64 (4 of the 256 routed experts per chip), fsdp=16 (ZeRO-3 over 16 x 64 for
dense weights), tensor=1. fp32 params + Adam moments take ~16 B/param = 10.7 TB, ~10.5 GB per chip of 95 GB.
Replace data.paths/data.tokenizer with the real corpus and the DeepSeek-V3 tokenizer.

    python -m jaxopd.train --config=configs/deepseek_v3_671b_pretrain.py   # on every worker: see tpu/launch.sh
"""

from jaxopd.training.config import base_config, load_model_preset
from jaxopd.training.optimizer import batch_ramp

SEQ_LEN = 4096
TOTAL_TOKENS = 14.8e12
RAMP = dict(start=3072, tokens=469e9)
BATCH_SIZE = 15360
MICROBATCH_SIZE = 3072  # the ramp grows in whole microbatches: 3072, 6144, ..., 15360


def get_config():
    config = base_config()
    config.workdir = "/mnt/gcs/deepseek_v3_671b"  # a bucket mounted on every worker (tpu/setup.sh)
    # Full remat: each of the 61 blocks keeps only its bf16 input (3 x 4096 tokens x 7168 per chip and microbatch,
    # ~11 GB over the layers, beside the ~10.5 GB of params and moments). Keeping the matmul outputs as well
    # ("dots_with_no_batch_dims_saveable": MLA's q and k/v up-projections alone are 128 heads x 448 per token,
    # ~8x the block input) would take ~100 GB, more than a v5p chip's 95 GB.
    # Pretraining is at 4K with plain RoPE; YaRN (the preset's, as the released config.json has it) comes with the
    # context-extension stages, deepseek_v3_671b_32k and deepseek_v3_671b_128k (§4.3).
    config.model = load_model_preset("deepseek_v3", dtype="bfloat16", remat="full", rope_scaling=None,
                                     max_position_embeddings=SEQ_LEN)
    config.seq_len = SEQ_LEN
    config.batch_size = BATCH_SIZE
    config.microbatch_size = MICROBATCH_SIZE
    config.batch_ramp.update(start=RAMP["start"], tokens=RAMP["tokens"])
    ramp = batch_ramp(BATCH_SIZE, SEQ_LEN, MICROBATCH_SIZE, RAMP["start"], RAMP["tokens"])
    config.steps = ramp.step_at_tokens(TOTAL_TOKENS)
    config.optimizer.update(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
    config.optimizer.schedule.update(
        kind="deepseek_v3", peak_lr=2.2e-4, warmup_steps=2000,
        decay_start=ramp.step_at_tokens(10e12), decay_end=ramp.step_at_tokens(14.3e12), end_lr=2.2e-5,
        final_step=ramp.step_at_tokens(14.3e12 + 333e9), final_lr=7.3e-6)
    config.mtp_weight = 0.3
    config.moe_balance_weight = 1e-4
    config.moe_bias_rate = 1e-3
    config.loss_chunk_size = 1024
    config.log_every = 10
    config.eval_every = 1000
    config.checkpoint_every = 500
    config.keep_checkpoints = 3
    config.progress_bar = False
    config.data.eval_batches = 4
    config.data.num_workers = 8
    config.mesh.update(data=1, fsdp=-1, expert=64, tensor=1)
    config.distributed.auto_detect = True  # Cloud TPU: JAX finds the coordinator and process ids itself
    return config


def stage_steps() -> dict[str, int]:
    ramp = batch_ramp(BATCH_SIZE, SEQ_LEN, MICROBATCH_SIZE, RAMP["start"], RAMP["tokens"])
    return {"mtp_switch_step": ramp.step_at_tokens(10e12), "bias_freeze_step": ramp.step_at_tokens(14.3e12)}


if __name__ == "__main__":
    print(stage_steps())
