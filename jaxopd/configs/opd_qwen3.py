"""On-policy distillation of a Qwen3-8B student from a Qwen3-32B teacher on chat-formatted math prompts, graded by
the math grader; the student comes back as a Hugging Face checkpoint. Variants: `:v5p-64` (a TPU v5p slice of 32
chips) and `:gpu8` (8 GPUs of 80 GB, the default); `--config.model.lora_rank=0` trains every weight instead of rank-32
LoRA adapters (the seed's Tinker recipes); then also set --config.model.param_dtype=float32 and a full-model rate,
--config.optimizer.schedule.peak_lr=1e-6.

    python -m jaxopd.train --config=opd_qwen3:gpu8 --config.init_from.path=/models/Qwen3-8B \
        --config.distill.teacher=/models/Qwen3-32B --config.distill.prompts=my_prompts.jsonl \
        --config.distill.eval_prompts=my_eval.jsonl --config.export_hf=/models/Qwen3-8B-opd

Both models are Hugging Face directories as `save_pretrained` writes them (config.json, safetensors, tokenizer.json,
tokenizer_config.json with the chat template): the student's architecture and tokenizer come from its directory, the
teacher's tokenizer is checked against it before anything compiles. Prompts are JSON Lines or Parquet rows with chat
`messages` (or a `prompt` string) and an `answer` for the grader, e.g. data/tasks/math_chat/ (generated word
problems in that shape); Qwen3's template renders them with thinking off (template_vars).
"""

from jaxopd.training.config import base_config, model_config_dict

# Per variant: mesh axes, rollouts per step (prompts x group_size), rows per forward/backward, and per sampling call.
VARIANTS = {
    # 32 chips of 95 GB: params sharded 8-way (fsdp) and 4-way over heads and MLP (tensor); Qwen3's 8 KV heads split
    # over tensor=4. The teacher loads from Hugging Face in float32 (teacher.load_model's hf_dtype: 131 GB, 4.1 GB a
    # chip); with the student adapters it leaves room for 256 rollouts of 4.6K tokens (benchmarks/RESULTS.md).
    "v5p-64": dict(mesh=dict(data=1, fsdp=8, expert=1, tensor=4), batch_size=256, microbatch_size=32,
                   sampling_microbatch=64),
    # 8 GPUs of 80 GB: every weight FSDP-sharded 8-way (teacher 8 GB, a full-FT student in float32 with Adam 16 GB
    # per GPU); rollouts in 4 sampling calls of 32 rows, the step in microbatches of 8.
    "gpu8": dict(mesh=dict(data=1, fsdp=8, expert=1, tensor=1), batch_size=128, microbatch_size=8,
                 sampling_microbatch=32),
}


def get_config(variant: str = "gpu8"):
    if variant not in VARIANTS:
        raise ValueError(f"opd_qwen3 has no variant {variant!r}; use one of {', '.join(VARIANTS)}")
    chosen = VARIANTS[variant]
    config = base_config()
    config.workdir = f"workdirs/opd_qwen3_{variant}"
    # The architecture comes from init_from.path; these are the run's own choices.
    config.model = model_config_dict(dict(dtype="bfloat16", param_dtype="bfloat16", remat="full", lora_rank=32,
                                          lora_alpha=32.0, lora_targets=("attention", "mlp")))
    config.init_from.path = "/models/Qwen3-8B"  # placeholders: your directories
    config.loss = "reverse_kl"
    config.distill.update(
        teacher="/models/Qwen3-32B",
        prompts="data/tasks/math_chat/train.jsonl",
        eval_prompts="data/tasks/math_chat/eval.jsonl",
        eval_prompts_count=64,
        grader="math",
        template_vars='{"enable_thinking": false}',
        group_size=4,
        max_prompt_len=512,
        max_new_tokens=4096,  # a completion cut here (no EOS) is still trained on
        long_prompts="skip",
        temperature=1.0,
        kv_cache_dtype="bfloat16",
        sampling_microbatch=chosen["sampling_microbatch"],
    )
    config.seq_len = config.distill.max_prompt_len + config.distill.max_new_tokens
    config.batch_size = chosen["batch_size"]
    config.microbatch_size = chosen["microbatch_size"]
    config.mesh.update(**chosen["mesh"])
    config.steps = 150  # the seed: 60% -> 70% on AIME'24 in about 150 steps
    config.loss_chunk_size = 512
    config.mtp_weight = 0.0
    config.moe_bias_rate = 0.0
    config.optimizer.update(weight_decay=0.0, grad_clip_norm=1.0)
    # LoRA learns at about ten times the full-model rate (Thinking Machines' "LoRA without regret").
    config.optimizer.schedule.update(kind="constant", peak_lr=1e-4, warmup_steps=0)
    config.log_every = 1
    config.eval_every = 25
    config.checkpoint_every = 25
    config.export_hf = ""  # a directory: the student (LoRA merged) written there when the run finishes
    return config
