"""DeepSeek-V3 671B, first long-context extension stage: 4K -> 32K with YaRN, 1000 steps of 1920 rows of 32K tokens
at learning rate 7.3e-6 (DeepSeek-V3 technical report, arXiv:2412.19437, §4.3), from the pretraining run's
checkpoint (configs/deepseek_v3_671b_pretrain.py, whose workdir is init_from.path).

- YaRN on the decoupled rope key (MLA's qk_rope_head_dim = 64 dimensions): scale s = 40, alpha = 1, beta = 32 over
  the 4096-token original window, attention factor sqrt(t) = 0.1 ln s + 1 on the logits of every dimension (the
  Hugging Face config.json's rope_scaling: yarn, factor 40, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1,
  original_max_position_embeddings 4096; max_position_embeddings 163840 = 40 x 4096). The report uses the same
  hyperparameters in both stages, so this stage's rope is the deepseek_v3 preset's as it ships; everything else of the
  model is pretraining's (fp32 master weights, bf16 compute, full remat, expert-parallel dropless dispatch, scanned
  layers), and init_from refuses a checkpoint whose architecture differs.
- Rows of 32K tokens, documents packed best-fit with attention kept inside each document (segment ids, positions
  restarting at 0); blockwise attention keeps the [32K, 32K] logits out of memory.
- Learning rate 7.3e-6, constant: the last pretraining value. The report starts each stage from the previous one
  at that rate with no warmup, i.e. as a continuation of training, so the AdamW moments are carried over
  (`init_from.optimizer="carry"`; "restart" gives fresh moments). MTP weight 0.1 and bias update speed 0 as at the
  end of pretraining (the report says nothing else for these stages).

Mesh (v5p-2048, 1024 chips, as pretraining): expert=8 x fsdp=16 x context=8. Every chip holds 4096 tokens of a
microbatch, as in pretraining (whose plan fits): 128 batch shards of one 32K row each, each row split over 8 chips
(context parallelism: MLA all-gathers the row's compressed keys/values, jaxopd/kernels/context_parallel.py), 15
microbatches per step. The experts and their dispatch buffers are pretraining's (expert=8: 32 routed experts per
group), and the weights and AdamW moments are sharded over all 1024 chips (ZeRO-3 over fsdp x expert x context), so
the per-chip state is pretraining's 7.7 GiB. tensor=1: no all-reduce per matmul. `python -m jaxopd.plan
--config=deepseek_v3_671b_32k --topology=v5p:8x8x16` compiles it for the slice: 83.1 GiB a chip of 95, it fits
(benchmarks/RESULTS.md).

    python -m jaxopd.train --config=configs/deepseek_v3_671b_32k.py   # after the pretraining run, on every worker
"""

from jaxopd.training.config import load_config_file, load_model_preset

SEQ_LEN = 32768
BATCH_SIZE = 1920
STEPS = 1000
LEARNING_RATE = 7.3e-6


def get_config():
    config = load_config_file("deepseek_v3_671b_pretrain")
    config.init_from.update(kind="checkpoint", path=config.workdir, optimizer="carry")  # the previous stage's run
    config.workdir = "/mnt/gcs/deepseek_v3_671b_32k"
    # Pretraining's model choices (fp32 master weights, bf16 compute, full remat, expert-parallel dropless dispatch,
    # scanned layers) with the preset's YaRN, and blockwise attention for the long rows.
    preset = load_model_preset("deepseek_v3")
    config.model.update(rope_scaling=preset.rope_scaling, max_position_embeddings=preset.max_position_embeddings,
                        attention_implementation="blockwise")
    config.seq_len = SEQ_LEN
    config.batch_size = BATCH_SIZE
    config.microbatch_size = 128
    config.batch_ramp.update(start=0, tokens=0.0)
    config.steps = STEPS
    config.optimizer.schedule.update(kind="constant", peak_lr=LEARNING_RATE)
    config.mtp_weight = 0.1
    config.moe_bias_rate = 0.0
    config.eval_every = 250
    config.checkpoint_every = 100
    config.mesh.update(data=1, fsdp=-1, expert=8, context=8, tensor=1)
    return config
