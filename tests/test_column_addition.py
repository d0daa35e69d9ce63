"""The column addition task: the checker and first wrong step on hand-written right and wrong solutions, every
generated step against digit arithmetic, the generator's determinism and ranges, the bundled files equal to what
the generator writes, and prompts and solutions round-tripping through the task's tokenizer."""

import json
import pathlib
import re

import pytest

from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.distill import graders
from jaxopd.tasks import column_addition
from jaxopd.tasks.column_addition import WrongStep

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "tasks" / "column_addition"
ROW = {"prompt": "c3b4a7+g1f8e5+k1j2i6="}  # 347 + 185 + 126 = 658, tagged by hand
RIGHT = "a7+e5+i6+0=18,b4+f8+j2+1=15,c3+g1+k1+1=06;c6b5a8"  # worked by hand


@pytest.mark.parametrize("completion, reward, wrong", [
    (RIGHT, 1.0, None),
    (RIGHT + "<eos>12<pad><pad>", 1.0, None),  # nothing after EOS counts
    # The units carry dropped: the tens column and the answer inherit it.
    ("a7+e5+i6+0=08,b4+f8+j2+0=14,c3+g1+k1+1=06;c6b4a8", 0.0, WrongStep(0, 11)),
    # A wrong middle step whose answer still reads right: graded correct, but the step is found.
    ("a7+e5+i6+0=18,b4+f8+j2+1=16,c3+g1+k1+1=06;c6b5a8", 1.0, WrongStep(1, 26)),
    # The right digit under the wrong tag (the second number's units read as the third's): a wrong step.
    ("a7+e5+j6+0=18,b4+f8+j2+1=15,c3+g1+k1+1=06;c6b5a8", 1.0, WrongStep(0, 6)),
    ("a7+e5+i6+0=18,b4+f8+j2+1=15,c3+g1+k1+1=06;c6b6a8", 0.0, WrongStep(3, 45)),  # only the answer wrong
    ("a7+e5+i6+0=18,b4+f8", 0.0, WrongStep(1, 19)),  # cut short
    ("a7+e5+i6+0=18,b4+f8+j2+1=15;c3+g1+k1+1=06;c6b5a8", 1.0, WrongStep(1, 27)),  # a step ended by ";", not ","
    (RIGHT + "8", 0.0, WrongStep(3, len(RIGHT))),  # runs on past the answer
    ("c6b5a8", 0.0, WrongStep(0, 0)),  # no worked steps and no ";": no answer either
    (";c6b5a8", 1.0, WrongStep(0, 0)),  # the answer alone is graded right, its steps all missing
    (";658", 0.0, WrongStep(0, 0)),  # the sum without its tags is not the answer the solution writes
    ("", 0.0, WrongStep(0, 0)),
])
def test_grade_and_first_wrong_step_on_hand_written_solutions(completion, reward, wrong):
    assert column_addition.grade(ROW, completion) == reward
    assert column_addition.first_wrong_step(ROW, completion) == wrong


def test_solution_and_answer_match_the_hand_worked_example_with_a_final_carry():
    assert column_addition.tagged(["347", "185", "126"]) == ROW["prompt"]
    assert column_addition.solution(ROW["prompt"]) == RIGHT and column_addition.answer(ROW["prompt"]) == "658"
    assert (column_addition.solution("c9b9a9+g9f9e9+k9j9i9=")
            == "a9+e9+i9+0=27,b9+f9+j9+2=29,c9+g9+k9+2=29;2c9b9a7")


def _letter(number: int, place: int) -> str:
    """Number `number`'s tag for the digit of 10**place: four letters a number, from "a"."""
    return chr(ord("a") + 4 * number + place)


