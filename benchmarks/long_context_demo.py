"""Long context in small, on CPU: the tiny model pretrained on 256-token rows (configs/tiny_long_256.py, with the
retrieval mix of data/retrieval.py), then three ways to go longer, each scored by perplexity by position and by
needle-in-a-haystack retrieval by length and depth:

  (a) no extension: stage 0 as it is, evaluated past its 256-token window (--allow_beyond_window). With plain RoPE
      the angles depend on the position alone, not on max_position_embeddings, so this is also "the window raised
      without scaling and without training": the eval-only reading of (b).
  (b) the window raised to 2048 without scaling, trained: tiny_long_2k:plain from stage 0.
  (c) YaRN x8 to 2048, trained the same steps: tiny_long_2k from stage 0.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/long_context_demo.py [--steps0 200 --steps1 100 --samples 2]

Every stage and evaluation is a command of the package's CLIs (printed, and listed in the RESULTS.md section this
writes); a stage whose workdir already holds its last checkpoint is not trained again (--retrain to redo it). Figures
(one per run and evaluation, and the three perplexity curves together) go to benchmarks/long_context/; the section
"Long context in small" of benchmarks/RESULTS.md gets the tables between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FIGURES = REPO / "benchmarks" / "long_context"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Long context in small (`benchmarks/long_context_demo.py`)"
BEGIN, END = "<!-- long_context_demo: begin (generated) -->", "<!-- long_context_demo: end -->"
PERPLEXITY_LENGTHS = "64,128,256,512,1k,2k"
NIAH_LENGTHS = "256,512,1k,2k"
NIAH_DEPTHS = "0,0.25,0.5,0.75,1"
# (name, label, config, whether it is trained from stage 0)
RUNS = (("a_no_extension", "(a) no extension: stage 0 (256, plain RoPE)", "tiny_long_256", False),
        ("b_plain_2k", "(b) window raised to 2k, plain RoPE, trained", "tiny_long_2k:plain", True),
        ("c_yarn_2k", "(c) YaRN x8 to 2k, trained", "tiny_long_2k", True))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdirs/long_context_demo", help="where the three runs train")
    parser.add_argument("--steps0", type=int, default=300, help="stage 0 steps (its cosine schedule ends there)")
    parser.add_argument("--steps1", type=int, default=200, help="steps of each 2k stage, (b) and (c) alike")
    parser.add_argument("--samples", type=int, default=2, help="needles per (length, depth) cell")
    parser.add_argument("--num_sequences", type=int, default=8, help="text windows of the perplexity evaluation")
    parser.add_argument("--retrain", action="store_true", help="train stages even when their checkpoint exists")
    parser.add_argument("--no_results", action="store_true", help="do not rewrite the RESULTS.md section")
    return parser


def _run(command: list[str]) -> tuple[str, float]:
    """(stdout + stderr, seconds) of a package command run from the repository root; exits on failure."""
    print("$ python", " ".join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    return result.stdout + result.stderr, seconds


def run_workdir(args: argparse.Namespace, name: str) -> pathlib.Path:
    """Run a's workdir is stage 0's, which (b) and (c) start from."""
    return pathlib.Path(args.workdir) / ("stage0_256" if name == RUNS[0][0] else name)


def train_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The train command of each run: stage 0 (run a) and the two 2k stages from it."""
    stage0 = run_workdir(args, RUNS[0][0])
    commands = {RUNS[0][0]: ["-m", "jaxopd.train", "--config=tiny_long_256", f"--config.workdir={stage0}",
                             f"--config.steps={args.steps0}", f"--config.optimizer.schedule.decay_end={args.steps0}"]}
    for name, _, config, _ in RUNS[1:]:
        commands[name] = ["-m", "jaxopd.train", f"--config={config}", f"--config.workdir={run_workdir(args, name)}",
                          f"--config.init_from.path={stage0}", f"--config.steps={args.steps1}"]
    return commands


def eval_commands(args: argparse.Namespace, name: str) -> dict[str, list[str]]:
    checkpoint = run_workdir(args, name)
    output = checkpoint / "eval"
    common = [f"--checkpoint={checkpoint}", f"--output_dir={output}"]
    # One generation call per length: its compilation, not the decoding, is most of the time on CPU.
    niah_batch = len(NIAH_DEPTHS.split(",")) * args.samples
    return {"perplexity": ["-m", "jaxopd.evaluate", "perplexity", *common, "--batch_size=4",
                           f"--lengths={PERPLEXITY_LENGTHS}", f"--num_sequences={args.num_sequences}"],
            "niah": ["-m", "jaxopd.evaluate", "niah", *common, f"--batch_size={niah_batch}",
                     f"--lengths={NIAH_LENGTHS}", f"--depths={NIAH_DEPTHS}", f"--samples={args.samples}",
                     "--allow_beyond_window"]}


def _finished(workdir: pathlib.Path, steps: int) -> bool:
    checkpoints = workdir / "checkpoints"
    return checkpoints.is_dir() and any(path.name == str(steps) for path in checkpoints.iterdir())


