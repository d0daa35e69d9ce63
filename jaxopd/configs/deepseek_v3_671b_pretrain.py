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

Mesh (v5p-2048: 1024 chips, topology v5p:8x8x16): expert=8 (32 of the 256 routed experts per device group),
fsdp=128 (ZeRO-3: dense weights over fsdp x expert = all 1024 chips, expert weights over expert x fsdp, MLA's
up-projections q_b/kv_b over fsdp by their low rank), tensor=1. fp32 params + two fp32 Adam moments, 12 B/param x
683B = 8.2 TB, 7.7 GiB per chip of 95. The expert axis is 8, not 64, because the all-to-all dispatch's buffers grow
with it: dropless, each device's T tokens x top-8 pairs may all go to one peer, so every exchange holds expert x T x
8 rows of d=7168 per device (3.8 GB at expert=8 and T=4096, 30 GB at expert=64); the price is 32 experts' weights
gathered over fsdp per MoE layer (2.8 GB in bf16). Dropless, as the paper trains (§2.1.2, "No Token-Dropping"):
the plan, `python -m jaxopd.plan --config=deepseek_v3_671b_pretrain --topology=v5p:8x8x16`, says it fits at
74.5 GiB per chip (7.7 GiB state, 66.8 GiB temporaries; benchmarks/RESULTS.md); with q_b/kv_b replicated it took
160 GiB.
`--config.model.moe_capacity_factor=2.0` (per-peer blocks 4x smaller) saves only 3.1 GiB more (71.4 GiB): the
dispatch buffers are not what filled the chip.
Replace data.paths/data.tokenizer with the real corpus and the DeepSeek-V3 tokenizer.

    python -m jaxopd.train --config=configs/deepseek_v3_671b_pretrain.py   # on every worker: see tpu/launch.sh
"""

from jaxopd.training.config import base_config, load_model_preset
from jaxopd.training.optimizer import batch_ramp

SEQ_LEN = 4096
TOTAL_TOKENS = 14.8e12
RAMP = dict(start=3072, tokens=469e9)
BATCH_SIZE = 15360
# One 4096-token sequence per chip and microbatch; the ramp grows in whole microbatches: 3072, 4096, ..., 15360
MICROBATCH_SIZE = 1024


def get_config():
    config = base_config()
    config.workdir = "/mnt/gcs/deepseek_v3_671b"  # a bucket mounted on every worker (tpu/setup.sh)
    # Full remat: each of the 61 blocks (and the MTP block) keeps only its bf16 input, 4096 tokens x 7168 per chip and
    # microbatch (3.6 GB over the layers). Keeping the matmul outputs as well ("dots_with_no_batch_dims_saveable":
    # MLA's q and k/v up-projections alone are 128 heads x 448 per token, ~8x the block input, and the routed
    # experts' 8 x 2048 per token) would take tens of GB more per chip beside the dispatch buffers.
    # fp32 master weights (the paper keeps fp32 master weights and gradients, §3.3), bf16 compute; experts run
    # expert-parallel with dropless ragged all-to-all dispatch (only the filled rows move); scanned layers keep the
    # compile time nearly flat in depth.
    # Pretraining is at 4K with plain RoPE; YaRN (the preset's, as the released config.json has it) comes with the
    # context-extension stages, deepseek_v3_671b_32k and deepseek_v3_671b_128k (§4.3).
    config.model = load_model_preset("deepseek_v3", dtype="bfloat16", param_dtype="float32", remat="full",
                                     rope_scaling=None, max_position_embeddings=SEQ_LEN, expert_parallel=True,
                                     expert_dispatch="ragged_all_to_all", scan_layers=True)
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
    config.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
    config.distributed.auto_detect = True  # Cloud TPU: JAX finds the coordinator and process ids itself
    return config


def stage_steps() -> dict[str, int]:
    ramp = batch_ramp(BATCH_SIZE, SEQ_LEN, MICROBATCH_SIZE, RAMP["start"], RAMP["tokens"])
    return {"mtp_switch_step": ramp.step_at_tokens(10e12), "bias_freeze_step": ramp.step_at_tokens(14.3e12)}


if __name__ == "__main__":
    print(stage_steps())
