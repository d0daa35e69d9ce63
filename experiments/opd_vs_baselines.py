"""The seed's comparison in miniature: continue one SFT'd student four ways and compare accuracy per FLOP and per
gradient step.

    PYTHONPATH=. python experiments/opd_vs_baselines.py [--task arithmetic|column_addition] [--seeds 0,1,2] \
        [--steps N] [--target ACC] [--lrs 1e-4,3e-4] [--jobs 2]

Starting point (data/tasks/train_teacher.py made both): a teacher trained to high accuracy on the task, and a smaller
student after a short SFT on teacher samples. `--task arithmetic` (tiny_distill: 2-4 token answers) or
`--task column_addition` (column_addition_distill: 48-49 token worked solutions, where an early wrong carry reaches
the answer). From there, with the same loop, batch and optimizer:
  - teacher_sft: more off-policy distillation (SFT on teacher samples; cost = teacher sampling + training when the
    data must be generated, training alone when it exists: both are reported),
  - grpo: RL with the sparse correctness reward, group-normalized (cost = student sampling + training),
  - reverse_kl: on-policy distillation (cost = student sampling + teacher scoring + training),
  - full_reverse_kl: the same on-policy states, but the exact full-vocabulary reverse KL at each position instead
    of its one-sample estimate (separates the estimator's variance from the objective itself).
Held-out greedy accuracy is plotted against cumulative FLOPs (`flops/total`, jaxopd.training.flops conventions) and
against gradient steps in the task's PNG, and the FLOPs and steps each method needs to first reach the target accuracy
(fixed per task before the runs: `--target`, by default halfway from the student's start to the teacher) go to the
task's section of experiments/RESULTS.md, per seed, with the ratios to OPD.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import pathlib
import time

import numpy as np

from jaxopd import train
from jaxopd.training.config import load_config_file

HERE = pathlib.Path(__file__).resolve().parent  # experiments/: the figures and RESULTS.md
METHODS = {"teacher_sft": "SFT on teacher samples", "grpo": "RL, sparse reward (GRPO)", "reverse_kl": "OPD",
           "full_reverse_kl": "OPD, exact per-token KL"}
COLOURS = {"teacher_sft": "tab:blue", "grpo": "tab:orange", "reverse_kl": "tab:green", "full_reverse_kl": "tab:purple"}


@dataclasses.dataclass(frozen=True)
class Study:
    """One task's comparison: the run config every method continues, and where its results go."""

    config: str  # a bundled run config: its student, teacher, prompts, grader, batch and optimizer
    description: str  # the task, for RESULTS.md
    section: str  # its RESULTS.md heading
    figure: str  # its PNG, in experiments/
    target: float  # the default --target, fixed before any run: about halfway from the student to the teacher
    reading: str  # what the table says, written after the runs that RESULTS.md shows


STUDIES = {
    "arithmetic": Study(
        "tiny_distill", "multi-digit addition (data/tasks/arithmetic, 2-4 token answers)",
        "## On-policy distillation", "opd_vs_baselines.png", 0.65,
        "Reading: the seed's ordering against RL holds here (OPD beats the sparse reward per FLOP), but more SFT "
        "on teacher samples is cheaper still, the opposite of the seed's 9-30x. On this task a completion is 2-4 "
        "tokens, so there is almost no room for the student's own prefixes to drift from the teacher's (the "
        "compounding-error regime where on-policy data pays), and the teacher's temperature-1 samples are almost "
        "all correct, so SFT sees ideal targets. The exact per-token KL row uses the same on-policy states "
        "without the one-sample estimate: the gap between it and OPD is the estimator's variance, the gap "
        "between it and SFT the objective and the states."),
    "column_addition": Study(
        "column_addition_distill", "sums of 3 three-digit numbers worked column by column with carries "
        "(data/tasks/column_addition, 48-49 token solutions; the answer is graded)",
        "## On-policy distillation on long worked solutions (column_addition)", "opd_vs_baselines_column_addition.png",
        0.71,
        "Reading: the seed's result does not hold from this student. Only SFT on teacher samples reaches the target "
        "(70-90 steps); OPD, its exact-KL form and GRPO lose greedy accuracy in their first 10-20 steps at every "
        "learning rate and seed (0.45 -> 0.15-0.25), then OPD and exact KL climb back at about SFT's slope but end "
        "below the start after 150 steps. The reason is the student's sampling: 0.449 greedy but 0.045 at "
        "temperature 1, so 95% of its rollouts go wrong, most in the first column, and about two thirds of the "
        "tokens OPD trains on follow the student's first mistake, where a teacher trained on right solutions only is "
        "off its own distribution (experiments/opd_penalty_by_step.py: the penalty is 5.3 nats on the first wrong "
        "token, -0.03 before it, 0.66 after). The estimator is not the cause: the exact per-token KL collapses alike. "
        "On the policy OPD optimizes, its samples, OPD and exact KL do improve: sampled accuracy 0.045 -> 0.10 and "
        "0.12, as much as SFT's 0.12 at the same steps. A student that samples right often enough is the seed's "
        "setting: the same SFT for 500 steps gives 0.961 greedy and 0.334 sampled, 1000 steps 0.988 and 0.692 "
        "(teacher 0.838 sampled); measured by sampled accuracy from the 500-step student, the comparison would start "
        "where the seed's does (next run)."),
}


