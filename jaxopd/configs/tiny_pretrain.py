"""The embedded default: a tiny DeepSeek-style model (MLA + MoE + MTP, models/tiny.py) pretrained on the bundled
Python-stdlib corpus. On 2 CPU cores it finishes in under 5 minutes with a loss well below the corpus's unigram
entropy (both logged in metrics.jsonl).

    python -m jaxopd.train --config=configs/tiny_pretrain.py [--config.workdir=/tmp/tiny]
"""

from jaxopd.training.config import base_config, load_model_preset


def get_config():
    config = base_config()
    config.workdir = "workdirs/tiny_pretrain"
    config.model = load_model_preset("tiny")
    config.steps = 200
    config.batch_size = 16
    config.microbatch_size = 16
    config.seq_len = 128
    config.log_every = 10
    config.eval_every = 100
    config.checkpoint_every = 100
    config.unigram_entropy_batches = 50
    config.data.eval_batches = 8
    config.mtp_weight = 0.3
    config.moe_bias_rate = 1e-3
    config.optimizer.weight_decay = 0.01
    config.optimizer.schedule.update(kind="warmup_cosine", peak_lr=4e-3, warmup_steps=20, decay_end=200, end_lr=4e-4)
    return config
