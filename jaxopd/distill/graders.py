"""Graders: `grader(row, completion) -> float`, the reward of one completion of one prompt row, run on the host.

`row` is the prompt's row as read (its `answer`, metadata, the `prompt` or `messages`); `completion` is the decoded
completion without the EOS token that ended it. Pure OPD needs no grader (`distill.grader=""`): then there is no
reward and the eval reports reverse KL only. Built-ins (`distill.grader`):

- "exact_match": the completion, stripped, equals str(row[answer_field]) stripped.
- "math": the answer extracted from the completion — the last `\\boxed{...}` (nested braces), else `#### n`, else the
  last number — equals row[answer_field] as a number (1,234 = 1234; 0.5 = 1/2), or as stripped text otherwise.
- "regex": `re.search(distill.grader_pattern, completion)` finds a match.
- "arithmetic": the bundled addition task's checker (the answer computed from row["prompt"]).
- "column_addition": the bundled column-by-column sums task's checker: the answer after the completion's last ";"
  equals the sum that row["prompt"] asks for (jaxopd/tasks/column_addition.py).
- "package.module:function": a function of the user's, called as function(row, completion) -> float.

A grader that raises on a row does not stop the run: `grade` scores that row 0, counts it and keeps the first error.
"""

from __future__ import annotations

import dataclasses
import fractions
import importlib
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np

Grader = Callable[[dict, str], float]
# The bundled tasks' checkers, each a grader by import path (imported only when named).
TASKS = {"arithmetic": "jaxopd.tasks.arithmetic:grade", "column_addition": "jaxopd.tasks.column_addition:grade"}
BUILT_IN = ("exact_match", "math", "regex", *TASKS)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def boxed_answer(text: str) -> Optional[str]:
    """The contents of the last `\\boxed{...}` in `text` (braces inside it balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index]
            depth -= 1
    return None  # unclosed


def math_answer(text: str) -> Optional[str]:
    """The final answer a solution states: the last \\boxed{...}, else what follows the last `####`, else the last
    number in the text; None when there is none."""
    boxed = boxed_answer(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def as_number(text: str) -> Optional[fractions.Fraction]:
    """`text` as an exact number ("1,234", "-0.5", "3/4", "$12", "12."), or None when it is not one number."""
    cleaned = text.strip().strip("$").rstrip(".").replace(",", "").replace(" ", "")
    if cleaned.startswith("\\frac{") and cleaned.endswith("}"):  # \frac{a}{b}
        parts = cleaned[len("\\frac{"):-1].split("}{")
        cleaned = "/".join(parts) if len(parts) == 2 else cleaned
    try:
        return fractions.Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(given: Optional[str], expected: Any) -> bool:
    """Numerically equal when both read as numbers, else equal as stripped text."""
    if given is None:
        return False
    expected = str(expected)
    given_number, expected_number = as_number(given), as_number(expected)
    if given_number is not None and expected_number is not None:
        return given_number == expected_number
    return given.strip() == expected.strip()


def _field(row: dict, name: str) -> Any:
    if name not in row:
        raise KeyError(f"the row has no {name!r} field (fields: {sorted(row)}); set distill.answer_field")
    return row[name]


def build(spec: str, *, answer_field: str = "answer", pattern: str = "", key: str = "distill.grader"
          ) -> Optional[Grader]:
    """The grader `spec` names (module docstring), or None for "" (no grader). ValueError naming `key` for an
    unknown name, an import path that does not resolve, or "regex" without a valid pattern."""
    if not spec:
        return None
    if spec == "exact_match":
        return lambda row, completion: float(completion.strip() == str(_field(row, answer_field)).strip())
    if spec == "math":
        return lambda row, completion: float(answers_equal(math_answer(completion), _field(row, answer_field)))
    if spec == "regex":
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{key}='regex' with distill.grader_pattern={pattern!r}: not a regular expression "
                             f"({error})") from error
        if not pattern:
            raise ValueError(f"{key}='regex' needs distill.grader_pattern (a Python regular expression)")
        return lambda row, completion: float(compiled.search(completion) is not None)
    if ":" not in spec and spec not in TASKS:
        raise ValueError(f"{key}={spec!r} is not a grader: use one of {', '.join(BUILT_IN)}, '' for none, or "
                         "'package.module:function' for your own")
    module_name, _, function_name = TASKS.get(spec, spec).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{key}={spec!r}: cannot import module {module_name!r} ({error}); is it installed or on "
                         "PYTHONPATH?") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{key}={spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


@dataclasses.dataclass
class Grades:
    """Rewards `[rows]` float32, how many rows the grader raised on, and the first such error with its row."""

    rewards: np.ndarray
    errors: int
    first_error: Optional[str]


def grade(grader: Grader, rows: Sequence[dict], completions: Sequence[str]) -> Grades:
    """`grader` on every (row, completion); a row it raises on, or returns a non-number for, scores 0 and is counted."""
    rewards, errors, first = [], 0, None
    for row, completion in zip(rows, completions):
        try:
            reward = float(grader(row, completion))
            if not np.isfinite(reward):
                raise ValueError(f"returned {reward}")
        except Exception as error:  # a user's grader may raise anything; the run goes on
            errors += 1
            first = first or f"{type(error).__name__}: {error} (row {row!r}, completion {completion!r})"
            reward = 0.0
        rewards.append(reward)
    return Grades(np.asarray(rewards, np.float32), errors, first)
