"""The seed's "personalization" experiment in small: learn something new, lose an old skill, get it back by OPD
with the model's own earlier checkpoint as the teacher.

    PYTHONPATH=. python experiments/opd_personalization.py [--new facts|subtraction] [--start DIR] \
        [--finetune-steps 400] [--opd-steps 150] [--opd-lrs 1.5e-4,5e-4] [--mix-old 0.3] [--seeds 0,1,2]

  A  the starting student, good at addition: the bundled student continued by SFT on teacher samples (the best SFT
     run of experiments/opd_vs_baselines.py: 300 steps, peak LR 1.5e-3), built here unless --start names one (any
     architecture: B and C take A's; `--start data/tasks/arithmetic/teacher` runs the experiment on the 5x larger
     bundled teacher);
  B  A fine-tuned by next-token CE on new documents, optionally mixed with some addition documents (`--mix-old`, as
     the seed mixes chat data into mid-training). `--new facts` (the seed's "internal documents"): a table of
     arbitrary key -> value facts written " 482=917", knowledge that cannot be computed, recalled from the prompt
     " 482="; `--new subtraction`: worked subtraction problems "835-62=773", a second skill in the old task's format.
     Addition suffers;
  C  B trained by OPD on addition prompts only, teacher = A (same tokenizer, its own earlier self).
Greedy accuracy of A, B and C on held-out addition prompts and on the new material (fact recall; held-out
subtraction problems) goes to experiments/RESULTS.md (sections "OPD personalization (<A's size>), ...").
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Callable

import jax
import numpy as np

from jaxopd.bundled import resolve_path
from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.distill import rollouts as rollouts_lib
from jaxopd.distill.prompts import plain_prompts
from jaxopd.distill.sampling import Sampler
from jaxopd.distill.teacher import load_model, read_model_fields
from jaxopd.tasks import arithmetic
from jaxopd.train import train
from jaxopd.training.config import load_config_file, model_config_dict, to_model_config
from jaxopd.training.flops import count_params

import opd_vs_baselines  # noqa: E402  (same directory: RESULTS.md section writer)

HERE = pathlib.Path(__file__).resolve().parent  # experiments/: RESULTS.md
ARITHMETIC = pathlib.Path(resolve_path("data/tasks/arithmetic"))
SECTION = "## OPD personalization"
DISTILL_CONFIG = "tiny_distill"  # the bundled run config, by name


def accuracies(path: pathlib.Path, tests: list[tuple[list[str], Callable[[str, str], bool]]]) -> list[float]:
    """Greedy accuracy of the checkpoint at `path` on each (prompts, checker) of `tests`, completions judged by the
    checker; the model is loaded once."""
    model, params = load_model(path)
    tokenizer = load_tokenizer(ARITHMETIC / "tokenizer.json")
    distill = load_config_file(DISTILL_CONFIG).distill
    sampler = Sampler(model, distill.max_prompt_len, distill.max_new_tokens, (tokenizer.eos_id,), tokenizer.pad_id)
    accuracy = []
    for prompts, checker in tests:
        result = rollouts_lib.rollout(sampler, params, tokenizer, plain_prompts(prompts, tokenizer),
                                      jax.random.key(0), group_size=1, greedy=True)
        accuracy.append(float(np.mean([checker(p, c) for p, c in zip(prompts, result.completions)])))
    return accuracy


def make_facts(count: int, seed: int = 11) -> dict[str, str]:
    """`count` arbitrary facts: prompt " {key}=" (distinct 3-digit keys; the leading space marks a lookup) ->
    a random value of 1 to 3 digits."""
    rng = np.random.default_rng(seed)
    keys = rng.choice(np.arange(100, 1000), size=count, replace=False)
    return {f" {key}=": str(int(rng.integers(0, 1000))) for key in keys}


def new_material(kind: str, num_facts: int) -> tuple[list[dict[str, str]], list[str], Callable[[str, str], bool]]:
    """The new documents (prompt + answer), the prompts that test them, and their checker."""
    if kind == "facts":
        facts = make_facts(num_facts)
        documents = [{"prompt": prompt, "answer": value} for prompt, value in facts.items()]
        return documents, list(facts), lambda prompt, completion: (
            completion.split(arithmetic.EOS, 1)[0].replace(arithmetic.PAD, "") == facts[prompt])
    documents = list(arithmetic.read_jsonl(ARITHMETIC / "subtraction.jsonl"))
    seen = {p["prompt"] for p in documents}
    held_out = [p["prompt"] for p in arithmetic.make_problems(3000, max_digits=2, ops="-", seed=7)
                if p["prompt"] not in seen][:256]
    return documents, held_out, arithmetic.check


def build_start(workdir: pathlib.Path) -> pathlib.Path:
    """A: the bundled student after 300 more steps of SFT on teacher samples at peak LR 1.5e-3."""
    start = workdir / "start_teacher_sft_lr0.0015"
    if not (start / "checkpoints").exists():
        train(load_config_file(DISTILL_CONFIG, {
            "loss": "teacher_sft", "workdir": str(start), "steps": 300, "eval_every": 300, "checkpoint_every": 300,
            "progress_bar": False, "optimizer.schedule.decay_end": 300, "optimizer.schedule.peak_lr": 1.5e-3,
            "optimizer.schedule.end_lr": 1.5e-4}))
    return start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", choices=("facts", "subtraction"), default="facts", help="what B learns")
    parser.add_argument("--facts", type=int, default=200, help="--new facts: how many")
    parser.add_argument("--start", default="", help="A's checkpoint directory (default: built in --workdir)")
    parser.add_argument("--workdir", default="/tmp/jaxopd_personalization")
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--finetune-lr", type=float, default=3e-3)
    parser.add_argument("--opd-steps", type=int, default=150)
    parser.add_argument("--mix-old", type=float, default=0.0,
                        help="old-task (addition) documents mixed into B's corpus, as a fraction of the new ones")
    parser.add_argument("--opd-lrs", default="5e-4", help="peak learning rates of C, one run each (a tenth at the end)")
    parser.add_argument("--seeds", default="0", help="seeds of B and C (data order, sampling); A is shared")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = pathlib.Path(args.start) if args.start else build_start(workdir)
    start_model = model_config_dict(read_model_fields(start)[1])  # B and C are A's architecture
    size = f"{count_params(to_model_config(start_model))['total'] / 1e3:.0f}k-param model"
    documents, new_prompts, new_checker = new_material(args.new, args.facts)
    held_out_addition = [row["prompt"] for row in arithmetic.read_jsonl(ARITHMETIC / "eval.jsonl")][:256]
    name = f"{args.new}{args.facts if args.new == 'facts' else ''}_mix{args.mix_old:g}"
    # The new documents, optionally mixed with some old-task documents (the seed mixes chat data into mid-training);
    # few facts are repeated to the corpus size of the subtraction run, so both see as many tokens per epoch.
    old_task = list(arithmetic.read_jsonl(ARITHMETIC / "train.jsonl"))
    copies = max(1, 5000 // len(documents))
    new_docs = documents * copies
    corpus = workdir / f"docs_{name}.jsonl"
    corpus.write_text("".join(json.dumps({"text": p["prompt"] + p["answer"]}) + "\n"
                              for p in new_docs + old_task[:int(args.mix_old * len(new_docs))]))

    new_label = {"facts": f"{args.facts} facts", "subtraction": "subtraction docs"}[args.new]
    mixed = f" + {args.mix_old:g}x as many addition docs" if args.mix_old else ""
    labels = [f"B: A + CE on {new_label}{mixed} ({args.finetune_steps} steps, LR {args.finetune_lr:g})"]
    lrs = [float(lr) for lr in args.opd_lrs.split(",")]
    labels += [f"C: B + OPD on addition prompts, teacher A ({args.opd_steps} steps, peak LR {lr:g})" for lr in lrs]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    paths: dict[str, list[pathlib.Path]] = {label: [] for label in labels}  # label -> one checkpoint per seed
    kl: dict[float, list[tuple[float, float]]] = {lr: [] for lr in lrs}  # eval/reverse_kl to A before, after C
    for seed in seeds:
        finetuned = workdir / (f"finetuned_{name}_{args.finetune_steps}_lr{args.finetune_lr:g}"
                               + (f"_seed{seed}" if seed else ""))
        config = load_config_file(DISTILL_CONFIG, {
            "loss": "ce", "workdir": str(finetuned), "steps": args.finetune_steps, "seq_len": 48,
            "loss_chunk_size": 48, "batch_size": 64, "microbatch_size": 64,  # packed rows of ~5 documents each
            "eval_every": 0, "checkpoint_every": args.finetune_steps, "progress_bar": False, "seed": seed,
            "init_from.path": str(start), "data.paths": str(corpus), "data.eval_fraction": 0.0,
            "optimizer.schedule.decay_end": args.finetune_steps, "optimizer.schedule.peak_lr": args.finetune_lr})
        config.model = start_model
        if not (finetuned / "checkpoints").exists():
            train(config)
        paths[labels[0]].append(finetuned)
        for lr, label in zip(lrs, labels[1:]):
            recovered = workdir / f"{finetuned.name}_opd{args.opd_steps}_lr{lr:g}"
            config = load_config_file(DISTILL_CONFIG, {
                "workdir": str(recovered), "steps": args.opd_steps, "eval_every": args.opd_steps,
                "checkpoint_every": args.opd_steps, "progress_bar": False, "seed": seed,
                "init_from.path": str(finetuned), "distill.teacher": str(start),
                "optimizer.schedule.decay_end": args.opd_steps, "optimizer.schedule.peak_lr": lr,
                "optimizer.schedule.end_lr": lr / 10})
            config.model = start_model
            if not (recovered / "checkpoints").exists():
                train(config)
            paths[label].append(recovered)
            logged = map(json.loads, (recovered / "metrics.jsonl").read_text().splitlines())
            evals = [line["eval/reverse_kl"] for line in logged if "eval/reverse_kl" in line]
            kl[lr].append((evals[0], evals[-1]))

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{np.mean(values):.3f} ± {np.std(values):.3f} ({', '.join(f'{v:.2f}' for v in values)})"

    tests = [(held_out_addition, arithmetic.check), (new_prompts, new_checker)]
    rows = []
    for label, label_paths in [("A: start", [start]), *paths.items()]:
        old, new = zip(*(accuracies(path, tests) for path in label_paths))  # one (old, new) per seed
        rows.append((label, cell(list(old)), cell(list(new))))
    kl_lines = [f"- peak LR {lr:g}: per-token reverse KL to A on held-out addition prompts "
                f"{np.mean([before for before, _ in kl[lr]]):.3f} -> {np.mean([after for _, after in kl[lr]]):.3f} "
                "nats/token" + (" (mean over seeds)" if len(seeds) > 1 else "") for lr in lrs]
    new_column = {"facts": f"fact recall ({len(new_prompts)} facts, new knowledge)",
                  "subtraction": "held-out subtraction (new skill)"}[args.new]
    heading = f"{SECTION} ({size})" + {"facts": ", new facts", "subtraction": ", new skill (subtraction)"}[args.new]
    seed_note = f"; B and C with seeds {args.seeds}: mean ± std (per seed)" if len(seeds) > 1 else ""
    lines = [heading + (f", old-task documents mixed into B ({args.mix_old:g}x)" if args.mix_old else ""), "",
             f"`PYTHONPATH=. python experiments/opd_personalization.py --new {args.new} "
             + (f"--start {args.start} " if args.start else "") +
             f"--finetune-steps {args.finetune_steps} --finetune-lr {args.finetune_lr:g} --opd-steps {args.opd_steps} "
             f"--opd-lrs {args.opd_lrs} --mix-old {args.mix_old:g}"
             + (f" --seeds {args.seeds}" if len(seeds) > 1 else "") + f"`: greedy accuracy{seed_note}.", "",
             f"| model | held-out addition (old skill, 256) | {new_column} |", "|---|---|---|"]
    lines += [f"| {label} | {old} | {new} |" for label, old, new in rows]
    lines += ["", "During C:", *kl_lines]
    section = "\n".join(lines) + "\n"
    opd_vs_baselines.write_section(HERE / "RESULTS.md", section)
    print(section)


if __name__ == "__main__":
    main()
