"""On-policy distillation (OPD) and its baselines on the trainer's train_step.

- objectives.py: the losses ("reverse_kl", "grpo", "teacher_sft", "full_reverse_kl", "forward_kl", "jsd"),
  registered in jaxopd.train_step.OBJECTIVES on import.
- policy_gradient.py: the advantage and policy-gradient math on sampled tokens' log-probs (pure functions on arrays).
- teacher.py: load a teacher (jaxopd or Hugging Face checkpoint) onto the mesh, check tokenizers, jitted scoring.
- rollouts.py: the grain prompt stream, rollouts with task rewards, FLOP counts.
- driver.py: the loop run by `python -m jaxopd.train --config=configs/tiny_distill.py`.
"""

from jaxopd.distill.objectives import DISTILL_LOSSES