def _check_steps_by_digit_arithmetic(prompt: str, text: str) -> None:
    """Every step reads the column's digits off the numbers by integer division, under their letters, carries the
    previous step's tens, and the answer is Python's sum under the first number's letters: an independent reading
    of what a prompt and its worked solution must say."""
    numbers = [int(n) for n in re.sub("[a-z]", "", prompt[:-1]).split("+")]
    width = len(str(numbers[0]))
    assert prompt == "+".join("".join(_letter(j, place) + str(n // 10 ** place % 10)
                                      for place in reversed(range(width))) for j, n in enumerate(numbers)) + "="
    columns, answer_text = text.split(";")
    carry = 0
    for place, step in enumerate(columns.split(",")):
        left, total = step.split("=")
        assert left.split("+") == [_letter(j, place) + str(n // 10 ** place % 10) for j, n in enumerate(numbers)
                                   ] + [str(carry)], (prompt, step)
        assert int(total) == sum(n // 10 ** place % 10 for n in numbers) + carry and len(total) == 2
        carry = int(total) // 10
    total = str(sum(numbers))
    assert place == width - 1 and answer_text == total[:-width] + "".join(
        _letter(0, width - 1 - i) + digit for i, digit in enumerate(total[-width:]))


def _bundled() -> list[dict]:
    return [json.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (DATA / name).open()]


def test_every_bundled_solution_follows_from_digit_arithmetic_and_grades_right():
    grader = graders.build("column_addition")
    for row in _bundled():
        _check_steps_by_digit_arithmetic(row["prompt"], row["solution"])
        assert row["answer"] == str(eval(re.sub("[a-z]", "", row["prompt"][:-1])))  # Python's own arithmetic
        assert grader(row, row["solution"]) == 1.0 and column_addition.first_wrong_step(row, row["solution"]) is None


def test_first_wrong_step_finds_every_single_character_corruption():
    for row in _bundled()[:40]:
        reference = row["solution"]
        # The step of each character by the lengths of the steps (a separator ends its step): brute force.
        step_of = [index for index, step in enumerate(reference.replace(";", ",").split(",")) for _ in step + ","]
        for offset, character in enumerate(reference):
            wrong = "1" if character != "1" else "2"
            corrupted = reference[:offset] + wrong + reference[offset + 1:]
            assert column_addition.first_wrong_step(row, corrupted) == WrongStep(step_of[offset], offset)
            # Only the answer is graded: a corrupted column step still scores 1, a corrupted ";" or answer 0.
            assert column_addition.grade(row, corrupted) == float(offset < reference.index(";"))


@pytest.mark.parametrize("prompt", [
    "b1a2+g3f4e5=", "b1a2*f3e4=", "b1a2=", "+b1a2+f3e4=", "b1a2+f3e4",
    "12+34=",  # untagged
    "b1a2+b3a4=",  # the second number under the first's letters
    "a1b2+e3f4=",  # the letters in the wrong order
    "a1+e2+i3+m4+a5=",  # five numbers: more than the tags name
])
def test_a_prompt_that_is_not_a_problem_is_an_error(prompt):
    with pytest.raises(ValueError, match="not a column addition problem"):
        column_addition.grade({"prompt": prompt}, ";b4a6")
    with pytest.raises(KeyError, match="no 'prompt' field"):
        column_addition.first_wrong_step({"question": prompt}, ";b4a6")


def test_the_generator_is_deterministic_distinct_and_covers_its_ranges():
    problems = column_addition.make_problems(600, operand_counts=(2, 4), widths=(1, 3), seed=7)
    assert problems == column_addition.make_problems(600, operand_counts=(2, 4), widths=(1, 3), seed=7)
    assert problems != column_addition.make_problems(600, operand_counts=(2, 4), widths=(1, 3), seed=8)
    assert len({p["prompt"] for p in problems}) == 600
    shapes = {(p["prompt"].count("+") + 1, len(p["prompt"].split("+")[0]) // 2) for p in problems}
    assert shapes == {(count, width) for count in (2, 3, 4) for width in (1, 2, 3)}
    for problem in problems:
        assert all(str(int(n)) == n for n in re.sub("[a-z]", "", problem["prompt"][:-1]).split("+"))  # no 0 first
    for shape in (dict(operand_counts=(1, 3)), dict(operand_counts=(3, 5)), dict(widths=(3, 5))):
        with pytest.raises(ValueError, match="operand_counts"):
            column_addition.make_problems(1, **shape)


def test_the_bundled_files_are_what_the_generator_writes_and_eval_is_held_out(tmp_path):
    column_addition.main(["--out", str(tmp_path)])
    for name in ("train.jsonl", "eval.jsonl", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    train, held_out = ({json.loads(line)["prompt"] for line in (DATA / name).open()}
                       for name in ("train.jsonl", "eval.jsonl"))
    assert len(train) == 2000 and len(held_out) == 256 and not train & held_out


def test_prompts_and_solutions_round_trip_through_the_tokenizer_at_30_to_150_tokens():
    tokenizer = load_tokenizer(DATA / "tokenizer.json")
    assert tokenizer.vocab_size == len(column_addition.VOCAB) == 33
    assert tokenizer.eos_id == column_addition.VOCAB.index("<eos>") and tokenizer.pad_id == 0
    lengths = []
    for row in _bundled():
        for text in (row["prompt"], row["solution"]):
            ids = tokenizer.encode(text)
            # One token per character, none of them the unknown (= PAD) token, and back to the same text.
            assert len(ids) == len(text) and tokenizer.pad_id not in ids and tokenizer.decode(ids) == text
        lengths.append(len(tokenizer.encode(row["solution"])))
    assert 30 <= min(lengths) and max(lengths) <= 150
    assert (min(lengths), max(lengths)) == (48, 49)  # 3 three-digit numbers, without and with a final carry


def test_the_distill_config_fits_its_student_checkpoint_and_the_bundled_lengths():
    from jaxopd.bundled import resolve_path
    from jaxopd.training import config as config_lib
    from jaxopd.training.checkpoint import read_model_fields

    config = config_lib.load_config_file("column_addition_distill")
    run = config_lib.to_run_config(config)
    _, student_fields = read_model_fields(resolve_path(config.init_from.path))
    assert config_lib.to_model_config(config.model) == config_lib.to_model_config(
        config_lib.model_config_dict(student_fields))
    tokenizer = load_tokenizer(resolve_path(config.data.tokenizer))
    rows = _bundled()
    # BOS + prompt fits max_prompt_len, the longest solution + EOS max_new_tokens, and both the model's window.
    assert max(len(tokenizer.encode(row["prompt"])) + 1 for row in rows) == run.distill.max_prompt_len
    assert max(len(tokenizer.encode(row["solution"])) + 1 for row in rows) == run.distill.max_new_tokens
    assert run.seq_len == run.distill.max_prompt_len + run.distill.max_new_tokens <= run.model.max_position_embeddings
