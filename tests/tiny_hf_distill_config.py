"""Run config for the distillation runs with Hugging Face models (tests/tiny_hf.py): the student's architecture comes
from init_from.path (or --config.model.*), the tokenizers from the model directories; OPD (reverse_kl) at a high
learning rate for a few dozen short steps, so the eval reverse KL drops within seconds; no grader (pure OPD). The
test sets the paths."""

from jaxopd.training.config import base_config, model_config_dict


def get_config():
    config = base_config()
    config.model = model_config_dict({})  # no field set: every one overridable, none contradicting a checkpoint
    config.loss = "reverse_kl"
    config.distill.update(max_prompt_len=10, max_new_tokens=5, group_size=4, eval_prompts_count=16)  # "<bos><|user|>99+99=<|assistant|>": 9
    config.seq_len = 15
    config.steps = 30
    config.batch_size = 32
    config.microbatch_size = 32
    config.loss_chunk_size = 16
    config.log_every = 10
    config.eval_every = 30
    config.checkpoint_every = 0
    config.progress_bar = False
    config.data.fim_rate = 0.0
    config.mtp_weight = 0.0
    config.moe_bias_rate = 0.0
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule.update(kind="constant", peak_lr=1e-2)
    config.mesh.update(data=-1)
    return config
