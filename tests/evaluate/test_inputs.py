"""Lengths as typed, the tokenizer a checkpoint names, the token stream, and the lazy matplotlib import."""

import shutil
import sys

import pytest

from jaxopd.data.tokenizer import SentencePieceTokenizer
from jaxopd.evaluate import figures
from jaxopd.evaluate.inputs import GENERATED_FILLER, checkpoint_tokenizer, parse_lengths, run_config, token_stream


def test_parse_lengths_reads_k_as_1024():
    assert parse_lengths("1k,2k,300,1.5k") == [1024, 2048, 300, 1536]
    for bad in ("1k,,2k", "abc", "0", "0.3k"):
        with pytest.raises(ValueError, match="--lengths item"):
            parse_lengths(bad)


def test_a_run_workdir_names_its_tokenizer_and_seq_len(tiny_run):
    workdir = tiny_run[0]
    for path in (workdir, workdir / "checkpoints"):
        tokenizer = checkpoint_tokenizer(path)
        assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.vocab_size == 4096
        assert run_config(path)["seq_len"] == 128


def test_a_checkpoint_away_from_its_workdir_asks_for_the_tokenizer_flag(tiny_run, tmp_path):
    path = shutil.copytree(tiny_run[0] / "checkpoints", tmp_path / "moved")
    with pytest.raises(ValueError, match="pass --tokenizer"):
        checkpoint_tokenizer(path)
    assert checkpoint_tokenizer(path, "data/tokenizer.model").vocab_size == 4096


def test_a_hugging_face_checkpoint_brings_its_tokenizer(hf_checkpoint):
    tokenizer = checkpoint_tokenizer(hf_checkpoint)
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id) == (512, 1, 0)
    assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    with pytest.raises(ValueError, match="without tokenizer.json; pass --tokenizer"):
        checkpoint_tokenizer(shutil.copytree(hf_checkpoint, hf_checkpoint.parent / "no_tokenizer",
                                             ignore=shutil.ignore_patterns("tokenizer.json")))


def test_token_stream_from_the_corpus_and_generated():
    tokenizer = checkpoint_tokenizer("unused", "data/tokenizer.model")
    corpus = token_stream(tokenizer, "data/corpus/python_stdlib.jsonl.gz", 1000)
    assert len(corpus) >= 4000 and "def " in tokenizer.decode(corpus)
    generated = token_stream(tokenizer, "generated", 1000)
    assert len(generated) >= 1000 and tokenizer.decode(generated).startswith(GENERATED_FILLER * 3)
    with pytest.raises(ValueError, match="do not exist"):
        token_stream(tokenizer, "no/such/file.jsonl", 10)


def test_missing_matplotlib_is_an_import_error_with_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"pip install matplotlib \(or 'jaxopd\[eval\]'\)"):
        figures.pyplot()
