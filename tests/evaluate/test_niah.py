"""Needle in a haystack: the needle sits once at its depth, the scorer is exact, cases follow the seed, bad lengths
stop the command, and the CLI's greedy completions are the model's."""

import json

import jax
import numpy as np
import pytest

from jaxopd.evaluate import __main__ as cli
from jaxopd.evaluate.inputs import checkpoint_tokenizer, token_stream
from jaxopd.data.retrieval import place_needles
from jaxopd.evaluate.niah import ANSWER_TOKENS, check_lengths, make_cases, score_completion, score_grid

CORPUS = "data/corpus/python_stdlib.jsonl.gz"


@pytest.fixture(scope="module")
def tokenizer():
    return checkpoint_tokenizer("unused", "data/tokenizer.model")


@pytest.fixture(scope="module")
def corpus_ids(tokenizer):
    return token_stream(tokenizer, CORPUS, 2048)


def occurrences(tokens, pattern):
    """Start of every occurrence of `pattern` in `tokens`, by brute force."""
    return [i for i in range(len(tokens) - len(pattern) + 1) if tokens[i:i + len(pattern)] == list(pattern)]


def test_place_needle_at_depth_fraction_of_the_filler():
    filler, needle, question = list(range(100, 110)), [1, 2], [7, 8, 9]
    for depth, before in ((0.0, 0), (0.26, 3), (0.5, 5), (1.0, 10)):
        tokens, starts = place_needles(filler, [needle], question, [depth], prefix_ids=[0])
        assert starts == [1 + before]
        assert tokens == [0] + filler[:before] + needle + filler[before:] + question
    with pytest.raises(ValueError, match=r"depth=1.5 must lie in \[0, 1\]"):
        place_needles(filler, [needle], question, [1.5])


def test_every_case_holds_its_needle_once_at_the_requested_depth(tokenizer, corpus_ids):
    lengths, depths = [300, 1024], [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]
    cases = make_cases(tokenizer, corpus_ids, lengths, depths, samples=2, seed=3)
    assert [(c.length, c.depth, c.sample) for c in cases] == [(l, d, s) for l in lengths for d in depths
                                                                for s in range(2)]
    for case in cases:
        needle_ids, question_ids = tokenizer.encode(case.needle.statement), tokenizer.encode(case.needle.question)
        assert len(case.tokens) == case.length - ANSWER_TOKENS
        body = case.length - ANSWER_TOKENS - 1 - len(needle_ids) - len(question_ids)
        assert case.needle_start == 1 + round(case.depth * body)
        assert occurrences(case.tokens, needle_ids) == [case.needle_start]
        assert case.tokens[0] == tokenizer.bos_id and case.tokens[-len(question_ids):] == question_ids
        # The filler around the needle is one unbroken window of the corpus.
        filler = case.tokens[1:case.needle_start] + case.tokens[case.needle_start + len(needle_ids):-len(question_ids)]
        assert len(filler) == body and occurrences(corpus_ids, filler)
        text = tokenizer.decode(case.tokens)
        assert text.count(case.needle.key) == 1 and text.count(f"secret key for {case.needle.name} is") == 2
        assert len(case.needle.key) == 6 and case.needle.key.isdigit()


def test_cases_follow_the_seed_and_not_the_other_cells(tokenizer, corpus_ids):
    first = make_cases(tokenizer, corpus_ids, [300, 600], [0.0, 0.5], samples=3, seed=0)
    assert first == make_cases(tokenizer, corpus_ids, [300, 600], [0.0, 0.5], samples=3, seed=0)
    other = make_cases(tokenizer, corpus_ids, [300, 600], [0.0, 0.5], samples=3, seed=1)
    assert [c.needle for c in first] != [c.needle for c in other] and [c.tokens for c in first] != [
        c.tokens for c in other]
    assert make_cases(tokenizer, corpus_ids, [600], [0.5], samples=3, seed=0) == first[-3:]


@pytest.mark.parametrize("completion, score", [
    (" 123456.", 1.0), ("123456", 1.0), (" 123456\nThe secret key for Bob is 999999.", 1.0),
    (" 1234567.", 0.0), (" 12345.", 0.0), (" 023456", 0.0), (" 12 3456", 0.0), (" unknown", 0.0), ("", 0.0),
    (" 654321, not 123456", 0.0)])
def test_score_is_exact_on_the_first_digits(completion, score):
    assert score_completion(completion, "123456") == score


