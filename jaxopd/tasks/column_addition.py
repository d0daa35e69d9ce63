"""Sums of several multi-digit numbers worked column by column with carries, every digit tagged with a letter (an
index hint) so that a small model finds it by content rather than by position: a task whose completions are long
(48-49 tokens for the bundled 3 numbers of 3 digits) and where one early mistake reaches the answer. A generator,
an exact checker, the first wrong step of a completion, and a character-level tokenizer. Write the bundled files with

    python -m jaxopd.tasks.column_addition --out data/tasks/column_addition

A problem adds up to 4 numbers of one width (up to 4 digits); the bundled ones, 3 numbers of 3 digits (a teacher
learns that shape in minutes, train_teacher.py). Each digit follows its tag, one letter per (number, column):
number j's column c (c = 0 for the units) is `TAGS[j * MAX_WIDTH + c]`, so 347 + 185 + 126 is

    c3b4a7+g1f8e5+k1j2i6=

Its worked solution has one step per column, units first: the column's tagged digits, the carry in, "=" and the
column's sum as two digits (carry out, digit); after ";" comes the answer, the last carry (when not 0) then each
column's digit from the last column to the first, tagged with the first number's letter for that column:

    a7+e5+i6+0=18,b4+f8+j2+1=15,c3+g1+k1+1=06;c6b5a8

Why tags in the solution too: each digit is then a copy of what follows the same letter earlier on (what an
induction head does), and each letter follows from the step's previous one; without them a tiny model must count
its way to the j-th number's digit and did not learn to (0.0 eval accuracy, train_teacher.py). A wrong carry is the
next step's carry in, so it changes that column's digit of the answer (and any carries it starts); a wrong column
digit reaches the answer directly. Every character is one token. Prompt files are JSON Lines
{"prompt", "answer" (the decimal sum), "solution"}; the checker and `first_wrong_step` recompute both from the prompt.
"""

from __future__ import annotations

import argparse
import pathlib
import re
from typing import NamedTuple, Optional, Sequence

import numpy as np

from jaxopd.tasks.arithmetic import BOS, EOS, PAD, write_jsonl, write_tokenizer

MAX_OPERANDS, MAX_WIDTH = 4, 4
TAGS = "abcdefghijklmnop"  # MAX_OPERANDS * MAX_WIDTH letters, number-major
STEP_SEPARATOR, ANSWER_SEPARATOR = ",", ";"
CHARACTERS = "0123456789+=" + STEP_SEPARATOR + ANSWER_SEPARATOR + TAGS
VOCAB = (PAD, BOS, EOS, *CHARACTERS)
# The bundled problems' shape (operand count and width, each (low, high)): 3-4 numbers of 3-4 digits gave a 96-wide
# 3-layer teacher 0.031 greedy accuracy after 600 steps, exactly 3 of 3 digits 0.27 after 500 (benchmarks/RESULTS.md).
BUNDLED_OPERANDS, BUNDLED_WIDTHS = (3, 3), (3, 3)
_PROBLEM = re.compile(rf"^[{TAGS}]\d(?:[{TAGS}]\d)*(?:\+[{TAGS}]\d(?:[{TAGS}]\d)*)+=$")


def tag(number: int, column: int) -> str:
    """The letter before number `number`'s digit in column `column` (0 = units), both counted from 0."""
    return TAGS[number * MAX_WIDTH + column]


def tagged(numbers: Sequence[str]) -> str:
    """The prompt adding `numbers` (decimal strings of one width): "347", "185" -> "c3b4a7+g1f8e5=" ."""
    width = len(numbers[0])
    return "+".join("".join(tag(j, width - 1 - i) + digit for i, digit in enumerate(number))
                    for j, number in enumerate(numbers)) + "="


