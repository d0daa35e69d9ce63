"""The seed's comparison in miniature: continue one SFT'd student three ways and compare accuracy per FLOP.

    PYTHONPATH=. python experiments/opd_vs_baselines.py [--seeds 0,1,2] [--steps 150] [--target 0.5] [--jobs 2]

Starting point (data/tasks/train_teacher.py made both): a teacher trained to high accuracy on multi-digit addition,
and a smaller student after a short SFT on teacher samples. From there, with the same loop, batch and optimizer:
  - teacher_sft: more off-policy distillation (SFT on teacher samples; cost = teacher sampling + training),
  - grpo: RL with the sparse correctness reward, group-normalized (cost = student sampling + training),
  - reverse_kl: on-policy distillation (cost = student sampling + teacher scoring + training),
  - full_reverse_kl: the same on-policy states, but the exact full-vocabulary reverse KL at each position instead
    of its one-sample estimate (separates the estimator's variance from the objective itself).
Held-out greedy accuracy is plotted against cumulative FLOPs (`flops/total`, jaxopd.training.flops conventions) in
experiments/opd_vs_baselines.png, and the FLOPs each method needs to first reach `--target` accuracy go to
experiments/RESULTS.md (section "On-policy distillation"), mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import pathlib
import time

import numpy as np

from jaxopd import train
from jaxopd.training.config import load_config_file

HERE = pathlib.Path(__file__).resolve().parent  # experiments/: the figure and RESULTS.md
METHODS = {"teacher_sft": "SFT on teacher samples", "grpo": "RL, sparse reward (GRPO)", "reverse_kl": "OPD",
           "full_reverse_kl": "OPD, exact per-token KL"}
SECTION = "## On-policy distillation"


def method_config(method: str, seed: int, lr: float, args: argparse.Namespace):
    workdir = pathlib.Path(args.workdir) / f"{method}_lr{lr:g}_seed{seed}"
    return load_config_file("tiny_distill", {
        "loss": method, "seed": seed, "steps": args.steps, "workdir": str(workdir), "eval_every": args.eval_every,
        "checkpoint_every": args.steps, "progress_bar": False, "log_every": args.eval_every,
        "optimizer.schedule.decay_end": args.steps, "optimizer.schedule.peak_lr": lr,
        "optimizer.schedule.end_lr": lr / 10})


def run(method: str, seed: int, lr: float, args: argparse.Namespace) -> dict:
    config = method_config(method, seed, lr, args)
    workdir = pathlib.Path(config.workdir)
    if not (workdir / "metrics.jsonl").exists():
        start = time.perf_counter()
        train.train(config)
        print(f"{method} lr {lr:g} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/accuracy" in row]
    return {"flops": np.asarray([row["flops/total"] for row in evals]),
            "accuracy": np.asarray([row["eval/accuracy"] for row in evals]),
            "reverse_kl": np.asarray([row["eval/reverse_kl"] for row in evals]),
            "teacher_accuracy": next(row["eval/teacher_accuracy"] for row in rows if "eval/teacher_accuracy" in row)}


def flops_to_reach(curve: dict, target: float) -> float:
    """Cumulative FLOPs at the first eval with accuracy >= target (inf if never)."""
    hits = np.flatnonzero(curve["accuracy"] >= target)
    return float(curve["flops"][hits[0]]) if len(hits) else float("inf")


def sweep_score(curve: dict, target: float) -> tuple[float, float]:
    """Orders learning rates: fewest FLOPs to the target first, then the highest final accuracy."""
    return flops_to_reach(curve, target), -float(curve["accuracy"][-1])


def plot(curves: dict, target: float, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (method, label), colour in zip(METHODS.items(), ("tab:blue", "tab:orange", "tab:green", "tab:purple")):
        for index, curve in enumerate(curves[method]):
            axis.plot(curve["flops"], curve["accuracy"], color=colour, alpha=0.8, marker=".",
                      label=label if index == 0 else None)
    teacher = curves["reverse_kl"][0]["teacher_accuracy"]
    axis.axhline(teacher, color="black", linestyle=":", label=f"teacher ({teacher:.2f})")
    axis.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target ({target:.2f})")
    axis.set_xscale("log")
    axis.set_xlabel("cumulative FLOPs (sampling + teacher scoring + training)")
    axis.set_ylabel("held-out accuracy (greedy)")
    axis.set_title("Continuing an SFT'd student: accuracy vs compute (one line per seed)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def results_section(curves: dict, target: float, args: argparse.Namespace, best_lr: dict, sweep: dict) -> str:
    opd = np.asarray([flops_to_reach(c, target) for c in curves["reverse_kl"]])
    config = method_config("reverse_kl", 0, best_lr["reverse_kl"], args)
    lines = [SECTION, "",
             f"`PYTHONPATH=. python experiments/opd_vs_baselines.py --seeds {args.seeds} --steps {args.steps} "
             f"--eval-every {args.eval_every} --target {target} --lrs {args.lrs} --jobs {args.jobs}` (about 2 min a "
             "run on 2 CPU cores; runs already in `--workdir` are reused). "
             "Task: multi-digit addition (data/tasks/arithmetic), teacher and SFT'd student from "
             "data/tasks/train_teacher.py; every method continues the same student with the same batch "
             f"({config.batch_size // config.distill.group_size} prompts x {config.distill.group_size} samples), "
             "optimizer (AdamW, warmup then cosine to a tenth of the peak) and steps; each method's peak learning "
             f"rate is the best of {args.lrs} on seed {args.seeds.split(',')[0]} (fewest FLOPs to the target, then "
             "highest final accuracy; sweep below). FLOPs follow jaxopd/training/flops.py: "
             "student or teacher "
             "sampling (prefill + cached decode), teacher scoring (one forward) and training (3x forward). "
             f"Teacher accuracy: {curves['reverse_kl'][0]['teacher_accuracy']:.3f}.", "",
             "![accuracy vs FLOPs](opd_vs_baselines.png)", "",
             f"| method | peak LR | start acc. | final acc. (mean ± std) | final reverse KL | FLOPs to reach "
             f"{target:.2f} (per seed) | × OPD (median) |",
             "|---|---|---|---|---|---|---|"]
    for method, label in METHODS.items():
        runs = curves[method]
        final = np.asarray([c["accuracy"][-1] for c in runs])
        kl = np.asarray([c["reverse_kl"][-1] for c in runs])
        reach = np.asarray([flops_to_reach(c, target) for c in runs])
        reach_text = ", ".join("never" if not np.isfinite(r) else f"{r:.2e}" for r in reach)
        if not np.isfinite(np.median(opd)):
            ratio_text = "n/a (OPD did not reach it)"
        elif not np.isfinite(np.median(reach)):
            ratio_text = "∞ (not reached)"
        else:
            ratio_text = f"{np.median(reach) / np.median(opd):.1f}"
        lines.append(f"| {label} | {best_lr[method]:g} | {runs[0]['accuracy'][0]:.3f} | {final.mean():.3f} ± {final.std():.3f} | "
                     f"{kl.mean():.3f} | {reach_text} | {ratio_text} |")
    reached = [label for method, label in METHODS.items()
               if np.isfinite(np.median([flops_to_reach(c, target) for c in curves[method]]))]
    lines += ["", f"Methods whose median run reached {target:.2f}: {', '.join(reached) or 'none'}. OPD uses the "
              "mean-advantage baseline (`distill.kl_baseline`, on by default).", ""]
    if len(sweep) > 1:
        lines += ["Learning-rate sweep (one seed): final accuracy / FLOPs to the target.", "",
                  "| method | " + " | ".join(f"{lr:g}" for lr in sweep) + " |",
                  "|---|" + "---|" * len(sweep)]
        for method, label in METHODS.items():
            cells = []
            for lr in sweep:
                curve = sweep[lr][method]
                reach = flops_to_reach(curve, target)
                cells.append(f"{curve['accuracy'][-1]:.3f} / " + ("never" if not np.isfinite(reach) else f"{reach:.2e}"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
              "Reading: the seed's ordering against RL holds here (OPD beats the sparse reward per FLOP), but more SFT "
              "on teacher samples is cheaper still, the opposite of the seed's 9-30x. On this task a completion is 2-4 "
              "tokens, so there is almost no room for the student's own prefixes to drift from the teacher's (the "
              "compounding-error regime where on-policy data pays), and the teacher's temperature-1 samples are almost "
              "all correct, so SFT sees ideal targets. The exact per-token KL row uses the same on-policy states "
              "without the one-sample estimate: the gap between it and OPD is the estimator's variance, the gap "
              "between it and SFT the objective and the states."]
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
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--lrs", default="5e-4", help="peak learning rates to sweep (on the first seed) per method")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--workdir", default="/tmp/jaxopd_opd_vs_baselines")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(lr) for lr in args.lrs.split(",")]
    # Runs are independent processes (spawned: JAX does not survive fork), `--jobs` at a time.
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        sweep_futures = {lr: {method: pool.submit(run, method, seeds[0], lr, args) for method in METHODS} for lr in lrs}
        sweep = {lr: {method: future.result() for method, future in runs.items()} for lr, runs in sweep_futures.items()}
        best_lr = {method: min(lrs, key=lambda lr: sweep_score(sweep[lr][method], args.target)) for method in METHODS}
        futures = {method: [pool.submit(run, method, seed, best_lr[method], args) for seed in seeds]
                   for method in METHODS}
        curves = {method: [future.result() for future in runs] for method, runs in futures.items()}
    plot(curves, args.target, HERE / "opd_vs_baselines.png")
    section = results_section(curves, args.target, args, best_lr, sweep)
    write_section(HERE / "RESULTS.md", section)
    print(section)


if __name__ == "__main__":
    main()
