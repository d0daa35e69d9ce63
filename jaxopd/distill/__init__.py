"""On-policy distillation (OPD) and its baselines, as a batch source and an evaluator for the one training loop.

- objectives.py: the losses ("reverse_kl", "grpo", "teacher_sft", "full_reverse_kl", "forward_kl", "jsd",
  "topk_forward_kl", "topk_reverse_kl");
  policy_gradient.py: the advantage and policy-gradient math they use.
- sampling.py: the KV-cache sampler (prefill + decode loop); rollouts.py: the grain prompt stream, rollouts with
  task rewards, FLOP counts.
- teacher.py: load a teacher (jaxopd or Hugging Face checkpoint) onto the mesh, check tokenizers, jitted scoring.
- source.py: `RolloutSource` (prompts -> rollouts -> teacher scores -> batch) and `DistillEvaluator`.
"""
