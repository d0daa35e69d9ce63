"""Sums of several multi-digit numbers worked column by column with carries: a task whose completions are long
(36-81 tokens with the defaults) and where one early mistake reaches the answer. A generator, an exact checker, the
first wrong step of a completion, and a character-level tokenizer. Write the bundled files with

    python -m jaxopd.tasks.column_addition --out data/tasks/column_addition

A problem adds 3-5 numbers of one width (3-5 digits): `"347+185+126="`. Its worked solution has one step per
column, units first, each the column's digits, the carry in, "=" and the column's sum as two digits (carry out,
digit); after ";" comes the answer, the last carry (when not 0) then the digits from the last column to the first:

    7+5+6+0=18,4+8+2+1=15,3+1+1+1=06;658

A wrong carry is the next step's carry in, so it changes that column's digit of the answer (and any carries it
starts); a wrong column digit reaches the answer directly. Every character is one token. Prompt files are JSON Lines {"prompt", "answer", "solution"}; the checker
and `first_wrong_step` recompute both from the prompt.
"""

from __future__ import annotations

import argparse
import pathlib
import re
from typing import NamedTuple, Optional, Sequence

import numpy as np

from jaxopd.tasks.arithmetic import BOS, EOS, PAD, write_jsonl, write_tokenizer

STEP_SEPARATOR, ANSWER_SEPARATOR = ",", ";"
CHARACTERS = "0123456789+=" + STEP_SEPARATOR + ANSWER_SEPARATOR
VOCAB = (PAD, BOS, EOS, *CHARACTERS)
_PROBLEM = re.compile(r"^\d+(?:\+\d+)+=$")


def operands(prompt: str) -> list[str]:
    """The numbers `prompt` ("a+b+...=", all of one width) adds, as written."""
    numbers = prompt[:-1].split("+")
    if _PROBLEM.match(prompt) is None or len({len(number) for number in numbers}) != 1:
        raise ValueError(f"prompt {prompt!r} is not a column addition problem 'a+b+...=' of numbers of one width")
    return numbers


def steps(prompt: str) -> list[str]:
    """The worked solution of `prompt` as its steps: one per column (units first), then the answer."""
    numbers = operands(prompt)
    carry, columns, digits = 0, [], []
    for column in range(len(numbers[0]) - 1, -1, -1):
        column_digits = [number[column] for number in numbers]
        total = sum(int(digit) for digit in column_digits) + carry
        columns.append("+".join(column_digits) + f"+{carry}={total:02d}")
        carry, digit = divmod(total, 10)
        digits.append(str(digit))
    return columns + [(str(carry) if carry else "") + "".join(reversed(digits))]


def solution(prompt: str) -> str:
    """The whole worked completion of `prompt` (module docstring), without EOS."""
    *columns, answer_text = steps(prompt)
    return STEP_SEPARATOR.join(columns) + ANSWER_SEPARATOR + answer_text


def answer(prompt: str) -> str:
    """The sum `prompt` asks for, in decimal: what `solution` ends with."""
    return str(sum(int(number) for number in operands(prompt)))


def _text(completion: str) -> str:
    """A decoded completion up to its first EOS, padding removed."""
    return completion.split(EOS, 1)[0].replace(PAD, "")


def _prompt(row: dict) -> str:
    if "prompt" not in row:
        raise KeyError(f"the row has no 'prompt' field (fields: {sorted(row)}); column_addition rows are "
                       "{'prompt': 'a+b+...=', ...}")
    return row["prompt"]


def grade(row: dict, completion: str) -> float:
    """1.0 when what follows the completion's last ";" is exactly the sum, else 0.0: the final answer alone is
    graded, whatever the steps before it say (`first_wrong_step` reads those)."""
    text = _text(completion)
    if ANSWER_SEPARATOR not in text:
        return 0.0
    return float(text.rsplit(ANSWER_SEPARATOR, 1)[1] == answer(_prompt(row)))


class WrongStep(NamedTuple):
    """Where a completion first departs from the worked solution: `step` counts the columns from 0 (units) and
    equals the column count for the answer; `offset` is the character, so also the token, of the completion."""

    step: int
    offset: int


def first_wrong_step(row: dict, completion: str) -> Optional[WrongStep]:
    """The first step of `completion` that differs from the worked solution of row["prompt"], or None when the
    completion is that solution. A completion cut short is wrong where it stops; one that goes on past the answer
    is wrong in the answer."""
    reference, text = solution(_prompt(row)), _text(completion)
    offset = next((index for index, (given, expected) in enumerate(zip(text, reference)) if given != expected),
                  min(len(text), len(reference)))
    if offset == len(text) == len(reference):
        return None
    # A separator belongs to the step it ends, so a missing "," is a wrong step, not a wrong next one.
    step = sum(character in (STEP_SEPARATOR, ANSWER_SEPARATOR) for character in reference[:offset])
    return WrongStep(step, offset)


def make_problems(count: int, *, operand_counts: tuple[int, int] = (3, 5), widths: tuple[int, int] = (3, 5),
                  seed: int = 0) -> list[dict[str, str]]:
    """`count` distinct problems in a fixed order for `seed`: the number of operands uniform in `operand_counts`
    and their width uniform in `widths` (both inclusive), each operand uniform among the numbers of that width.
    One width per problem, so every column has a digit of every operand and a step's shape is fixed by the count."""
    if not 2 <= operand_counts[0] <= operand_counts[1] or not 1 <= widths[0] <= widths[1]:
        raise ValueError(f"operand_counts={operand_counts} must be (low, high) with 2 <= low <= high and "
                         f"widths={widths} (low, high) with 1 <= low <= high")
    rng = np.random.default_rng(seed)
    problems: dict[str, dict[str, str]] = {}
    while len(problems) < count:
        width = int(rng.integers(widths[0], widths[1] + 1))
        numbers = rng.integers(10 ** (width - 1), 10 ** width, size=int(rng.integers(operand_counts[0],
                                                                                     operand_counts[1] + 1)))
        prompt = "+".join(str(number) for number in numbers) + "="
        problems.setdefault(prompt, {"prompt": prompt, "answer": answer(prompt), "solution": solution(prompt)})
    return list(problems.values())


def write(out: str | pathlib.Path, train: int = 2000, eval_count: int = 256, seed: int = 0) -> None:
    """tokenizer.json, tokenizer_config.json, and train.jsonl and eval.jsonl, disjoint (drawn from one stream)."""
    out = pathlib.Path(out)
    write_tokenizer(out, VOCAB)
    every = make_problems(train + eval_count, seed=seed)
    write_jsonl(out / "train.jsonl", every[:train])
    write_jsonl(out / "eval.jsonl", every[train:])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxopd.tasks.column_addition", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/tasks/column_addition")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write(args.out, args.train, args.eval, args.seed)
    print(f"wrote {args.out}: tokenizer ({len(VOCAB)} tokens), {args.train} train and {args.eval} eval problems")


if __name__ == "__main__":
    main()