def method_config(study: Study, method: str, seed: int, lr: float, args: argparse.Namespace):
    # log_every=1: every step's FLOPs by part reach metrics.jsonl, so the cost without sampling can be summed.
    workdir = pathlib.Path(args.workdir) / f"{method}_lr{lr:g}_seed{seed}"
    return load_config_file(study.config, {
        "loss": method, "seed": seed, "steps": args.steps, "workdir": str(workdir), "eval_every": args.eval_every,
        "checkpoint_every": args.steps, "progress_bar": False, "log_every": 1,
        "optimizer.schedule.decay_end": args.steps, "optimizer.schedule.peak_lr": lr,
        "optimizer.schedule.end_lr": lr / 10})


def run(study: Study, method: str, seed: int, lr: float, args: argparse.Namespace) -> dict:
    """A method's run (trained unless its workdir holds a finished one): its eval curve as arrays over the evals,
    `flops` cumulative in all, `training_flops` without any sampling (SFT's cost when the teacher's data exists)."""
    config = method_config(study, method, seed, lr, args)
    workdir = pathlib.Path(config.workdir)
    metrics = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if not any(row.get("step") == args.steps and "eval/accuracy" in row for row in rows):
        start = time.perf_counter()
        train.train(config)  # resumes a run cut short
        print(f"{method} lr {lr:g} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    sampling = {row["step"]: row["flops/sampling"] for row in rows if "flops/sampling" in row}
    if sorted(sampling) != list(range(1, args.steps + 1)):
        raise ValueError(f"{metrics} does not log every step's flops/sampling (made with log_every > 1?): "
                         "delete the run or use another --workdir")
    sampled = np.cumsum([sampling[step] for step in range(1, args.steps + 1)])
    evals = [row for row in rows if "eval/accuracy" in row]
    steps = np.asarray([row["step"] for row in evals])
    flops = np.asarray([row["flops/total"] for row in evals])
    return {"steps": steps, "flops": flops,
            "training_flops": flops - np.where(steps > 0, sampled[np.maximum(steps - 1, 0)], 0.0),
            "accuracy": np.asarray([row["eval/accuracy"] for row in evals]),
            "reverse_kl": np.asarray([row["eval/reverse_kl"] for row in evals]),
            "teacher_accuracy": next(row["eval/teacher_accuracy"] for row in rows if "eval/teacher_accuracy" in row),
            "sampled_accuracy": sampled_accuracy(config, str(workdir))}


def sampled_accuracy(config, checkpoint: str, samples: int = 4, seed: int = 0) -> float:
    """Graded accuracy of `samples` temperature-`distill.temperature` completions per held-out prompt from
    `checkpoint`: the policy as OPD samples it, which for a student can be far below its greedy accuracy. Cached in
    `checkpoint`/sampled_accuracy.json when that is a run's workdir."""
    import jax

    from jaxopd.bundled import resolve_path
    from jaxopd.data.tokenizer import load_tokenizer
    from jaxopd.distill import graders
    from jaxopd.distill.prompts import plain_prompts, read_rows
    from jaxopd.distill.rollouts import rollout
    from jaxopd.distill.sampling import Sampler
    from jaxopd.distill.teacher import load_model

    cache = pathlib.Path(checkpoint) / "sampled_accuracy.json"
    if cache.exists():
        return json.loads(cache.read_text())["accuracy"]
    distill = config.distill
    tokenizer = load_tokenizer(resolve_path(config.data.tokenizer))
    rows = [row for _, row in read_rows(resolve_path(distill.eval_prompts), "distill.eval_prompts")]
    rows = rows[:distill.eval_prompts_count]
    model, params = load_model(resolve_path(checkpoint))
    sampler = Sampler(model, distill.max_prompt_len, distill.max_new_tokens, (tokenizer.eos_id,), tokenizer.pad_id)
    result = rollout(sampler, params, tokenizer, plain_prompts([row["prompt"] for row in rows], tokenizer),
                     jax.random.key(seed), group_size=samples, temperature=distill.temperature)
    grades = graders.grade(graders.build(distill.grader), [row for row in rows for _ in range(samples)],
                           result.completions)
    accuracy = float(grades.rewards.mean())
    if (pathlib.Path(checkpoint) / "metrics.jsonl").exists():
        cache.write_text(json.dumps({"accuracy": accuracy, "samples": samples, "seed": seed}))
    return accuracy


def to_reach(curve: dict, target: float, axis: str = "flops") -> float:
    """`curve[axis]` (cumulative FLOPs, training FLOPs or steps) at the first eval with accuracy >= target (inf if
    never)."""
    hits = np.flatnonzero(curve["accuracy"] >= target)
    return float(curve[axis][hits[0]]) if len(hits) else float("inf")


def sweep_score(curve: dict, target: float) -> tuple[float, float]:
    """Orders learning rates: fewest FLOPs to the target first, then the highest final accuracy."""
    return to_reach(curve, target), -float(curve["accuracy"][-1])


def plot(curves: dict, target: float, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_flops, by_steps) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for method, label in METHODS.items():
        for index, curve in enumerate(curves[method]):
            first = index == 0
            by_flops.plot(curve["flops"], curve["accuracy"], color=COLOURS[method], alpha=0.8, marker=".",
                          label=label if first else None)
            if method == "teacher_sft":
                by_flops.plot(curve["training_flops"], curve["accuracy"], color=COLOURS[method], alpha=0.6,
                              linestyle="--", label=f"{label}, data exists (training FLOPs)" if first else None)
            by_steps.plot(curve["steps"], curve["accuracy"], color=COLOURS[method], alpha=0.8, marker=".",
                          label=label if first else None)
    teacher = curves["reverse_kl"][0]["teacher_accuracy"]
    for axis in (by_flops, by_steps):
        axis.axhline(teacher, color="black", linestyle=":", label=f"teacher ({teacher:.2f})")
        axis.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target ({target:.2f})")
    by_flops.set_xscale("log")
    by_flops.set_xlabel("cumulative FLOPs (sampling + teacher scoring + training)")
    by_steps.set_xlabel("gradient steps")
    by_flops.set_ylabel("held-out accuracy (greedy)")
    handles, labels = by_flops.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=120)


