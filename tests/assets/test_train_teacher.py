"""The teacher/student script's task table: the longest problem each task's generator can write fits its sampling
lengths and its CE rows whole, so no teacher is trained on cut documents or asked for a cut completion."""

import pytest

from jaxopd.assets.tasks import train_teacher
from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.tasks import column_addition

# The generators' largest problems: 2-digit addition (arithmetic's default), 4 numbers of 4 digits.
LONGEST = {"arithmetic": ("99+99=", "198"),
           "column_addition": (column_addition.tagged(["9999"] * 4), column_addition.solution(
               column_addition.tagged(["9999"] * 4)))}


@pytest.mark.parametrize("name", sorted(train_teacher.TASKS))
def test_the_longest_problem_fits_the_sampler_and_a_training_row(name):
    task = train_teacher.TASKS[name]
    tokenizer = load_tokenizer(task.directory / "tokenizer.json")
    prompt, completion = LONGEST[name]
    prompt_tokens, completion_tokens = 1 + len(tokenizer.encode(prompt)), len(tokenizer.encode(completion)) + 1
    assert prompt_tokens <= task.max_prompt_len and completion_tokens <= task.max_new_tokens
    assert prompt_tokens + completion_tokens <= task.seq_len
    assert prompt_tokens + completion_tokens <= task.teacher_model["max_position_embeddings"]
    assert prompt_tokens + completion_tokens <= task.student_model["max_position_embeddings"]
    assert task.teacher_model["scan_layers"] is False and task.student_model["scan_layers"] is False
    assert task.teacher_model["vocab_size"] == task.student_model["vocab_size"] == tokenizer.vocab_size


def test_the_column_addition_corpus_is_prompts_with_their_worked_solutions():
    documents = train_teacher.column_addition_documents(count=3000)
    assert len(set(documents)) == len(documents) > 2900
    for document in documents:
        prompt, completion = document.split("=", 1)
        assert completion == column_addition.solution(prompt + "=")