def _stale(result: pathlib.Path, workdir: pathlib.Path) -> bool:
    """Whether an evaluation's file is missing or older than the run's last training (an evaluation newer than it
    is not run again)."""
    return not result.is_file() or result.stat().st_mtime < (workdir / "train.log").stat().st_mtime


def retrieval_share(config: str, seq_len: int, batches: int = 16) -> float:
    """The fraction of training tokens that are retrieval documents in a run's first `batches` batches."""
    from jaxopd.data.pipeline import make_pipeline
    from jaxopd.training.config import load_config_file

    run = load_config_file(config)
    iterator = make_pipeline(run.data, seq_len=seq_len, batch_size=run.batch_size, seed=run.seed, process_index=0,
                             process_count=1)
    for _ in range(batches):
        next(iterator)
    return iterator.stats["tokens_retrieval"] / iterator.stats["tokens_read"]


def _training(log: str) -> str:
    """"steps 0 -> N in S s" from the loop's last line, or the progress bar's last count of a run stopped early."""
    done = re.findall(r"^done: (steps .*? in \d+ s)", log, re.MULTILINE)
    if done:
        return done[-1]
    progress = re.findall(r"(\d+)/\d+ \[([\d:]+)<", log)
    return f"stopped at step {progress[-1][0]} after {progress[-1][1]}" if progress else "no log"


