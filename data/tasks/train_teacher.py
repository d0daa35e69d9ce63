"""Makes the checkpoints that configs/tiny_distill.py starts from (run once; the outputs are committed):

  data/tasks/arithmetic/teacher        a bigger model trained by next-token CE on correct worked problems
  data/tasks/arithmetic/student_init   the tiny_distill student after a short SFT on teacher samples

    PYTHONPATH=. python data/tasks/train_teacher.py [--workdir /tmp/arith] [--teacher-steps N] [--student-steps N]

Both stages are ordinary jaxopd runs: the teacher is `jaxopd.train` with loss "ce" on a JSON Lines corpus of
"347+85=432" documents, the student is the distillation driver with loss "teacher_sft". Only params are kept.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from jaxopd import train
from jaxopd.config import base_config, load_config_file, model_config_dict
from jaxopd.distill.teacher import load_model, save_model
from jaxopd.tasks.arithmetic import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARITHMETIC = ROOT / "data" / "tasks" / "arithmetic"
# A DeepSeek-V3-style teacher would be set here once the MLA model is available; the student is configs/tiny_distill.
TEACHER_MODEL = dict(vocab_size=17, d_model=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16, mlp_dim=256,
                     qk_norm=True, max_position_embeddings=64)


def teacher_config(workdir: pathlib.Path, corpus: pathlib.Path, steps: int):
    config = base_config()
    config.workdir = str(workdir)
    config.model = model_config_dict(TEACHER_MODEL)
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
    save_model(out, fields, params)
    print(f"exported {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/jaxopd_arithmetic")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--student-steps", type=int, default=30)
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "worked_problems.jsonl"
    with open(corpus, "w") as f:
        for problem in read_jsonl(ARITHMETIC / "train.jsonl"):
            f.write(json.dumps({"text": problem["prompt"] + problem["answer"]}) + "\n")
    train.train(teacher_config(workdir / "teacher", corpus, args.teacher_steps))
    export(workdir / "teacher", ARITHMETIC / "teacher")
    student = load_config_file(ROOT / "configs" / "tiny_distill.py", {
        "workdir": str(workdir / "student_init"), "loss": "teacher_sft", "steps": args.student_steps,
        "init_from.path": "", "eval_every": args.student_steps, "checkpoint_every": args.student_steps,
        "distill.teacher": str(ARITHMETIC / "teacher")})
    train.train(student)
    export(workdir / "student_init", ARITHMETIC / "student_init")


if __name__ == "__main__":
    main()
