"""Makes the checkpoints that configs/tiny_distill.py starts from (run once; the outputs are committed):

  data/tasks/arithmetic/teacher        a bigger model trained by next-token CE on correct worked problems
  data/tasks/arithmetic/student_init   the tiny_distill student after a short SFT on teacher samples

    PYTHONPATH=. python data/tasks/train_teacher.py [--workdir /tmp/arith] [--teacher-steps N] [--student-steps N]

Both are ordinary `jaxopd.train` runs with loss "ce": the teacher on a JSON Lines corpus of correct worked problems
("347+85=432"), the student on the teacher's own temperature-1 completions of the training prompts (SFT on teacher
samples, packed like pretraining data). Only params are kept, in the run's layer layout (scanned by default). The
committed ones were trained unrolled and rewritten scanned when scan_layers became the default (same values,
stacked, same saved configs), so the defaults read them without converting.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from jaxopd import train
from jaxopd.training.config import base_config, load_config_file, model_config_dict
from jaxopd.distill.teacher import load_model, save_model
from jaxopd.tasks.arithmetic import read_jsonl

ARITHMETIC = pathlib.Path(__file__).resolve().parent / "arithmetic"  # the bundled task, beside this file
# The teacher is DeepSeek-V3-style (MLA with interleaved RoPE), the student (configs/tiny_distill.py) Qwen3-style
# GQA: distillation needs only a shared tokenizer.
TEACHER_MODEL = dict(vocab_size=17, d_model=96, num_layers=3, num_heads=4, mlp_dim=256, attention="mla",
                     kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     rope_layout="interleaved", max_position_embeddings=64)


def ce_config(workdir: pathlib.Path, corpus: pathlib.Path, steps: int, model: dict):
    config = base_config()
    config.workdir = str(workdir)
    config.model = model_config_dict(model)
    config.steps = steps
    config.batch_size = config.microbatch_size = 64
    config.seq_len = 48
    config.loss_chunk_size = 48
    config.log_every = 50
    config.eval_every = 0
    config.checkpoint_every = steps
    config.data.update(source="jsonl", paths=str(corpus), tokenizer=str(ARITHMETIC / "tokenizer.json"), fim_rate=0.0,
                       eval_fraction=0.0)
    config.mtp_weight = config.moe_bias_rate = config.optimizer.weight_decay = 0.0
    config.optimizer.schedule.update(kind="warmup_cosine", peak_lr=3e-3, warmup_steps=100, decay_end=steps,
                                     end_lr=1e-4)
    return config


def export(workdir: pathlib.Path, out: pathlib.Path) -> None:
    model, params = load_model(workdir)
    fields = json.loads((workdir / "config.json").read_text())["model"]
    save_model(out, fields, params, overwrite=True)
    print(f"exported {out}")


def write_teacher_samples(teacher: pathlib.Path, corpus: pathlib.Path, batch: int = 1000) -> None:
    """One temperature-1 teacher completion per training prompt, as "prompt + completion" documents."""
    import jax

    from jaxopd.data.tokenizer import load_tokenizer
    from jaxopd.distill.prompts import plain_prompts
    from jaxopd.distill.rollouts import rollout
    from jaxopd.distill.sampling import Sampler
    from jaxopd.tasks.arithmetic import check

    model, params = load_model(teacher)
    tokenizer = load_tokenizer(ARITHMETIC / "tokenizer.json")
    distill = load_config_file("tiny_distill").distill
    sampler = Sampler(model, distill.max_prompt_len, distill.max_new_tokens, (tokenizer.eos_id,), tokenizer.pad_id)
    prompts = [problem["prompt"] for problem in read_jsonl(ARITHMETIC / "train.jsonl")]
    correct = 0.0
    with open(corpus, "w") as f:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            result = rollout(sampler, params, tokenizer, plain_prompts(chunk, tokenizer), jax.random.key(start),
                             group_size=1)
            correct += sum(check(prompt, completion) for prompt, completion in zip(chunk, result.completions))
            for prompt, completion in zip(chunk, result.completions):
                f.write(json.dumps({"text": prompt + completion.split("<eos>")[0]}) + "\n")
    print(f"teacher samples: {correct / len(prompts):.3f} correct", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/jaxopd_arithmetic")
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=250)
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "worked_problems.jsonl"
    with open(corpus, "w") as f:
        for problem in read_jsonl(ARITHMETIC / "train.jsonl"):
            f.write(json.dumps({"text": problem["prompt"] + problem["answer"]}) + "\n")
    train.train(ce_config(workdir / "teacher", corpus, args.teacher_steps, TEACHER_MODEL))
    export(workdir / "teacher", ARITHMETIC / "teacher")
    samples = workdir / "teacher_samples.jsonl"
    write_teacher_samples(ARITHMETIC / "teacher", samples)
    student_model = load_config_file("tiny_distill").model.to_dict()
    train.train(ce_config(workdir / "student_init", samples, args.student_steps, student_model))
    export(workdir / "student_init", ARITHMETIC / "student_init")


if __name__ == "__main__":
    main()