def eval_losses(workdir: pathlib.Path, steps: int) -> str:
    """"first -> last" held-out eval/ce_loss of a run (on its own rows), from its metrics.jsonl, up to `steps`."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["eval/ce_loss"]) for r in records if "eval/ce_loss" in r and r["step"] <= steps]
    return f"{losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} (step {losses[-1][0]})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def key_digit_losses(checkpoint: pathlib.Path, samples: int, seed: int = 0) -> dict[str, Any]:
    """The NIAH evaluation's own cases (same seed, so the same needles and filler), scored by teacher forcing
    instead of greedy decoding: the mean loss (nats) of the key's digits after the question, per depth x length
    cell, `[len(depths)][len(lengths)]`. Chance is ln 10 = 2.30 a digit; a graded reading where exact-match scores
    are all 0 or all 1."""
    from jaxopd.distill.teacher import load_model
    from jaxopd.evaluate import niah, perplexity
    from jaxopd.evaluate.inputs import checkpoint_tokenizer, parse_lengths, token_stream
    from jaxopd.training import sharding
    from jaxopd.training.config import MeshConfig

    lengths, depths = parse_lengths(NIAH_LENGTHS), [float(depth) for depth in NIAH_DEPTHS.split(",")]
    tokenizer = checkpoint_tokenizer(checkpoint)
    filler = token_stream(tokenizer, "data/corpus/python_stdlib.jsonl.gz", max(lengths))
    cases = niah.make_cases(tokenizer, filler, lengths, depths, samples, seed)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
    model, params = load_model(checkpoint, mesh)
    cell_losses: dict[tuple[int, float], list[float]] = {}
    for length in lengths:
        group = [case for case in cases if case.length == length]
        answers = [tokenizer.encode(case.needle.answer) for case in group]
        rows = np.asarray([case.tokens + answer for case, answer in zip(group, answers)], np.int32)
        losses = perplexity.token_losses(model, params, mesh, rows, batch_size=len(group))
        for case, answer, row in zip(group, answers, losses):
            digits = [len(case.tokens) + i for i, token in enumerate(answer) if tokenizer.decode([token]).isdigit()]
            cell_losses.setdefault((length, case.depth), []).append(float(row[digits].mean()))
    return {"lengths": lengths, "depths": depths, "samples": samples, "seed": seed,
            "losses": [[float(np.mean(cell_losses[length, depth])) for length in lengths] for depth in depths]}


def perplexity_figure(results: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
    from jaxopd.evaluate.figures import pyplot
    from jaxopd.evaluate.inputs import format_length

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6.5, 4.0))
    for name, label, _, _ in RUNS:
        buckets = results[name]["perplexity"]["buckets"]
        ends = [bucket["end"] for bucket in buckets]
        axes.plot(ends, [bucket["perplexity"] for bucket in buckets], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_xticks(ends, [format_length(end) for end in ends])
    axes.minorticks_off()
    axes.set_yscale("log")
    axes.axvline(256, color="grey", linestyle=":", label="stage 0 window (256)")
    axes.set_xlabel("Token position (bucket end)")
    axes.set_ylabel("Perplexity")
    axes.set_title("Loss by position, bundled Python corpus")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def section(args: argparse.Namespace, results: dict[str, dict[str, Any]], logs: dict[str, str],
            shares: dict[str, float]) -> str:
    lines = [BEGIN, "", "```"]
    commands = train_commands(args)
    for name, _, _, _ in RUNS:
        lines.append("python " + " ".join(commands[name]))
    for name, _, _, _ in RUNS:
        lines += ["python " + " ".join(command) for command in eval_commands(args, name).values()]
    lines += ["```", "", f"Driver: `PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/long_context_demo.py "
              f"--steps0 {args.steps0} --steps1 {args.steps1} --samples {args.samples} "
              f"--num_sequences {args.num_sequences}`.", ""]
    steps = {name: args.steps1 if trained else args.steps0 for name, _, _, trained in RUNS}
    lines += _table(["run", "steps", "rows", "retrieval share of training tokens", "training",
                     "held-out eval ce_loss on its rows"],
                    [[label, str(steps[name]), "2048" if trained else "256", f"{shares[name]:.2f}",
                      _training(logs[name]), eval_losses(REPO / run_workdir(args, name), steps[name])]
                     for name, label, _, trained in RUNS])
    buckets = results[RUNS[0][0]]["perplexity"]["buckets"]
    lines += ["", "Perplexity by position bucket [start, end) on the bundled corpus "
              f"({args.num_sequences} windows of {buckets[-1]['end']} tokens, seed 0):", ""]
    lines += _table(["run", *[f"[{b['start']}, {b['end']})" for b in buckets]],
                    [[label, *[f"{b['perplexity']:.2f}" for b in results[name]["perplexity"]["buckets"]]]
                     for name, label, _, _ in RUNS])
    lengths, depths = results[RUNS[0][0]]["niah"]["lengths"], results[RUNS[0][0]]["niah"]["depths"]
    lines += ["", "The same needles scored by teacher forcing: mean loss of the key's 6 digits after the question, "
              "nats a digit (chance ln 10 = 2.30), over depths and needles:", ""]
    lines += _table(["run", *map(str, lengths)],
                    [[label, *[f"{np.mean([row[i] for row in results[name]['key_digits']['losses']]):.2f}"
                               for i in range(len(lengths))]] for name, label, _, _ in RUNS])
    lines += ["", f"Needle in a haystack, mean score over {len(depths)} depths x {args.samples} needles per length "
              "(corpus filler, greedy, exact 6 digits):", ""]
    lines += _table(["run", *map(str, lengths)],
                    [[label, *[f"{np.mean([row[i] for row in results[name]['niah']['scores']]):.2f}"
                               for i in range(len(lengths))]] for name, label, _, _ in RUNS])
    for name, label, _, _ in RUNS:
        lines += ["", f"{label}: score by depth (rows) and length (columns), "
                  f"[figure](long_context/{name}_niah.png)", ""]
        lines += _table(["depth", *map(str, lengths)],
                        [[f"{depth:g}", *[f"{score:.2f}" for score in row]]
                         for depth, row in zip(depths, results[name]["niah"]["scores"])])
    lines += ["", "Figures: [perplexity of the three](long_context/perplexity.png), and per run "
              "`long_context/<run>_perplexity.png`, `<run>_niah.png`; the JSON of every evaluation beside them.",
              "", END]
    return "\n".join(lines)


def write_section(text: str) -> None:
    results = RESULTS.read_text()
    if BEGIN in results:
        start, end = results.index(BEGIN), results.index(END) + len(END)
        RESULTS.write_text(results[:start] + text + results[end:])
    else:
        RESULTS.write_text(results.rstrip("\n") + f"\n\n{SECTION}\n\n{text}\n")


def main() -> None:
    args = _parser().parse_args()
    FIGURES.mkdir(parents=True, exist_ok=True)
    logs, results, shares = {}, {}, {}
    for name, command in train_commands(args).items():
        steps, workdir = args.steps0 if name == RUNS[0][0] else args.steps1, REPO / run_workdir(args, name)
        # The log is kept in the workdir, so that a later call that does not train again can still report it.
        if args.retrain or not _finished(workdir, steps):
            log, _ = _run(command)
            (workdir / "train.log").write_text(log)
        logs[name] = (workdir / "train.log").read_text()
        print(name, _training(logs[name]), flush=True)
    for name, _, config, _ in RUNS:
        shares[name] = retrieval_share(config, 256 if name == RUNS[0][0] else 2048)
        results[name] = {}
        for kind, command in eval_commands(args, name).items():
            directory = REPO / run_workdir(args, name) / "eval"
            if args.retrain or _stale(directory / f"{kind}.json", directory.parent):
                output, seconds = _run(command)
                print(output.strip().splitlines()[-1], f"({seconds:.0f} s)", flush=True)
            results[name][kind] = json.loads((directory / f"{kind}.json").read_text())
            shutil.copy(directory / f"{kind}.png", FIGURES / f"{name}_{kind}.png")
            shutil.copy(directory / f"{kind}.json", FIGURES / f"{name}_{kind}.json")
        path = FIGURES / f"{name}_key_digits.json"
        if args.retrain or _stale(path, directory.parent):
            path.write_text(json.dumps(key_digit_losses(REPO / run_workdir(args, name), args.samples), indent=2) + "\n")
        results[name]["key_digits"] = json.loads(path.read_text())
    perplexity_figure(results, FIGURES / "perplexity.png")
    text = section(args, results, logs, shares)
    print(text)
    if not args.no_results:
        write_section(text)


if __name__ == "__main__":
    main()
