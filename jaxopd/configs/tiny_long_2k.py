"""Long context in small, stage 1: tiny_long_256's model extended from 256 to 2048 positions with YaRN (factor 8,
beta_fast 32, beta_slow 1, DeepSeek's mscale = mscale_all_dim = 1 form, as configs/deepseek_v3_671b_32k.py with s = 40),
200 steps on 2048-token packed rows, from the checkpoint in workdirs/tiny_long_256 (init_from) with its AdamW
moments carried, at that run's last learning rate, as DeepSeek-V3 §4.3 continues at the end of pretraining.
The variant `tiny_long_2k:plain` trains the same steps with the window raised but no YaRN (plain RoPE), the
comparison of the demonstration. The retrieval documents of stage 0 (data/retrieval.py) now span 128 to 2048 tokens,
7 in 10 documents (about a third of the tokens), so retrieval is trained at every distance of the new window. A few
minutes on 2 CPU cores.

    python -m jaxopd.train --config=tiny_long_2k         # or tiny_long_2k:plain
    python -m jaxopd.evaluate niah --checkpoint=workdirs/tiny_long_2k --lengths=256,512,1k,2k
"""

from typing import Optional

from jaxopd.training.config import load_config_file, model_config_dict

SEQ_LEN = 2048
YARN = dict(kind="yarn", factor=8.0, original_max_position_embeddings=256, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
            mscale_all_dim=1.0)


def get_config(variant: Optional[str] = None):
    if variant not in (None, "plain"):
        raise ValueError(f"tiny_long_2k has the variant 'plain' (no YaRN), not {variant!r}")
    config = load_config_file("tiny_long_256")
    config.init_from.update(kind="checkpoint", path=config.workdir, optimizer="carry")  # the previous stage's run
    config.workdir = "workdirs/tiny_long_2k" + ("_plain" if variant else "")
    config.model = model_config_dict({
        **config.model.to_dict(), "rope_scaling": None if variant else YARN, "max_position_embeddings": SEQ_LEN,
        "attention_implementation": "blockwise", "attention_block_q": 256, "attention_block_kv": 256})
    config.seq_len = SEQ_LEN
    config.batch_size = config.microbatch_size = 1  # the 2048 tokens a step of the 256-token stage
    config.loss_chunk_size = 512
    config.data.retrieval_weight = 0.7
    config.steps = 200
    config.optimizer.schedule.update(kind="constant", peak_lr=config.optimizer.schedule.end_lr)
    return config
