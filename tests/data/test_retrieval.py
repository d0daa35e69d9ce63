"""Retrieval training documents: the evaluator's needle format read back from the text by regular expression, the same
documents for the same seed, the mix weight honoured by count, whole documents in every row, clear config errors."""

import re

import numpy as np
import pytest

from jaxopd.data.pipeline import make_pipeline
from jaxopd.data.retrieval import NAMES, RetrievalDocuments, place_needles
from jaxopd.evaluate.inputs import token_stream
from jaxopd.evaluate.niah import make_cases, score_completion
from tests.data.conftest import BUNDLED_CORPUS, data_config, write_jsonl

FACT = re.compile(r"\nThe secret key for (\w+) is (\d{6})\.\n")
QUESTION_AND_ANSWER = re.compile(r"\n\nWhat is the secret key for (\w+)\? The secret key for \1 is( (\d{6})\.)$")


@pytest.fixture(scope="module")
def corpus():
    return [f"def f{i}(x):\n    return x + {i}  # filler line {i}\n" * (5 + i % 7) for i in range(30)]


def documents(tokenizer, corpus, **overrides):
    settings = dict(seq_len=256, min_tokens=120, max_facts=3, seed=0)
    return RetrievalDocuments(tokenizer, corpus, **{**settings, **overrides})


def read_back(tokenizer, tokens):
    """(facts {name: key}, asked name, answer text) from a document's text, with BOS and EOS checked."""
    assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
    text = tokenizer.decode(tokens[1:-1])
    ending = QUESTION_AND_ANSWER.search(text)
    assert ending is not None, text[-200:]
    facts = dict(FACT.findall(text[:ending.start()]))
    assert len(facts) == len(FACT.findall(text[:ending.start()]))  # names are distinct
    return facts, ending.group(1), ending.group(2), ending.group(3)


def test_a_document_is_an_evaluation_prompt_and_its_answer(tokenizer, corpus):
    source = documents(tokenizer, corpus)
    counts = set()
    for index in range(40):
        document = source[index]
        facts, asked, answer, key = read_back(tokenizer, document["tokens"].tolist())
        assert 1 <= len(facts) <= 3 and set(facts) <= set(NAMES)
        counts.add(len(facts))
        assert facts[asked] == key and score_completion(answer, key) == 1.0
        assert 120 <= len(document["tokens"]) <= 256
        assert document["retrieval"] and not document["fim"]
    assert counts == {1, 2, 3}
    # The evaluator's prompt is the same text up to the answer: one fact, then the question it asks.
    case, = make_cases(tokenizer, token_stream(tokenizer, str(BUNDLED_CORPUS), 512), [300], [0.5], 1, seed=0)
    facts, asked, _, _ = read_back(tokenizer, case.tokens + tokenizer.encode(case.needle.answer)
                                   + [tokenizer.eos_id])
    assert facts == {case.needle.name: case.needle.key} and asked == case.needle.name


def test_needles_go_in_at_their_depths_in_order():
    filler, needles, question = list(range(100, 110)), [[1], [2, 2], [3]], [9]
    tokens, starts = place_needles(filler, needles, question, [0.5, 0.0, 0.5], prefix_ids=[0])
    assert tokens == [0, 2, 2, *range(100, 105), 1, 3, *range(105, 110), 9]
    assert [tokens[start:start + len(needle)] for start, needle in zip(starts, needles)] == needles
    with pytest.raises(ValueError, match="2 needles but 1 depths"):
        place_needles(filler, needles[:2], question, [0.5])


def test_documents_follow_the_seed_alone(tokenizer, corpus):
    first = documents(tokenizer, corpus)
    picks = [7, 0, 3, 7]
    again = [documents(tokenizer, corpus)[index]["tokens"].tolist() for index in picks]
    assert again == [first[index]["tokens"].tolist() for index in picks]
    assert first[1]["tokens"].tolist() != first[2]["tokens"].tolist()
    assert documents(tokenizer, corpus, seed=1)[7]["tokens"].tolist() != again[0]
    assert documents(tokenizer, corpus, stream=1)[7]["tokens"].tolist() != again[0]


def test_lengths_and_depths_span_the_row(tokenizer, corpus):
    source = documents(tokenizer, corpus)
    lengths, depths = [], []
    for index in range(150):
        tokens = source[index]["tokens"].tolist()
        facts, asked, _, key = read_back(tokenizer, tokens)
        lengths.append(len(tokens))
        text = tokenizer.decode(tokens[1:-1])
        depths.append(text.index(f"for {asked} is {key}.") / text.rindex("\n\nWhat is"))
    assert min(lengths) < 135 and max(lengths) > 240
    assert min(depths) < 0.1 and max(depths) > 0.9


def test_the_mix_weight_is_honoured_by_count_and_eval_stays_corpus(tmp_path, tokenizer):
    # Short corpus documents, so that a few batches read many documents of both kinds.
    texts = [f"x{i} = {i} * {i}  # line {i} of a short document\n" * 2 for i in range(80)]
    config = data_config(write_jsonl(tmp_path / "short.jsonl", texts), retrieval_weight=0.25, eval_fraction=0.1,
                         packing_buffer=64)
    iterator = make_pipeline(config, seq_len=256, batch_size=4, seed=0)
    for _ in range(3):
        next(iterator)
    stats = iterator.stats
    assert stats["documents_read"] > 40
    assert abs(stats["documents_retrieval"] - 0.25 * stats["documents_read"]) <= 1
    assert 0 < stats["tokens_retrieval"] < stats["tokens_read"]
    evaluation = make_pipeline(config, seq_len=256, batch_size=4, seed=0, split="eval", num_batches=2)
    list(evaluation)
    assert evaluation.stats["documents_read"] > 0 and evaluation.stats["documents_retrieval"] == 0


def test_every_retrieval_document_reaches_a_row_whole(tokenizer):
    config = data_config(BUNDLED_CORPUS, retrieval_weight=1.0, packing_buffer=64)
    iterator = make_pipeline(config, seq_len=256, batch_size=8, seed=0)
    segments = 0
    for _ in range(4):
        batch = next(iterator)
        for tokens, targets, segment_ids in zip(batch["tokens"], batch["targets"], batch["segment_ids"]):
            for segment in range(1, segment_ids.max() + 1):
                where = np.flatnonzero(segment_ids == segment)
                read_back(tokenizer, [*tokens[where].tolist(), int(targets[where[-1]])])
                segments += 1
    assert segments > 0 and iterator.packing_stats["documents_cut"] == 0
    assert iterator.stats["documents_retrieval"] == iterator.stats["documents_read"]


@pytest.mark.parametrize("overrides, message", [
    (dict(retrieval_weight=1.5), r"data.retrieval_weight=1.5 must be in \[0, 1\]"),
    (dict(retrieval_weight=0.5, retrieval_min_tokens=20), r"data.retrieval_min_tokens=20 must lie in \[\d+, "),
    (dict(retrieval_weight=0.5, retrieval_min_tokens=300), r"data.retrieval_min_tokens=300 .*seq_len=256"),
    (dict(retrieval_weight=0.5, retrieval_max_facts=0), r"data.retrieval_max_facts=0 must lie in \[1, 20\]"),
])
def test_bad_retrieval_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_pipeline(data_config(BUNDLED_CORPUS, **overrides), seq_len=256, batch_size=2, seed=0)