def operands(prompt: str) -> list[str]:
    """The numbers `prompt` adds, as decimal strings without their tags; the tags must be the ones `tagged` writes."""
    numbers = re.sub(f"[{TAGS}]", "", prompt[:-1]).split("+")
    if (_PROBLEM.match(prompt) is None or len({len(number) for number in numbers}) != 1
            or len(numbers) > MAX_OPERANDS or len(numbers[0]) > MAX_WIDTH or tagged(numbers) != prompt):
        raise ValueError(f"prompt {prompt!r} is not a column addition problem: up to {MAX_OPERANDS} numbers of one "
                         f"width (at most {MAX_WIDTH} digits), each digit after its tag, e.g. 'b4a7+f8e5=' for 47+85")
    return numbers


def steps(prompt: str) -> list[str]:
    """The worked solution of `prompt` as its steps: one per column (units first), then the answer."""
    numbers = operands(prompt)
    width = len(numbers[0])
    carry, columns, digits = 0, [], []
    for column in range(width):
        column_digits = [number[width - 1 - column] for number in numbers]
        total = sum(int(digit) for digit in column_digits) + carry
        columns.append("+".join(tag(j, column) + digit for j, digit in enumerate(column_digits))
                       + f"+{carry}={total:02d}")
        carry, digit = divmod(total, 10)
        digits.append(tag(0, column) + str(digit))
    return columns + [(str(carry) if carry else "") + "".join(reversed(digits))]


def solution(prompt: str) -> str:
    """The whole worked completion of `prompt` (module docstring), without EOS."""
    *columns, answer_text = steps(prompt)
    return STEP_SEPARATOR.join(columns) + ANSWER_SEPARATOR + answer_text


def answer(prompt: str) -> str:
    """The sum `prompt` asks for, in decimal: what `solution` ends with once its tags are dropped."""
    return str(sum(int(number) for number in operands(prompt)))


def _text(completion: str) -> str:
    """A decoded completion up to its first EOS, padding removed."""
    return completion.split(EOS, 1)[0].replace(PAD, "")


def _prompt(row: dict) -> str:
    if "prompt" not in row:
        raise KeyError(f"the row has no 'prompt' field (fields: {sorted(row)}); column_addition rows are "
                       "{'prompt': 'c3b4a7+g1f8e5+...=', ...}")
    return row["prompt"]


def grade(row: dict, completion: str) -> float:
    """1.0 when what follows the completion's last ";" is exactly the solution's answer (the sum, its digits
    tagged), else 0.0: the final answer alone is graded, whatever the steps before it say (`first_wrong_step` reads
    those)."""
    text = _text(completion)
    if ANSWER_SEPARATOR not in text:
        return 0.0
    return float(text.rsplit(ANSWER_SEPARATOR, 1)[1] == steps(_prompt(row))[-1])


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


def make_problems(count: int, *, operand_counts: tuple[int, int] = BUNDLED_OPERANDS,
                  widths: tuple[int, int] = BUNDLED_WIDTHS, seed: int = 0) -> list[dict[str, str]]:
    """`count` distinct problems in a fixed order for `seed`: the number of operands uniform in `operand_counts`
    and their width uniform in `widths` (both inclusive), each operand uniform among the numbers of that width.
    One width per problem, so every column has a digit of every operand and a step's shape is fixed by the count."""
    if not 2 <= operand_counts[0] <= operand_counts[1] <= MAX_OPERANDS or not 1 <= widths[0] <= widths[1] <= MAX_WIDTH:
        raise ValueError(f"operand_counts={operand_counts} must be (low, high) with 2 <= low <= high <= "
                         f"{MAX_OPERANDS} and widths={widths} (low, high) with 1 <= low <= high <= {MAX_WIDTH} "
                         "(the tags name that many numbers and columns)")
    rng = np.random.default_rng(seed)
    problems: dict[str, dict[str, str]] = {}
    while len(problems) < count:
        width = int(rng.integers(widths[0], widths[1] + 1))
        numbers = rng.integers(10 ** (width - 1), 10 ** width, size=int(rng.integers(operand_counts[0],
                                                                                     operand_counts[1] + 1)))
        prompt = tagged([str(number) for number in numbers])
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
