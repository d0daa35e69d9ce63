"""The arithmetic task: checker against brute force, generator ranges, the bundled prompt sets and tokenizer."""

import itertools
import pathlib

import pytest

from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.tasks import arithmetic

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "tasks" / "arithmetic"


def test_checker_accepts_exactly_the_true_result_for_all_two_digit_problems():
    for left, right in itertools.product(range(0, 100, 7), range(0, 100, 3)):
        for op, truth in (("+", left + right), ("-", left - right)):
            if truth < 0:
                continue
            prompt = f"{left}{op}{right}="
            assert arithmetic.check(prompt, f"{truth}<eos>")
            assert arithmetic.check(prompt, f"{truth}<eos>99<pad><pad>")  # anything after EOS is ignored
            assert not arithmetic.check(prompt, f"{truth + 1}<eos>")
            assert not arithmetic.check(prompt, f"{truth}0<eos>")
            assert not arithmetic.check(prompt, f" {truth}")


def test_checker_rejects_a_prompt_that_is_not_a_problem():
    with pytest.raises(ValueError, match="not an arithmetic problem"):
        arithmetic.check("12*3=", "36")


def test_problems_respect_digit_bounds_and_ops():
    problems = arithmetic.make_problems(2000, max_digits=3, ops="+-", seed=3)
    for problem in problems:
        left, op, right = problem["prompt"][:-1].replace("-", " - ").replace("+", " + ").split()
        assert 1 <= len(left) <= 3 and 1 <= len(right) <= 3 and op in "+-"
        assert int(problem["answer"]) >= 0 and str(int(left)) == left  # no leading zeros, no negative results
    lengths = {len(p["prompt"]) for p in problems}
    assert min(lengths) == 4 and max(lengths) == 8  # "1+2=" .. "123+456="
    assert {p["prompt"][:-1].strip("0123456789")[0] for p in problems} == {"+", "-"}


def test_bundled_prompt_sets_are_correct_and_eval_is_held_out():
    train = list(arithmetic.read_jsonl(DATA / "train.jsonl"))
    held_out = list(arithmetic.read_jsonl(DATA / "eval.jsonl"))
    assert len(held_out) >= 256
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held_out}
    for problem in held_out + train[:500]:
        assert int(problem["answer"]) == eval(problem["prompt"][:-1])  # Python's own arithmetic as the reference


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tokenizer = load_tokenizer(DATA / "tokenizer.json")
    text = "907+96=1003"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert [tokenizer.id_to_token(i) for i in ids] == list(text)
    assert tokenizer.eos_id == arithmetic.VOCAB.index(arithmetic.EOS) and tokenizer.vocab_size == len(arithmetic.VOCAB)
