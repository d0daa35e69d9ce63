"""DeepSeek-V3 671B, second long-context extension stage: 32K -> 128K, 1000 steps of 480 rows of 128K tokens at
learning rate 7.3e-6 (DeepSeek-V3 technical report, arXiv:2412.19437, §4.3), from the 32K stage's checkpoint
(configs/deepseek_v3_671b_32k.py, whose workdir is init_from.path).

Everything else is the 32K stage's: the same YaRN (s = 40, alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1; the report
uses the same hyperparameters in both stages), constant learning rate 7.3e-6 with the AdamW moments carried over
(`init_from.optimizer="carry"`), best-fit packed per-document rows, blockwise attention, full remat.

Mesh (v5p-2048, 1024 chips): 480 rows split over at most 32 batch shards (480 = 32 x 15), so tensor=32 (4 of the 128
heads per chip), expert=32 (8 of the 256 routed experts per chip): microbatches of 32 rows, one 128K row per 32-chip
group, 15 accumulated per step. One row's 61 block inputs alone are 131072 x 7168 bf16 x 61 = 115 GB, more than a
v5p chip's 95 GB: this stage needs the sequence of a row split over chips too (context parallelism, issue 15 item 2),
which `python -m jaxopd.plan` will show once it lands; until then the config is the recipe, not a run that fits.

    python -m jaxopd.train --config=configs/deepseek_v3_671b_128k.py   # after the 32K stage, on every worker
"""

from jaxopd.training.config import load_config_file

SEQ_LEN = 131072
BATCH_SIZE = 480


def get_config():
    config = load_config_file("deepseek_v3_671b_32k")
    config.init_from.path = config.workdir  # the previous stage's run; kind and optimizer="carry" as there
    config.workdir = "/mnt/gcs/deepseek_v3_671b_128k"
    config.seq_len = SEQ_LEN
    config.batch_size = BATCH_SIZE
    config.microbatch_size = 32
    config.mesh.update(data=1, fsdp=1, expert=32, tensor=32)
    return config
