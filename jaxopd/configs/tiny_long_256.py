"""Long context in small, stage 0: the tiny DeepSeek-style model (models/tiny.py: MLA with a 16-dimension decoupled
rope key, MoE, MTP) pretrained on 256-token packed rows of the bundled Python corpus with plain RoPE, the window
that configs/tiny_long_2k.py then extends eightfold with YaRN, as DeepSeek-V3 extends 4K to 32K and 128K (§4.3).
9 in 10 training documents are generated key/value retrieval documents (data/retrieval.py: the needle format of
`python -m jaxopd.evaluate niah`, 128 to 256 tokens, about a fifth of the tokens), so that retrieval is learnable at
this size. A few minutes on 2 CPU cores.

    python -m jaxopd.train --config=tiny_long_256
    python -m jaxopd.train --config=tiny_long_2k        # from workdirs/tiny_long_256
    python -m jaxopd.evaluate perplexity --checkpoint=workdirs/tiny_long_256 --lengths=64,128,256,512,1k
"""

from jaxopd.training.config import base_config, load_model_preset

SEQ_LEN = 256


def get_config():
    config = base_config()
    config.workdir = "workdirs/tiny_long_256"
    config.model = load_model_preset("tiny", max_position_embeddings=SEQ_LEN)
    config.steps = 300
    config.batch_size = 8  # 2048 tokens a step, as tiny_pretrain
    config.microbatch_size = 8
    config.seq_len = SEQ_LEN
    config.loss_chunk_size = SEQ_LEN
    config.log_every = 10
    config.eval_every = 100
    config.checkpoint_every = 100
    config.data.eval_batches = 8
    config.data.retrieval_weight = 0.9
    config.mtp_weight = 0.3
    config.moe_bias_rate = 1e-3
    config.optimizer.weight_decay = 0.01
    config.optimizer.schedule.update(kind="warmup_cosine", peak_lr=4e-3, warmup_steps=20, decay_end=300, end_lr=4e-4)
    return config
