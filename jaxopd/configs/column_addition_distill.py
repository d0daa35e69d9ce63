"""On-policy distillation where the seed says it pays: long worked solutions. The bundled column_addition task (sums
of 3 three-digit numbers worked column by column with carries, 48-49 completion tokens; jaxopd/tasks/
column_addition.py) with its teacher (3-layer MLA, 0.965 greedy on the held-out prompts) and its student after a short
SFT on teacher samples (2-layer GQA, 0.449), both made by data/tasks/train_teacher.py. One early wrong carry reaches
the answer, so the student's own prefixes leave the teacher's distribution: the regime on-policy data is for.

    python -m jaxopd.train --config=column_addition_distill [--config.loss=teacher_sft | grpo | full_reverse_kl]

experiments/opd_vs_baselines.py --task column_addition compares the methods from this config (experiments/RESULTS.md).
"""

from jaxopd.tasks import column_addition
from jaxopd.training.config import load_config_file, model_config_dict

TASK = "data/tasks/column_addition"
# The student's shape (its weights come from student_init): the tiny_distill student with this task's vocabulary.
STUDENT_MODEL = dict(vocab_size=len(column_addition.VOCAB), d_model=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=12, mlp_dim=128, qk_norm=True, max_position_embeddings=72, scan_layers=False)


def get_config():
    # tiny_distill's loop, loss, optimizer and cadence; this task's data, models, lengths and batch.
    config = load_config_file("tiny_distill")
    config.workdir = "workdirs/column_addition_distill"
    config.model = model_config_dict(STUDENT_MODEL)
    config.init_from.path = f"{TASK}/student_init"
    config.distill.update(
        prompts=f"{TASK}/train.jsonl",
        eval_prompts=f"{TASK}/eval.jsonl",
        teacher=f"{TASK}/teacher",
        grader="column_addition",  # the final answer, recomputed from the prompt
        max_prompt_len=22,  # "<bos>" + 3 tagged three-digit numbers + "="
        max_new_tokens=50,  # the longest solution (49) + EOS
    )
    config.steps = 200
    config.batch_size = config.microbatch_size = 256  # rollouts per step: 64 prompts x group_size 4
    config.seq_len = config.loss_chunk_size = config.distill.max_prompt_len + config.distill.max_new_tokens
    config.log_every = 10
    config.data.tokenizer = f"{TASK}/tokenizer.json"
    config.optimizer.schedule.decay_end = config.steps
    return config
