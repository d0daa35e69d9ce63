"""The chat-formatted math prompt set: each answer recomputed from the numbers in its text, the bundled files equal
what the generator writes, train and eval disjoint."""

import json
import pathlib
import re

from jaxopd.tasks import math_chat

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "tasks" / "math_chat"


def _solve(text: str) -> int:
    """The answer read off the wording, independently of the generator's arithmetic."""
    n = [int(x) for x in re.findall(r"\d+", text)]
    if "buys" in text and "more" in text:
        return n[0] + n[1]
    if "gave" in text:
        return n[0] - n[1]
    if "boxes" in text:
        return n[0] * n[1]
    if "equally" in text:
        return n[0] // n[1]
    return n[0] * n[1] - n[2]


def test_every_answer_follows_from_its_problem_and_the_bundled_files_are_the_generated_ones(tmp_path):
    math_chat.write(tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    rows = [json.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (DATA / name).open()]
    assert len(rows) == 576
    for row in rows:
        system, user = row["messages"]
        assert (system["role"], user["role"]) == ("system", "user") and "\\boxed{" in system["content"]
        assert int(row["answer"]) == _solve(user["content"]) >= 0, user["content"]
        if "equally" in user["content"]:
            numbers = [int(x) for x in re.findall(r"\d+", user["content"])]
            assert numbers[0] % numbers[1] == 0
    train = {json.dumps(r) for r in map(json.loads, (DATA / "train.jsonl").open())}
    assert not train & {json.dumps(r) for r in map(json.loads, (DATA / "eval.jsonl").open())}
