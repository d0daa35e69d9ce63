"""Chat-formatted math word problems: a small generated prompt set in the shape users bring (chat `messages` with a
system prompt, and an `answer` field for the math grader), for the real-use config (configs/opd_qwen3.py) and its
tests. Write the bundled files with

    python -m jaxopd.tasks.math_chat --out data/tasks/math_chat

Each line: {"messages": [{"role": "system", ...}, {"role": "user", "content": "<problem>"}], "answer": "<integer>"}.
The problems are one- or two-step (sums, differences, products, shares); the answer is exact.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Callable, Iterator, Sequence

import numpy as np

SYSTEM = "Solve the problem. Reason step by step, then give the final answer as \\boxed{<number>}."
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards")
NAMES = ("Ada", "Ben", "Chen", "Dana", "Emil", "Farah", "Goro", "Hana")


def _problems(rng: np.random.Generator) -> Callable[[], tuple[str, int]]:
    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    def one() -> tuple[str, int]:
        name, other, item = pick(NAMES), pick(NAMES), pick(ITEMS)
        a, b, c = (int(x) for x in rng.integers(2, 60, size=3))
        kind = int(rng.integers(5))
        if kind == 0:
            return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
        if kind == 1:
            a, b = max(a, b), min(a, b)
            return f"{name} had {a} {item} and gave {b} to {other}. How many {item} are left?", a - b
        if kind == 2:
            a, b = a % 12 + 2, b % 12 + 2
            return f"There are {a} boxes with {b} {item} in each. How many {item} are there in all?", a * b
        if kind == 3:
            share, people = a % 15 + 1, b % 8 + 2
            return (f"{name} shares {share * people} {item} equally among {people} friends. How many {item} does "
                    f"each friend get?", share)
        a, b = a % 12 + 2, b % 12 + 2
        return (f"{name} buys {a} packs of {item} with {b} in each pack, then loses {c % (a * b)} of them. "
                f"How many {item} does {name} have?", a * b - c % (a * b))
    return one


def rows(count: int, seed: int) -> Iterator[dict]:
    """`count` distinct problems as prompt rows, in a fixed order for `seed`."""
    problem = _problems(np.random.default_rng(seed))
    seen: set[str] = set()
    while len(seen) < count:
        text, value = problem()
        if text in seen:
            continue
        seen.add(text)
        yield {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
               "answer": str(value)}


def write(out: str | pathlib.Path, train: int = 512, eval_count: int = 64, seed: int = 0) -> None:
    """train.jsonl and eval.jsonl, disjoint (drawn from one stream)."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    every = list(rows(train + eval_count, seed))
    for name, part in (("train.jsonl", every[:train]), ("eval.jsonl", every[train:])):
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in part))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxopd.tasks.math_chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write(args.out, args.train, args.eval, args.seed)
    print(f"wrote {args.out}/train.jsonl ({args.train} rows) and eval.jsonl ({args.eval} rows)")


if __name__ == "__main__":
    main()
