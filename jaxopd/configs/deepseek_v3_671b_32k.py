"""DeepSeek-V3 671B, first long-context extension stage: 4K -> 32K with YaRN, 1000 steps of 1920 rows of 32K tokens
at learning rate 7.3e-6 (DeepSeek-V3 technical report, arXiv:2412.19437, §4.3), from the pretraining run's
checkpoint (configs/deepseek_v3_671b_pretrain.py, whose workdir is init_from.path).

- YaRN on the decoupled rope key (MLA's qk_rope_head_dim = 64 dimensions): scale s = 40, alpha = 1, beta = 32 over
  the 4096-token original window, attention factor sqrt(t) = 0.1 ln s + 1 on the logits of every dimension (the
  Hugging Face config.json's rope_scaling: yarn, factor 40, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1,
  original_max_position_embeddings 4096; max_position_embeddings 163840 = 40 x 4096). The report uses the same
  hyperparameters in both stages, so this stage's model is the deepseek_v3 preset as it ships; init_from takes every
  other architecture field from the checkpoint and refuses one that differs.
- Rows of 32K tokens, documents packed best-fit with attention kept inside each document (segment ids, positions
  restarting at 0); blockwise attention keeps the [32K, 32K] logits out of memory.
- Learning rate 7.3e-6, constant: the last pretraining value. The report starts each stage from the previous one
  at that rate with no warmup, i.e. as a continuation of training, so the AdamW moments are carried over
  (`init_from.optimizer="carry"`; "restart" gives fresh moments). MTP weight 0.1 and bias update speed 0 as at the
  end of pretraining (the report says nothing else for these stages).

Mesh (v5p-2048, 1024 chips, as pretraining): 1920 rows do not split over 1024 batch shards, so tensor=8 (heads,
MLP and expert widths split 8 ways) leaves 128 batch shards: microbatches of 128 rows, one 32K row per 8-chip group,
15 accumulated per step. Full remat keeps each of the 61 block inputs, 32768 x 7168 bf16 = 470 MB a row, ~29 GB per
chip beside ~10.5 GB of params and moments (estimated; `python -m jaxopd.plan` compiles it for the slice).

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
    config.model = load_model_preset("deepseek_v3", dtype="bfloat16", remat="full",
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
    config.mesh.update(data=1, fsdp=-1, expert=64, tensor=8)
    return config