def _values(values, fmt) -> str:
    return ", ".join("never" if not np.isfinite(value) else fmt(value) for value in values)


def _ratio(value: float, reference: float) -> str:
    if not np.isfinite(reference):
        return "n/a (OPD did not reach it)"
    return "∞ (not reached)" if not np.isfinite(value) else f"{value / reference:.2f}"


def results_section(study: Study, curves: dict, target: float, args: argparse.Namespace, best_lr: dict,
                    sweep: dict) -> str:
    opd = {axis: np.median([to_reach(c, target, axis) for c in curves["reverse_kl"]]) for axis in ("flops", "steps")}
    config = method_config(study, "reverse_kl", 0, best_lr["reverse_kl"], args)
    start = curves["reverse_kl"][0]["accuracy"][0]
    lines = [study.section, "",
             f"`PYTHONPATH=. python experiments/opd_vs_baselines.py --task {args.task} --seeds {args.seeds} "
             f"--steps {args.steps} --eval-every {args.eval_every} --target {target} --lrs {args.lrs} "
             f"--jobs {args.jobs}` (runs already in `--workdir` are reused, runs cut short resume). "
             f"Task: {study.description}; teacher and SFT'd student from data/tasks/train_teacher.py, run config "
             f"`{study.config}`. Every method continues the same student with the same batch "
             f"({config.batch_size // config.distill.group_size} prompts x {config.distill.group_size} samples), "
             "optimizer (AdamW, warmup then cosine to a tenth of the peak) and steps; each method's peak learning "
             f"rate is the best of {args.lrs} on seed {args.seeds.split(',')[0]} (fewest FLOPs to the target, then "
             "highest final accuracy; sweep below). FLOPs follow jaxopd/training/flops.py: student or teacher "
             "sampling (prefill + cached decode), teacher scoring (one forward) and training (3x forward); SFT's "
             "\"data exists\" row counts its training FLOPs alone. "
             f"Start accuracy {start:.3f} greedy, {args.start_sampled:.3f} sampled; teacher "
             f"{curves['reverse_kl'][0]['teacher_accuracy']:.3f} greedy, {args.teacher_sampled:.3f} sampled; target "
             f"{target:.2f} (greedy), fixed before the runs. \"acc.\" is greedy held-out accuracy (what the target "
             "and the curves use), \"sampled acc.\" that of 4 temperature-1 samples per held-out prompt from the "
             "final checkpoint (the policy as OPD and GRPO sample it).", "",
             f"![accuracy vs FLOPs and steps]({study.figure})", "",
             f"| method | peak LR | final acc. (mean ± std) | final sampled acc. | final reverse KL | steps to "
             f"{target:.2f} (per seed) | × OPD | FLOPs to {target:.2f} (per seed) | × OPD |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(label: str, method: str, flops_axis: str) -> str:
        runs = curves[method]
        final = np.asarray([c["accuracy"][-1] for c in runs])
        steps = [to_reach(c, target, "steps") for c in runs]
        flops = [to_reach(c, target, flops_axis) for c in runs]
        sampled = np.asarray([c["sampled_accuracy"] for c in runs])
        return (f"| {label} | {best_lr[method]:g} | {final.mean():.3f} ± {final.std():.3f} | "
                f"{sampled.mean():.3f} ± {sampled.std():.3f} | "
                f"{np.mean([c['reverse_kl'][-1] for c in runs]):.3f} | {_values(steps, lambda v: f'{v:.0f}')} | "
                f"{_ratio(np.median(steps), opd['steps'])} | {_values(flops, lambda v: f'{v:.2e}')} | "
                f"{_ratio(np.median(flops), opd['flops'])} |")

    for method, label in METHODS.items():
        lines.append(row(label, method, "flops"))
        if method == "teacher_sft":
            lines.append(row(f"{label}, data exists", method, "training_flops"))
    lines += ["", "× OPD: the method's median over seeds divided by OPD's (below 1: cheaper than OPD). OPD uses the "
              "mean-advantage baseline (`distill.kl_baseline`, on by default).", ""]
    if len(sweep) > 1:
        lines += ["Learning-rate sweep (one seed): final accuracy / FLOPs to the target.", "",
                  "| method | " + " | ".join(f"{lr:g}" for lr in sweep) + " |",
                  "|---|" + "---|" * len(sweep)]
        for method, label in METHODS.items():
            cells = [f"{sweep[lr][method]['accuracy'][-1]:.3f} / {_values([to_reach(sweep[lr][method], target)], lambda v: f'{v:.2e}')}"
                     for lr in sweep]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if study.reading:
        lines.append(study.reading)
    return "\n".join(lines) + "\n"


def write_section(path: pathlib.Path, section: str) -> None:
    """Replaces the section of RESULTS.md headed by `section`'s first line (up to the next "## " heading), or
    appends it."""
    heading = section.splitlines()[0]
    text = path.read_text() if path.exists() else "# Experiment results\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end + 1:] if end >= 0 else "")
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="arithmetic", choices=sorted(STUDIES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--lrs", default="5e-4", help="peak learning rates to sweep (on the first seed) per method")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=None, help="accuracy to reach (default: the task's)")
    parser.add_argument("--workdir", default=None, help="default: /tmp/jaxopd_opd_vs_baselines[_<task>]")
    args = parser.parse_args()
    study = STUDIES[args.task]
    target = study.target if args.target is None else args.target
    args.workdir = args.workdir or "/tmp/jaxopd_opd_vs_baselines" + ("" if args.task == "arithmetic" else f"_{args.task}")
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(lr) for lr in args.lrs.split(",")]
    # Runs are independent processes (spawned: JAX does not survive fork), `--jobs` at a time.
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        def submit(method: str, seed: int, lr: float):
            return pool.submit(run, study, method, seed, lr, args)

        sweep_futures = {lr: {method: submit(method, seeds[0], lr) for method in METHODS} for lr in lrs}
        sweep = {lr: {method: future.result() for method, future in runs.items()} for lr, runs in sweep_futures.items()}
        best_lr = {method: min(lrs, key=lambda lr: sweep_score(sweep[lr][method], target)) for method in METHODS}
        futures = {method: [submit(method, seed, best_lr[method]) for seed in seeds] for method in METHODS}
        curves = {method: [future.result() for future in runs] for method, runs in futures.items()}
    base = method_config(study, "reverse_kl", seeds[0], lrs[0], args)
    args.start_sampled = sampled_accuracy(base, base.init_from.path)
    args.teacher_sampled = sampled_accuracy(base, base.distill.teacher)
    plot(curves, target, HERE / study.figure,
         f"Continuing an SFT'd student on {args.task}: accuracy vs compute and vs steps (one line per seed)")
    section = results_section(study, curves, target, args, best_lr, sweep)
    write_section(HERE / "RESULTS.md", section)
    print(section)


if __name__ == "__main__":
    main()
