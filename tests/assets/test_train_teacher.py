"""The teacher/student script's task table: the longest problem each task's generator can write fits its sampling
lengths and its CE rows whole, so no teacher is trained on cut documents or asked for a cut completion."""

import pytest

from jaxopd.assets.tasks import train_teacher
from jaxopd.data.pipeline import make_pipeline
from jaxopd.data.tokenizer import load_tokenizer
from jaxopd.tasks import column_addition

# The generators' largest problems: 2-digit addition (arithmetic's default), 3 numbers of 3 digits (column_addition's).
LONGEST = {"arithmetic": ("99+99=", "198"),
           "column_addition": (column_addition.tagged(["999"] * 3), column_addition.solution(
               column_addition.tagged(["999"] * 3)))}


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
    for prompt, completion in documents:
        assert completion == column_addition.solution(prompt)


def test_column_addition_teacher_rows_train_on_the_worked_solution_only(tmp_path):
    task = train_teacher.TASKS["column_addition"]
    documents = train_teacher.column_addition_documents(count=40)
    corpus = tmp_path / "corpus.jsonl"
    train_teacher.write_corpus(task, documents, corpus)
    config = train_teacher.ce_config(task, tmp_path / "run", corpus, steps=1, model=task.teacher_model)
    config.data.update(num_epochs=1, shuffle=False, read_threads=1)
    batches = list(make_pipeline(config.data, seq_len=task.seq_len, batch_size=8, seed=0, process_index=0,
                                 process_count=1))
    tokenizer = load_tokenizer(task.directory / "tokenizer.json")
    trained = sorted(tokenizer.decode([int(token) for token, mask in zip(targets, masks) if mask == 1
                                       and token != tokenizer.eos_id])
                     for batch in batches for targets, masks in zip(batch["targets"], batch["loss_mask"]))
    assert trained == sorted(completion for _, completion in documents)
