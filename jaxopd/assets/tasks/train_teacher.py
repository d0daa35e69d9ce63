"""Makes a bundled task's teacher and SFT'd student (run once; the outputs are committed):

  data/tasks/<task>/teacher        a bigger model trained by next-token CE on correct worked problems
  data/tasks/<task>/student_init   a small student after a short SFT on teacher samples

    PYTHONPATH=. python data/tasks/train_teacher.py [--task arithmetic|column_addition] [--workdir /tmp/arith]
        [--teacher-steps N] [--student-steps N]

Both are ordinary `jaxopd.train` runs with loss "ce": the teacher on a JSON Lines corpus of correct worked problems
("347+85=" and "432"; for column_addition prompt and worked solution), the student on the teacher's own
temperature-1 completions of the training prompts (SFT on teacher samples, packed like pretraining data). A task with
`completion_only` trains on the completions alone (data.prompt_field: its prompts' random digits are unpredictable
CE that only dilutes the gradient); the others on whole documents. Only params are kept, in
the layer layout each Task sets (scan_layers written out). Each model's greedy accuracy on the task's eval prompts is
printed at the end. The committed arithmetic checkpoints were trained unrolled and rewritten scanned when
scan_layers became the default (same values, stacked, same saved configs), so the defaults read them without
converting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from typing import Callable

from jaxopd import train
from jaxopd.distill.teacher import load_model, save_model
from jaxopd.tasks import arithmetic, column_addition
from jaxopd.tasks.arithmetic import read_jsonl
from jaxopd.training.config import base_config, load_config_file, model_config_dict

TASKS_DIR = pathlib.Path(__file__).resolve().parent  # the bundled tasks, beside this file
# The teachers are DeepSeek-V3-style (MLA with interleaved RoPE), the students (configs/tiny_distill.py) Qwen3-style
# GQA: distillation needs only a shared tokenizer. scan_layers is written out: the checkpoints' layout depends on it.
TEACHER_MODEL = dict(vocab_size=17, d_model=96, num_layers=3, num_heads=4, mlp_dim=256, attention="mla",
                     kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     rope_layout="interleaved", max_position_embeddings=64, scan_layers=False)


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between the bundled tasks: where they live, the teacher's corpus, the checker, the lengths."""

    name: str  # the directory under data/tasks/
    documents: Callable[[], list[tuple[str, str]]]  # correct worked problems as (prompt, completion), for the teacher
    grade: Callable[[dict, str], float]
    seq_len: int  # CE rows; every document fits whole
    max_prompt_len: int  # BOS + prompt tokens, for sampling
    max_new_tokens: int  # completion + EOS
    teacher_model: dict
    student_model: dict
    teacher_steps: int
    student_steps: int
    completion_only: bool  # no loss on the prompt tokens (the committed arithmetic models were trained with one)
    batch_size: int  # CE rows a step

    @property
    def directory(self) -> pathlib.Path:
        return TASKS_DIR / self.name


def arithmetic_documents() -> list[tuple[str, str]]:
    return [(row["prompt"], row["answer"]) for row in read_jsonl(TASKS_DIR / "arithmetic" / "train.jsonl")]


def column_addition_documents(count: int = 60_000) -> list[tuple[str, str]]:
    """Far more problems than the 2000 bundled training prompts (a teacher that saw only those would not generalize),
    drawn with another seed and never one of the eval prompts."""
    held_out = {row["prompt"] for row in read_jsonl(TASKS_DIR / "column_addition" / "eval.jsonl")}
    return [(row["prompt"], row["solution"]) for row in column_addition.make_problems(count, seed=1)
            if row["prompt"] not in held_out]


def _tiny_distill_student(**changes) -> dict:
    return {**load_config_file("tiny_distill").model.to_dict(), "scan_layers": False, **changes}


TASKS = {
    "arithmetic": Task("arithmetic", arithmetic_documents, arithmetic.grade, seq_len=48, max_prompt_len=8,
                       max_new_tokens=5, teacher_model=TEACHER_MODEL, student_model=_tiny_distill_student(),
                       teacher_steps=2000, student_steps=250, completion_only=False, batch_size=64),
    # "<bos>" + 3 tagged three-digit numbers is 22 tokens, the longest solution 49 (+ EOS). Runs on 3-4 numbers of 3-4
    # digits (0.031 greedy after 600 steps, 0.004 for a bigger teacher after 800) and the first of 3 numbers of 3
    # digits (0.27 after 500 steps, whole documents): benchmarks/RESULTS.md.
    "column_addition": Task("column_addition", column_addition_documents, column_addition.grade, seq_len=72,
                            max_prompt_len=22, max_new_tokens=50,
                            teacher_model={**TEACHER_MODEL, "vocab_size": len(column_addition.VOCAB),
                                           "max_position_embeddings": 72},
                            student_model=_tiny_distill_student(vocab_size=len(column_addition.VOCAB),
                                                                max_position_embeddings=72),
                            teacher_steps=1000, student_steps=250, completion_only=True, batch_size=32),
}


