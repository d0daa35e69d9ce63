"""On-policy distillation where the seed says it pays: long worked solutions. The bundled column_addition task (sums
of 3 three-digit numbers worked column by column with carries, 48-49 completion tokens; jaxopd/tasks/
column_addition.py) with its teacher (3-layer MLA, 0.965 greedy on the held-out prompts) and its student after a short
SFT on teacher samples (2-layer GQA, 0.449), both made by data/tasks/train_teacher.py. One early wrong carry reaches
the answer, so the student's own prefixes leave the teacher's distribution: the regime on-policy data is for.

    python -m jaxopd.train --config=column_addition_distill [--config.loss=teacher_sft | grpo | full_reverse_kl]

experiments/opd_vs_baselines.py --task column_addition compares the methods from this config (experiments/RESULTS.md).
"""

from jaxopd.tasks import column_addition
from jaxopd.training.config import base_config, model_config_dict

TASK = "data/tasks/column_addition"
# The student's shape (its weights come from student_init): the tiny_distill student with this task's vocabulary.
STUDENT_MODEL = dict(vocab_size=len(column_addition.VOCAB), d_model=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=12, mlp_dim=128, qk_norm=True, max_position_embeddings=72, scan_layers=False)


def get_config():
    config = base_config()
    config.workdir = "workdirs/column_addition_distill"
    config.model = model_config_dict(STUDENT_MODEL)
    config.init_from.update(kind="checkpoint", path=f"{TASK}/student_init")
    config.loss = "reverse_kl"
    config.distill.update(
        prompts=f"{TASK}/train.jsonl",
        eval_prompts=f"{TASK}/eval.jsonl",
        teacher=f"{TASK}/teacher",
        grader="column_addition",  # the final answer, recomputed from the prompt
        max_prompt_len=22,  # "<bos>" + 3 tagged three-digit numbers + "="
        max_new_tokens=50,  # the longest solution (49) + EOS
    )
    config.steps = 200
    config.batch_size = 256  # rollouts per step: 64 prompts x group_size 4
    config.microbatch_size = 256
    config.seq_len = config.distill.max_prompt_len + config.distill.max_new_tokens
    config.loss_chunk_size = config.seq_len
    config.log_every = 10
    config.eval_every = 25
    config.checkpoint_every = 50
    config.data.tokenizer = f"{TASK}/tokenizer.json"
    config.data.fim_rate = 0.0
    config.mtp_weight = 0.0
    config.moe_bias_rate = 0.0
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule.update(kind="warmup_cosine", peak_lr=5e-4, warmup_steps=10, decay_start=10,
                                     decay_end=200, end_lr=5e-5)
    config.mesh.update(data=-1)
    return config
