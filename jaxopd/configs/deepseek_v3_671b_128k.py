"""DeepSeek-V3 671B, second long-context extension stage: 32K -> 128K, 1000 steps of 480 rows of 128K tokens at
learning rate 7.3e-6 (DeepSeek-V3 technical report, arXiv:2412.19437, §4.3), from the 32K stage's checkpoint
(configs/deepseek_v3_671b_32k.py, whose workdir is init_from.path).

Everything else is the 32K stage's: the same YaRN (s = 40, alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1; the report
uses the same hyperparameters in both stages), constant learning rate 7.3e-6 with the AdamW moments carried over
(`init_from.optimizer="carry"`), best-fit packed per-document rows, blockwise attention, full remat.

Mesh (v5p-2048, 1024 chips): context=128 x tensor=8, one row per microbatch (480 a step). One row's 61 block inputs
alone are 131072 x 7168 bf16 x 61 = 115 GB, more than a v5p chip's 95 GB, so each row is split over 128 chips
(1024 tokens a chip; context parallelism, jaxopd/kernels/context_parallel.py: MLA all-gathers the row's compressed
keys/values, not its 128 heads' full ones). The naive MLA of the backward still expands that latent into every
head's keys and values for the whole 128K row on each chip; tensor=8 leaves each chip 16 of the 128 heads, which is
what makes it fit. Measured with the TPU compiler (`python -m jaxopd.plan --config=deepseek_v3_671b_128k
--topology=v5p:8x8x16`, benchmarks/RESULTS.md): 90.3 GiB a chip; expert=16 x context=64 needed 155.8 GiB and
expert=8 x context=16 x tensor=8 103.4 GiB. Weights and AdamW moments are sharded over all 1024 chips (ZeRO-3 over
fsdp x expert x context, heads and MLP columns over tensor).

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
    config.microbatch_size = 1
    config.mesh.update(data=1, fsdp=1, expert=1, context=128, tensor=8)
    return config