def ce_config(task: Task, workdir: pathlib.Path, corpus: pathlib.Path, steps: int, model: dict):
    config = base_config()
    config.workdir = str(workdir)
    config.model = model_config_dict(model)
    config.steps = steps
    config.batch_size = config.microbatch_size = task.batch_size
    config.seq_len = config.loss_chunk_size = task.seq_len
    config.log_every = 50
    config.eval_every = 0
    config.checkpoint_every = steps
    config.data.update(source="jsonl", paths=str(corpus), tokenizer=str(task.directory / "tokenizer.json"),
                       fim_rate=0.0, eval_fraction=0.0, prompt_field="prompt" if task.completion_only else None)
    config.mtp_weight = config.moe_bias_rate = config.optimizer.weight_decay = 0.0
    config.optimizer.schedule.update(kind="warmup_cosine", peak_lr=3e-3, warmup_steps=100, decay_end=steps,
                                     end_lr=1e-4)
    return config


def export(workdir: pathlib.Path, out: pathlib.Path) -> None:
    model, params = load_model(workdir)
    fields = json.loads((workdir / "config.json").read_text())["model"]
    save_model(out, fields, params, overwrite=True)
    print(f"exported {out}")


def sample(task: Task, checkpoint: pathlib.Path, rows: list[dict], *, greedy: bool, batch: int = 1000
           ) -> tuple[list[str], float]:
    """One completion per row's prompt (temperature 1, or greedy) from `checkpoint`, and the fraction graded right."""
    import jax

    from jaxopd.data.tokenizer import load_tokenizer
    from jaxopd.distill.prompts import plain_prompts
    from jaxopd.distill.rollouts import rollout
    from jaxopd.distill.sampling import Sampler

    model, params = load_model(checkpoint)
    tokenizer = load_tokenizer(task.directory / "tokenizer.json")
    sampler = Sampler(model, task.max_prompt_len, task.max_new_tokens, (tokenizer.eos_id,), tokenizer.pad_id)
    completions = []
    for start in range(0, len(rows), batch):
        chunk = [row["prompt"] for row in rows[start:start + batch]]
        completions += rollout(sampler, params, tokenizer, plain_prompts(chunk, tokenizer), jax.random.key(start),
                               group_size=1, greedy=greedy).completions
    correct = sum(task.grade(row, completion) for row, completion in zip(rows, completions)) / len(rows)
    return completions, correct


def write_corpus(task: Task, documents: list[tuple[str, str]], corpus: pathlib.Path) -> None:
    """(prompt, completion) documents as JSON Lines: {"prompt", "text": completion} for a `completion_only` task
    (ce_config names the prompt field), else {"text": prompt + completion}."""
    rows = ({"prompt": prompt, "text": completion} if task.completion_only else {"text": prompt + completion}
            for prompt, completion in documents)
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_teacher_samples(task: Task, teacher: pathlib.Path, corpus: pathlib.Path) -> None:
    """One temperature-1 teacher completion per training prompt, as (prompt, completion) documents."""
    rows = list(read_jsonl(task.directory / "train.jsonl"))
    completions, correct = sample(task, teacher, rows, greedy=False)
    write_corpus(task, [(row["prompt"], completion.split("<eos>")[0]) for row, completion in zip(rows, completions)],
                 corpus)
    print(f"teacher samples: {correct:.3f} correct", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    parser.add_argument("--workdir", default=None, help="default /tmp/jaxopd_<task>")
    parser.add_argument("--teacher-steps", type=int, default=None, help="default: the task's")
    parser.add_argument("--student-steps", type=int, default=None, help="default: the task's")
    args = parser.parse_args()
    task = TASKS[args.task]
    workdir = pathlib.Path(args.workdir or f"/tmp/jaxopd_{task.name}")
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "worked_problems.jsonl"
    write_corpus(task, task.documents(), corpus)
    train.train(ce_config(task, workdir / "teacher", corpus, args.teacher_steps or task.teacher_steps,
                          task.teacher_model))
    export(workdir / "teacher", task.directory / "teacher")
    samples = workdir / "teacher_samples.jsonl"
    write_teacher_samples(task, task.directory / "teacher", samples)
    train.train(ce_config(task, workdir / "student_init", samples, args.student_steps or task.student_steps,
                          task.student_model))
    export(workdir / "student_init", task.directory / "student_init")
    held_out = list(read_jsonl(task.directory / "eval.jsonl"))
    for name in ("teacher", "student_init"):
        print(f"{name}: greedy eval accuracy {sample(task, task.directory / name, held_out, greedy=True)[1]:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