def test_score_grid_averages_each_cell():
    records = [{"length": 8, "depth": 0.0, "score": 1.0}, {"length": 8, "depth": 0.0, "score": 0.0},
               {"length": 8, "depth": 1.0, "score": 1.0}, {"length": 16, "depth": 0.0, "score": 0.0},
               {"length": 16, "depth": 1.0, "score": 1.0}]
    assert score_grid(records, [8, 16], [0.0, 1.0]) == [[0.5, 0.0], [1.0, 1.0]]


def test_a_needle_that_does_not_fit_is_an_error_naming_it(tokenizer, corpus_ids):
    with pytest.raises(ValueError, match=r"length 40: the needle 'The secret key for \w+ is \d{6}\.' \(\d+ tokens\)"
                                         r".*use lengths of at least \d+"):
        make_cases(tokenizer, corpus_ids, [40], [0.5], samples=1, seed=0)
    with pytest.raises(ValueError, match="needs .* filler tokens but the text has only 50"):
        make_cases(tokenizer, corpus_ids[:50], [300], [0.5], samples=1, seed=0)


def test_lengths_past_the_window_need_the_flag():
    with pytest.raises(ValueError, match=r"\[512\] exceed the model's max_position_embeddings=256.*"
                                         "--allow_beyond_window"):
        check_lengths([128, 256, 512], 256, allow_beyond_window=False)
    check_lengths([128, 256, 512], 256, allow_beyond_window=True)


def greedy_reference(model, params, prompt, steps):
    """Greedy tokens by full forward passes (no cache), and each step's top-2 logit margin. The row is padded to a
    fixed width (one compilation): attention is causal, so the padding after the last token changes nothing."""
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens)[0])
    tokens, margins = list(prompt), []
    for _ in range(steps):
        row = np.zeros((1, len(prompt) + steps), np.int32)
        row[0, :len(tokens)] = tokens
        logits = np.asarray(forward(row)[len(tokens) - 1], np.float64)
        top = np.sort(logits)[-2:]
        tokens.append(int(logits.argmax()))
        margins.append(top[1] - top[0])
    return tokens[len(prompt):], margins


def test_cli_writes_the_grid_and_the_model_greedy_answers(tiny_run, tmp_path, tokenizer, capsys):
    workdir, model, params = tiny_run
    argv = ["niah", f"--checkpoint={workdir}", "--lengths=128,256", "--depths=0,0.5,1", "--batch_size=4"]
    cli.main(argv + [f"--output_dir={tmp_path / 'a'}"])
    result = json.loads((tmp_path / "a" / "niah.json").read_text())
    assert (tmp_path / "a" / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["lengths"] == [128, 256] and result["depths"] == [0.0, 0.5, 1.0]
    assert result["max_position_embeddings"] == 256 and len(result["cases"]) == 6
    for record in result["cases"]:
        assert record["score"] == score_completion(record["completion"], record["key"])
        assert tokenizer.decode(record["completion_ids"]) == record["completion"]
    assert result["scores"] == score_grid(result["cases"], [128, 256], [0.0, 0.5, 1.0])
    # The completions are the model's greedy continuation of the prompt the seed makes.
    stream = token_stream(tokenizer, CORPUS, 256)
    for case, record in zip(make_cases(tokenizer, stream, [128, 256], [0.0, 0.5, 1.0], 1, 0), result["cases"]):
        assert (case.needle.key, case.needle_start) == (record["key"], record["needle_start"])
        reference, margins = greedy_reference(model, params, case.tokens, len(record["completion_ids"]))
        clear = next((i for i, margin in enumerate(margins) if margin < 1e-4), len(margins))  # ties may go either way
        assert record["completion_ids"][:clear] == reference[:clear] and clear >= 1
    # Reproducible: the same command again writes the same file.
    cli.main(argv + [f"--output_dir={tmp_path / 'b'}"])
    assert (tmp_path / "b" / "niah.json").read_text() == (tmp_path / "a" / "niah.json").read_text()


def test_cli_stops_on_lengths_past_the_window_before_generating(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match=r"error: --lengths \[512\] exceed .*max_position_embeddings=256"):
        cli.main(["niah", f"--checkpoint={tiny_run[0]}", "--lengths=256,512", f"--output_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=r"error: length 32: the needle .* use lengths of at least"):
        cli.main(["niah", f"--checkpoint={tiny_run[0]}", "--lengths=32", f"--output_dir={tmp_path}"])
    assert not (tmp_path / "niah.json").exists()
