"""Graders: the math answer extraction and numeric comparison on hand-written cases, exact match, regex, a user's
grader by import path (this module's), a raising grader counted and not fatal, and the errors for bad names."""

import pytest

from jaxopd.distill import graders


def answer_of_row(row, completion):  # a user's grader, imported as tests.distill.test_graders:answer_of_row
    return float(completion.strip().endswith(row["answer"]))


def raises_on_negative(row, completion):
    if row["answer"].startswith("-"):
        raise RuntimeError("negative answers are not supported")
    return 1.0


@pytest.mark.parametrize("text, extracted", [
    ("so the total is \\boxed{42}.", "42"),
    ("first \\boxed{1}, then corrected: \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box, nested braces
    ("\\boxed{x^{2}+1} done", "x^{2}+1"),
    ("Adding up.\n#### 1,234\n", "1,234"),
    ("It costs $12.50 and then 3 more, 15.5 in all", "15.5"),
    ("the answer is -7", "-7"),
    ("a third is 1/3", "1/3"),
    ("no digits at all", None),
    ("\\boxed{unclosed 3", "3"),  # an unclosed box falls back to the last number
])
def test_math_answer_extraction(text, extracted):
    assert graders.math_answer(text) == extracted


@pytest.mark.parametrize("given, expected, equal", [
    ("1,234", "1234", True), ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("$12", "12", True),
    ("12.", "12", True), ("-3", "3", False), ("12", "12.01", False), ("x+1", " x+1 ", True), ("x+1", "x+2", False),
    (None, "1", False),
])
def test_numeric_comparison(given, expected, equal):
    assert graders.answers_equal(given, expected) is equal


def test_built_in_graders():
    math = graders.build("math")
    assert math({"answer": "1234"}, "We add. #### 1,234") == 1.0 and math({"answer": 5}, "\\boxed{6}") == 0.0
    exact = graders.build("exact_match", answer_field="target")
    assert exact({"target": "Paris"}, " Paris\n") == 1.0 and exact({"target": "Paris"}, "paris") == 0.0
    regex = graders.build("regex", pattern=r"^\d+$")
    assert regex({}, "123") == 1.0 and regex({}, "12a") == 0.0
    arithmetic = graders.build("arithmetic")
    assert arithmetic({"prompt": "12+30="}, "42") == 1.0 and arithmetic({"prompt": "12+30="}, "43") == 0.0
    column_addition = graders.build("column_addition")
    worked = "a2+e0+i0+0=02,b1+f3+j1+0=05;b5a2"  # 12 + 30 + 10: the answer after ";" is graded
    assert column_addition({"prompt": "b1a2+f3e0+j1i0="}, worked) == 1.0
    assert column_addition({"prompt": "b1a2+f3e0+j1i0="}, worked[:-1] + "3") == 0.0
    assert graders.build("") is None


def test_a_grader_by_import_path_and_a_raising_one_is_counted_not_fatal():
    mine = graders.build("tests.distill.test_graders:answer_of_row")
    assert mine({"answer": "7"}, "it is 7") == 1.0
    rows = [{"answer": "1"}, {"answer": "-2"}, {"answer": "3"}, {"answer": "-4"}]
    grades = graders.grade(graders.build("tests.distill.test_graders:raises_on_negative"), rows, ["a"] * 4)
    assert grades.rewards.tolist() == [1.0, 0.0, 1.0, 0.0] and grades.errors == 2
    assert grades.first_error.startswith("RuntimeError: negative answers are not supported (row {'answer': '-2'}")
    missing = graders.grade(graders.build("math"), [{"question": "q"}], ["\\boxed{1}"])
    assert missing.errors == 1 and "no 'answer' field" in missing.first_error and "distill.answer_field" in \
        missing.first_error
    nan = graders.grade(lambda row, completion: float("nan"), [{}], ["x"])
    assert nan.errors == 1 and nan.rewards.tolist() == [0.0]


@pytest.mark.parametrize("spec, pattern, message", [
    ("nope", "", r"distill.grader='nope' is not a grader: use one of exact_match, math, regex, arithmetic"),
    ("no_such_module_xyz:f", "", r"distill.grader='no_such_module_xyz:f': cannot import module 'no_such_module_xyz'"),
    ("tests.distill.test_graders:missing", "", r"module 'tests.distill.test_graders' has no function 'missing'"),
    ("regex", "", r"distill.grader='regex' needs distill.grader_pattern"),
    ("regex", "(", r"not a regular expression"),
])
def test_bad_grader_names_are_errors_naming_them(spec, pattern, message):
    with pytest.raises(ValueError, match=message):
        graders.build(spec, pattern=pattern)


def test_an_unresolvable_grader_stops_a_run_before_step_1(tmp_path):
    from jaxopd import train
    from jaxopd.training.config import load_config_file

    config = load_config_file("tiny_distill", {"workdir": str(tmp_path / "run"), "distill.grader": "nowhere:grade",
                                               "batch_size": 16, "microbatch_size": 16, "progress_bar": False,
                                               "distill.eval_prompts_count": 8})
    with pytest.raises(ValueError, match="distill.grader='nowhere:grade': cannot import module 'nowhere'"):
        train.train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
