"""The seed's "personalization" experiment in small: learn something new, lose an old skill, get it back by OPD
with the model's own earlier checkpoint as the teacher.

    PYTHONPATH=. python benchmarks/opd_personalization.py [--start DIR] [--finetune-steps 150] [--opd-steps 150] \
        [--opd-lrs 1.5e-4,5e-4] [--mix-old 0.3]

  A  the starting student, good at addition (default: the SFT-on-teacher-samples run of
     benchmarks/opd_vs_baselines.py, seed 0, its best student);
  B  A fine-tuned by next-token CE on new documents, worked subtraction problems ("835-62=773"), optionally mixed
     with some addition documents (`--mix-old`, as the seed mixes chat data into mid-training): subtraction is
     learned, addition suffers;
  C  B trained by OPD on addition prompts only, teacher = A (same tokenizer, its own earlier self).
Greedy accuracy of A, B and C on held-out addition and subtraction prompts goes to benchmarks/RESULTS.md
(section "OPD personalization").
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax

from jaxopd import train
from jaxopd.config import load_config_file
from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.distill import rollouts as rollouts_lib
from jaxopd.distill.driver import train_distill
from jaxopd.distill.teacher import load_model
from jaxopd.sampling import Sampler
from jaxopd.tasks import arithmetic

import opd_vs_baselines  # noqa: E402  (same directory: RESULTS.md section writer)

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARITHMETIC = ROOT / "data" / "tasks" / "arithmetic"
SECTION = "## OPD personalization"


def accuracy(path: pathlib.Path, prompts: list[str]) -> float:
    """Greedy accuracy of the checkpoint at `path` on `prompts` (arithmetic checker)."""
    model, params = load_model(path)
    tokenizer = load_tokenizer(ARITHMETIC / "tokenizer.json")
    distill = load_config_file(ROOT / "configs" / "tiny_distill.py").distill
    sampler = Sampler(model, distill.max_prompt_len, distill.max_new_tokens, (tokenizer.eos_id,), tokenizer.pad_id)
    result = rollouts_lib.rollout(sampler, params, tokenizer, prompts, jax.random.key(0), group_size=1,
                                  add_bos=True, checker=arithmetic.check, greedy=True)
    return float(result.rewards.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", default="/tmp/jaxopd_opd_vs_baselines/teacher_sft_lr0.0005_seed0")
    parser.add_argument("--workdir", default="/tmp/jaxopd_personalization")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--opd-steps", type=int, default=150)
    parser.add_argument("--mix-old", type=float, default=0.0,
                        help="old-task (addition) documents mixed into B's corpus, as a fraction of the new ones")
    parser.add_argument("--opd-lrs", default="5e-4", help="peak learning rates of C, one run each (a tenth at the end)")
    args = parser.parse_args()
    workdir, start = pathlib.Path(args.workdir), pathlib.Path(args.start)
    workdir.mkdir(parents=True, exist_ok=True)
    train_problems = list(arithmetic.read_jsonl(ARITHMETIC / "subtraction.jsonl"))
    seen = {p["prompt"] for p in train_problems}
    held_out_subtraction = [p["prompt"] for p in arithmetic.make_problems(3000, max_digits=2, ops="-", seed=7)
                            if p["prompt"] not in seen][:256]
    held_out_addition = rollouts_lib.read_prompts(str(ARITHMETIC / "eval.jsonl"), "prompt", 256)
    # The new documents, optionally mixed with some old-task documents (the seed mixes chat data into mid-training).
    old_task = list(arithmetic.read_jsonl(ARITHMETIC / "train.jsonl"))[:int(args.mix_old * len(train_problems))]
    corpus = workdir / f"docs_mix{args.mix_old:g}.jsonl"
    corpus.write_text("".join(json.dumps({"text": p["prompt"] + p["answer"]}) + "\n"
                              for p in train_problems + old_task))

    finetuned = workdir / f"finetuned_{args.finetune_steps}_mix{args.mix_old:g}"
    config = load_config_file(ROOT / "configs" / "tiny_distill.py", {
        "loss": "ce", "workdir": str(finetuned), "steps": args.finetune_steps, "seq_len": 48, "loss_chunk_size": 48,
        "batch_size": 64, "microbatch_size": 64,  # packed rows of ~5 documents each
        "eval_every": 0, "checkpoint_every": args.finetune_steps, "progress_bar": False,
        "init_from.path": str(start / "checkpoints"), "data.paths": str(corpus), "data.eval_fraction": 0.0,
        "optimizer.schedule.decay_end": args.finetune_steps, "optimizer.schedule.peak_lr": 3e-3})
    if not (finetuned / "checkpoints").exists():
        train.train(config)

    mixed = f" + {args.mix_old:g}x as many addition docs" if args.mix_old else ""
    models = [("A: start", start), (f"B: A + CE on subtraction docs{mixed} ({args.finetune_steps} steps)", finetuned)]
    kl_lines = []
    for lr in [float(lr) for lr in args.opd_lrs.split(",")]:
        recovered = workdir / f"{finetuned.name}_opd{args.opd_steps}_lr{lr:g}"
        config = load_config_file(ROOT / "configs" / "tiny_distill.py", {
            "workdir": str(recovered), "steps": args.opd_steps, "eval_every": args.opd_steps,
            "checkpoint_every": args.opd_steps, "progress_bar": False,
            "init_from.path": str(finetuned / "checkpoints"), "distill.teacher": str(start),
            "optimizer.schedule.decay_end": args.opd_steps, "optimizer.schedule.peak_lr": lr,
            "optimizer.schedule.end_lr": lr / 10})
        if not (recovered / "checkpoints").exists():
            train_distill(config)
        label = f"C: B + OPD on addition prompts, teacher A ({args.opd_steps} steps, peak LR {lr:g})"
        models.append((label, recovered))
        evals = [json.loads(line) for line in (recovered / "metrics.jsonl").read_text().splitlines()
                 if "eval/reverse_kl" in json.loads(line)]
        kl_lines.append(f"- peak LR {lr:g}: per-token reverse KL to A on held-out addition prompts "
                        f"{evals[0]['eval/reverse_kl']:.3f} -> {evals[-1]['eval/reverse_kl']:.3f} nats/token")

    rows = [(label, accuracy(path, held_out_addition), accuracy(path, held_out_subtraction)) for label, path in models]
    lines = [SECTION + (", old-task documents mixed into B" if args.mix_old else ""), "",
             f"`PYTHONPATH=. python benchmarks/opd_personalization.py --finetune-steps {args.finetune_steps} "
             f"--opd-steps {args.opd_steps} --opd-lrs {args.opd_lrs} --mix-old {args.mix_old:g}`: greedy accuracy on 256 held-out prompts of "
             "each kind.", "",
             "| model | addition (old skill) | subtraction (new knowledge) |", "|---|---|---|"]
    lines += [f"| {label} | {add:.3f} | {sub:.3f} |" for label, add, sub in rows]
    lines += ["", "During C:", *kl_lines]
    section = "\n".join(lines) + "\n"
    opd_vs_baselines.write_section(ROOT / "benchmarks" / "RESULTS.md", section)
    print(section)


if __name__ == "__main__":
    main()
